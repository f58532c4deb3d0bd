"""Shared pieces of the ``ai.sige`` op set.

Attribute specs and validation, the canonical overload name, input validation (ranks, channels,
index ranges), the numpy pre-op / gather helpers used by the references, and a small builder for
the ONNX function bodies (standard ONNX ops only, opset 18) including the pre-op/activation body
and the index arithmetic shared by every gathering op.  Op files only hold what is specific to
one op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.reference.op_run import OpRun

DOMAIN = "ai.sige"
OPSET_VERSION = 1
ONNX_OPSET = 18
IR_VERSION = 10

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "sigmoid", "tanh", "gelu")
ACTIVATION_ALIASES = {"swish": "silu"}

Shape = tuple[int | str, ...]  # a shape with symbolic dims allowed


# ----------------------------------------------------------------------------------------------
# Attribute specs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttrSpec:
    """One attribute: kind is 'pair' (2 ints), 'int', 'float' or 'string'; default None = required."""

    name: str
    kind: str
    default: Any = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None
    overload_default: bool = True  # False: left out of the overload name at its default (older names stay)


def _positive_pair(v: Any) -> str | None:
    return None if all(x >= 1 for x in v) else "must be positive"


def _nonneg_pair(v: Any) -> str | None:
    return None if all(x >= 0 for x in v) else "must be non-negative"


def _stride_1_2(v: Any) -> str | None:
    return None if all(x in (1, 2) for x in v) else "must be 1 or 2 (see docs/sige-ops.md)"


def _positive(v: Any) -> str | None:
    return None if v >= 1 else "must be >= 1"


def _zero_one(v: Any) -> str | None:
    return None if v in (0, 1) else "must be 0 or 1"


def _activation(v: Any) -> str | None:
    return None if v in ACTIVATIONS else f"must be one of {', '.join(ACTIVATIONS)} (or alias swish)"


BLOCK = AttrSpec("block", "pair", None, _positive_pair)
GROUPS = AttrSpec("groups", "int", None, _positive)
PRE_ATTRS = (
    AttrSpec("activation", "string", "identity", _activation),
    AttrSpec("alpha", "float", 0.2),
    AttrSpec("activation_first", "int", 0, _zero_one),
)


# The gathered frame is x resized (nearest, ONNX "asymmetric" + floor): frame[r] = x[r * downsample // upsample]
RESAMPLE = (
    AttrSpec("upsample", "pair", (1, 1), _positive_pair, overload_default=False),
    AttrSpec("downsample", "pair", (1, 1), _positive_pair, overload_default=False),
)


PADDING_MODES = ("zeros", "reflect", "edge")


def _padding_mode(v: Any) -> str | None:
    return None if v in PADDING_MODES else f"must be one of {', '.join(PADDING_MODES)}"


# What the gathered frame holds outside the image: 0 after the pre-ops, its mirror image without repeating the
# border (ONNX Pad "reflect"), or the border value (ONNX Pad "edge").
PADDING = AttrSpec("padding_mode", "string", "zeros", _padding_mode, overload_default=False)


def scatter_attrs(prefix: str = "") -> tuple[AttrSpec, ...]:
    """``offset``/``stride`` (optionally prefixed, e.g. ``shortcut_``)."""
    return (
        AttrSpec(prefix + "offset", "pair", (0, 0), _nonneg_pair),
        AttrSpec(prefix + "stride", "pair", (1, 1), _positive_pair),
    )


def _normalise_value(op_type: str, spec: AttrSpec, value: Any) -> Any:
    where = f"{op_type}: attribute {spec.name!r}"
    if spec.kind == "pair":
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = (int(value), int(value))
        try:
            seq = [v for v in value]
        except TypeError:
            raise ValueError(f"{where} must be a pair of ints, got {value!r}") from None
        if len(seq) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in seq):
            raise ValueError(f"{where} must be a pair of ints, got {value!r}")
        value = (int(seq[0]), int(seq[1]))
    elif spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{where} must be an int, got {value!r}")
        value = int(value)
    elif spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{where} must be a float, got {value!r}")
        value = float(np.float32(value))  # what an ONNX FLOAT attribute holds
        if not math.isfinite(value):
            raise ValueError(f"{where} must be finite, got {value!r}")
    elif spec.kind == "string":
        if isinstance(value, bytes):
            value = value.decode()
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        value = ACTIVATION_ALIASES.get(value, value)
    if spec.check is not None:
        err = spec.check(value)
        if err:
            raise ValueError(f"{where} {err}, got {value!r}")
    return value


def normalise_attrs(op_type: str, specs: Sequence[AttrSpec], attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``attrs`` against ``specs``, fill defaults; ValueError naming unknown/bad/missing ones."""
    known = {s.name for s in specs}
    unknown = sorted(set(attrs) - known)
    if unknown:
        raise ValueError(f"{op_type}: unknown attribute(s) {unknown}; expected {sorted(known)}")
    out: dict[str, Any] = {}
    for spec in specs:
        value = attrs.get(spec.name)
        if value is None:
            if spec.default is None:
                raise ValueError(f"{op_type}: missing required attribute {spec.name!r}")
            value = spec.default
        out[spec.name] = _normalise_value(op_type, spec, value)
    return out


