"""SigeScatter(blocks, base, indices[, residual]) -> y: copy of base with the blocks written in (clipped)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (SigeOpRun, Body, OpDef, Shape, body_scatter_positions, check_array,
                      check_blocks_vs_base, check_indices, check_scatter_range, fail, need_rank,
                      np_scatter_blocks, register, scatter_attrs)

OP_TYPE = "SigeScatter"
INPUTS = ("blocks", "base", "indices", "residual")


def validate(arrays: list[np.ndarray | None], attrs: dict[str, Any]) -> None:
    blocks, base, indices, residual = arrays
    check_indices(OP_TYPE, indices)
    check_array(OP_TYPE, "blocks", blocks, 4)
    check_array(OP_TYPE, "base", base, 4)
    assert blocks is not None and base is not None and indices is not None
    check_blocks_vs_base(OP_TYPE, blocks, base, indices.shape[0])
    if residual is not None and residual.shape != base.shape:
        fail(OP_TYPE, f"residual shape {list(residual.shape)} != base shape {list(base.shape)}")
    check_scatter_range(OP_TYPE, indices, attrs["offset"], attrs["stride"], base.shape[2:], blocks.shape[2:])


def compute(blocks: np.ndarray, base: np.ndarray, indices: np.ndarray, residual: np.ndarray | None = None, *,
            offset: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    y = base.copy()
    np_scatter_blocks(y, blocks.astype(base.dtype, copy=False), indices, offset, stride, residual)
    return y


def body(bd: Body, inputs: list[str | None], attrs: dict[str, Any]) -> str:
    blocks, base, indices, residual = inputs
    assert blocks is not None and base is not None and indices is not None
    pos, vals = body_scatter_positions(bd, indices, blocks, base, attrs["offset"], attrs["stride"])
    if residual is not None:
        vals = bd.op("Add", vals, bd.op("GatherND", residual, pos))
    return bd.op("ScatterND", base, pos, vals, out="y")


def shape(shapes: list[Shape | None], attrs: dict[str, Any]) -> list[Shape]:
    return [need_rank(OP_TYPE, "base", shapes[1], 4)]


OP = register(OpDef(OP_TYPE, INPUTS, 3, scatter_attrs(), validate, compute, body, shape, doc=__doc__ or ""))


class SigeScatter(SigeOpRun):
    """onnx.reference implementation of SigeScatter (the numpy reference above)."""

    op_def = OP
