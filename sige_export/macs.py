"""MACs of ONNX graphs (and of torch modules) with torchprofile's conventions for compute ops.

Counted (one multiply-accumulate each):

* ``Conv`` / ``ConvTranspose``: ``prod(output shape) * Cin_per_group * prod(kernel)``; like
  torchprofile, the weight dim used as the input-channel count is ``W.shape[1]`` when
  ``W.shape[0]`` equals the output channels, else ``W.shape[0]`` (transposed convs).
* ``Gemm`` / ``MatMul``: ``prod(output shape) * K`` (torchprofile's ``n*m*p`` / ``b*n*m*p``,
  1-D operands included); attention's ``Q K^T`` and ``P V`` matmuls are ordinary MatMuls.
* ``Einsum``: product of the sizes of all distinct indices (two-operand contractions).
* ``ai.sige`` ``SigeSparseConv2d(x, indices, weight, ...)``: ``prod(output [B*N, Cout, oh, ow]) *
  W.shape[1] * kh * kw`` (N active blocks).

Elementwise ops, normalisation, activations, pooling and resizing count 0 (the dense compute of
these generators is >99% convolutions/matmuls; ONNX exports decompose SiLU, GELU or GroupNorm into
extra ``Mul`` nodes that a torch-level count would not see, so counting them would make the ONNX
and torch numbers disagree).

Extension hook: :data:`MACS_RULES` maps ``(domain, op_type)`` (``""`` is the default ONNX domain)
to ``rule(node, ctx) -> int``; ``ctx`` gives static shapes (:meth:`ShapeContext.shape`), constant
values (:meth:`ShapeContext.const`) and attributes (:meth:`ShapeContext.attr`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from . import SIGE_DOMAIN, onnx_io

Shape = tuple[int, ...]


@dataclass(frozen=True)
class NodeMacs:
    name: str
    op_type: str
    domain: str
    macs: int


@dataclass
class MacsReport:
    """Per-node MACs of the counted nodes; ``unknown`` lists counted-op nodes whose shapes were unknown."""

    nodes: list[NodeMacs] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(n.macs for n in self.nodes)

    def by_op_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            key = n.op_type if not n.domain else f"{n.domain}.{n.op_type}"
            out[key] = out.get(key, 0) + n.macs
        return out

    def __int__(self) -> int:
        return self.total


class ShapeError(RuntimeError):
    """A counted node's shape could not be determined."""


class ShapeContext:
    """Static shapes and constant values of a shape-inferred model's tensors."""

    def __init__(self, model: onnx.ModelProto, consts: Mapping[str, np.ndarray] | None = None) -> None:
        g = model.graph
        self._shapes: dict[str, Shape | None] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            self._shapes[vi.name] = _static_shape(vi.type)
        self._consts: dict[str, np.ndarray] = dict(consts or {})
        for init in g.initializer:
            self._shapes[init.name] = tuple(int(d) for d in init.dims)
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        arr = numpy_helper.to_array(a.t)
                        self._consts[node.output[0]] = arr
                        self._shapes[node.output[0]] = tuple(arr.shape)

    def shape(self, name: str) -> Shape | None:
        if not name:
            return None
        if name in self._consts:
            return tuple(self._consts[name].shape)
        return self._shapes.get(name)

    def require(self, name: str) -> Shape:
        s = self.shape(name)
        if s is None:
            raise ShapeError(f"shape of {name!r} unknown")
        return s

    def const(self, name: str) -> np.ndarray | None:
        return self._consts.get(name)

    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


MacsRule = Callable[[onnx.NodeProto, ShapeContext], int]


def _static_shape(tp: onnx.TypeProto) -> Shape | None:
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tp.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def _conv(node: onnx.NodeProto, ctx: ShapeContext) -> int:
    out = ctx.require(node.output[0])
    w = ctx.require(node.input[1])
    ic = w[1] if out[1] == w[0] else w[0]
    return math.prod(out) * ic * math.prod(w[2:])


def _gemm(node: onnx.NodeProto, ctx: ShapeContext) -> int:
    a = ctx.require(node.input[0])
    out = ctx.require(node.output[0])
    k = a[0] if ctx.attr(node, "transA", 0) else a[1]
    return math.prod(out) * k


def _matmul(node: onnx.NodeProto, ctx: ShapeContext) -> int:
    a = ctx.require(node.input[0])
    out = ctx.require(node.output[0])
    return math.prod(out) * a[-1]


def _einsum(node: onnx.NodeProto, ctx: ShapeContext) -> int:
    eq = ctx.attr(node, "equation")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    lhs = eq.replace(" ", "").split("->")[0].split(",")
    if len(lhs) < 2 or any("..." in t for t in lhs):
        return 0
    sizes: dict[str, int] = {}
    for term, name in zip(lhs, node.input):
        shape = ctx.require(name)
        for letter, dim in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), dim)
    return math.prod(sizes.values())