def attrs_from_node(node: onnx.NodeProto) -> dict[str, Any]:
    """Python values of a node's attributes (ints lists as tuples, strings decoded)."""
    out: dict[str, Any] = {}
    for att in node.attribute:
        v = helper.get_attribute_value(att)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list):
            v = tuple(v)
        out[att.name] = v
    return out


def _fmt_float(v: float) -> str:
    return format(v, ".9g")


def overload_name(
    specs: Sequence[AttrSpec], attrs: Mapping[str, Any], optional_present: Sequence[str]
) -> str:
    """Canonical overload string: body-relevant attribute values + present optional inputs.

    ``alpha`` only counts for ``leaky_relu``; ``activation_first`` only when it changes the body
    (an activation other than identity and a scale or shift present).
    """
    parts: list[str] = []
    has_affine = any(n in ("scale", "shift") for n in optional_present)
    for spec in specs:
        v = attrs[spec.name]
        if spec.name == "alpha" and attrs.get("activation") != "leaky_relu":
            continue
        if spec.name == "activation_first" and (attrs.get("activation") == "identity" or not has_affine):
            continue
        if not spec.overload_default and v == spec.default:
            continue
        if spec.kind == "pair":
            s = f"{v[0]}x{v[1]}"
        elif spec.kind == "float":
            s = _fmt_float(v)
        else:
            s = str(v)
        parts.append(f"{spec.name}={s}")
    parts.append("in=" + ("+".join(optional_present) if optional_present else "-"))
    return ";".join(parts)


# ----------------------------------------------------------------------------------------------
# Op definitions (filled by each op module)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpDef:
    """Everything the public API needs to know about one op."""

    op_type: str
    inputs: tuple[str, ...]
    n_required: int
    attrs: tuple[AttrSpec, ...]
    validate: Callable[[list[np.ndarray | None], dict[str, Any]], None]
    compute: Callable[..., np.ndarray]  # (arrays..., **attrs) -> output, arrays already validated
    body: Callable[["Body", list[str | None], dict[str, Any]], str]  # returns output name
    shape: Callable[[list[Shape | None], dict[str, Any]], list[Shape]]
    doc: str = ""
    outputs: tuple[str, ...] = field(default=("y",))

    def optional_names(self) -> tuple[str, ...]:
        return self.inputs[self.n_required:]


REGISTRY: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    REGISTRY[op.op_type] = op
    return op


class SigeOpRun(OpRun):
    """Base of the ``onnx.reference`` classes: ``_run`` normalises the attributes (defaults filled),
    validates the inputs and calls the op's vectorised numpy reference.  Subclasses are named
    after the op type and set ``op_def``."""

    op_domain = DOMAIN
    op_def: ClassVar[OpDef]

    def _run(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray]:  # type: ignore[override]
        op = self.op_def
        arrays: list[np.ndarray | None] = [None if a is None else np.asarray(a) for a in args]
        arrays += [None] * (len(op.inputs) - len(arrays))
        attrs = normalise_attrs(op.op_type, op.attrs, kwargs)
        op.validate(arrays, attrs)
        return (op.compute(*arrays, **attrs),)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------
def fail(op_type: str, msg: str) -> None:
    raise ValueError(f"{op_type}: {msg}")


def check_array(op_type: str, name: str, a: np.ndarray | None, rank: int | None = None,
                dtype: Any = None) -> None:
    if a is None:
        fail(op_type, f"input {name!r} is required")
    if rank is not None and a.ndim != rank:
        fail(op_type, f"input {name!r} must have rank {rank}, got rank {a.ndim} (shape {a.shape})")
    if dtype is not None and a.dtype != dtype:
        fail(op_type, f"input {name!r} must be {np.dtype(dtype).name}, got {a.dtype.name}")


