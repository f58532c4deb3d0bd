"""Sparsifier: dense ONNX -> SIGE program (prime and edit passes in one ONNX graph).

The program is one ONNX graph that holds both passes. ``prime`` is the dense model; the tensors
the edit pass reuses (scatter bases, folded normalisation scale/shift, conditioning tensors) are
*caches*: ordinary tensors of the prime part that the edit part reads. Running the whole graph
computes both passes at once; :func:`sige_export.program.SigeProgram.prime_model` and
``edit_model`` cut it at the caches, so the edit model takes them as inputs (the program is
stateless; the runtime holds the caches). The manifest (JSON in the model's metadata under
``sige_manifest``) names inputs, caches, index inputs with their mask level and block config,
and scatter maps.

The edit pass is built by abstract interpretation of the dense graph in topological order. Every
tensor that depends on an editable input gets a :class:`Rep`: a materialised full tensor, or
blocks not yet scattered into their cached base, with a pending per-channel affine and
activation. Convolutions become sparse (``SigeSparseConv2d`` or ``SigeScatterGather`` + Conv),
affine/activation chains fold into the next gather, residual adds fold into the scatter, and
anything else runs dense on full tensors (a dense island; unknown ops are warned about).
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import onnx_io
from .mask import BlockConfig, snap_block
from .token_rules import Rows, TokenRules
from .graph import (GraphInfo, attrs_of, constants_to_initializers, conv_transposes_as_convs, fold_constants,
                    norms_before_depth_to_space, topological_nodes)

log = logging.getLogger(__name__)

MANIFEST_KEY = "sige_manifest"
PROGRAM_FORMAT_VERSION = 1
EDIT_PREFIX = "edit/"
MIN_OPSET = 18  # the ai.sige function bodies are written against opset 18
# tile of the statistics correction (the changed tiles cover every scattered output block; larger tiles
# gather with fewer index computations: 4 x 4 made ddpm's statistics ~2x cheaper than 2 x 2)
STAT_TILE = 4
TOKEN_TILE = 2  # tile of the sparse-token rows (Stable Diffusion transformers)

# Ops that run correctly on full tensors in the edit pass without any warning (sparsity is
# carried to the next convolution through the scattered full tensor).
DENSE_OK = {
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Exp", "Log", "Sqrt", "Pow", "Reciprocal", "Erf",
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Softmax", "Clip", "Max", "Min", "Where", "Cast",
    "Concat", "Split", "Slice", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
    "Identity", "Expand", "Gather", "Shape", "ConstantOfShape", "Range", "Equal", "Less", "Greater",
    "MatMul", "Gemm", "Einsum", "Conv", "ConvTranspose", "Resize", "Upsample", "AveragePool", "MaxPool",
    "GlobalAveragePool", "Pad", "ReduceMean", "ReduceSum", "InstanceNormalization",
    "GroupNormalization", "BatchNormalization", "LayerNormalization", "Dropout", "Tile",
    "DepthToSpace", "SpaceToDepth",
}

ACTIVATIONS = {"Relu": "relu", "LeakyRelu": "leaky_relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}


@dataclass(frozen=True)
class SparsifyOptions:
    """Options of the sparsifier (CLI: --block-size, --sparse-min-res, --sparse-min-blocks, --norm-stats, ...)."""

    block_size: int = 6  # for k x k convolutions with k > 1 (the paper's 6 for 3x3; k > 3 adds k - 3)
    block_size_1x1: int = 4  # for 1x1 convolutions (the paper's 4)
    sparse_min_res: int = 8  # convolutions whose input min(H, W) is smaller run dense
    # convolutions whose block grid has fewer blocks run dense: an edit with its halo reaches most of such a
    # grid, so gathering costs more than it saves (ddpm's 8x8 maps, 4 blocks: 0.98x as sparse; GauGAN's 8x16,
    # 8 blocks: 1.07x at a 1.2% edit)
    sparse_min_blocks: int = 8
    attention_min_res: int = 16  # attention regions below run dense (scatter first)
    # "update": statistics exact for the edited input, corrected over the changed tiles (same MACs;
    # the fidelity report shows it equal at small edits and far better at large ones: ddpm-church256
    # 33% blob 29.6 dB vs 4.8 dB, gancomp-gaugan 35.0 vs 31.7 dB). "original": the paper's cached stats.
    norm_stats: str = "update"
    mask_eps: float = 1e-3  # difference threshold of the runtime's automatic mask
    mask_dilation: int = 1  # dilation of the mask at every level (paper's default 1)
    editable_inputs: tuple[str, ...] | None = None  # default: the first graph input

    def __post_init__(self) -> None:
        if self.norm_stats not in ("original", "update"):
            raise ValueError(f"norm_stats must be 'original' or 'update', got {self.norm_stats!r}")
        for name in ("block_size", "block_size_1x1", "sparse_min_res", "sparse_min_blocks", "attention_min_res",
                     "mask_dilation"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "mask_dilation" else 1):
                least = "non-negative" if name == "mask_dilation" else "positive"
                raise ValueError(f"{name} must be a {least} integer, got {value!r}")


class SparsifyError(ValueError):
    """The model cannot be sparsified; the message says why."""


# ----------------------------------------------------------------------------- patterns


@dataclass
class Op:
    """A canonical op: one ONNX node, or a matched pattern of several (GroupNorm, Silu, Gelu)."""

    kind: str
    inputs: list[str]
    output: str
    nodes: list[onnx.NodeProto]
    attrs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.nodes[-1].name or self.output


def _single_consumer(info: GraphInfo, tensor: str, node: onnx.NodeProto) -> bool:
    cons = info.consumers.get(tensor, [])
    return len(cons) == 1 and cons[0] is node and not info.is_graph_output(tensor)


def _only_consumer(info: GraphInfo, tensor: str) -> onnx.NodeProto | None:
    cons = info.consumers.get(tensor, [])
    if len(cons) == 1 and not info.is_graph_output(tensor):
        return cons[0]
    return None


def _per_channel(arr: np.ndarray | None, channels: int) -> np.ndarray | None:
    """``arr`` as a [C] vector if it broadcasts per channel over NCHW, else None."""
    if arr is None:
        return None
    a = np.asarray(arr)
    if a.size == 1:
        return np.full(channels, a.reshape(()).item(), dtype=np.float32)
    shape = a.shape
    if len(shape) >= 3 and shape[-1] == 1 and shape[-2] == 1 and shape[-3] == channels and a.size == channels:
        return a.reshape(channels).astype(np.float32)
    return None


def canonical_ops(info: GraphInfo) -> list[Op]:
    """Group node patterns the exporters emit into canonical ops, in topological order."""
    nodes = topological_nodes(info.model.graph)
    absorbed: set[int] = set()
    ops: list[Op] = []
    for node in nodes:
        if id(node) in absorbed:
            continue
        op = (_match_group_norm(info, node) or _match_silu(info, node) or _match_gelu(info, node)
              or _match_pad_conv(info, node))
        if op is not None:
            absorbed.update(id(n) for n in op.nodes)
            ops.append(op)
            continue
        if len(node.output) != 1:
            ops.append(Op(node.op_type, list(node.input), node.output[0], [node], attrs_of(node)))
            continue
        ops.append(Op(node.op_type, list(node.input), node.output[0], [node], attrs_of(node)))
    return ops


def _match_group_norm(info: GraphInfo, node: onnx.NodeProto) -> Op | None:
    """Reshape -> InstanceNormalization(ones, zeros) -> Reshape [-> Mul gamma] [-> Add beta]; or GroupNormalization."""
    if node.op_type == "GroupNormalization":
        a = attrs_of(node)
        x = node.input[0]
        shape = info.static_shape(x)
        if shape is None or len(shape) != 4:
            return None
        c = shape[1]
        g = int(a["num_groups"])
        scale = info.consts.get(node.input[1])
        bias = info.consts.get(node.input[2])
        if scale is None or bias is None:
            return None
        if scale.size == g and g != c:  # opset 18 semantics: per-group scale
            scale = np.repeat(scale, c // g)
            bias = np.repeat(bias, c // g)
        return Op("GroupNorm", [x], node.output[0], [node],
                  {"groups": g, "eps": float(a.get("epsilon", 1e-5)), "gamma": scale.astype(np.float32),
                   "beta": bias.astype(np.float32)})
    if node.op_type != "Reshape":
        return None
    x = node.input[0]
    xshape = info.static_shape(x)
    if xshape is None or len(xshape) != 4:
        return None
    inorm = _only_consumer(info, node.output[0])
    if inorm is None or inorm.op_type != "InstanceNormalization":
        return None
    s = info.consts.get(inorm.input[1])
    b = info.consts.get(inorm.input[2])
    if s is None or b is None or not np.all(s == 1) or not np.all(b == 0):
        return None
    rshape = info.static_shape(node.output[0])
    if rshape is None or len(rshape) != 3:
        return None
    groups = rshape[1]
    back = _only_consumer(info, inorm.output[0])
    if back is None or back.op_type != "Reshape" or info.static_shape(back.output[0]) != xshape:
        return None
    chain = [node, inorm, back]
    # The Shape node feeding the second Reshape (if any) is absorbed too when it has no other use.
    shape_src = info.producer.get(back.input[1])
    if shape_src is not None and shape_src.op_type == "Shape" and _single_consumer(info, shape_src.output[0], back):
        chain.insert(2, shape_src)
    out = back.output[0]
    c = xshape[1]
    gamma = np.ones(c, np.float32)
    beta = np.zeros(c, np.float32)
    nxt = _only_consumer(info, out)
    if nxt is not None and nxt.op_type == "Mul":
        other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
        pc = _per_channel(info.consts.get(other), c)
        if pc is not None:
            gamma = pc
            chain.append(nxt)
            out = nxt.output[0]
            nxt = _only_consumer(info, out)
    if nxt is not None and nxt.op_type == "Add":
        other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
        pc = _per_channel(info.consts.get(other), c)
        if pc is not None:
            beta = pc
            chain.append(nxt)
            out = nxt.output[0]
    return Op("GroupNorm", [x], out, chain,
              {"groups": groups, "eps": float(attrs_of(inorm).get("epsilon", 1e-5)), "gamma": gamma, "beta": beta})


def _match_pad_conv(info: GraphInfo, node: onnx.NodeProto) -> Op | None:
    """Pad on H/W -> Conv becomes one Conv with (asymmetric) pads: no padded copy, no odd mask level. A reflect or
    edge Pad (torch's ``padding_mode``, ``ReflectionPad2d``) before a Conv without pads of its own becomes the
    Conv's ``padding_mode``, which its gathers read through."""
    mode = attrs_of(node).get("mode", "constant") if node.op_type == "Pad" else None
    if mode not in ("constant", "reflect", "edge"):
        return None
    pads = info.consts.get(node.input[1]) if len(node.input) > 1 else None
    value = info.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
    if pads is None or value is None or np.any(value != 0) or pads.size != 8 or (len(node.input) > 3 and node.input[3]):
        return None
    pads = [int(p) for p in pads]
    if pads[0] or pads[1] or pads[4] or pads[5] or min(pads) < 0:
        return None
    conv = _only_consumer(info, node.output[0])
    if conv is None or conv.op_type != "Conv" or conv.input[0] != node.output[0]:
        return None
    a = attrs_of(conv)
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return None
    cp = list(a.get("pads", [0, 0, 0, 0]))
    if mode != "constant":
        if any(cp):
            return None
        a["padding_mode"] = mode
    a["pads"] = [cp[0] + pads[2], cp[1] + pads[3], cp[2] + pads[6], cp[3] + pads[7]]
    return Op("Conv", [node.input[0]] + list(conv.input[1:]), conv.output[0], [node, conv], a)


def _match_silu(info: GraphInfo, node: onnx.NodeProto) -> Op | None:
    """Sigmoid(x) -> Mul(x, sigmoid): the exporters' SiLU/swish."""
    if node.op_type != "Sigmoid":
        return None
    x = node.input[0]
    mul = _only_consumer(info, node.output[0])
    if mul is None or mul.op_type != "Mul" or sorted(mul.input) != sorted([x, node.output[0]]):
        return None
    return Op("Silu", [x], mul.output[0], [node, mul])


def _match_gelu(info: GraphInfo, node: onnx.NodeProto) -> Op | None:
    """Div(x, sqrt2) -> Erf -> Add 1 -> Mul x -> Mul 0.5 (the TorchScript exporter's exact GELU)."""
    if node.op_type == "Gelu":
        if attrs_of(node).get("approximate", "none") != "none":
            return None
        return Op("Gelu", [node.input[0]], node.output[0], [node])
    if node.op_type != "Div":
        return None
    d = info.consts.get(node.input[1])
    if d is None or d.size != 1 or abs(float(d.reshape(())) - np.sqrt(2.0)) > 1e-4:
        return None
    x = node.input[0]
    erf = _only_consumer(info, node.output[0])
    if erf is None or erf.op_type != "Erf":
        return None
    add = _only_consumer(info, erf.output[0])
    if add is None or add.op_type != "Add":
        return None
    one = info.consts.get(add.input[1] if add.input[0] == erf.output[0] else add.input[0])
    if one is None or one.size != 1 or float(one.reshape(())) != 1.0:
        return None
    mul = _only_consumer(info, add.output[0])
    if mul is None or mul.op_type != "Mul" or x not in mul.input:
        return None
    half = _only_consumer(info, mul.output[0])
    if half is None or half.op_type != "Mul":
        return None
    h = info.consts.get(half.input[1] if half.input[0] == mul.output[0] else half.input[0])
    if h is None or h.size != 1 or float(h.reshape(())) != 0.5:
        return None
    return Op("Gelu", [x], half.output[0], [node, erf, add, mul, half])


# ----------------------------------------------------------------------------- reps


@dataclass(frozen=True)
class BlockGrid:
    """A sparse conv's block grid: its input resolution and the snapped block geometry."""

    in_hw: tuple[int, int]
    config: BlockConfig

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.config.out_hw(self.in_hw)

    def blocks(self) -> int:
        """Blocks in the grid (output blocks tiling the output)."""
        (ho, wo), (bh, bw) = self.out_hw, self.config.out_block
        return -(-ho // bh) * -(-wo // bw)

    def key(self) -> str:
        c = self.config
        h, w = self.in_hw
        return (f"{h}x{w}/k{c.kernel[0]}x{c.kernel[1]}s{c.stride[0]}x{c.stride[1]}"
                f"p{'_'.join(map(str, c.padding))}b{c.block[0]}x{c.block[1]}")

    def to_json(self) -> dict:
        c = self.config
        return {
            "resolution": list(self.in_hw), "out_resolution": list(self.out_hw), "kernel": list(c.kernel),
            "stride": list(c.stride), "pads": list(c.padding), "block": list(c.block),
            "block_stride": list(c.block_stride), "out_block": list(c.out_block), "offset": list(c.offset),
        }


@dataclass(frozen=True)
class Pending:
    """Blocks not yet written into their cached base: the value is Scatter(blocks, base, indices[, residual])."""

    blocks: str
    base: str
    indices: str
    grid: BlockGrid
    residual: str | None = None


@dataclass(frozen=True, eq=False)
class Expr:
    """An elementwise expression over other values (SPADE's ``norm(x) * (1 + gamma) + beta``).

    A conv over it gathers each leaf at its blocks and evaluates the expression on the small
    blocks, so the full-size product is never computed; ``emit`` writes the nodes for given
    leaf values (blocks or, when materialised, full tensors).
    """

    leaves: tuple[str, ...]
    emit: Callable[[dict[str, str]], str]


@dataclass(frozen=True)
class Resampled:
    """A nearest resize of ``source`` by integer factors: ``value[r] = source[r * down // up]`` per axis.

    A gather reads ``source`` through the factors (SigeGather / SigeSparseConv2d ``upsample`` /
    ``downsample``), so the resized tensor is never computed; ``node`` is the original Resize, run
    dense when something needs the full tensor.
    """

    source: str
    up: tuple[int, int]
    down: tuple[int, int]
    node: onnx.NodeProto

    def attrs(self) -> dict:
        return {"upsample": list(self.up), "downsample": list(self.down)}


@dataclass(frozen=True)
class Rep:
    """Edit-pass value of a dynamic tensor: act(value * scale + shift), value full or pending."""

    full: str | None = None
    pending: Pending | None = None
    # A channel concat not materialised: (dense tensor, channels) per part; a conv over it is the
    # sum of convs over the parts with sliced weights, so skip connections are never copied.
    parts: tuple[tuple[str, int], ...] | None = None
    rows: Rows | None = None  # a token tensor known at the changed tokens only (see token_rules)
    expr: Expr | None = None  # an elementwise expression evaluated where it is gathered
    resampled: Resampled | None = None  # a nearest resize, read through by the gathers
    scale: str | None = None  # [B|1, C, 1, 1]
    shift: str | None = None
    act: str | None = None
    alpha: float = 0.2
    # Every change against the primed tensor lies inside scattered output blocks at this resolution
    # (so statistics can be corrected from those blocks alone); False after a dense island.
    confined: bool = False

    @property
    def plain(self) -> bool:
        return self.scale is None and self.shift is None and self.act is None


# ----------------------------------------------------------------------------- builder


class _Builder:
    """Collects the nodes and initializers the sparsifier adds; unique, readable names."""

    def __init__(self, used: set[str]) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.used = set(used)

    def fresh(self, hint: str) -> str:
        base = hint if hint not in self.used else None
        k = 1
        while base is None:
            cand = f"{hint}.{k}"
            if cand not in self.used:
                base = cand
            k += 1
        self.used.add(base)
        return base

    def const(self, hint: str, arr: np.ndarray) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def sige(self, op_type: str, inputs: list[str], hint: str, **attrs) -> str:
        from sige_export import custom_ops

        out = self.fresh(hint)
        self.nodes.append(custom_ops.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


# ----------------------------------------------------------------------------- the pass


@dataclass
class SparsifyResult:
    model: onnx.ModelProto
    manifest: dict
    warnings: list[str]


class _Sparsifier(TokenRules):
    def __init__(self, model: onnx.ModelProto, options: SparsifyOptions, forbid_fusion: set[str],
                 weights: dict[str, onnx.TensorProto] | None = None) -> None:
        """Rewrites ``model`` in place; ``weights``: the data of initializers ``model`` holds detached."""
        self.opts = options
        self.model = model
        self.info = GraphInfo.build(self.model, weights)
        self.ops = canonical_ops(self.info)
        used = {t for n in self.model.graph.node for t in list(n.input) + list(n.output)}
        used |= {i.name for i in self.model.graph.input} | {i.name for i in self.model.graph.initializer}
        self.prime = _Builder(used)  # extra prime nodes (normalisation statistics)
        self.b = self.prime  # one namespace: edit nodes go to the same builder lists, tagged below
        self.edit_nodes_start = 0
        self.forbid_fusion = forbid_fusion
        self.materialized_pending: set[str] = set()
        self.scattered: dict[Pending, str] = {}
        self.opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 17)
        self.reps: dict[str, Rep] = {}
        self.caches: dict[str, None] = {}
        self.indices: dict[str, BlockGrid] = {}
        self.smaps: dict[str, dict] = {}
        self.tiles: dict[str, tuple[int, int]] = {}
        self.token_rows: dict[str, tuple[int, int]] = {}
        self.dropped: set[int] = set()  # original nodes the prime pass no longer runs
        self.cache_updates: dict[str, str] = {}  # cache -> edit tensor holding its edited value (not scatters)
        self.warnings: list[str] = []
        self.dense_islands: list[str] = []
        self.sparse_convs: list[str] = []
        self.inputs = [i.name for i in self.model.graph.input]
        init_names = {i.name for i in self.model.graph.initializer}
        self.inputs = [i for i in self.inputs if i not in init_names]
        editable = options.editable_inputs or (self.inputs[0],)
        for e in editable:
            if e not in self.inputs:
                raise SparsifyError(f"editable input {e!r} is not an input of the model ({', '.join(self.inputs)})")
        self.editable = list(editable)
        self.dynamic = self._dynamic_tensors()
        self.consumer_ops: dict[str, list[Op]] = {}
        for op in self.ops:
            for i in op.inputs:
                self.consumer_ops.setdefault(i, []).append(op)

    # -- analysis
    def _dynamic_tensors(self) -> set[str]:
        dyn = set(self.editable)
        for node in topological_nodes(self.model.graph):
            if any(i in dyn for i in node.input):
                dyn.update(node.output)
        return dyn

    def _nchw(self, name: str) -> tuple[int, int, int, int] | None:
        s = self.info.static_shape(name)
        return s if s is not None and len(s) == 4 else None

    # -- caches and static values
    def cache(self, tensor: str) -> str:
        """The original (prime) value of ``tensor``, read by the edit pass as a cache."""
        if tensor in self.info.consts:
            return tensor
        self.caches[tensor] = None
        return tensor

    def static(self, tensor: str) -> str:
        """A tensor that does not depend on the edit: an initializer or a cached prime tensor."""
        return self.cache(tensor)

    # -- materialisation
    def full(self, tensor: str) -> str:
        """A full edit-pass tensor holding the value of dense ``tensor``."""
        if tensor not in self.dynamic:
            return self.static(tensor)
        rep = self.reps[tensor]
        if rep.full is not None and rep.plain:
            return rep.full
        value = self._pre_ops(self._materialize_base(rep), rep)
        self.reps[tensor] = Rep(full=value, confined=rep.confined)
        return value

    def _pre_ops(self, value: str, rep: Rep) -> str:
        """``act(value * scale + shift)`` of ``rep`` on a full tensor or on blocks (per-channel scale / shift)."""
        if rep.scale is not None:
            value = self.b.node("Mul", [value, rep.scale], EDIT_PREFIX + "scaled")
        if rep.shift is not None:
            value = self.b.node("Add", [value, rep.shift], EDIT_PREFIX + "shifted")
        if rep.act is not None:
            value = self._activation(value, rep.act, rep.alpha)
        return value

    def _materialize_base(self, rep: Rep) -> str:
        if rep.full is not None:
            return rep.full
        if rep.parts is not None:
            return self.b.node("Concat", [self.full(t) for t, _ in rep.parts], EDIT_PREFIX + "concat", axis=1)
        if rep.rows is not None:
            return self._materialize_rows(rep.rows)
        if rep.expr is not None:
            return rep.expr.emit({leaf: self.full(leaf) for leaf in rep.expr.leaves})
        if rep.resampled is not None:
            node = onnx.NodeProto()
            node.CopyFrom(rep.resampled.node)
            out = self.b.fresh(EDIT_PREFIX + node.output[0])
            node.name = out
            node.input[0] = rep.resampled.source
            node.input[1:] = [self.static(i) if i else "" for i in node.input[1:]]
            node.output[0] = out
            self.b.nodes.append(node)
            return out
        p = rep.pending
        assert p is not None
        if p not in self.scattered:
            self.materialized_pending.add(p.blocks)
            ins = [p.blocks, p.base, p.indices] + ([p.residual] if p.residual else [])
            self.scattered[p] = self.b.sige("SigeScatter", ins, EDIT_PREFIX + "scatter",
                                            offset=list(p.grid.config.offset), stride=list(p.grid.config.stride))
        return self.scattered[p]

    def _activation(self, x: str, act: str, alpha: float) -> str:
        if act == "relu":
            return self.b.node("Relu", [x], EDIT_PREFIX + "relu")
        if act == "leaky_relu":
            return self.b.node("LeakyRelu", [x], EDIT_PREFIX + "lrelu", alpha=alpha)
        if act == "sigmoid":
            return self.b.node("Sigmoid", [x], EDIT_PREFIX + "sigmoid")
        if act == "tanh":
            return self.b.node("Tanh", [x], EDIT_PREFIX + "tanh")
        if act == "silu":
            s = self.b.node("Sigmoid", [x], EDIT_PREFIX + "sigmoid")
            return self.b.node("Mul", [x, s], EDIT_PREFIX + "silu")
        if act == "gelu":
            d = self.b.node("Div", [x, self.b.const(EDIT_PREFIX + "sqrt2", np.array(np.sqrt(2.0), np.float32))],
                            EDIT_PREFIX + "gelu_div")
            e = self.b.node("Erf", [d], EDIT_PREFIX + "gelu_erf")
            a = self.b.node("Add", [e, self.b.const(EDIT_PREFIX + "one", np.array(1.0, np.float32))],
                            EDIT_PREFIX + "gelu_add")
            m = self.b.node("Mul", [x, a], EDIT_PREFIX + "gelu_mul")
            return self.b.node("Mul", [m, self.b.const(EDIT_PREFIX + "half", np.array(0.5, np.float32))],
                               EDIT_PREFIX + "gelu")
        raise AssertionError(act)

    # -- per-channel affine
    def _affine(self, tensor_in: str, out: str, scale: str | None, shift: str | None) -> None:
        """out = in * scale + shift with per-channel [*, C, 1, 1] scale/shift, folded when possible."""
        rep = self.reps[tensor_in]
        if rep.expr is not None:
            def emit(vals: dict[str, str], e: Expr = rep.expr) -> str:
                v = e.emit(vals)
                if scale is not None:
                    v = self.b.node("Mul", [v, scale], EDIT_PREFIX + "blk_scale")
                return self.b.node("Add", [v, shift], EDIT_PREFIX + "blk_shift") if shift is not None else v
            self.reps[out] = Rep(expr=Expr(rep.expr.leaves, emit), confined=rep.confined)
            return
        if rep.act is not None:
            rep = Rep(full=self.full(tensor_in), confined=rep.confined)
        new_scale, new_shift = rep.scale, rep.shift
        if scale is not None:
            new_scale = scale if new_scale is None else self.b.node("Mul", [new_scale, scale], EDIT_PREFIX + "scale")
            if new_shift is not None:
                new_shift = self.b.node("Mul", [new_shift, scale], EDIT_PREFIX + "shift")
        if shift is not None:
            new_shift = shift if new_shift is None else self.b.node("Add", [new_shift, shift], EDIT_PREFIX + "shift")
        self.reps[out] = replace(rep, scale=new_scale, shift=new_shift)

    def _set_activation(self, tensor_in: str, out: str, act: str, alpha: float = 0.2) -> None:
        rep = self.reps[tensor_in]
        if rep.expr is not None:
            def emit(vals: dict[str, str], e: Expr = rep.expr) -> str:
                return self._activation(e.emit(vals), act, alpha)
            self.reps[out] = Rep(expr=Expr(rep.expr.leaves, emit), confined=rep.confined)
            return
        if rep.act is not None:
            rep = Rep(full=self.full(tensor_in), confined=rep.confined)
        self.reps[out] = replace(rep, act=act, alpha=alpha)

    # -- rules
    def run(self) -> None:
        for op in self.ops:
            if not any(o in self.dynamic for n in op.nodes for o in n.output):
                continue
            done = self._token_rule(op)
            if done is None:
                handler: Callable[[Op], bool] = getattr(self, f"_op_{op.kind}", None) or (lambda o: False)
                done = handler(op)
            if not done:
                self._dense(op)

    def _ensure_editable(self, name: str) -> None:
        if name in self.editable and name not in self.reps:
            self.reps[name] = Rep(full=EDIT_PREFIX + name)

    def _dense(self, op: Op) -> None:
        """Run the op's original nodes on full edit tensors (a dense island)."""
        kinds = {n.op_type for n in op.nodes}
        unknown = sorted(k for k in kinds if k not in DENSE_OK or any(n.domain not in ("", "ai.onnx") for n in op.nodes))
        if unknown:
            msg = f"node {op.name!r} ({', '.join(unknown)}) has no sparse rule: it runs dense in the edit pass"
            self.warnings.append(msg)
            warnings.warn(msg, stacklevel=2)
        self.dense_islands.append(op.name)
        rename: dict[str, str] = {}
        for n in op.nodes:
            for i in n.input:
                if i and i not in rename and i not in {o for m in op.nodes for o in m.output}:
                    self._ensure_editable(i)
                    rename[i] = self.full(i) if i in self.dynamic else self.static(i)
        for n in op.nodes:
            outs = []
            for o in n.output:
                if not o:
                    outs.append("")
                    continue
                rename[o] = self.b.fresh(EDIT_PREFIX + o)
                outs.append(rename[o])
            new = onnx.NodeProto()
            new.CopyFrom(n)
            new.name = (EDIT_PREFIX + n.name) if n.name else ""
            del new.input[:]
            new.input.extend(rename.get(i, i) if i else "" for i in n.input)
            del new.output[:]
            new.output.extend(outs)
            self.b.nodes.append(new)
            for o in n.output:
                if o and o in self.dynamic:
                    self.reps[o] = Rep(full=rename[o])

    def _op_Conv(self, op: Op) -> bool:
        x = op.inputs[0]
        if x not in self.dynamic or any(i not in self.info.consts for i in op.inputs[1:] if i):
            return False
        self._ensure_editable(x)
        xs = self._nchw(x)
        w = self.info.consts[op.inputs[1]]
        a = op.attrs
        if xs is None or w.ndim != 4 or any(d != 1 for d in a.get("dilations", [1, 1])):
            return False
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
            return False
        if min(xs[2], xs[3]) < self.opts.sparse_min_res:
            return False
        kernel = (w.shape[2], w.shape[3])
        stride = tuple(a.get("strides", [1, 1]))
        pads = tuple(a.get("pads", [0, 0, 0, 0]))
        requested = self.opts.block_size_1x1 if kernel == (1, 1) else self.opts.block_size
        # block_size is a 3x3 conv's; a larger kernel widens the block by its extra taps, so it keeps the same
        # outputs per block (a 7x7 conv in a block of 7 computed one output from 49 gathered pixels per channel)
        requested = tuple(max(requested + max(0, k - 3), k) for k in kernel)
        grid = BlockGrid((xs[2], xs[3]), snap_block(requested, kernel, stride, pads))
        if grid.blocks() < self.opts.sparse_min_blocks:
            return False
        idx = self._indices(grid)
        group = int(a.get("group", 1))
        bias = op.inputs[2] if len(op.inputs) > 2 and op.inputs[2] else None
        rep = self.reps[x]
        padding = a.get("padding_mode", "zeros")
        if rep.parts is not None and group == 1:
            blocks = self._concat_conv_blocks(rep, op.inputs[1], bias, grid, idx, padding)
        else:
            blocks = self._conv_blocks(x, rep, op.inputs[1], bias, grid, idx, group, padding)
        self.sparse_convs.append(op.name)
        self.reps[op.output] = Rep(pending=Pending(blocks, self.cache(op.output), idx, grid), confined=True)
        return True

    def _pre_attrs(self, rep: Rep) -> dict:
        if rep.act is None:
            return {}
        return {"activation": rep.act, **({"alpha": float(rep.alpha)} if rep.act == "leaky_relu" else {})}

    def _fusable(self, rep: Rep, padding: str = "zeros") -> bool:
        """Pending blocks whose full tensor is never needed: gather straight from blocks and base (a scatter-gather
        pads with zeros only)."""
        return (rep.pending is not None and rep.full is None and rep.pending.residual is None
                and rep.pending.blocks not in self.forbid_fusion and padding == "zeros")

    def _full_base(self, x: str, rep: Rep) -> str:
        """The full tensor under ``rep``'s pre-ops, materialised once and remembered for ``x``."""
        base = self._materialize_base(rep)
        if (rep.pending is not None or rep.resampled is not None) and self.reps.get(x) is rep:
            self.reps[x] = replace(rep, full=base, pending=None, resampled=None)
        return base

    def _conv_blocks(self, x: str, rep: Rep, weight: str, bias: str | None, grid: BlockGrid, idx: str,
                     group: int, padding: str = "zeros") -> str:
        """Output blocks of a conv over ``rep`` on ``grid`` (pre-ops fused into the gather; ``padding``: what the
        gather reads outside the image, see docs/sige-ops.md)."""
        c = grid.config
        if self._fusable(rep, padding) or rep.expr is not None:
            gathered = self._gather(x, rep, grid, idx, padding)
            return self.b.node("Conv", [gathered, weight] + ([bias] if bias else []), EDIT_PREFIX + "conv_blocks",
                               kernel_shape=list(c.kernel), strides=list(c.stride), group=group, pads=[0, 0, 0, 0])
        source, resample = self._gather_source(x, rep)
        return self.b.sige("SigeSparseConv2d", [source, idx, weight, bias or "", rep.scale or "", rep.shift or ""],
                           EDIT_PREFIX + "sparse_conv", block=list(c.block), strides=list(c.stride), group=group,
                           padding_mode=padding, **self._pre_attrs(rep), **resample)

    def _gather_source(self, x: str, rep: Rep) -> tuple[str, dict]:
        """The full tensor a gather over ``rep`` reads, and the resize it reads it through."""
        if rep.resampled is not None and rep.full is None:
            return rep.resampled.source, rep.resampled.attrs()
        return self._full_base(x, rep), {}

    def _concat_conv_blocks(self, rep: Rep, weight: str, bias: str | None, grid: BlockGrid, idx: str,
                            padding: str = "zeros") -> str:
        """conv(concat(a, b, ...)): gather each part's blocks, concat the small blocks, one conv (pads 0)."""
        c = grid.config
        gathered = []
        c0 = 0
        for part, channels in rep.parts:
            c1 = c0 + channels
            if rep.plain:
                part_rep = self.reps[part]
            else:
                part_rep = Rep(full=self.full(part), scale=self._channel_slice(rep.scale, c0, c1),
                               shift=self._channel_slice(rep.shift, c0, c1), act=rep.act, alpha=rep.alpha)
            gathered.append(self._gather(part, part_rep, grid, idx, padding))
            c0 = c1
        blocks = self.b.node("Concat", gathered, EDIT_PREFIX + "gathered_concat", axis=1)
        return self.b.node("Conv", [blocks, weight] + ([bias] if bias else []), EDIT_PREFIX + "conv_blocks",
                           kernel_shape=list(c.kernel), strides=list(c.stride), group=1, pads=[0, 0, 0, 0])

    def _gather(self, x: str, rep: Rep, grid: BlockGrid, idx: str, padding: str = "zeros") -> str:
        """Gathered input blocks [B*N, C, bh, bw] of ``rep`` with its pre-ops applied."""
        if rep.expr is not None:
            values = rep.expr.emit({leaf: self._gather(leaf, self.reps[leaf], grid, idx, padding)
                                    for leaf in rep.expr.leaves})
            if padding != "zeros":  # the leaves' reflections or borders make the expression's
                return values
            # Zero outside the image, as the dense conv's padding sees the expression's value.
            h, w = grid.in_hw
            ones = self.b.const(EDIT_PREFIX + f"ones{h}x{w}", np.ones((1, 1, h, w), np.float32))
            inside = self.b.sige("SigeGather", [ones, idx], EDIT_PREFIX + "inside", block=list(grid.config.block))
            return self.b.node("Mul", [values, inside], EDIT_PREFIX + "blk_expr")
        pre = self._pre_attrs(rep)
        if self._fusable(rep, padding):
            p = rep.pending
            return self.b.sige("SigeScatterGather",
                               [p.blocks, p.base, self._scatter_map(p), idx, rep.scale or "", rep.shift or ""],
                               EDIT_PREFIX + "scatter_gather", block=list(grid.config.block), **pre)
        source, resample = self._gather_source(x, rep)
        return self.b.sige("SigeGather", [source, idx, rep.scale or "", rep.shift or ""],
                           EDIT_PREFIX + "gather", block=list(grid.config.block), padding_mode=padding, **pre,
                           **resample)

    def _channel_slice(self, t: str | None, c0: int, c1: int) -> str | None:
        if t is None:
            return None
        return self.b.node("Slice", [t, self.b.const(EDIT_PREFIX + "c0", np.array([c0], np.int64)),
                                     self.b.const(EDIT_PREFIX + "c1", np.array([c1], np.int64)),
                                     self.b.const(EDIT_PREFIX + "axis1", np.array([1], np.int64))],
                           EDIT_PREFIX + "channel_slice")

    def _op_Resize(self, op: Op) -> bool:
        """A nearest resize by integer factors stays virtual: the gathers read its input through the factors
        (the upsampling between resolutions, the conditioning map's downsampling in SPADE)."""
        x = op.inputs[0]
        factors = self._nearest_factors(op)
        if x not in self.dynamic or factors is None:
            return False
        self._ensure_editable(x)
        rep = self.reps[x]
        if rep.pending is not None or rep.full is not None:  # per-channel pre-ops commute with the resize
            source = self._full_base(x, rep)
            pre = {"scale": rep.scale, "shift": rep.shift, "act": rep.act, "alpha": rep.alpha}
        else:
            source, pre = self.full(x), {}
        self.reps[op.output] = Rep(resampled=Resampled(source, *factors, op.nodes[0]), **pre)
        return True

    def _nearest_factors(self, op: Op) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """``(up, down)`` when the Resize picks ``x[r * down // up]`` on both spatial axes (checked by running the
        node on a ramp with onnx.reference, so every mode and rounding that agrees is taken), else None."""
        node = op.nodes[0]
        xs, ys = self._nchw(op.inputs[0]), self._nchw(op.output)
        if (len(op.nodes) != 1 or node.op_type != "Resize" or xs is None or ys is None or xs[:2] != ys[:2]
                or op.attrs.get("mode", "nearest") != "nearest" or "axes" in op.attrs
                or any(i and i not in self.info.consts for i in op.inputs[1:])):
            return None
        up, down = [], []
        for n, m in zip(xs[2:], ys[2:]):
            if m >= n and m % n == 0:
                up.append(m // n), down.append(1)
            elif m < n and n % m == 0:
                up.append(1), down.append(n // m)
            else:
                return None
        from onnx.reference import ReferenceEvaluator

        h, w = xs[2], xs[3]
        ramp = np.arange(h * w, dtype=np.float32).reshape(1, 1, h, w)
        consts = [self.info.consts[i] if i else None for i in op.inputs[1:]]
        if len(consts) > 2 and consts[2] is not None:  # sizes: the ramp is one image of one channel
            consts[2] = np.concatenate([[1, 1], consts[2][2:]]).astype(np.int64)
        feeds = {"x": ramp, **{f"c{k}": v for k, v in enumerate(consts) if v is not None}}
        ref = onnx.NodeProto()
        ref.CopyFrom(node)
        ref.input[:] = ["x"] + [f"c{k}" if v is not None else "" for k, v in enumerate(consts)]
        ref.output[:] = ["y"]
        try:
            got = ReferenceEvaluator(ref).run(None, feeds)[0]
        except Exception:  # noqa: BLE001 - a Resize the reference cannot run stays dense
            return None
        rows = np.arange(ys[2]) * down[0] // up[0]
        cols = np.arange(ys[3]) * down[1] // up[1]
        if got.shape != (1, 1, ys[2], ys[3]) or not np.array_equal(got[0, 0], ramp[0, 0][rows[:, None], cols[None, :]]):
            return None
        return (up[0], up[1]), (down[0], down[1])

    def _op_Concat(self, op: Op) -> bool:
        xs = self._nchw(op.output)
        if xs is None or op.attrs.get("axis") not in (1, -3) or min(xs[2], xs[3]) < self.opts.sparse_min_res:
            return False
        parts = []
        for i in op.inputs:
            s_ = self._nchw(i)
            if i not in self.dynamic or s_ is None or s_[2:] != xs[2:]:
                return False
            self._ensure_editable(i)
            parts.append((i, s_[1]))
        self.reps[op.output] = Rep(parts=tuple(parts), confined=all(self.reps[i].confined for i, _ in parts))
        return True

    def _indices(self, grid: BlockGrid) -> str:
        name = "idx/" + grid.key()
        self.indices[name] = grid
        return name

    def _scatter_map(self, p: Pending) -> str:
        name = "smap/" + p.grid.key()
        self.smaps[name] = {"indices": p.indices, **p.grid.to_json()}
        return name

    def _op_Add(self, op: Op) -> bool:
        a, b = op.inputs
        if a in self.dynamic and b in self.dynamic:
            self._ensure_editable(a)
            self._ensure_editable(b)
            ra, rb = self.reps[a], self.reps[b]
            pa = ra.pending is not None and ra.full is None and ra.plain and ra.pending.residual is None
            pb = rb.pending is not None and rb.full is None and rb.plain and rb.pending.residual is None
            if pa and pb and ra.pending.grid != rb.pending.grid and ra.pending.grid.out_hw == rb.pending.grid.out_hw:
                main, sc = (ra.pending, rb.pending)
                if main.grid.config.kernel < sc.grid.config.kernel:
                    main, sc = sc, main
                self.materialized_pending.update({main.blocks, sc.blocks})
                out = self.b.sige("SigeScatterWithBlockResidual",
                                  [main.blocks, self.cache(op.output), main.indices, sc.blocks, sc.base, sc.indices],
                                  EDIT_PREFIX + "scatter_block_residual", offset=list(main.grid.config.offset),
                                  stride=list(main.grid.config.stride), shortcut_offset=list(sc.grid.config.offset),
                                  shortcut_stride=list(sc.grid.config.stride))
                self.reps[op.output] = Rep(full=out, confined=True)
                return True
            if self._elementwise_expr(op, "Add"):
                return True
            batch1 = (self._nchw(op.output) or (0,))[0] == 1
            for main_rep, other in ((ra, b), (rb, a)):
                if (main_rep.pending is not None and main_rep.full is None and (main_rep.plain or batch1)
                        and main_rep.pending.residual is None and self._nchw(other) == self._nchw(op.output)):
                    confined = self.reps[other].confined
                    residual = self.full(other)
                    # a normalised branch (ResNet generators' x + IN(conv(...))): its scale / shift / activation
                    # apply to the blocks, which then scatter with the residual like a plain conv's
                    blocks = main_rep.pending.blocks if main_rep.plain else self._pre_ops(main_rep.pending.blocks,
                                                                                          main_rep)
                    self.reps[op.output] = Rep(pending=replace(main_rep.pending, blocks=blocks,
                                                               base=self.cache(op.output), residual=residual),
                                               confined=confined)
                    return True
            return False
        return self._static_affine(op, add=True)

    def _op_Mul(self, op: Op) -> bool:
        if all(i in self.dynamic for i in op.inputs):
            for i in op.inputs:
                self._ensure_editable(i)
            return self._elementwise_expr(op, "Mul", always=True)
        return self._static_affine(op, add=False)

    def _elementwise_expr(self, op: Op, op_type: str, always: bool = False) -> bool:
        """An elementwise op of two same-shape feature maps as an expression gathered where needed.

        Add prefers the scatter-with-residual fusion unless an operand already is an expression;
        Mul (SPADE's modulation) always becomes one. Batch 1 only (the blocks' validity mask).
        """
        a, b = op.inputs
        xs = self._nchw(op.output)
        if (xs is None or xs[0] != 1 or self._nchw(a) != xs or self._nchw(b) != xs
                or min(xs[2], xs[3]) < self.opts.sparse_min_res):
            return False
        ra, rb = self.reps[a], self.reps[b]
        if not (always or ra.expr is not None or rb.expr is not None):
            return False
        if ra.rows is not None or rb.rows is not None:
            return False
        ea = ra.expr or Expr((a,), lambda vals, t=a: vals[t])
        eb = rb.expr or Expr((b,), lambda vals, t=b: vals[t])

        def emit(vals: dict[str, str]) -> str:
            return self.b.node(op_type, [ea.emit(vals), eb.emit(vals)], EDIT_PREFIX + "blk_" + op_type.lower())

        leaves = tuple(dict.fromkeys(ea.leaves + eb.leaves))
        self.reps[op.output] = Rep(expr=Expr(leaves, emit), confined=ra.confined and rb.confined)
        return True

    def _static_affine(self, op: Op, add: bool) -> bool:
        a, b = op.inputs
        dyn, other = (a, b) if a in self.dynamic else (b, a)
        if other in self.dynamic:
            return False
        xs = self._nchw(dyn)
        if xs is None or self._nchw(op.output) != xs:
            return False
        os_ = self.info.shapes.get(other)
        if os_ is None:
            return False
        c = xs[1]
        if other in self.info.consts:
            pc = _per_channel(self.info.consts[other], c)
            if pc is None:
                return False
            val = self.b.const(EDIT_PREFIX + ("shift" if add else "scale"), pc.reshape(1, c, 1, 1))
        else:
            # A conditioning tensor (e.g. a time embedding [B, C, 1, 1]) computed in prime.
            if not (len(os_) == 4 and os_[2] == 1 and os_[3] == 1 and os_[1] == c):
                return False
            val = self.static(other)
        self._ensure_editable(dyn)
        if add:
            self._affine(dyn, op.output, None, val)
        else:
            self._affine(dyn, op.output, val, None)
        return True

    def _op_BatchNormalization(self, op: Op) -> bool:
        x = op.inputs[0]
        if x not in self.dynamic or any(i not in self.info.consts for i in op.inputs[1:5]):
            return False
        if op.attrs.get("training_mode", 0):
            return False
        xs = self._nchw(x)
        if xs is None:
            return False
        gamma, beta, mean, var = (self.info.consts[i].astype(np.float64) for i in op.inputs[1:5])
        s = gamma / np.sqrt(var + float(op.attrs.get("epsilon", 1e-5)))
        t = beta - mean * s
        c = xs[1]
        self._ensure_editable(x)
        self._affine(x, op.output, self.b.const(EDIT_PREFIX + "bn_scale", s.astype(np.float32).reshape(1, c, 1, 1)),
                     self.b.const(EDIT_PREFIX + "bn_shift", t.astype(np.float32).reshape(1, c, 1, 1)))
        return True

    def _op_GroupNorm(self, op: Op) -> bool:
        return self._norm(op, op.attrs["groups"], op.attrs["eps"], op.attrs["gamma"], op.attrs["beta"])

    def _op_InstanceNormalization(self, op: Op) -> bool:
        xs = self._nchw(op.inputs[0])
        if xs is None or op.inputs[1] not in self.info.consts or op.inputs[2] not in self.info.consts:
            return False
        c = xs[1]
        return self._norm(op, c, float(op.attrs.get("epsilon", 1e-5)),
                          self.info.consts[op.inputs[1]].reshape(c).astype(np.float32),
                          self.info.consts[op.inputs[2]].reshape(c).astype(np.float32))

    def _norm(self, op: Op, groups: int, eps: float, gamma: np.ndarray, beta: np.ndarray) -> bool:
        """A group norm as a per-channel affine folded into the next gather.

        ``original``: statistics of the primed tensor, cached. ``update``: prime caches per-group
        sums of x and x^2; the edit adds (new - old) over the scattered tiles of this resolution,
        so the statistics are exact for the edited tensor at a cost proportional to the edit.
        A tensor whose changes are not confined to scattered tiles (after a dense island) is
        normalised dense, which is exact too.
        """
        x = op.inputs[0]
        xs = self._nchw(x)
        if xs is None or xs[1] % groups:
            return False
        self._ensure_editable(x)
        rep = self.reps[x]
        update = self.opts.norm_stats == "update"
        if update and (not rep.confined or min(xs[2], xs[3]) < self.opts.sparse_min_res):
            return False
        mean, var = self._prime_moments(x, groups, op.name)
        scale, shift = self._norm_affine(self.prime, mean, var, xs, groups, eps, gamma, beta, f"stats/{op.name}")
        self._normalise_in_prime(op, x, scale, shift)
        if update:
            new_mean, new_var = self._edited_moments(x, rep, groups, self.cache(mean), self.cache(var))
            self.cache_updates.update({mean: new_mean, var: new_var})
            mean, var = new_mean, new_var
            scale, shift = self._norm_affine(self.b, mean, var, xs, groups, eps, gamma, beta, EDIT_PREFIX + "norm")
            self._affine(x, op.output, scale, shift)
        else:
            self._affine(x, op.output, self.cache(scale), self.cache(shift))
        return True

    def _normalise_in_prime(self, op: Op, x: str, scale: str, shift: str) -> None:
        """The prime pass normalises with the statistics it caches anyway: the original norm nodes go."""
        scaled = self.prime.node("Mul", [x, scale], f"stats/{op.name}/normalised")
        self.prime.nodes.append(helper.make_node("Add", [scaled, shift], [op.output], name=f"stats/{op.name}/out"))
        self.dropped.update(id(n) for n in op.nodes)

    def _prime_moments(self, x: str, groups: int, hint: str) -> tuple[str, str]:
        """Prime nodes: mean and variance [B, G, 1] of ``x`` per group (two passes, as the norm does)."""
        b = self._nchw(x)[0]
        p = self.prime
        tag = f"stats/{hint}"
        xg = p.node("Reshape", [x, p.const(tag + "/gshape", np.array([b, groups, -1], np.int64))], tag + "/xg")
        mean = self._reduce(p, "ReduceMean", xg, [2], tag + "/mean")
        centered = p.node("Sub", [xg, mean], tag + "/centered")
        var = self._reduce(p, "ReduceMean", p.node("Mul", [centered, centered], tag + "/sq"), [2], tag + "/var")
        return mean, var

    def _edited_moments(self, x: str, rep: Rep, groups: int, mean: str, var: str) -> tuple[str, str]:
        """Mean and variance [B, G, 1] of the edited ``x``: cached moments corrected where it changed.

        With d = new - old over the changed tiles and n elements per group:
        mean' = mean + sum(d)/n, var' = var + sum(d * (new + old - 2 mean))/n - (sum(d)/n)^2;
        every correction term is of the size of the change, so an unchanged tensor keeps its
        statistics bit for bit and no E[x^2] - E[x]^2 cancellation occurs.
        """
        b, c, h, w = self._nchw(x)
        e = self.b
        inv_n = e.const(EDIT_PREFIX + "inv_n", np.array(groups / (c * h * w), np.float32))
        p = rep.pending
        sums = None  # [2, B, G, 1] from one ai.sige moments op, read in one pass
        if p is not None and rep.full is None and p.residual is None and rep.act is None and rep.expr is None:
            # x differs from the primed tensor exactly at the pending blocks: their moments against the base
            sums = e.sige("SigeScatterMoments", [p.blocks, p.base, p.indices, mean, rep.scale or "", rep.shift or ""],
                          EDIT_PREFIX + "moments", offset=list(p.grid.config.offset),
                          stride=list(p.grid.config.stride), groups=groups)
        elif rep.plain and rep.expr is None and rep.rows is None and not self._fusable(rep):
            sums = self._tile_moments(x, rep, mean, groups)
        if sums is not None:
            def moment(i: int, hint_: str) -> str:
                at = [e.const(EDIT_PREFIX + "at", np.array([v], np.int64)) for v in (i, i + 1, 0)]
                row = e.node("Squeeze", [e.node("Slice", [sums, *at], EDIT_PREFIX + hint_), at[2]], EDIT_PREFIX + hint_)
                return e.node("Mul", [row, inv_n], EDIT_PREFIX + hint_)

            dmean, dvar = moment(0, "dmean"), moment(1, "dvar")
        else:  # an activation (or an expression) pending on x: its gathered tiles, then the sums
            tiles, tile = self._tiles((h, w))
            grid = BlockGrid((h, w), snap_block(tile, 1, 1, 0))  # a tile is a 1x1 "conv" block: no halo
            shape = e.const(EDIT_PREFIX + "gshape", np.array([b, -1, groups, (c // groups) * tile * tile], np.int64))
            new = e.node("Reshape", [self._gather(x, rep, grid, tiles), shape], EDIT_PREFIX + "new")
            old = e.node("Reshape", [self._gather_original(x, rep, grid, tiles), shape], EDIT_PREFIX + "old")
            mean4 = e.node("Unsqueeze", [mean, e.const(EDIT_PREFIX + "axis1", np.array([1], np.int64))],
                           EDIT_PREFIX + "mean4")  # [B, 1, G, 1]
            d = e.node("Sub", [new, old], EDIT_PREFIX + "delta")
            # the same difference again for the second sum: each reduction then fuses its own (new - old) and
            # d is never materialised (TVM's FuseOps fuses elementwise producers into one reduction only)
            d2 = e.node("Sub", [new, old], EDIT_PREFIX + "delta")
            two_mean = e.node("Add", [mean4, mean4], EDIT_PREFIX + "two_mean")
            centered = e.node("Sub", [e.node("Add", [new, old], EDIT_PREFIX + "new_old"), two_mean],
                              EDIT_PREFIX + "centered")
            axes2 = e.const(EDIT_PREFIX + "axis2", np.array([2], np.int64))

            def group_sum(v: str, hint_: str) -> str:  # [B, T, G, k] -> [B, G, 1]
                summed = self._reduce(e, "ReduceSum", v, [1, 3], EDIT_PREFIX + hint_, keepdims=0)
                return e.node("Unsqueeze", [summed, axes2], EDIT_PREFIX + hint_)

            dmean = e.node("Mul", [group_sum(d, "delta_sum"), inv_n], EDIT_PREFIX + "dmean")
            d_centered = e.node("Mul", [d2, centered], EDIT_PREFIX + "d_centered")
            dvar = e.node("Mul", [group_sum(d_centered, "delta_m2"), inv_n], EDIT_PREFIX + "dvar")
        new_mean = e.node("Add", [mean, dmean], EDIT_PREFIX + "mean")
        new_var = e.node("Sub", [e.node("Add", [var, dvar], EDIT_PREFIX + "var_plus"),
                                 e.node("Mul", [dmean, dmean], EDIT_PREFIX + "dmean_sq")], EDIT_PREFIX + "var")
        return new_mean, e.node("Relu", [new_var], EDIT_PREFIX + "var")  # rounding can dip below 0

    def _gather_original(self, x: str, rep: Rep, grid: BlockGrid, idx: str) -> str:
        """The primed values of ``x`` at the blocks of ``grid`` (from caches the edit already holds)."""
        block = list(grid.config.block)
        if rep.parts is not None:
            parts = [self.b.sige("SigeGather", [self.cache(t), idx], EDIT_PREFIX + "gather_orig", block=block)
                     for t, _ in rep.parts]
            gathered = self.b.node("Concat", parts, EDIT_PREFIX + "gather_orig", axis=1)
            if rep.plain:
                return gathered
            # The concat's own affine and activation, applied to the small gathered blocks.
            full = Rep(full=gathered, scale=rep.scale, shift=rep.shift, act=rep.act, alpha=rep.alpha)
            tmp = self.b.fresh(EDIT_PREFIX + "orig_blocks")
            self.reps[tmp] = full
            return self.full(tmp)
        if rep.pending is not None and rep.full is None:
            return self.b.sige("SigeGather", [rep.pending.base, idx, rep.scale or "", rep.shift or ""],
                               EDIT_PREFIX + "gather_orig", block=block, **self._pre_attrs(rep))
        return self.b.sige("SigeGather", [self.cache(x), idx], EDIT_PREFIX + "gather_orig", block=block)

    def _tile_moments(self, x: str, rep: Rep, mean: str, groups: int) -> str:
        """SigeTileMoments of plain ``x`` against its primed value over the changed tiles: [2, B, G, 1]. A concat
        whose parts hold whole groups gets one op per part, so neither tensor is concatenated."""
        b, c, h, w = self._nchw(x)
        e = self.b
        tiles, tile = self._tiles((h, w))
        per_group = c // groups
        if rep.parts is not None and all(n % per_group == 0 for _, n in rep.parts):
            sums, g0 = [], 0
            for t, n in rep.parts:
                bounds = [e.const(EDIT_PREFIX + "at", np.array([v], np.int64)) for v in (g0, g0 + n // per_group, 1)]
                part_mean = e.node("Slice", [mean, *bounds], EDIT_PREFIX + "part_mean")
                sums.append(e.sige("SigeTileMoments", [self.full(t), self.cache(t), tiles, part_mean],
                                   EDIT_PREFIX + "moments", block=[tile, tile], groups=n // per_group))
                g0 += n // per_group
            return e.node("Concat", sums, EDIT_PREFIX + "moments", axis=2)
        old = self._original(x, rep)  # before _full_base forgets a pending scatter's base
        return e.sige("SigeTileMoments", [self._full_base(x, rep), old, tiles, mean], EDIT_PREFIX + "moments",
                      block=[tile, tile], groups=groups)

    def _original(self, x: str, rep: Rep) -> str:
        """The primed value of plain ``x`` as one full tensor (from caches the edit already holds)."""
        if rep.parts is not None:
            return self.b.node("Concat", [self.cache(t) for t, _ in rep.parts], EDIT_PREFIX + "original", axis=1)
        if rep.pending is not None and rep.full is None:
            return rep.pending.base  # a scatter's base: the primed output
        return self.cache(x)

    def _tiles(self, hw: tuple[int, int]) -> tuple[str, int]:
        """Index input of the aligned tiles covering every block scattered at resolution ``hw``."""
        name = f"tiles/{hw[0]}x{hw[1]}"
        self.tiles[name] = hw
        return name, STAT_TILE

    def _norm_affine(self, bld: "_Builder", mean: str, var: str, xs: tuple, groups: int, eps: float,
                     gamma: np.ndarray, beta: np.ndarray, tag: str) -> tuple[str, str]:
        """Per-channel scale/shift [B, C, 1, 1] of a group norm from per-group mean/variance [B, G, 1]."""
        b, c = xs[0], xs[1]
        veps = bld.node("Add", [var, bld.const(tag + "/eps", np.array(eps, np.float32))], tag + "/var_eps")
        rstd = bld.node("Reciprocal", [bld.node("Sqrt", [veps], tag + "/std")], tag + "/rstd")
        to_c = bld.const(tag + "/cshape", np.array([b, c, 1, 1], np.int64))
        expand = bld.const(tag + "/eshape", np.array([b, groups, c // groups], np.int64))
        rstd_c = bld.node("Reshape", [bld.node("Expand", [rstd, expand], tag + "/rstd_e"), to_c], tag + "/rstd_c")
        mean_c = bld.node("Reshape", [bld.node("Expand", [mean, expand], tag + "/mean_e"), to_c], tag + "/mean_c")
        scale = bld.node("Mul", [rstd_c, bld.const(tag + "/gamma", gamma.reshape(1, c, 1, 1))], tag + "/scale")
        shift = bld.node("Sub", [bld.const(tag + "/beta", beta.reshape(1, c, 1, 1)),
                                 bld.node("Mul", [mean_c, scale], tag + "/mean_scale")], tag + "/shift")
        return scale, shift

    def _reduce(self, bld: "_Builder", op_type: str, x: str, axes: list[int], hint: str, keepdims: int = 1) -> str:
        """A reduction in the model's opset (axes moved from attribute to input in opset 18)."""
        if self.opset >= 18:
            return bld.node(op_type, [x, bld.const(hint + "/axes", np.array(axes, np.int64))], hint, keepdims=keepdims)
        return bld.node(op_type, [x], hint, axes=axes, keepdims=keepdims)

    def _op_Silu(self, op: Op) -> bool:
        self._ensure_editable(op.inputs[0])
        self._set_activation(op.inputs[0], op.output, "silu")
        return True

    def _op_Gelu(self, op: Op) -> bool:
        self._ensure_editable(op.inputs[0])
        self._set_activation(op.inputs[0], op.output, "gelu")
        return True

    def _op_Relu(self, op: Op) -> bool:
        self._ensure_editable(op.inputs[0])
        self._set_activation(op.inputs[0], op.output, "relu")
        return True

    def _op_LeakyRelu(self, op: Op) -> bool:
        self._ensure_editable(op.inputs[0])
        self._set_activation(op.inputs[0], op.output, "leaky_relu", float(op.attrs.get("alpha", 0.01)))
        return True

    def _op_Sigmoid(self, op: Op) -> bool:
        self._ensure_editable(op.inputs[0])
        self._set_activation(op.inputs[0], op.output, "sigmoid")
        return True

    def _op_Tanh(self, op: Op) -> bool:
        self._ensure_editable(op.inputs[0])
        self._set_activation(op.inputs[0], op.output, "tanh")
        return True


def _at_least_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """A copy of ``model`` at default-domain opset >= ``version`` (the op bodies use opset 18)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), version)
    if current >= version:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return m
    return onnx_io.convert_version(model, version)  # a new model too


def _check_static(model: onnx.ModelProto) -> None:
    init = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = vi.type.tensor_type.shape.dim
        bad = [d.dim_param or "?" for d in dims if not d.HasField("dim_value") or d.dim_value <= 0]
        if bad:
            raise SparsifyError(
                f"input {vi.name!r} has dynamic dimensions ({', '.join(bad)}); fix them with "
                f"--input-shape {vi.name}=1x3x256x256 (your sizes)")


def sparsify(dense: onnx.ModelProto, options: SparsifyOptions | None = None) -> SparsifyResult:
    """Build the SIGE program (prime + edit in one graph) from a dense ONNX model with static shapes."""
    options = options or SparsifyOptions()
    _check_static(dense)
    prepared = fold_constants(constants_to_initializers(_at_least_opset(dense, MIN_OPSET)))
    prepared = norms_before_depth_to_space(conv_transposes_as_convs(prepared))
    # Pass 1 learns which pending scatters get materialised anyway; pass 2 skips fusing those
    # into ScatterGather (the full tensor exists, so a plain sparse conv over it is cheaper).
    # Pass 1 only looks: it works on a copy without the weights' data, pass 2 on ``prepared`` itself.
    light, weights = onnx_io.detach_weights(prepared)
    first = _Sparsifier(light, options, set(), weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.run()
    s = _Sparsifier(prepared, options, first.materialized_pending)
    del first, light, weights
    s.run()
    if not s.sparse_convs:
        raise SparsifyError("the model has no convolution on the editable input's spatial path that can be "
                            "made sparse: nothing to sparsify")
    return _assemble(s)


def _assemble(s: _Sparsifier) -> SparsifyResult:
    from sige_export import custom_ops

    model = s.model
    g = model.graph
    dense_outputs = [o.name for o in g.output]
    edit_outputs = []
    for o in dense_outputs:
        s._ensure_editable(o)
        full = s.full(o) if o in s.dynamic else s.static(o)
        name = EDIT_PREFIX + o
        if full != name:
            s.b.nodes.append(helper.make_node("Identity", [full], [name], name=name))
        edit_outputs.append(name)
    kept = [n for n in g.node if id(n) not in s.dropped]
    del g.node[:]
    g.node.extend(kept + s.b.nodes)
    g.initializer.extend(s.b.inits)
    info = s.info
    elem = {n: info.dtypes.get(n, TensorProto.FLOAT) for n in info.dtypes}

    def vi(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, list(shape))

    for e in s.editable:
        g.input.append(vi(EDIT_PREFIX + e, info.shapes[e], elem.get(e, TensorProto.FLOAT)))
    for k, name in enumerate(sorted(s.indices)):
        g.input.append(vi(name, [f"N{k}", 2], TensorProto.INT32))
    for name, sm in sorted(s.smaps.items()):
        g.input.append(vi(name, sm["out_resolution"], TensorProto.INT32))
    for k, name in enumerate(sorted(s.tiles)):
        g.input.append(vi(name, [f"T{k}", 2], TensorProto.INT32))
    for k, name in enumerate(sorted(s.token_rows)):
        g.input.append(vi(name, [f"R{k}"], TensorProto.INT64))
    for o, eo in zip(dense_outputs, edit_outputs):
        g.output.append(vi(eo, info.shapes.get(o, []), elem.get(o, TensorProto.FLOAT)))
    # The prime pass's replacement norm nodes come after their consumers in the lists: sort.
    ordered = topological_nodes(g)
    del g.node[:]
    g.node.extend(ordered)
    custom_ops.attach_functions(model, in_place=True)
    # Shapes of every tensor (caches become outputs/inputs of the extracted passes).
    inferred = onnx_io.infer_shapes(model, weights=False)
    del g.value_info[:]
    g.value_info.extend(inferred.graph.value_info)
    known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    caches = []
    for c in s.caches:
        v = known.get(c)
        if v is None:
            raise SparsifyError(f"internal: no shape for cache {c!r}")
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        caches.append({"name": c, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(
            v.type.tensor_type.elem_type).name})
    prime_inputs = [i for i in s.inputs]
    manifest = {
        "format": "sige-program",
        "version": PROGRAM_FORMAT_VERSION,
        "inputs": [{"name": i, "shape": list(info.shapes[i]), "dtype": onnx.helper.tensor_dtype_to_np_dtype(
            elem.get(i, TensorProto.FLOAT)).name, "editable": i in s.editable} for i in prime_inputs],
        "outputs": dense_outputs,
        "prime": {"inputs": prime_inputs, "outputs": dense_outputs + [c["name"] for c in caches]},
        "edit": {
            "inputs": [EDIT_PREFIX + e for e in s.editable] + sorted(s.indices) + sorted(s.smaps) + sorted(s.tiles)
            + sorted(s.token_rows)
            + [c["name"] for c in caches],
            "outputs": edit_outputs,
            "edited": {e: EDIT_PREFIX + e for e in s.editable},
        },
        "caches": caches,
        "mask": {"source": s.editable[0], "resolution": list(info.shapes[s.editable[0]][2:4]),
                 "eps": s.opts.mask_eps, "dilation": s.opts.mask_dilation},
        "indices": [{"name": n, **g_.to_json()} for n, g_ in sorted(s.indices.items())],
        "scatter_maps": [{"name": n, **v} for n, v in sorted(s.smaps.items())],
        # Edited values of caches the edit recomputes other than by scattering (statistics, token maps).
        "cache_updates": dict(sorted(s.cache_updates.items())),
        "stat_tiles": [{"name": n, "resolution": list(hw), "tile": [STAT_TILE, STAT_TILE],
                        "grids": sorted(k for k, g_ in s.indices.items() if g_.out_hw == hw)}
                       for n, hw in sorted(s.tiles.items())],
        "token_rows": [{"name": n, "resolution": list(hw), "tile": [TOKEN_TILE, TOKEN_TILE],
                        "grids": sorted(k for k, g_ in s.indices.items() if g_.out_hw == hw)}
                       for n, hw in sorted(s.token_rows.items())],
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.opts.__dict__.items()},
        "sparse_convs": s.sparse_convs,
        "dense_islands": s.dense_islands,
        "warnings": s.warnings,
    }
    helper.set_model_props(model, {MANIFEST_KEY: json.dumps(manifest)})
    return SparsifyResult(model, manifest, s.warnings)
