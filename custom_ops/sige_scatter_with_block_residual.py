"""SigeScatterWithBlockResidual: scatter the main branch over the cached sum, then correct the shortcut.

``y = SigeScatter(blocks, base, indices, residual=shortcut_base)``, then at the shortcut blocks
``y[region] += shortcut_blocks - shortcut_base[region]``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (Body, OpDef, Shape, body_flatten_hw, body_scatter_positions, check_array,
                      check_blocks_vs_base, check_indices, check_scatter_range, fail, make_op_run, need_rank,
                      np_scatter_blocks, register, scatter_attrs)

OP_TYPE = "SigeScatterWithBlockResidual"
INPUTS = ("blocks", "base", "indices", "shortcut_blocks", "shortcut_base", "shortcut_indices")


def validate(arrays: list[np.ndarray | None], attrs: dict[str, Any]) -> None:
    blocks, base, indices, sc_blocks, sc_base, sc_indices = arrays
    check_indices(OP_TYPE, indices)
    check_indices(OP_TYPE, sc_indices, "shortcut_indices")
    check_array(OP_TYPE, "shortcut_base", sc_base, 4)
    assert base is not None and sc_base is not None and indices is not None and sc_indices is not None
    check_blocks_vs_base(OP_TYPE, blocks, base, indices.shape[0])
    check_blocks_vs_base(OP_TYPE, sc_blocks, base, sc_indices.shape[0], ("shortcut_blocks", "base"))
    assert blocks is not None and sc_blocks is not None
    if sc_base.shape != base.shape:
        fail(OP_TYPE, f"shortcut_base shape {list(sc_base.shape)} != base shape {list(base.shape)}")
    check_scatter_range(OP_TYPE, indices, attrs["offset"], attrs["stride"], base.shape[2:], blocks.shape[2:])
    check_scatter_range(OP_TYPE, sc_indices, attrs["shortcut_offset"], attrs["shortcut_stride"],
                        base.shape[2:], sc_blocks.shape[2:], "shortcut_indices")


def compute(blocks: np.ndarray, base: np.ndarray, indices: np.ndarray, shortcut_blocks: np.ndarray,
            shortcut_base: np.ndarray, shortcut_indices: np.ndarray, *, offset: tuple[int, int],
            stride: tuple[int, int], shortcut_offset: tuple[int, int],
            shortcut_stride: tuple[int, int]) -> np.ndarray:
    y = base.copy()
    np_scatter_blocks(y, blocks.astype(base.dtype, copy=False), indices, offset, stride, shortcut_base)
    np_scatter_blocks(y, shortcut_blocks.astype(base.dtype, copy=False), shortcut_indices, shortcut_offset,
                      shortcut_stride, -shortcut_base, add=True)
    return y


def body(bd: Body, inputs: list[str | None], attrs: dict[str, Any]) -> str:
    blocks, base, indices, sc_blocks, sc_base, sc_indices = inputs
    assert None not in (blocks, base, indices, sc_blocks, sc_base, sc_indices)
    sc_flat = body_flatten_hw(bd, sc_base)
    pos, vals = body_scatter_positions(bd, indices, blocks, base, attrs["offset"], attrs["stride"])
    vals = bd.op("Add", vals, bd.op("GatherElements", sc_flat, pos, axis=2))
    y = bd.op("ScatterElements", body_flatten_hw(bd, base), pos, vals, axis=2)
    pos2, vals2 = body_scatter_positions(bd, sc_indices, sc_blocks, base, attrs["shortcut_offset"],
                                         attrs["shortcut_stride"])
    vals2 = bd.op("Sub", vals2, bd.op("GatherElements", sc_flat, pos2, axis=2))
    y = bd.op("ScatterElements", y, pos2, vals2, axis=2, reduction="add")
    return bd.op("Reshape", y, bd.op("Shape", base), out="y")


def shape(shapes: list[Shape | None], attrs: dict[str, Any]) -> list[Shape]:
    return [need_rank(OP_TYPE, "base", shapes[1], 4)]


OP = register(OpDef(OP_TYPE, INPUTS, 6, (*scatter_attrs(), *scatter_attrs("shortcut_")), validate, compute,
                    body, shape, doc=__doc__ or ""))
SigeScatterWithBlockResidual = make_op_run(OP)