def check_float_arrays(op_type: str, *specs: tuple[str, np.ndarray | None, int]) -> None:
    """Each ``(name, array, rank)``: present, of that rank, floating point."""
    for name, a, rank in specs:
        check_array(op_type, name, a, rank)
        assert a is not None
        check_float(op_type, name, a)


def check_group_mean(op_type: str, name: str, x: np.ndarray, mean: np.ndarray, groups: int) -> None:
    """``name`` [B, C, ...] splits into ``groups`` channel groups and ``mean`` is their [B, groups, 1]."""
    b, c = x.shape[:2]
    if c % groups:
        fail(op_type, f"{name} has {c} channels, not a multiple of groups={groups}")
    if mean.shape != (b, groups, 1):
        fail(op_type, f"mean must have shape [B, groups, 1] = {[b, groups, 1]}, got {list(mean.shape)}")


def check_float(op_type: str, name: str, a: np.ndarray) -> None:
    if not np.issubdtype(a.dtype, np.floating):
        fail(op_type, f"input {name!r} must be a float tensor, got {a.dtype.name}")


def check_indices(op_type: str, indices: np.ndarray | None, name: str = "indices") -> None:
    """int32 ``[N, 2]``."""
    check_array(op_type, name, indices)
    assert indices is not None
    if indices.dtype != np.int32:
        fail(op_type, f"{name} must be int32, got {indices.dtype.name}")
    if indices.ndim != 2 or indices.shape[1] != 2:
        fail(op_type, f"{name} must have shape [N, 2], got {list(indices.shape)}")


def check_gather_range(op_type: str, indices: np.ndarray, hw: tuple[int, int], block: tuple[int, int],
                       name: str = "indices") -> None:
    """Each block must overlap the image: ``-bh < h < H`` and ``-bw < w < W``."""
    if indices.shape[0] == 0:
        return
    lo = -np.asarray(block)
    hi = np.asarray(hw)
    bad = np.any((indices <= lo) | (indices >= hi), axis=1)
    if bad.any():
        n = int(np.argmax(bad))
        fail(op_type, f"{name}[{n}] = {indices[n].tolist()} is outside the image plus halo: a block "
                      f"{list(block)} at it does not overlap the {hw[0]}x{hw[1]} image "
                      f"(need {-block[0]} < h < {hw[0]} and {-block[1]} < w < {hw[1]})")


def resampled(attrs: Mapping[str, Any]) -> bool:
    return tuple(attrs.get("upsample", (1, 1))) != (1, 1) or tuple(attrs.get("downsample", (1, 1))) != (1, 1)


