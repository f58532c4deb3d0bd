"""SigeTileMoments(x, original, indices, mean) -> y: group-norm moment corrections over changed tiles.

With ``d = x - original`` read at the ``block`` tiles of ``indices`` (as SigeGather reads them, 0
outside the image) and channels split into ``groups`` consecutive groups:
``y[0, b, g, 0] = sum(d)`` and ``y[1, b, g, 0] = sum(d * (x + original - 2 * mean[b, g, 0]))``
over the tiles, the group's channels and the tile pixels. ``y`` is ``[2, B, G, 1]``. Tiles must not
overlap (they come from one aligned tile grid).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (BLOCK, GROUPS, SigeOpRun, Body, OpDef, Shape, body_finish_gather, body_flatten_hw,
                      body_gather_positions, check_float_arrays, check_gather_range, check_group_mean,
                      check_indices, fail, need_rank, np_gather_blocks, register)

OP_TYPE = "SigeTileMoments"
INPUTS = ("x", "original", "indices", "mean")


def validate(arrays: list[np.ndarray | None], attrs: dict[str, Any]) -> None:
    x, original, indices, mean = arrays
    check_float_arrays(OP_TYPE, ("x", x, 4), ("original", original, 4), ("mean", mean, 3))
    assert x is not None and original is not None and indices is not None and mean is not None
    if original.shape != x.shape:
        fail(OP_TYPE, f"original shape {list(original.shape)} != x shape {list(x.shape)}")
    check_group_mean(OP_TYPE, "x", x, mean, attrs["groups"])
    check_indices(OP_TYPE, indices)
    check_gather_range(OP_TYPE, indices, x.shape[2:], attrs["block"])


def compute(x: np.ndarray, original: np.ndarray, indices: np.ndarray, mean: np.ndarray, *,
            block: tuple[int, int], groups: int) -> np.ndarray:
    b = x.shape[0]

    def tiles(t: np.ndarray) -> np.ndarray:  # [B, N, G, C/G * bh * bw], float64 sums
        return np_gather_blocks(t, indices, block).reshape(b, -1, groups, t.shape[1] // groups * block[0] * block[1])

    new, old = tiles(x).astype(np.float64), tiles(original).astype(np.float64)
    d = new - old
    centered = new + old - 2.0 * mean.astype(np.float64)[:, None, :, :]
    return np.stack([d.sum(axis=(1, 3)), (d * centered).sum(axis=(1, 3))])[..., None].astype(x.dtype)


def body(bd: Body, inputs: list[str | None], attrs: dict[str, Any]) -> str:
    x, original, indices, mean = inputs
    assert x is not None and original is not None and indices is not None and mean is not None
    block, groups = attrs["block"], attrs["groups"]
    pos = body_gather_positions(bd, indices, x, block)
    per_group = bd.op("Mul", bd.op("Div", bd.shape(x, 1, 2), bd.ints([groups])), bd.ints([block[0] * block[1]]))
    grouped = bd.concat(bd.shape(x, 0, 1), bd.ints([-1, groups]), per_group)  # [B, N, G, C/G * bh * bw]

    def tiles(t: str) -> str:
        g = bd.op("Gather", body_flatten_hw(bd, t), pos.flat, axis=2)  # [B, C, N, bh, bw]
        return bd.reshape(body_finish_gather(bd, g, pos, block, bd.fresh("tiles")), grouped)

    new, old = tiles(x), tiles(original)
    d = bd.op("Sub", new, old)
    two_mean = bd.op("Mul", bd.unsqueeze(mean, [1]), bd.scalar_f32(2.0))  # [B, 1, G, 1]
    centered = bd.op("Sub", bd.op("Add", new, old), two_mean)
    axes = bd.ints([1, 3])
    sums = [bd.unsqueeze(bd.op("ReduceSum", v, axes, keepdims=0), [0, 3]) for v in (d, bd.op("Mul", d, centered))]
    return bd.op("Concat", *sums, axis=0, out="y")


def shape(shapes: list[Shape | None], attrs: dict[str, Any]) -> list[Shape]:
    b, _, _, _ = need_rank(OP_TYPE, "x", shapes[0], 4)
    return [(2, b, attrs["groups"], 1)]


OP = register(OpDef(OP_TYPE, INPUTS, 4, (BLOCK, GROUPS), validate, compute, body, shape, doc=__doc__ or ""))


class SigeTileMoments(SigeOpRun):
    """onnx.reference implementation of SigeTileMoments (the numpy reference above)."""

    op_def = OP
