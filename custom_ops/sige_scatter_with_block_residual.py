"""SigeScatterWithBlockResidual: scatter the main branch over the cached sum, then correct the shortcut.

``y = SigeScatter(blocks, base, indices, residual=shortcut_base)``, then at the shortcut blocks
``y[region] += shortcut_blocks - shortcut_base[region]``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (SigeOpRun, Body, OpDef, Shape, body_scatter_positions, check_array,
                      check_blocks_vs_base, check_indices, check_scatter_range, fail, need_rank,
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
    pos, vals = body_scatter_positions(bd, indices, blocks, base, attrs["offset"], attrs["stride"])
    y = bd.op("ScatterND", base, pos, bd.op("Add", vals, bd.op("GatherND", sc_base, pos)))
    pos2, vals2 = body_scatter_positions(bd, sc_indices, sc_blocks, base, attrs["shortcut_offset"],
                                         attrs["shortcut_stride"])
    vals2 = bd.op("Sub", vals2, bd.op("GatherND", sc_base, pos2))
    return bd.op("ScatterND", y, pos2, vals2, reduction="add", out="y")


def shape(shapes: list[Shape | None], attrs: dict[str, Any]) -> list[Shape]:
    return [need_rank(OP_TYPE, "base", shapes[1], 4)]


OP = register(OpDef(OP_TYPE, INPUTS, 6, (*scatter_attrs(), *scatter_attrs("shortcut_")), validate, compute,
                    body, shape, doc=__doc__ or ""))


class SigeScatterWithBlockResidual(SigeOpRun):
    """onnx.reference implementation of SigeScatterWithBlockResidual (the numpy reference above)."""

    op_def = OP