def frame_hw(op_type: str, hw: Sequence[int], attrs: Mapping[str, Any]) -> tuple[int, int]:
    """The gathered frame ``H * upsample / downsample`` (per axis); an error unless it divides exactly."""
    up, down = attrs.get("upsample", (1, 1)), attrs.get("downsample", (1, 1))
    out = []
    for axis, n, u, d in zip("HW", hw, up, down):
        if (int(n) * u) % d:
            fail(op_type, f"x's {axis} = {n} times upsample {u} is not divisible by downsample {d}")
        out.append(int(n) * u // d)
    return out[0], out[1]


def check_resample_params(op_type: str, x: np.ndarray, scale: np.ndarray | None, shift: np.ndarray | None,
                          attrs: Mapping[str, Any]) -> None:
    """With a resampled frame, scale/shift broadcast per channel (no spatial extent)."""
    if not resampled(attrs):
        return
    for name, p in (("scale", scale), ("shift", shift)):
        if p is not None and (1, 1, *p.shape)[-2:] != (1, 1):
            fail(op_type, f"{name} of shape {list(p.shape)} has a spatial extent; with upsample/downsample it must "
                          f"broadcast per channel ([C, 1, 1] or [B, C, 1, 1])")


def np_resample(x: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """The frame of ``x`` (nearest resize by upsample / downsample)."""
    if not resampled(attrs):
        return x
    (uh, uw), (dh, dw) = attrs["upsample"], attrs["downsample"]
    hf, wf = frame_hw("resample", x.shape[2:], attrs)
    rows = np.arange(hf) * dh // uh
    cols = np.arange(wf) * dw // uw
    return x[:, :, rows[:, None], cols[None, :]]


def scatter_origins(indices: np.ndarray, offset: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """Top-left ``(r0, c0)`` in the output of each block: ``(h + offset) // stride``."""
    return (indices.astype(np.int64) + np.asarray(offset)) // np.asarray(stride)


def check_scatter_range(op_type: str, indices: np.ndarray, offset: Sequence[int], stride: Sequence[int],
                        out_hw: tuple[int, int], block: tuple[int, int], name: str = "indices") -> None:
    """Each scattered block must overlap the output ``[Ho, Wo]``."""
    if indices.shape[0] == 0:
        return
    org = scatter_origins(indices, offset, stride)
    bad = np.any((org <= -np.asarray(block)) | (org >= np.asarray(out_hw)), axis=1)
    if bad.any():
        n = int(np.argmax(bad))
        fail(op_type, f"{name}[{n}] = {indices[n].tolist()} is outside the image plus halo: with offset "
                      f"{list(offset)} and stride {list(stride)} its {block[0]}x{block[1]} block lands at "
                      f"{org[n].tolist()}, which does not overlap the {out_hw[0]}x{out_hw[1]} output")


def check_broadcast(op_type: str, name: str, a: np.ndarray | None, target: tuple[int, ...]) -> None:
    """``a`` broadcasts (numpy rules) to exactly ``target``."""
    if a is None:
        return
    check_float(op_type, name, a)
    ok = a.ndim <= len(target) and all(
        s in (1, t) for s, t in zip(a.shape[::-1], target[::-1])
    )
    if not ok:
        fail(op_type, f"{name} of shape {list(a.shape)} is not broadcastable to the input shape {list(target)} "
                      f"(channel or spatial mismatch)")


def check_blocks_vs_base(op_type: str, blocks: np.ndarray, base: np.ndarray, n: int,
                         names: tuple[str, str] = ("blocks", "base")) -> None:
    check_array(op_type, names[0], blocks, 4)
    check_array(op_type, names[1], base, 4)
    check_float(op_type, names[0], blocks)
    check_float(op_type, names[1], base)
    if blocks.shape[1] != base.shape[1]:
        fail(op_type, f"channel mismatch: {names[0]} have {blocks.shape[1]} channels, "
                      f"{names[1]} has {base.shape[1]}")
    if blocks.shape[0] != base.shape[0] * n:
        fail(op_type, f"{names[0]} batch {blocks.shape[0]} != {names[1]} batch {base.shape[0]} * "
                      f"number of indices {n}")


# ----------------------------------------------------------------------------------------------
# numpy reference helpers
# ----------------------------------------------------------------------------------------------
def _erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf (Numerical Recipes erfc Chebyshev fit, fractional error < 1.2e-7), float64."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def np_activation(x: np.ndarray, activation: str, alpha: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    if activation == "identity":
        y = x64
    elif activation == "relu":
        y = np.maximum(x64, 0.0)
    elif activation == "leaky_relu":
        y = np.where(x64 >= 0, x64, alpha * x64)
    elif activation == "silu":
        y = x64 / (1.0 + np.exp(-x64))
    elif activation == "sigmoid":
        y = 1.0 / (1.0 + np.exp(-x64))
    elif activation == "tanh":
        y = np.tanh(x64)
    elif activation == "gelu":
        y = 0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))
    else:  # pragma: no cover - attributes are validated
        raise ValueError(f"unknown activation {activation!r}")
    return y.astype(x.dtype)


def np_pre(x: np.ndarray, scale: np.ndarray | None, shift: np.ndarray | None, activation: str,
           alpha: float, activation_first: int) -> np.ndarray:
    """``act(x*scale+shift)`` or ``act(x)*scale+shift`` (full tensor, broadcasting)."""
    def affine(v: np.ndarray) -> np.ndarray:
        if scale is not None:
            v = v * scale
        if shift is not None:
            v = v + shift
        return v

    if activation_first:
        y = affine(np_activation(x, activation, alpha))
    else:
        y = np_activation(affine(x), activation, alpha)
    return np.asarray(y, dtype=x.dtype)


def padded_position(r: np.ndarray, n: int, padding_mode: str) -> np.ndarray:
    """Where position ``r`` of an axis of length ``n`` reads under ``padding_mode`` (reflect: one mirror image,
    ``-r`` before the start, ``2(n-1) - r`` after the end; edge: the nearest border), clamped to ``[0, n)``
    (positions further out than one image feed only outputs outside the image)."""
    if padding_mode == "reflect":
        r = (n - 1) - np.abs((n - 1) - np.abs(r))
    return np.clip(r, 0, n - 1)


def np_gather_blocks(x: np.ndarray, indices: np.ndarray, block: Sequence[int],
                     padding_mode: str = "zeros") -> np.ndarray:
    """``y[b*N+n, c, i, j] = x[b, c, h_n+i, w_n+j]`` inside the image, else 0 or, with ``padding_mode``
    reflect / edge, the value at :func:`padded_position` (fancy indexing)."""
    B, C, H, W = x.shape
    bh, bw = block
    N = indices.shape[0]
    rows = indices[:, 0].astype(np.int64)[:, None, None] + np.arange(bh)[None, :, None]
    cols = indices[:, 1].astype(np.int64)[:, None, None] + np.arange(bw)[None, None, :]
    if padding_mode != "zeros":
        g = x[:, :, padded_position(rows, H, padding_mode), padded_position(cols, W, padding_mode)]
    else:
        pad_h, pad_w = bh - 1, bw - 1
        xp = np.pad(x, ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)))
        g = xp[:, :, rows + pad_h, cols + pad_w]  # [B, C, N, bh, bw]
    return np.ascontiguousarray(g.transpose(0, 2, 1, 3, 4)).reshape(B * N, C, bh, bw)


