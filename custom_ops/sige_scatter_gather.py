"""SigeScatterGather(blocks, base, scatter_map, indices[, scale, shift]) -> y.

``SigeGather(SigeScatter(blocks, base, ...), indices, scale, shift)`` without writing the full tensor:
``scatter_map[r, c]`` is the flat offset ``n*ph*pw + i*pw + j`` of the block element covering
``(r, c)``, or -1 (take ``base``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (SigeOpRun, BLOCK, PRE_ATTRS, Body, OpDef, Shape, body_flatten_hw, body_gather_positions,
                      body_pre_gather, check_array, check_blocks_vs_base, check_broadcast, check_gather_range,
                      check_indices, dim_mul, fail, need_rank, np_gather_blocks, np_pre, register)

OP_TYPE = "SigeScatterGather"
INPUTS = ("blocks", "base", "scatter_map", "indices", "scale", "shift")


def validate(arrays: list[np.ndarray | None], attrs: dict[str, Any]) -> None:
    blocks, base, smap, indices, scale, shift = arrays
    check_indices(OP_TYPE, indices)
    check_array(OP_TYPE, "blocks", blocks, 4)
    check_array(OP_TYPE, "base", base, 4)
    check_array(OP_TYPE, "scatter_map", smap)
    assert blocks is not None and base is not None and smap is not None and indices is not None
    b = base.shape[0]
    if b == 0 or blocks.shape[0] % b:
        fail(OP_TYPE, f"blocks batch {blocks.shape[0]} is not a multiple of base batch {b}")
    check_blocks_vs_base(OP_TYPE, blocks, base, blocks.shape[0] // b)
    if smap.dtype != np.int32:
        fail(OP_TYPE, f"scatter_map must be int32, got {smap.dtype.name}")
    if smap.shape != base.shape[2:]:
        fail(OP_TYPE, f"scatter_map shape {list(smap.shape)} != base spatial shape {list(base.shape[2:])}")
    limit = (blocks.shape[0] // b) * blocks.shape[2] * blocks.shape[3]
    if smap.size and (smap.min() < -1 or smap.max() >= limit):
        fail(OP_TYPE, f"scatter_map values must be in [-1, {limit}) (N*ph*pw), got "
                      f"[{int(smap.min())}, {int(smap.max())}]")
    check_gather_range(OP_TYPE, indices, base.shape[2:], attrs["block"])
    check_broadcast(OP_TYPE, "scale", scale, base.shape)
    check_broadcast(OP_TYPE, "shift", shift, base.shape)


def np_scatter_by_map(blocks: np.ndarray, base: np.ndarray, smap: np.ndarray) -> np.ndarray:
    b, c = base.shape[:2]
    n, php = blocks.shape[0] // b, blocks.shape[2] * blocks.shape[3]
    flat = blocks.reshape(b, n, c, php).transpose(0, 2, 1, 3).reshape(b, c, n * php)
    flat = np.concatenate([flat, np.zeros((b, c, 1), base.dtype)], axis=2)  # -1 -> the zero column
    taken = flat[:, :, np.where(smap < 0, flat.shape[2] - 1, smap)]
    return np.where(smap >= 0, taken, base).astype(base.dtype)


def compute(blocks: np.ndarray, base: np.ndarray, scatter_map: np.ndarray, indices: np.ndarray,
            scale: np.ndarray | None = None, shift: np.ndarray | None = None, *, block: tuple[int, int],
            activation: str, alpha: float, activation_first: int) -> np.ndarray:
    x = np_scatter_by_map(blocks, base, scatter_map)
    return np_gather_blocks(np_pre(x, scale, shift, activation, alpha, activation_first), indices, block)


def body(bd: Body, inputs: list[str | None], attrs: dict[str, Any]) -> str:
    blocks, base, smap, indices, scale, shift = inputs
    assert blocks is not None and base is not None and smap is not None and indices is not None
    pos = body_gather_positions(bd, indices, base, attrs["block"])
    m = bd.op("Cast", bd.op("Gather", bd.reshape(smap, bd.ints([-1])), pos.flat, axis=0), to=7)  # [N,bh,bw]
    B, C = bd.shape(base, 0, 1), bd.shape(base, 1, 2)
    nb = bd.op("Div", bd.shape(blocks, 0, 1), B)
    php = bd.op("Mul", bd.shape(blocks, 2, 3), bd.shape(blocks, 3, 4))
    flat = bd.op("Transpose", bd.reshape(blocks, bd.concat(B, nb, C, php)), perm=[0, 2, 1, 3])
    length = bd.op("Mul", nb, php)
    flat = bd.reshape(flat, bd.concat(B, C, length))
    zeros = bd.op("ConstantOfShape", bd.concat(B, C, bd.ints([1])))  # float32 0
    flat = bd.op("Concat", flat, zeros, axis=2)  # never empty: -1 maps to the zero column
    z = bd.scalar_i64(0)
    covered = bd.op("GreaterOrEqual", m, z)
    taken = bd.op("Gather", flat, bd.op("Where", covered, m, bd.op("Squeeze", length, bd.ints([0]))), axis=2)
    from_base = bd.op("Gather", body_flatten_hw(bd, base), pos.flat, axis=2)
    v = bd.op("Where", covered, taken, from_base)  # [B, C, N, bh, bw]
    return body_pre_gather(bd, v, pos, scale, shift, attrs, out="y")


def shape(shapes: list[Shape | None], attrs: dict[str, Any]) -> list[Shape]:
    b, c, _, _ = need_rank(OP_TYPE, "base", shapes[1], 4)
    n, _ = need_rank(OP_TYPE, "indices", shapes[3], 2)
    return [(dim_mul(b, n), c, *attrs["block"])]


OP = register(OpDef(OP_TYPE, INPUTS, 4, (BLOCK, *PRE_ATTRS), validate, compute, body, shape,
                    doc=__doc__ or ""))


class SigeScatterGather(SigeOpRun):
    """onnx.reference implementation of SigeScatterGather (the numpy reference above)."""

    op_def = OP
