"""ONNX -> Relax import with ``(domain, op_type)`` dispatch.

TVM's Relax ONNX frontend dispatches on ``op_type`` alone: a node ``Gather`` in domain
``ai.sige`` would silently become ONNX ``Gather``. ``SigeGraphImporter`` subclasses the
frontend's ``ONNXGraphImporter`` and routes every node by its domain *before* the frontend
sees it:

* ``""`` / ``"ai.onnx"``   -> the stock converter map (one node at a time)
* ``"ai.sige"``            -> ``R.call_tir`` to the TE/TIR definitions in ``sige_te``
  (an unknown op_type in ``ai.sige`` is rejected, never converted as a standard op)
* any other domain         -> rejected with an error naming the node

Model-local functions (the ai.sige ONNX bodies) are ignored: the ops are lowered natively.
The number of blocks ``N`` of each ``indices`` input is symbolic unless fixed in ``shapes``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import onnx

SIGE_DOMAIN = "ai.sige"
OUT_EWISE_FUSABLE = 4  # relay/relax OpPatternKind kOutEWiseFusable: elementwise consumers fuse into it
STANDARD_DOMAINS = ("", "ai.onnx")


class UnsupportedNodeError(ValueError):
    """A node the importer refuses to convert (unknown domain or unknown ai.sige op)."""


def _node_label(node: onnx.NodeProto) -> str:
    return f"node {node.name or '<unnamed>'!r} (op_type {node.op_type!r}, domain {node.domain!r})"


class VirtualConcat:
    """A channel ``Concat`` whose only consumers are ``SigeGather`` x or ``SigeTileMoments`` x / original
    inputs: never materialised, they read its parts (``sige_te.concat_load``)."""

    def __init__(self, parts):
        self.parts = list(parts)


# -- ai.sige converters -----------------------------------------------------------------------
def _ints(attrs, key, default=None):
    v = attrs.get(key, default)
    if v is None:
        raise UnsupportedNodeError(f"missing attribute {key!r}")
    return tuple(int(a) for a in v)


def _opt(inputs, i):
    return inputs[i] if len(inputs) > i and inputs[i] is not None else None


def _shape_of(expr):
    return [d for d in expr.ty.shape.values]


def _convert_gather(bb, inputs, attrs, name):
    from . import sige_te

    x, idx = inputs[0], inputs[1]
    scale, shift = _opt(inputs, 2), _opt(inputs, 3)
    pre = sige_te.PreOp.from_attrs(attrs)
    frame = sige_te.Frame.from_attrs(attrs)
    block = _ints(attrs, "block")
    xs = list(x.parts) if isinstance(x, VirtualConcat) else [x]
    nx = len(xs)
    args = xs + [idx] + [t for t in (scale, shift) if t is not None]

    def f(*a):
        xparts, idx, rest = list(a[:nx]), a[nx], list(a[nx + 1:])
        sc = rest.pop(0) if scale is not None else None
        sf = rest.pop(0) if shift is not None else None
        return sige_te.gather_te(xparts if nx > 1 else xparts[0], idx, block, pre, sc, sf, frame=frame)

    return bb.emit_te(f, *args, primfunc_name_hint="sige_gather", primfunc_attrs={"sige.op": "SigeGather"})


def _convert_sparse_conv(bb, inputs, attrs, name):
    from . import sige_te

    x, idx, w = inputs[0], inputs[1], inputs[2]
    bias, scale, shift = _opt(inputs, 3), _opt(inputs, 4), _opt(inputs, 5)
    pre = sige_te.PreOp.from_attrs(attrs)
    frame = sige_te.Frame.from_attrs(attrs)
    block = _ints(attrs, "block")
    strides = _ints(attrs, "strides", (1, 1))
    group = int(attrs.get("group", 1))
    present = [t for t in (bias, scale, shift) if t is not None]

    def f(x, idx, w, *rest):
        rest = list(rest)
        b = rest.pop(0) if bias is not None else None
        sc = rest.pop(0) if scale is not None else None
        sf = rest.pop(0) if shift is not None else None
        return sige_te.sparse_conv2d_te(x, idx, w, b, sc, sf, block=block, strides=strides, group=group, pre=pre,
                                        frame=frame)

    return bb.emit_te(f, x, idx, w, *present, primfunc_name_hint="sige_sparse_conv2d",
                      primfunc_attrs={"sige.op": "SigeSparseConv2d", "op_pattern": OUT_EWISE_FUSABLE})


def _convert_scatter_gather(bb, inputs, attrs, name):
    from . import sige_te

    blocks, base, smap, idx = inputs[:4]
    scale, shift = _opt(inputs, 4), _opt(inputs, 5)
    pre = sige_te.PreOp.from_attrs(attrs)
    block = _ints(attrs, "block")
    present = [t for t in (scale, shift) if t is not None]

    def f(blocks, base, smap, idx, *rest):
        rest = list(rest)
        sc = rest.pop(0) if scale is not None else None
        sf = rest.pop(0) if shift is not None else None
        return sige_te.scatter_gather_te(blocks, base, smap, idx, block=block, pre=pre, scale=sc, shift=sf)

    return bb.emit_te(f, blocks, base, smap, idx, *present, primfunc_name_hint="sige_scatter_gather",
                      primfunc_attrs={"sige.op": "SigeScatterGather"})


def _convert_tile_moments(bb, inputs, attrs, name):
    from . import sige_te

    x, original, idx, mean = inputs[:4]
    xs = list(x.parts) if isinstance(x, VirtualConcat) else [x]
    os_ = list(original.parts) if isinstance(original, VirtualConcat) else [original]
    block = _ints(attrs, "block")
    groups = int(attrs["groups"])

    def f(*a):
        return sige_te.tile_moments_te(list(a[:len(xs)]), list(a[len(xs):len(xs) + len(os_)]), a[-2], a[-1],
                                       block=block, groups=groups)

    return bb.emit_te(f, *xs, *os_, idx, mean, primfunc_name_hint="sige_tile_moments",
                      primfunc_attrs={"sige.op": "SigeTileMoments"})


def _convert_scatter_moments(bb, inputs, attrs, name):
    from . import sige_te

    blocks, base, idx, mean = inputs[:4]
    scale, shift = _opt(inputs, 4), _opt(inputs, 5)
    present = [t for t in (scale, shift) if t is not None]

    def f(blocks, base, idx, mean, *rest):
        rest = list(rest)
        sc = rest.pop(0) if scale is not None else None
        sf = rest.pop(0) if shift is not None else None
        return sige_te.scatter_moments_te(blocks, base, idx, mean, sc, sf, offset=_ints(attrs, "offset", (0, 0)),
                                          stride=_ints(attrs, "stride", (1, 1)), groups=int(attrs["groups"]))

    return bb.emit_te(f, blocks, base, idx, mean, *present, primfunc_name_hint="sige_scatter_moments",
                      primfunc_attrs={"sige.op": "SigeScatterMoments"})


def _static(dims, what):
    out = []
    for d in dims:
        try:
            out.append(int(d))
        except TypeError:
            raise UnsupportedNodeError(f"{what}: dimension {d} must be static") from None
    return out


# attribute set on scatters whose base is a working copy (``with_working_copies``): written in place
IN_PLACE_ATTR = "sige_in_place"


def _scatter_target(bb, base, attrs, name):
    """What a scatter writes its blocks into: the working copy itself (``IN_PLACE_ATTR``), else a fresh copy
    of ``base``."""
    from tvm import relax

    from . import sige_te

    if int(attrs.get(IN_PLACE_ATTR, 0)):
        return base
    shape = _static(_shape_of(base), f"{name}: base")
    gv = bb.add_func(sige_te.copy_primfunc(*shape), "sige_scatter_copy")
    return bb.emit(relax.call_tir(gv, relax.Tuple([base]), relax.TensorType(shape, "float32")))


def _convert_scatter(bb, inputs, attrs, name):
    from tvm import relax

    from . import sige_te

    blocks, base, idx = inputs[0], inputs[1], inputs[2]
    residual = _opt(inputs, 3)
    B, C, Ho, Wo = _static(_shape_of(base), f"{name}: base")
    _, _, ph, pw = _shape_of(blocks)
    func = sige_te.scatter_primfunc(B, C, Ho, Wo, int(ph), int(pw), _ints(attrs, "offset", (0, 0)),
                                    _ints(attrs, "stride", (1, 1)), residual is not None)
    gv = bb.add_func(func, "sige_scatter")
    args = [blocks, _scatter_target(bb, base, attrs, name), idx] + ([residual] if residual is not None else [])
    return bb.emit(relax.call_tir_inplace(gv, relax.Tuple(args), [1], relax.TensorType((B, C, Ho, Wo), "float32")))


def _convert_scatter_block_residual(bb, inputs, attrs, name):
    from tvm import relax

    from . import sige_te

    blocks, base, idx, sblocks, sbase, sidx = inputs[:6]
    B, C, Ho, Wo = _static(_shape_of(base), f"{name}: base")
    _, _, ph, pw = _shape_of(blocks)
    _, _, sph, spw = _shape_of(sblocks)
    shortcut = (int(sph), int(spw), _ints(attrs, "shortcut_offset", (0, 0)), _ints(attrs, "shortcut_stride", (1, 1)))
    func = sige_te.scatter_primfunc(B, C, Ho, Wo, int(ph), int(pw), _ints(attrs, "offset", (0, 0)),
                                    _ints(attrs, "stride", (1, 1)), False, shortcut=shortcut)
    gv = bb.add_func(func, "sige_scatter_with_block_residual")
    args = [blocks, _scatter_target(bb, base, attrs, name), idx, sblocks, sbase, sidx]
    return bb.emit(relax.call_tir_inplace(gv, relax.Tuple(args), [1], relax.TensorType((B, C, Ho, Wo), "float32")))


# ai.sige inputs (by position) that may be a VirtualConcat
_READS_CONCAT_IN_PLACE = {"SigeGather": (0,), "SigeTileMoments": (0, 1)}

SIGE_CONVERTERS: dict[str, Callable] = {
    "SigeGather": _convert_gather,
    "SigeSparseConv2d": _convert_sparse_conv,
    "SigeScatter": _convert_scatter,
    "SigeScatterGather": _convert_scatter_gather,
    "SigeScatterWithBlockResidual": _convert_scatter_block_residual,
    "SigeTileMoments": _convert_tile_moments,
    "SigeScatterMoments": _convert_scatter_moments,
}


# -- the importer --------------------------------------------------------------------------------
def _importer_class():
    from tvm.relax.frontend.onnx import onnx_frontend as of

    class SigeGraphImporter(of.ONNXGraphImporter):
        """ONNXGraphImporter that dispatches on (domain, op_type)."""

        class _OneNode:
            def __init__(self, node):
                self.node = [node]

        def _check_for_unsupported_ops(self, graph):
            convert_map = of._get_convert_map()
            bad = []
            for node in graph.node:
                dom = node.domain
                if dom == SIGE_DOMAIN:
                    if node.op_type not in SIGE_CONVERTERS:
                        bad.append(f"{_node_label(node)}: not an op of the {SIGE_DOMAIN} op set "
                                   f"(known: {', '.join(sorted(SIGE_CONVERTERS))})")
                elif dom in STANDARD_DOMAINS:
                    if node.op_type not in convert_map and node.op_type not in ("If", "Constant"):
                        bad.append(f"{_node_label(node)}: ONNX op not supported by the TVM Relax frontend")
                else:
                    bad.append(f"{_node_label(node)}: unknown op domain {dom!r} "
                               f"(supported: standard ONNX and {SIGE_DOMAIN!r})")
            if bad:
                raise UnsupportedNodeError("cannot import the ONNX graph:\n  " + "\n  ".join(bad))

        packed_weights: frozenset = frozenset()

        def _virtual_concats(self, graph, uses: dict, outs: set) -> set:
            """Outputs of channel Concats of static 4-D tensors consumed only as inputs that read in place."""
            out = set()
            for node in graph.node:
                if node.domain not in STANDARD_DOMAINS or node.op_type != "Concat" or len(node.output) != 1:
                    continue
                axis = next((a.i for a in node.attribute if a.name == "axis"), None)
                y = node.output[0]
                u = uses.get(y, [])
                if axis not in (1, -3) or y in outs or not u or len(node.input) < 2:
                    continue
                if all(n.domain == SIGE_DOMAIN and k in _READS_CONCAT_IN_PLACE.get(n.op_type, ()) for n, k in u):
                    out.add(y)
            return out

        def _try_virtual_concat(self, node) -> bool:
            parts = [self._nodes.get(i) for i in node.input]
            try:
                shapes = [[int(d) for d in _shape_of(p)] for p in parts]
            except Exception:
                return False
            if any(len(s) != 4 for s in shapes) or len({(s[0], s[2], s[3]) for s in shapes}) != 1:
                return False
            dts = {str(p.ty.dtype) for p in parts}
            if dts != {"float32"}:
                return False
            self._nodes[node.output[0]] = VirtualConcat(parts)
            return True

        def _block_convs(self, graph, virtual: set, uses: dict, outs: set) -> tuple[dict, set]:
            """Convs over gathered blocks (pads 0) fused with what gathers their input, so the gathered blocks are
            never materialised (the schedules gather them per tile):

            * ``Conv(Concat(SigeGather(x_i, idx, scale_i, shift_i)...))`` (the UNet up path, group 1): one sparse
              conv reading every part in place;
            * ``Conv(SigeScatterGather(blocks, base, ...))`` (group 1 or depthwise): the conv over the virtual
              scatter.

            Returns ``{conv output: (kind, source nodes)}`` and the outputs not to emit."""
            prod = {o: n for n in graph.node for o in n.output}
            dims = {t.name: list(t.dims) for t in graph.initializer}
            dims.update({i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input})
            fused, skip = {}, set()
            for conv in graph.node:
                if conv.domain not in STANDARD_DOMAINS or conv.op_type != "Conv" or len(conv.input) < 2:
                    continue
                a = {at.name: onnx.helper.get_attribute_value(at) for at in conv.attribute}
                group = int(a.get("group", 1))
                w = dims.get(conv.input[1], [])
                depthwise = group > 1 and len(w) == 4 and w[0] == group and w[1] == 1
                if any(int(p) for p in a.get("pads", ())) or (group != 1 and not depthwise) \
                        or any(int(d) != 1 for d in a.get("dilations", ())) or a.get("auto_pad", b"NOTSET") != b"NOTSET":
                    continue
                src = prod.get(conv.input[0])
                if src is None or src.output[0] in outs or len(uses.get(src.output[0], [])) != 1:
                    continue
                if src.domain == SIGE_DOMAIN and src.op_type == "SigeScatterGather":
                    fused[conv.output[0]] = ("scatter_gather", [src])
                    skip.add(src.output[0])
                    continue
                if group != 1 or src.op_type != "Concat" or src.domain not in STANDARD_DOMAINS or len(src.input) < 2:
                    continue
                if next((at.i for at in src.attribute if at.name == "axis"), None) not in (1, -3):
                    continue
                gathers = [prod.get(i) for i in src.input]
                if any(g is None or g.domain != SIGE_DOMAIN or g.op_type != "SigeGather" or g.output[0] in outs
                       or len(uses.get(g.output[0], [])) != 1 or g.input[0] in virtual for g in gathers):
                    continue
                if len({g.input[1] for g in gathers}) != 1:
                    continue
                keys = [sorted((at.name, str(onnx.helper.get_attribute_value(at))) for at in g.attribute) for g in gathers]
                if any(k != keys[0] for k in keys):
                    continue
                fused[conv.output[0]] = ("concat", gathers)
                skip.update(g.output[0] for g in gathers)
                skip.add(src.output[0])
            return fused, skip

        def _construct_block_conv(self, conv, kind: str, sources) -> None:
            from tvm import relax

            from . import sige_te

            attrs = self._parse_attr(sources[0].attribute)
            pre = sige_te.PreOp.from_attrs(attrs)
            block = _ints(attrs, "block")
            conv_attrs = self._parse_attr(conv.attribute)
            strides = _ints(conv_attrs, "strides", (1, 1))
            group = int(conv_attrs.get("group", 1))
            w = self._nodes[conv.input[1]]
            bias = self._nodes[conv.input[2]] if len(conv.input) > 2 and conv.input[2] else None
            if kind == "scatter_gather":
                sg = sources[0]
                data = [self._nodes[i] for i in sg.input[:4]]  # blocks, base, scatter map, indices
                scale = self._nodes[sg.input[4]] if len(sg.input) > 4 and sg.input[4] else None
                shift = self._nodes[sg.input[5]] if len(sg.input) > 5 and sg.input[5] else None

                w_shape = [int(d) for d in _shape_of(w)]
                pointwise = group == 1 and w_shape[2:4] == [1, 1]

                def gathered(data_, sc, sf):
                    return sige_te.scatter_gather_te(*data_, block=block, pre=pre, scale=sc, shift=sf,
                                                     vector_pixels=pointwise)
            else:
                data = [self._nodes[g.input[0]] for g in sources] + [self._nodes[sources[0].input[1]]]
                chans = [int(_shape_of(x)[1]) for x in data[:-1]]

                def per_channel(k: int, fill: float):
                    present = [len(g.input) > k and g.input[k] != "" for g in sources]
                    if not any(present):
                        return None
                    parts = [self.bb.normalize(relax.op.reshape(self._nodes[g.input[k]], (1, c, 1, 1))) if p
                             else relax.const(np.full((1, c, 1, 1), fill, np.float32))
                             for g, c, p in zip(sources, chans, present)]
                    return self.bb.normalize(relax.op.concat(parts, axis=1))

                scale, shift = per_channel(2, 1.0), per_channel(3, 0.0)

                def gathered(data_, sc, sf):
                    return sige_te.gather_te(data_[:-1], data_[-1], block, pre, sc, sf,
                                             frame=sige_te.Frame.from_attrs(attrs))
            present = [t for t in (bias, scale, shift) if t is not None]
            n = len(data)

            def f(*a):
                data_, wt, rest = list(a[:n]), a[n], list(a[n + 1:])
                b = rest.pop(0) if bias is not None else None
                sc = rest.pop(0) if scale is not None else None
                sf = rest.pop(0) if shift is not None else None
                return sige_te.block_conv_te(gathered(data_, sc, sf), wt, b, strides=strides, group=group)

            self._nodes[conv.output[0]] = self.bb.emit_te(
                f, *data, w, *present, primfunc_name_hint="sige_sparse_conv2d",
                primfunc_attrs={"sige.op": "SigeSparseConv2d", "op_pattern": OUT_EWISE_FUSABLE})

        def _construct_nodes(self, graph):
            uses: dict[str, list] = {}  # tensor -> [(consumer node, input position)]
            for node in graph.node:
                for k, i in enumerate(node.input):
                    uses.setdefault(i, []).append((node, k))
            outs = {o.name for o in graph.output}
            virtual = self._virtual_concats(graph, uses, outs)
            fused, skip = self._block_convs(graph, virtual, uses, outs)
            attention = self._attention_chains(graph, uses, outs) if self.fuse_attention else {}
            skip |= {n.output[0] for chain in attention.values() for n in chain[:-1]}
            for node in graph.node:
                if node.output and node.output[0] in skip:
                    continue
                if node.output and node.output[0] in fused:
                    self._construct_block_conv(node, *fused[node.output[0]])
                    continue
                if node.output and node.output[0] in attention:
                    self._construct_attention(attention[node.output[0]])
                    continue
                if node.output and node.output[0] in virtual and self._try_virtual_concat(node):
                    continue
                if (node.domain in STANDARD_DOMAINS and node.op_type == "Conv" and len(node.input) > 1
                        and node.input[1] in self.packed_weights):
                    self._construct_packed_conv(node)
                elif node.domain in STANDARD_DOMAINS and node.op_type == "ReduceMean" and self._construct_mean_as_sum(node):
                    pass
                elif node.domain in STANDARD_DOMAINS and node.op_type == "Pad" and self._construct_border_pad(node):
                    pass
                elif (node.domain in STANDARD_DOMAINS and node.op_type == "ScatterElements"
                      and self._construct_scatter_elements(node)):
                    pass
                elif node.domain in STANDARD_DOMAINS:
                    super()._construct_nodes(self._OneNode(node))
                elif node.domain == SIGE_DOMAIN:
                    self._construct_sige(node)
                else:  # guarded by _check_for_unsupported_ops, kept for subgraphs
                    raise UnsupportedNodeError(f"{_node_label(node)}: unknown op domain {node.domain!r}")

        fuse_attention = False

        def _attention_chains(self, graph, uses: dict, outs: set) -> dict:
            """``MatMul(q, kt) [-> Mul(scale)] -> Softmax(last axis) -> MatMul(., v)`` whose intermediates have no
            other use: {final output: [the chain's nodes]}."""
            producer = {o: n for n in graph.node for o in n.output}

            def only_use(name):
                u = uses.get(name, [])
                return u[0] if len(u) == 1 and name not in outs else (None, None)

            chains = {}
            for sm in graph.node:
                if sm.domain not in STANDARD_DOMAINS or sm.op_type != "Softmax" \
                        or self._parse_attr(sm.attribute).get("axis", -1 if self.opset >= 13 else 1) not in (-1, 3):
                    continue
                final, pos = only_use(sm.output[0])
                if final is None or final.op_type != "MatMul" or pos != 0 or final.domain not in STANDARD_DOMAINS:
                    continue
                chain = [sm, final]
                pre = producer.get(sm.input[0])
                if pre is not None and pre.op_type == "Mul" and pre.domain in STANDARD_DOMAINS \
                        and only_use(pre.output[0])[0] is sm:
                    chain.insert(0, pre)
                    pre = next((producer.get(i) for i in pre.input if producer.get(i) is not None
                                and producer[i].op_type == "MatMul"), None)
                if pre is None or pre.op_type != "MatMul" or pre.domain not in STANDARD_DOMAINS \
                        or only_use(pre.output[0])[0] is not chain[0]:
                    continue
                chains[final.output[0]] = [pre] + chain
            return chains

        def _construct_attention(self, chain) -> None:
            """One ``sige_te.attention_te`` for a chain of ``_attention_chains`` (float32, ``q`` [B, H, M, D] with
            ``M`` the only symbolic dim, no broadcasting, a scalar constant scale); the chain's nodes one
            by one when it is not such a chain."""
            import tvm

            from . import sige_te

            scores, *rest = chain
            final = rest[-1]
            scale = 1.0
            ok = True
            if rest[0].op_type == "Mul":
                c = [self._nodes.get(i) for i in rest[0].input if i != scores.output[0]]
                ok = len(c) == 1 and isinstance(c[0], tvm.ir.expr.Constant) and c[0].value.numpy().size == 1
                scale = float(c[0].value.numpy().reshape(-1)[0]) if ok else 0.0
            q, kt = self._nodes.get(scores.input[0]), self._nodes.get(scores.input[1])
            v = self._nodes.get(final.input[1])
            try:
                qs, ks, vs = _shape_of(q), [int(d) for d in _shape_of(kt)], [int(d) for d in _shape_of(v)]
                static_q = [int(d) for k, d in enumerate(qs) if k != 2]
            except Exception:
                ok = False
            ok = ok and len(qs) == 4 and len(ks) == 4 and len(vs) == 4 \
                and all(str(t.ty.dtype) == "float32" for t in (q, kt, v)) \
                and static_q[:2] == ks[:2] == vs[:2] and static_q[2] == ks[2] and ks[3] == vs[2]
            if not ok:
                for node in chain:
                    super()._construct_nodes(self._OneNode(node))
                return
            from tvm import relax

            # k itself ([B, H, N, D]): kt's rows lie N floats apart, and a register tile's loads down them would
            # all fall in one L1 set; kt is mostly a Transpose, which this one folds into when fused
            k = self.bb.emit(relax.op.permute_dims(kt, [0, 1, 3, 2]))
            self._nodes[final.output[0]] = self.bb.emit_te(
                lambda q, k, v: sige_te.attention_te(q, k, v, scale), q, k, v,
                primfunc_name_hint="attention", primfunc_attrs={"sige.op": "Attention"})

        def _construct_border_pad(self, node) -> bool:
            """A reflect / edge Pad of H and W with constant pads as ``sige_te.pad_primfunc``; False for any other."""
            import tvm
            from tvm import relax

            from . import sige_te

            mode = next((at.s.decode() for at in node.attribute if at.name == "mode"), "constant")
            x = self._nodes.get(node.input[0])
            amounts = self._nodes.get(node.input[1]) if len(node.input) > 1 else None
            if mode not in ("reflect", "edge") or not isinstance(amounts, tvm.ir.expr.Constant) or any(node.input[3:]):
                return False
            p = [int(v) for v in amounts.value.numpy().reshape(-1)]
            try:
                shape = [int(d) for d in _shape_of(x)]
            except Exception:
                return False
            if len(shape) != 4 or len(p) != 8 or any(p[k] for k in (0, 1, 4, 5)) or min(p) < 0 \
                    or str(x.ty.dtype) != "float32":
                return False
            pads = (p[2], p[3], p[6], p[7])
            if mode == "reflect" and (max(pads[0], pads[2]) >= shape[2] or max(pads[1], pads[3]) >= shape[3]):
                return False
            out = [shape[0], shape[1], shape[2] + pads[0] + pads[2], shape[3] + pads[1] + pads[3]]
            gv = self.bb.add_func(sige_te.pad_primfunc(*shape, pads, mode), f"{mode}_pad")
            self._nodes[node.output[0]] = self.bb.emit(
                relax.call_tir(gv, relax.Tuple([x]), relax.TensorType(out, "float32")))
            return True

        def _construct_scatter_elements(self, node) -> bool:
            """ScatterElements of the changed tokens into a cached map (``sige_te.scatter_elements_primfunc`` over the
            tensors reshaped to [before axis, axis, after axis]): float32 data of static shape, int64 indices, no
            reduction; False for any other."""
            import math

            from tvm import relax

            from . import sige_te

            attrs = {at.name: at for at in node.attribute}
            if "reduction" in attrs and attrs["reduction"].s.decode() != "none":
                return False
            data, idx, upd = (self._nodes.get(i) for i in node.input)
            try:
                shape = [int(d) for d in _shape_of(data)]
                updates = list(_shape_of(upd))
            except Exception:
                return False
            axis = (attrs["axis"].i if "axis" in attrs else 0) % len(shape)
            if str(data.ty.dtype) != "float32" or str(idx.ty.dtype) != "int64" or len(updates) != len(shape):
                return False
            pre, post = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
            as3 = [pre, updates[axis], post]
            args = [self.bb.emit(relax.op.reshape(data, [pre, shape[axis], post])),
                    self.bb.emit(relax.op.reshape(idx, as3)), self.bb.emit(relax.op.reshape(upd, as3))]
            gv = self.bb.add_func(sige_te.scatter_elements_primfunc((pre, shape[axis], post)), "scatter_rows")
            out = self.bb.emit(relax.call_tir(gv, relax.Tuple(args),
                                              relax.TensorType([pre, shape[axis], post], "float32")))
            self._nodes[node.output[0]] = self.bb.emit(relax.op.reshape(out, shape))
            return True

        def _construct_mean_as_sum(self, node) -> bool:
            """ReduceMean over static axes as ReduceSum x 1/n: FuseOps fuses elementwise producers into a sum
            but not into a mean (a GroupNorm's ``mean((x - m)^2)`` would materialise ``(x - m)^2``: 4x slower)."""
            import tvm
            from tvm import relax

            x = self._nodes.get(node.input[0])
            try:
                shape = [int(d) for d in _shape_of(x)]
            except Exception:
                return False
            attrs = self._parse_attr(node.attribute)
            axes = attrs.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                a = self._nodes.get(node.input[1])
                if not isinstance(a, tvm.ir.expr.Constant):
                    return False
                axes = a.value.numpy().reshape(-1).tolist()
            if not axes or str(x.ty.dtype) not in ("float32", "float16"):
                return False
            n = 1
            for a in axes:
                n *= shape[int(a)]
            as_sum = onnx.NodeProto()
            as_sum.CopyFrom(node)
            as_sum.op_type = "ReduceSum"
            super()._construct_nodes(self._OneNode(as_sum))
            out = node.output[0]
            self._nodes[out] = self.bb.normalize(
                relax.op.multiply(self._nodes[out], relax.const(1.0 / n, str(x.ty.dtype))))
            return True

        def _construct_packed_conv(self, node):
            """ONNX Conv whose weight is pre-packed ``[Cout/v, Cin, kh, kw, v]`` (see ``packing``)."""
            from . import sige_te

            attrs = self._parse_attr(node.attribute)
            inputs = [self._nodes[i] if i != "" else None for i in node.input]
            pads = _ints(attrs, "pads", (0, 0, 0, 0))
            strides = _ints(attrs, "strides", (1, 1))
            x, w = inputs[0], inputs[1]
            b = _opt(inputs, 2)

            def f(x, w, *rest):
                return sige_te.conv2d_packed_te(x, w, rest[0] if rest else None, pads=pads, strides=strides)

            args = [x, w] + ([b] if b is not None else [])
            # op_pattern kOutEWiseFusable (as legalized relax.nn.conv2d): FuseOps fuses the epilogue
            self._nodes[node.output[0]] = self.bb.emit_te(f, *args, primfunc_name_hint="conv2d",
                                                          primfunc_attrs={"op_pattern": OUT_EWISE_FUSABLE})

        def _construct_sige(self, node):
            conv = SIGE_CONVERTERS.get(node.op_type)
            if conv is None:
                raise UnsupportedNodeError(f"{_node_label(node)}: not an op of the {SIGE_DOMAIN} op set")
            attrs = self._parse_attr(node.attribute)
            inputs = [self._nodes[i] if i != "" else None for i in node.input]
            try:
                out = conv(self.bb, inputs, attrs, node.name or node.op_type)
            except UnsupportedNodeError as e:
                raise UnsupportedNodeError(f"{_node_label(node)}: {e}") from None
            if len(node.output) != 1:
                raise UnsupportedNodeError(f"{_node_label(node)}: expected one output")
            self._nodes[node.output[0]] = out
            if int(attrs.get(IN_PLACE_ATTR, 0)):
                self._record_restore(node, attrs, inputs)

        working_copies: dict = {}  # working-copy input -> the cache input it mirrors
        restore_regions: list = []

        def _record_restore(self, node, attrs, inputs) -> None:
            """The regions an in-place scatter writes into its working copy (what ``restore`` copies back)."""
            work = node.input[1]
            shape = _static(_shape_of(inputs[1]), _node_label(node))
            regions = [(node.input[2], inputs[0], _ints(attrs, "offset", (0, 0)), _ints(attrs, "stride", (1, 1)))]
            if node.op_type == "SigeScatterWithBlockResidual":
                regions.append((node.input[5], inputs[3], _ints(attrs, "shortcut_offset", (0, 0)),
                                _ints(attrs, "shortcut_stride", (1, 1))))
            for idx, blocks, offset, stride in regions:
                self.restore_regions.append({"work": work, "cache": self.working_copies[work], "indices": idx,
                                             "shape": shape, "block": [int(d) for d in _shape_of(blocks)[2:]],
                                             "offset": offset, "stride": stride})

    return SigeGraphImporter


def _resolve_shapes(shapes: Mapping[str, Any] | None):
    """Turn ``{"x": (1, 64, 32, 32), "idx": ("N", 2)}`` into frontend shapes (str -> shared int64 tir.Var)."""
    from tvm import tirx

    if not shapes:
        return {}
    syms: dict[str, Any] = {}
    out = {}
    for k, shp in shapes.items():
        dims = []
        for d in shp:
            if d is None:
                d = f"{k}_dyn{len(dims)}"
            if isinstance(d, str):
                d = syms.setdefault(d, tirx.Var(d, "int64"))
            dims.append(d)
        out[k] = dims
    return out


def default_shapes(model: onnx.ModelProto, shapes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Shapes for every graph input: given ones win; ``indices`` inputs of sige ops get a symbolic ``N``."""
    init = {t.name for t in model.graph.initializer}
    given = dict(shapes or {})
    idx_inputs: dict[str, str] = {}
    for node in model.graph.node:
        if node.domain != SIGE_DOMAIN:
            continue
        pos = {"SigeGather": [1], "SigeSparseConv2d": [1], "SigeScatter": [2], "SigeScatterGather": [3],
               "SigeScatterWithBlockResidual": [2, 5], "SigeTileMoments": [2],
               "SigeScatterMoments": [2]}.get(node.op_type, [])
        for p in pos:
            if p < len(node.input):
                idx_inputs.setdefault(node.input[p], f"N_{len(idx_inputs)}")
    out = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        if vi.name in given:
            out[vi.name] = tuple(given[vi.name])
        elif vi.name in idx_inputs:
            out[vi.name] = (idx_inputs[vi.name], 2)
        else:
            dims = vi.type.tensor_type.shape.dim
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
    return out


def from_sige_onnx(model: onnx.ModelProto, shapes: Mapping[str, Any] | None = None, *,
                   keep_params_in_input: bool = False, packed_weights=(),
                   working_copies: Mapping[str, str] | None = None, fuse_attention: bool = False):
    """Import a SIGE ONNX model into a Relax ``IRModule`` (function ``main``; ``restore`` too when the model
    has working copies: ``working_copies`` is the map :func:`with_working_copies` returned).

    ``shapes`` maps input names to shapes; entries may be ints, strings (named symbolic dims,
    shared between inputs) or None (a fresh symbolic dim). ``indices`` inputs of ai.sige ops
    that are not given default to ``("N_k", 2)`` -- a symbolic block count, so one compiled
    module serves every mask. ``fuse_attention``: each ``softmax(q @ kt * scale) @ v`` becomes one
    ``sige_te.attention_te`` (scheduled by ``cpu.attention``; no GPU rule yet).
    """
    from tvm.relax.frontend.onnx import onnx_frontend as of

    if model.ir_version < 3:
        raise ValueError(f"ONNX IR version {model.ir_version} not supported")
    opset = 1
    for o in model.opset_import:
        if o.domain in STANDARD_DOMAINS:
            opset = o.version
            break
    for o in model.opset_import:
        if o.domain not in STANDARD_DOMAINS + (SIGE_DOMAIN,) and any(
                n.domain == o.domain for n in model.graph.node):
            bad = next(n for n in model.graph.node if n.domain == o.domain)
            raise UnsupportedNodeError(f"{_node_label(bad)}: unknown op domain {o.domain!r}")
    shape_dict = _resolve_shapes(default_shapes(model, shapes))
    dtypes = {}
    for vi in model.graph.input:
        et = vi.type.tensor_type.elem_type
        if et:
            dtypes[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(et).name
    Importer = _importer_class()
    g = Importer(shape_dict, dtypes, keep_params_in_input=keep_params_in_input, sanitize=True)
    g.packed_weights = frozenset(packed_weights)
    g.fuse_attention = fuse_attention
    g.working_copies = dict(working_copies or {})
    g.restore_regions = []
    mod = g.from_onnx(model.graph, opset)
    return _with_restore(mod, g.restore_regions) if g.restore_regions else mod


# Maps smaller than this keep the copying scatter: a memcpy of a few MiB costs less than the restore kernel's
# launch (ddpm-church256 at a 1.2% edit: 4 MiB and up in place 86 ms, every map 88 ms, none 92 ms).
WORKING_COPY_MIN_BYTES = 1 << 22


def with_working_copies(model: onnx.ModelProto, min_bytes: int | None = None) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The edit pass with its scatters into cached inputs writing into working copies, in place.

    A ``SigeScatter`` / ``SigeScatterWithBlockResidual`` whose ``base`` is a graph input of at least
    ``min_bytes`` (default ``WORKING_COPY_MIN_BYTES``) used as the base of no other scatter gets a new graph
    input ``<base>#work`` (same type) as its base and the attribute ``IN_PLACE_ATTR``: the import writes only
    its blocks into that tensor instead of copying the whole base, and adds ``restore`` / ``restore_full``
    (:func:`_with_restore`). The caller keeps one working copy per cache and makes it equal to the cache
    before each ``main`` call with them. Returns ``(model, {working-copy input: cache input})``."""
    min_bytes = WORKING_COPY_MIN_BYTES if min_bytes is None else min_bytes
    inputs = {i.name: i for i in model.graph.input}
    init = {t.name for t in model.graph.initializer}
    scatters = [n for n in model.graph.node if n.domain == SIGE_DOMAIN
                and n.op_type in ("SigeScatter", "SigeScatterWithBlockResidual") and len(n.input) > 1]
    bases: dict[str, int] = {}
    for n in scatters:
        bases[n.input[1]] = bases.get(n.input[1], 0) + 1
    m = onnx.ModelProto()
    m.CopyFrom(model)
    taken = set(inputs) | {o for n in m.graph.node for o in n.output}
    plan: dict[str, str] = {}
    new_inputs = []
    for n in m.graph.node:
        if n.domain != SIGE_DOMAIN or n.op_type not in ("SigeScatter", "SigeScatterWithBlockResidual"):
            continue
        base = n.input[1] if len(n.input) > 1 else ""
        if base not in inputs or base in init or bases.get(base) != 1 or _static_bytes(inputs[base]) < min_bytes:
            continue
        work = base + "#work"
        while work in taken:
            work += "_"
        taken.add(work)
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(inputs[base])
        vi.name = work
        new_inputs.append(vi)
        n.input[1] = work
        n.attribute.append(onnx.helper.make_attribute(IN_PLACE_ATTR, 1))
        plan[work] = base
    # before any lifted parameters (inputs that initializers shadow stay last, as the callers expect)
    k = next((j for j, i in enumerate(m.graph.input) if i.name in init), len(m.graph.input))
    for j, vi in enumerate(new_inputs):
        m.graph.input.insert(k + j, vi)
    return m, plan


def _static_bytes(vi) -> int:
    """Bytes of a float32 graph input with a static shape (0 when not static)."""
    n = 4
    for d in vi.type.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return 0
        n *= d.dim_value
    return n


def _with_restore(mod, regions: list[dict]):
    """``mod`` plus two Relax functions that put working copies back, in place, returning them:
    ``restore(work_1, cache_1, ..., indices...)`` copies each cache over the regions its working copy was
    written at (cheap for small edits); ``restore_full(work_1, cache_1, ...)`` copies whole maps (cheaper
    when the regions cover much of them). ``restore`` carries the attribute ``sige.restore_regions`` (JSON:
    per region its indices input and bytes per block; per working copy its bytes) to choose between them."""
    import json

    from tvm import relax, tirx

    from . import sige_te

    works = list(dict.fromkeys(r["work"] for r in regions))
    idxs = list(dict.fromkeys(r["indices"] for r in regions))
    first = {r["work"]: r for r in reversed(regions)}
    var: dict[str, Any] = {}
    maps = []
    for w in works:
        for name in (w, first[w]["cache"]):
            var[name] = relax.Var(name, relax.TensorType(first[w]["shape"], "float32"))
            maps.append(var[name])
    for k, i in enumerate(idxs):
        var[i] = relax.Var(i, relax.TensorType([tirx.Var(f"restore_n{k}", "int64"), 2], "int32"))
    info = json.dumps({"regions": [{"indices": r["indices"], "block_bytes": 4 * r["shape"][0] * r["shape"][1]
                                    * r["block"][0] * r["block"][1]} for r in regions],
                       "bytes": sum(4 * int(np.prod(first[w]["shape"])) for w in works)})
    bb = relax.BlockBuilder(mod)
    with bb.function("restore", maps + [var[i] for i in idxs], attrs={"sige.restore_regions": info}):
        cur = {w: var[w] for w in works}
        for r in regions:
            func = sige_te.restore_primfunc(*r["shape"], *r["block"], r["offset"], r["stride"])
            gv = bb.add_func(func, "sige_restore")
            cur[r["work"]] = bb.emit(relax.call_tir_inplace(
                gv, relax.Tuple([cur[r["work"]], var[r["cache"]], var[r["indices"]]]), [0],
                relax.TensorType(r["shape"], "float32")))
        bb.emit_func_output(relax.Tuple([cur[w] for w in works]))
    full = {m.name: relax.Var(m.name, m.ty) for m in maps}
    with bb.function("restore_full", list(full.values())):
        out = []
        for w in works:
            gv = bb.add_func(sige_te.copy_primfunc(*first[w]["shape"]), "sige_restore_full")
            out.append(bb.emit(relax.call_tir_inplace(gv, relax.Tuple([full[first[w]["cache"]], full[w]]), [1],
                                                      relax.TensorType(first[w]["shape"], "float32"))))
        bb.emit_func_output(relax.Tuple(out))
    return bb.get()