def np_scatter_blocks(y: np.ndarray, blocks: np.ndarray, indices: np.ndarray, offset: Sequence[int],
                      stride: Sequence[int], residual: np.ndarray | None = None, add: bool = False) -> None:
    """In place: write (or add) ``blocks`` (+ ``residual`` at the same positions) into ``y``, clipped."""
    B, C, Ho, Wo = y.shape
    N = indices.shape[0]
    ph, pw = blocks.shape[2], blocks.shape[3]
    if N == 0:
        return
    org = scatter_origins(indices, offset, stride)
    rows = org[:, 0][:, None, None] + np.arange(ph)[None, :, None]
    cols = org[:, 1][:, None, None] + np.arange(pw)[None, None, :]
    rows, cols = np.broadcast_arrays(rows, cols)  # [N, ph, pw]
    valid = (rows >= 0) & (rows < Ho) & (cols >= 0) & (cols < Wo)
    r, c = rows[valid], cols[valid]  # [M]
    vals = blocks.reshape(B, N, C, ph, pw).transpose(0, 2, 1, 3, 4)[:, :, valid]  # [B, C, M]
    if residual is not None:
        vals = vals + residual[:, :, r, c]
    if add:
        y[:, :, r, c] += vals  # no duplicates: blocks of one grid do not overlap
    else:
        y[:, :, r, c] = vals


# ----------------------------------------------------------------------------------------------
# Shape inference helpers
# ----------------------------------------------------------------------------------------------
def dim_mul(a: int | str, b: int | str) -> int | str:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if a == 1:
        return b
    if b == 1:
        return a
    return f"{a}*{b}"


def need_rank(op_type: str, name: str, s: Shape | None, rank: int) -> Shape:
    if s is None:
        fail(op_type, f"input {name!r} shape is required for shape inference")
    assert s is not None
    if len(s) != rank:
        fail(op_type, f"input {name!r} must have rank {rank}, got shape {list(s)}")
    return tuple(s)


