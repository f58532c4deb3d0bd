"""SigeGather(x, indices[, scale, shift]) -> y: pre-ops on x, then gather ``block`` windows (zero outside) of its
frame (x itself, or x resized by ``upsample`` / ``downsample``; outside it 0, or with ``padding_mode`` its
reflection or border)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ._common import (SigeOpRun, BLOCK, PADDING, PRE_ATTRS, RESAMPLE, Body, OpDef, Shape, check_array,
                      check_broadcast, check_float, check_gather_range, check_indices, check_resample_params,
                      body_flatten_hw, body_gather_positions, body_pre_gather, body_resample, dim_mul, frame_hw,
                      need_rank, np_gather_blocks, np_pre, np_resample, register)

OP_TYPE = "SigeGather"
INPUTS = ("x", "indices", "scale", "shift")


def validate(arrays: list[np.ndarray | None], attrs: dict[str, Any]) -> None:
    x, indices, scale, shift = arrays
    check_array(OP_TYPE, "x", x, 4)
    assert x is not None and indices is not None
    check_float(OP_TYPE, "x", x)
    check_indices(OP_TYPE, indices)
    check_gather_range(OP_TYPE, indices, frame_hw(OP_TYPE, x.shape[2:], attrs), attrs["block"])
    check_broadcast(OP_TYPE, "scale", scale, x.shape)
    check_broadcast(OP_TYPE, "shift", shift, x.shape)
    check_resample_params(OP_TYPE, x, scale, shift, attrs)


def compute(x: np.ndarray, indices: np.ndarray, scale: np.ndarray | None = None,
            shift: np.ndarray | None = None, *, block: tuple[int, int], activation: str, alpha: float,
            activation_first: int, upsample: tuple[int, int] = (1, 1),
            downsample: tuple[int, int] = (1, 1), padding_mode: str = "zeros") -> np.ndarray:
    pre = np_pre(x, scale, shift, activation, alpha, activation_first)
    return np_gather_blocks(np_resample(pre, {"upsample": upsample, "downsample": downsample}), indices, block,
                            padding_mode)


def body_blocks(bd: Body, inputs: list[str | None], attrs: dict[str, Any], out: str) -> str:
    """The gathered blocks named ``out`` (SigeSparseConv2d convolves them)."""
    x, indices, scale, shift = inputs
    assert x is not None and indices is not None
    x = body_resample(bd, x, attrs)
    pos = body_gather_positions(bd, indices, x, attrs["block"], attrs["padding_mode"])
    g = bd.op("Gather", body_flatten_hw(bd, x), pos.flat, axis=2)  # [B, C, N, bh, bw]
    return body_pre_gather(bd, g, pos, scale, shift, attrs, out=out)


def body(bd: Body, inputs: list[str | None], attrs: dict[str, Any]) -> str:
    return body_blocks(bd, inputs, attrs, out="y")


def shape(shapes: list[Shape | None], attrs: dict[str, Any]) -> list[Shape]:
    b, c, _, _ = need_rank(OP_TYPE, "x", shapes[0], 4)
    n, _ = need_rank(OP_TYPE, "indices", shapes[1], 2)
    return [(dim_mul(b, n), c, *attrs["block"])]


OP = register(OpDef(OP_TYPE, INPUTS, 2, (BLOCK, *PRE_ATTRS, *RESAMPLE, PADDING), validate, compute, body,
                    shape, doc=__doc__ or ""))


class SigeGather(SigeOpRun):
    """onnx.reference implementation of SigeGather (the numpy reference above)."""

    op_def = OP
