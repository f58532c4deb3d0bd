"""SigeScatterMoments(blocks, base, indices, mean[, scale, shift]) -> y: group-norm moment corrections of a scatter.

With ``new = pre(SigeScatter(blocks, base, indices))`` and ``old = pre(base)``, ``pre(v) = v * scale + shift``
per channel (``scale``, ``shift`` broadcastable to ``[B, C, 1, 1]``), ``d = new - old`` and the channels split
into ``groups`` consecutive groups: ``y[0, b, g, 0] = sum(d)``, ``y[1, b, g, 0] = sum(d * (new + old - 2 *
mean[b, g, 0]))`` over the group's channels and the image. ``d`` is 0 outside the scattered blocks, so only
they are read. ``y`` is ``[2, B, G, 1]``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (GROUPS, SigeOpRun, Body, OpDef, Shape, body_scatter_positions, check_blocks_vs_base,
                      check_float, check_float_arrays, check_group_mean, check_indices, check_scatter_range, fail,
                      need_rank, np_scatter_blocks, register, scatter_attrs)

OP_TYPE = "SigeScatterMoments"
INPUTS = ("blocks", "base", "indices", "mean", "scale", "shift")


def validate(arrays: list[np.ndarray | None], attrs: dict[str, Any]) -> None:
    blocks, base, indices, mean, scale, shift = arrays
    check_indices(OP_TYPE, indices)
    check_float_arrays(OP_TYPE, ("blocks", blocks, 4), ("base", base, 4), ("mean", mean, 3))
    assert blocks is not None and base is not None and indices is not None and mean is not None
    check_blocks_vs_base(OP_TYPE, blocks, base, indices.shape[0])
    check_scatter_range(OP_TYPE, indices, attrs["offset"], attrs["stride"], base.shape[2:], blocks.shape[2:])
    check_group_mean(OP_TYPE, "base", base, mean, attrs["groups"])
    b, c = base.shape[:2]
    for name, p in (("scale", scale), ("shift", shift)):
        if p is None:
            continue
        check_float(OP_TYPE, name, p)
        if p.ndim > 4 or any(s not in (1, t) for s, t in zip(p.shape[::-1], (1, 1, c, b))):
            fail(OP_TYPE, f"{name} of shape {list(p.shape)} is not per channel (broadcastable to {[b, c, 1, 1]})")


def compute(blocks: np.ndarray, base: np.ndarray, indices: np.ndarray, mean: np.ndarray,
            scale: np.ndarray | None = None, shift: np.ndarray | None = None, *, offset: tuple[int, int],
            stride: tuple[int, int], groups: int) -> np.ndarray:
    scattered = base.astype(np.float64)
    np_scatter_blocks(scattered, blocks.astype(np.float64), indices, offset, stride)

    def pre(v: np.ndarray) -> np.ndarray:
        return v * (1.0 if scale is None else scale) + (0.0 if shift is None else shift)

    b = base.shape[0]
    new = pre(scattered).reshape(b, groups, -1)
    old = pre(base.astype(np.float64)).reshape(b, groups, -1)
    d = new - old
    sums = [d.sum(axis=2), (d * (new + old - 2.0 * mean.astype(np.float64))).sum(axis=2)]
    return np.stack(sums)[..., None].astype(base.dtype)


def body(bd: Body, inputs: list[str | None], attrs: dict[str, Any]) -> str:
    blocks, base, indices, mean, scale, shift = inputs
    assert blocks is not None and base is not None and indices is not None and mean is not None
    pos, new = body_scatter_positions(bd, indices, blocks, base, attrs["offset"], attrs["stride"])  # [B, C, M]
    old = bd.op("GatherND", base, pos)
    def per_channel(p: str) -> str:  # broadcastable to [B, C, 1, 1] -> [B|1, C|1, 1]
        return bd.op("Reshape", bd.op("Expand", p, bd.ints([1, 1, 1, 1])), bd.ints([0, 0, 1]))

    def pre(v: str) -> str:
        if scale is not None:
            v = bd.op("Mul", v, per_channel(scale))
        if shift is not None:
            v = bd.op("Add", v, per_channel(shift))
        return v

    new, old = pre(new), pre(old)
    grouped = bd.concat(bd.shape(base, 0, 1), bd.ints([attrs["groups"], -1]))  # [B, G, C/G * M]
    d = bd.reshape(bd.op("Sub", new, old), grouped)
    centered = bd.op("Sub", bd.reshape(bd.op("Add", new, old), grouped), bd.op("Mul", mean, bd.scalar_f32(2.0)))
    axes = bd.ints([2])
    sums = [bd.unsqueeze(bd.op("ReduceSum", v, axes, keepdims=1), [0]) for v in (d, bd.op("Mul", d, centered))]
    return bd.op("Concat", *sums, axis=0, out="y")


def shape(shapes: list[Shape | None], attrs: dict[str, Any]) -> list[Shape]:
    b, _, _, _ = need_rank(OP_TYPE, "base", shapes[1], 4)
    return [(2, b, attrs["groups"], 1)]


OP = register(OpDef(OP_TYPE, INPUTS, 4, (*scatter_attrs(), GROUPS), validate, compute, body, shape,
                    doc=__doc__ or ""))


class SigeScatterMoments(SigeOpRun):
    """onnx.reference implementation of SigeScatterMoments (the numpy reference above)."""

    op_def = OP