# ----------------------------------------------------------------------------------------------
# Function body builder
# ----------------------------------------------------------------------------------------------
class Body:
    """Accumulates the nodes of a FunctionProto body with unique local names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def fresh(self, hint: str = "t") -> str:
        self._n += 1
        return f"_{hint}{self._n}"

    def op(self, op_type: str, *inputs: str, hint: str | None = None, out: str | None = None,
           **attrs: Any) -> str:
        name = out or self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def ints(self, values: Sequence[int], shape: Sequence[int] | None = None) -> str:
        vals = [int(v) for v in values]
        t = helper.make_tensor("value", TensorProto.INT64, list(shape) if shape is not None else [len(vals)], vals)
        return self.op("Constant", hint="c", value=t)

    def scalar_i64(self, v: int) -> str:
        return self.op("Constant", hint="c", value=helper.make_tensor("value", TensorProto.INT64, [], [int(v)]))

    def scalar_f32(self, v: float) -> str:
        return self.op("Constant", hint="c", value=helper.make_tensor("value", TensorProto.FLOAT, [], [float(v)]))

    def shape(self, x: str, start: int, end: int) -> str:
        return self.op("Shape", x, start=start, end=end)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", x, self.ints(axes))

    def reshape(self, x: str, shape: str) -> str:
        return self.op("Reshape", x, shape, allowzero=1)

    def concat(self, *xs: str) -> str:
        return self.op("Concat", *xs, axis=0)

    def function(self, op_type: str, overload: str, inputs: Sequence[str], output: str,
                 doc: str = "", opset: int = ONNX_OPSET) -> onnx.FunctionProto:
        return helper.make_function(
            DOMAIN, op_type, list(inputs), [output], self.nodes,
            opset_imports=[helper.make_opsetid("", opset)], attributes=[], doc_string=doc,
            overload=overload,
        )


def body_activation(bd: Body, v: str, activation: str, alpha: float) -> str:
    if activation == "identity":
        return v
    if activation == "relu":
        return bd.op("Relu", v)
    if activation == "leaky_relu":
        return bd.op("LeakyRelu", v, alpha=float(alpha))
    if activation == "silu":
        return bd.op("Mul", v, bd.op("Sigmoid", v))
    if activation == "sigmoid":
        return bd.op("Sigmoid", v)
    if activation == "tanh":
        return bd.op("Tanh", v)
    if activation == "gelu":
        e = bd.op("Erf", bd.op("Mul", v, bd.scalar_f32(1.0 / math.sqrt(2.0))))
        return bd.op("Mul", bd.op("Mul", v, bd.scalar_f32(0.5)), bd.op("Add", e, bd.scalar_f32(1.0)))
    raise ValueError(f"unknown activation {activation!r}")  # pragma: no cover


@dataclass
class GatherPositions:
    """Body tensors describing the gathered positions of ``N`` blocks of ``bh x bw``."""

    rows_c: str  # int64 [N, bh, 1] clamped to [0, H-1] (or reflected)
    cols_c: str  # int64 [N, 1, bw] clamped to [0, W-1] (or reflected)
    flat: str  # int64 [N, bh, bw] = rows_c * W + cols_c
    valid: str | None  # bool [N, bh, bw] inside the image; None: nothing is zeroed (reflect / edge padding)
    n: str  # int64 [1] N


def body_gather_positions(bd: Body, indices: str, like: str, block: Sequence[int],
                          padding_mode: str = "zeros") -> GatherPositions:
    """Index arithmetic for gathering ``block`` windows at ``indices`` from a ``[.., .., H, W]`` tensor."""
    bh, bw = block
    idx = bd.op("Cast", indices, to=TensorProto.INT64)
    zero, one, two = bd.ints([0]), bd.ints([1]), bd.ints([2])
    h = bd.unsqueeze(bd.op("Slice", idx, zero, one, one), [2])  # [N, 1, 1]
    w = bd.unsqueeze(bd.op("Slice", idx, one, two, one), [2])
    rows = bd.op("Add", h, bd.ints(range(bh), [1, bh, 1]))  # [N, bh, 1]
    cols = bd.op("Add", w, bd.ints(range(bw), [1, 1, bw]))  # [N, 1, bw]
    H = bd.shape(like, 2, 3)
    W = bd.shape(like, 3, 4)
    z = bd.scalar_i64(0)
    rv = bd.op("And", bd.op("GreaterOrEqual", rows, z), bd.op("Less", rows, H))
    cv = bd.op("And", bd.op("GreaterOrEqual", cols, z), bd.op("Less", cols, W))
    valid = bd.op("And", rv, cv, hint="valid") if padding_mode == "zeros" else None
    if padding_mode == "reflect":  # (n-1) - |(n-1) - |r||: see padded_position
        rows = bd.op("Sub", bd.op("Sub", H, one), bd.op("Abs", bd.op("Sub", bd.op("Sub", H, one), bd.op("Abs", rows))))
        cols = bd.op("Sub", bd.op("Sub", W, one), bd.op("Abs", bd.op("Sub", bd.op("Sub", W, one), bd.op("Abs", cols))))
    rows_c = bd.op("Max", bd.op("Min", rows, bd.op("Sub", H, one)), z)
    cols_c = bd.op("Max", bd.op("Min", cols, bd.op("Sub", W, one)), z)
    flat = bd.op("Add", bd.op("Mul", rows_c, W), cols_c, hint="flat")
    n = bd.shape(indices, 0, 1)
    return GatherPositions(rows_c, cols_c, flat, valid, n)


def body_resample(bd: Body, x: str, attrs: Mapping[str, Any]) -> str:
    """The frame of ``x``: rows / columns ``r * downsample // upsample`` picked by Gather (exact integer
    arithmetic, unlike a Resize whose float scale 1/3 can round a source row down)."""
    if not resampled(attrs):
        return x
    z, one = bd.scalar_i64(0), bd.scalar_i64(1)
    for axis, u, d in zip((2, 3), attrs["upsample"], attrs["downsample"]):
        n = bd.op("Squeeze", bd.shape(x, axis, axis + 1), bd.ints([0]))
        size = bd.op("Div", bd.op("Mul", n, bd.scalar_i64(u)), bd.scalar_i64(d))
        src = bd.op("Div", bd.op("Mul", bd.op("Range", z, size, one), bd.scalar_i64(d)), bd.scalar_i64(u))
        x = bd.op("Gather", x, src, axis=axis)
    return x


def body_flatten_hw(bd: Body, x: str) -> str:
    """``[B, C, H, W] -> [B, C, H*W]`` (constant ``[0, 0, -1]`` keeps ``B``, ``C`` static)."""
    return bd.op("Reshape", x, bd.ints([0, 0, -1]))


def body_gather_param(bd: Body, p: str, pos: GatherPositions) -> str:
    """A scale/shift broadcastable to ``[B, C, H, W]`` sampled at the gathered positions.

    Returns ``[Bp, Cp, N, bh, bw]`` (``Bp``, ``Cp`` in ``{1, B}``, ``{1, C}``), broadcastable to the
    gathered ``[B, C, N, bh, bw]``, without expanding ``p`` to the full tensor.
    """
    shp4 = bd.op("Slice", bd.concat(bd.ints([1, 1, 1, 1]), bd.op("Shape", p)), bd.ints([-4]),
                 bd.ints([2 ** 62]), bd.ints([0]))
    p4 = bd.reshape(p, shp4)
    one = bd.ints([1])
    hp = bd.op("Slice", shp4, bd.ints([2]), bd.ints([3]), bd.ints([0]))
    wp = bd.op("Slice", shp4, bd.ints([3]), bd.ints([4]), bd.ints([0]))
    flatp = bd.reshape(p4, bd.concat(bd.op("Slice", shp4, bd.ints([0]), bd.ints([2]), bd.ints([0])),
                                     bd.op("Mul", hp, wp)))
    r = bd.op("Min", pos.rows_c, bd.op("Sub", hp, one))
    c = bd.op("Min", pos.cols_c, bd.op("Sub", wp, one))
    return bd.op("Gather", flatp, bd.op("Add", bd.op("Mul", r, wp), c), axis=2)


def body_pre(bd: Body, g: str, scale: str | None, shift: str | None, attrs: Mapping[str, Any]) -> str:
    """Pre-ops on gathered values (scale/shift already gathered)."""
    act, alpha = attrs["activation"], attrs["alpha"]

    def affine(v: str) -> str:
        if scale is not None:
            v = bd.op("Mul", v, scale)
        if shift is not None:
            v = bd.op("Add", v, shift)
        return v

    if attrs["activation_first"]:
        return affine(body_activation(bd, g, act, alpha))
    return body_activation(bd, affine(g), act, alpha)


def body_finish_gather(bd: Body, v: str, pos: GatherPositions, block: Sequence[int], out: str) -> str:
    """Zero outside the image (not with reflect / edge padding), ``[B, C, N, bh, bw] -> [B*N, C, bh, bw]``.

    The merge goes through ``[C, B*N, bh, bw]`` with a constant ``[0, -1, bh, bw]`` shape so onnx
    shape inference keeps ``C``, ``bh``, ``bw`` static without data propagation (``-1`` is never
    ambiguous: ``C*bh*bw > 0`` even when ``N = 0``).
    """
    if pos.valid is not None:
        v = bd.op("Where", pos.valid, v, bd.scalar_f32(0.0))
    v = bd.op("Transpose", v, perm=[1, 0, 2, 3, 4])
    v = bd.op("Reshape", v, bd.ints([0, -1, *block]))
    return bd.op("Transpose", v, perm=[1, 0, 2, 3], out=out)


def body_pre_gather(bd: Body, values: str, pos: GatherPositions, scale: str | None, shift: str | None,
                    attrs: Mapping[str, Any], out: str) -> str:
    """Gathered raw values ``[B, C, N, bh, bw]`` -> pre-ops -> zero outside -> ``[B*N, C, bh, bw]``."""
    s = body_gather_param(bd, scale, pos) if scale is not None else None
    t = body_gather_param(bd, shift, pos) if shift is not None else None
    v = body_pre(bd, values, s, t, attrs)
    return body_finish_gather(bd, v, pos, attrs["block"], out)


def body_floordiv_origins(bd: Body, indices: str, offset: Sequence[int], stride: Sequence[int]) -> str:
    """``(indices + offset) // stride`` (floor, also for negatives) as int64 ``[N, 2]``."""
    k = 2 ** 32  # Div truncates; shift into the non-negative range first (indices are int32)
    idx = bd.op("Cast", indices, to=TensorProto.INT64)
    shifted = bd.op("Add", idx, bd.ints([o + k * s for o, s in zip(offset, stride)], [1, 2]))
    return bd.op("Sub", bd.op("Div", shifted, bd.ints(list(stride), [1, 2])), bd.ints([k, k], [1, 2]))