def _sige_sparse_conv(node: onnx.NodeProto, ctx: ShapeContext) -> int:
    w = ctx.require(node.input[2])
    out = ctx.shape(node.output[0])
    if out is None:  # no shape inference for the custom op: derive it from the op definition
        x = ctx.require(node.input[0])
        n = ctx.require(node.input[1])[0]
        bh, bw = ctx.attr(node, "block")
        sh, sw = ctx.attr(node, "strides", [1, 1])
        out = (x[0] * n, w[0], (bh - w[2]) // sh + 1, (bw - w[3]) // sw + 1)
    return math.prod(out) * math.prod(w[1:])


MACS_RULES: dict[tuple[str, str], MacsRule] = {
    ("", "Conv"): _conv,
    ("", "ConvTranspose"): _conv,
    ("", "Gemm"): _gemm,
    ("", "MatMul"): _matmul,
    ("", "Einsum"): _einsum,
    (SIGE_DOMAIN, "SigeSparseConv2d"): _sige_sparse_conv,
}

def _lighten(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> onnx.ModelProto:
    """Copy of ``model`` without large initializer data (inputs of the same type instead).

    Keeps shape inference fast and within protobuf's 2 GiB limit for big models (and works for
    models with external data that was never loaded)."""
    light, _ = onnx_io.detach_weights(model)
    g = light.graph
    keep, moved = [], []
    for init in g.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            moved.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    if moved:
        del g.initializer[:]
        g.initializer.extend(keep)
        g.input.extend(moved)
    if input_shapes:
        known = {i.name for i in g.input}
        for name in input_shapes:
            if name not in known:
                raise KeyError(f"input_shapes names {name!r}, not a graph input; inputs: {sorted(known)}")
        for inp in g.input:
            if inp.name in input_shapes:
                dims = inp.type.tensor_type.shape
                dims.ClearField("dim")
                for d in input_shapes[inp.name]:
                    dims.dim.add().dim_value = int(d)
        del g.value_info[:]
    return light


def infer_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None
                 ) -> onnx.ModelProto:
    """Shape-inferred light copy of ``model`` (``data_prop`` on, big weights dropped)."""
    light = _lighten(model, input_shapes)
    try:
        return shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - fall back to what the model already states
        return light


def count_macs(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
               rules: Mapping[tuple[str, str], MacsRule] | None = None, strict: bool = False) -> MacsReport:
    """Count MACs of every node that has a rule (``MACS_RULES`` unless ``rules`` is given).

    ``input_shapes`` fixes graph input shapes (e.g. ``{"segmap": (1, 36, 256, 512)}``) before
    shape inference. Nodes whose shapes stay unknown go to ``report.unknown`` (``strict``: raise).
    Only the top-level graph is walked; a node with a rule counts as a whole even where its op is
    a model-local function.
    """
    rules = MACS_RULES if rules is None else rules
    inferred = infer_shapes(model, input_shapes)
    ctx = ShapeContext(inferred)
    report = MacsReport()
    for i, node in enumerate(inferred.graph.node):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        rule = rules.get((domain, node.op_type))
        if rule is None:
            continue
        name = node.name or f"{node.op_type}_{i}"
        try:
            macs = int(rule(node, ctx))
        except ShapeError as e:
            if strict:
                raise ShapeError(f"node {name} ({node.op_type}): {e}") from None
            report.unknown.append(name)
            continue
        report.nodes.append(NodeMacs(name, node.op_type, domain, macs))
    return report


# --------------------------------------------------------------------------- torch side
def count_torch_macs(module: Any, inputs: Mapping[str, Any] | Sequence[Any]) -> MacsReport:
    """Same conventions counted at the aten level while running ``module`` (works on the meta device).

    Handles convolution, mm/addmm/bmm/baddbmm (so Linear, matmul, einsum and attention) and the
    fused scaled-dot-product-attention kernels (``Q K^T`` + ``P V``). Fast for full-size models
    when parameters and inputs live on ``torch.device("meta")``.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    report = MacsReport()

    def sdpa(args: tuple, out: Any) -> int:
        q, k, v = args[0], args[1], args[2]
        return math.prod(q.shape) * k.shape[-2] + math.prod(q.shape[:-1]) * k.shape[-2] * v.shape[-1]

    handlers: dict[Any, Callable[[tuple, Any], int]] = {
        aten.convolution.default: lambda a, o: math.prod(o.shape) * (
            a[1].shape[1] if o.shape[1] == a[1].shape[0] else a[1].shape[0]) * math.prod(a[1].shape[2:]),
        aten.mm.default: lambda a, o: math.prod(o.shape) * a[0].shape[-1],
        aten.addmm.default: lambda a, o: math.prod(o.shape) * a[1].shape[-1],
        aten.bmm.default: lambda a, o: math.prod(o.shape) * a[0].shape[-1],
        aten.baddbmm.default: lambda a, o: math.prod(o.shape) * a[1].shape[-1],
    }
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention"):
        op = getattr(aten, name, None)
        if op is not None:
            handlers[op.default] = sdpa

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            h = handlers.get(func)
            if h is not None:
                res = out[0] if isinstance(out, (tuple, list)) else out
                report.nodes.append(NodeMacs(str(func.overloadpacket.__name__), str(func), "aten",
                                             int(h(args, res))))
            return out

    with torch.no_grad(), _Counter():
        if isinstance(inputs, Mapping):
            module(**inputs)
        else:
            module(*inputs)
    return report


def format_macs(macs: int | float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.2f}{unit}"
    return str(int(macs))


__all__ = ["MACS_RULES", "MacsReport", "MacsRule", "NodeMacs", "ShapeContext", "ShapeError", "count_macs",
           "count_torch_macs", "format_macs", "infer_shapes"]

