"""Conv weights pre-packed once, at export: ``OIHW -> [O/v, I, H, W, v]`` (v output channels = one SIMD
register of the CPU target), stored packed in the artifact's weights blob and read as such by the
convolution kernels (dense ``Conv`` and ``SigeSparseConv2d``), so no call repacks weights.

Only weights whose every consumer in every pass is a group-1, dilation-1 ``Conv`` (weight input) or a
group-1 ``SigeSparseConv2d`` are packed; anything else keeps OIHW.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

SIGE_DOMAIN = "ai.sige"


def pack_width(cout: int, lanes: int) -> int:
    """Output channels per packed group: the largest divisor of ``cout`` that is <= ``lanes``."""
    for d in range(min(lanes, cout), 0, -1):
        if cout % d == 0:
            return d
    return 1


def pack_oihw(w: np.ndarray, v: int) -> np.ndarray:
    o, i, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(o // v, v, i, kh, kw).transpose(0, 2, 3, 4, 1))


def unpack(w: np.ndarray) -> np.ndarray:
    ov, i, kh, kw, v = w.shape
    return np.ascontiguousarray(w.transpose(0, 4, 1, 2, 3).reshape(ov * v, i, kh, kw))


def _attr(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def packable_conv_weights(models: Iterable, candidates: Iterable[str]) -> set[str]:
    """Names in ``candidates`` (4-D float initializers) used only as conv weights (see module doc)."""
    cand = set(candidates)
    ok: dict[str, bool] = {}
    for m in models:
        init = {t.name: t for t in m.graph.initializer}
        for out in m.graph.output:
            if out.name in cand:
                ok[out.name] = False
        for node in m.graph.node:
            for k, name in enumerate(node.input):
                if name not in cand:
                    continue
                good = False
                t = init.get(name)
                four_d = t is not None and len(t.dims) == 4
                if node.domain in ("", "ai.onnx") and node.op_type == "Conv" and k == 1 and four_d:
                    ap = _attr(node, "auto_pad", b"NOTSET")
                    ap = ap.decode() if isinstance(ap, bytes) else ap
                    good = (int(_attr(node, "group", 1)) == 1 and all(int(d) == 1 for d in _attr(node, "dilations", [1, 1]))
                            and ap in ("NOTSET", "") and len(_attr(node, "pads", [0, 0, 0, 0])) == 4)
                elif node.domain == SIGE_DOMAIN and node.op_type == "SigeSparseConv2d" and k == 2 and four_d:
                    good = int(_attr(node, "group", 1)) == 1
                ok[name] = ok.get(name, True) and good
    return {n for n, g in ok.items() if g}


def with_packed_inputs(model, packed_shapes: dict[str, tuple]):
    """A copy of ``model`` whose graph inputs in ``packed_shapes`` are declared with the packed shape."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in packed_shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in packed_shapes[vi.name]:
                dims.add().dim_value = int(d)
    return m