def body_scatter_positions(bd: Body, indices: str, blocks: str, base: str, offset: Sequence[int],
                           stride: Sequence[int]) -> tuple[str, str]:
    """Output positions of the in-image block elements and the blocks' values there.

    Returns ``(idx [B, C, M, 4] int64, values [B, C, M])`` for ScatterND / GatherND on ``base``-shaped
    tensors (which keeps ``base``'s static shape for onnx shape inference); elements outside the
    image are dropped (Compress), so no padded copy of ``base`` is needed.
    """
    org = body_floordiv_origins(bd, indices, offset, stride)
    zero, one, two = bd.ints([0]), bd.ints([1]), bd.ints([2])
    r0 = bd.unsqueeze(bd.op("Slice", org, zero, one, one), [2])  # [N, 1, 1]
    c0 = bd.unsqueeze(bd.op("Slice", org, one, two, one), [2])
    ph, pw = bd.shape(blocks, 2, 3), bd.shape(blocks, 3, 4)
    z, z1 = bd.scalar_i64(0), bd.scalar_i64(1)
    ar_h = bd.unsqueeze(bd.op("Range", z, bd.op("Squeeze", ph, zero), z1), [0, 2])  # [1, ph, 1]
    ar_w = bd.unsqueeze(bd.op("Range", z, bd.op("Squeeze", pw, zero), z1), [0, 1])  # [1, 1, pw]
    rows = bd.op("Add", r0, ar_h)  # [N, ph, 1]
    cols = bd.op("Add", c0, ar_w)  # [N, 1, pw]
    Ho, Wo = bd.shape(base, 2, 3), bd.shape(base, 3, 4)
    rv = bd.op("And", bd.op("GreaterOrEqual", rows, z), bd.op("Less", rows, Ho))
    cv = bd.op("And", bd.op("GreaterOrEqual", cols, z), bd.op("Less", cols, Wo))
    n = bd.shape(indices, 0, 1)
    php = bd.op("Mul", ph, pw)
    total = bd.op("Mul", n, php)
    valid = bd.reshape(bd.op("And", rv, cv), total)  # [N*ph*pw]
    rows_m = bd.op("Compress", bd.reshape(bd.op("Expand", rows, bd.concat(n, ph, pw)), total), valid, axis=0)
    cols_m = bd.op("Compress", bd.reshape(bd.op("Expand", cols, bd.concat(n, ph, pw)), total), valid, axis=0)
    B, C = bd.shape(base, 0, 1), bd.shape(base, 1, 2)
    vals = bd.reshape(blocks, bd.concat(B, n, C, php))  # [B, N, C, ph*pw]
    vals = bd.op("Transpose", vals, perm=[0, 2, 1, 3])
    vals = bd.reshape(vals, bd.concat(B, C, total))
    vals = bd.op("Compress", vals, valid, axis=2)  # [B, C, M]
    target = bd.concat(B, C, bd.shape(rows_m, 0, 1), one)
    parts = [bd.unsqueeze(bd.op("Range", z, bd.op("Squeeze", B, zero), z1), [1, 2, 3]),
             bd.unsqueeze(bd.op("Range", z, bd.op("Squeeze", C, zero), z1), [0, 2, 3]),
             bd.unsqueeze(rows_m, [0, 1, 3]), bd.unsqueeze(cols_m, [0, 1, 3])]
    nd = bd.op("Concat", *(bd.op("Expand", p, target) for p in parts), axis=3)  # [B, C, M, 4]
    return nd, vals
