"""SigeSparseConv2d(x, indices, weight[, bias, scale, shift]) -> y: Conv(SigeGather(x, ...), pads=0) (the gather
may resample x: ``upsample`` / ``downsample``, and pad it by reflection or its border: ``padding_mode``)."""
from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import sige_gather
from ._common import (SigeOpRun, BLOCK, PADDING, PRE_ATTRS, RESAMPLE, AttrSpec, Body, OpDef, Shape, _positive,
                      _stride_1_2, check_array, check_broadcast, check_float, check_gather_range, check_indices,
                      check_resample_params, dim_mul, fail, frame_hw, need_rank, register)

OP_TYPE = "SigeSparseConv2d"
INPUTS = ("x", "indices", "weight", "bias", "scale", "shift")
ATTRS = (BLOCK, AttrSpec("strides", "pair", (1, 1), _stride_1_2), AttrSpec("group", "int", 1, _positive),
         *PRE_ATTRS, *RESAMPLE, PADDING)


def validate(arrays: list[np.ndarray | None], attrs: dict[str, Any]) -> None:
    x, indices, weight, bias, scale, shift = arrays
    check_array(OP_TYPE, "x", x, 4)
    check_array(OP_TYPE, "weight", weight, 4)
    assert x is not None and indices is not None and weight is not None
    check_float(OP_TYPE, "x", x)
    check_float(OP_TYPE, "weight", weight)
    check_indices(OP_TYPE, indices)
    g = attrs["group"]
    c, cout, kh, kw = x.shape[1], weight.shape[0], weight.shape[2], weight.shape[3]
    if c % g or weight.shape[1] * g != c:
        fail(OP_TYPE, f"channel mismatch: weight {list(weight.shape)} expects {weight.shape[1]}*group({g}) "
                      f"input channels, x has {c}")
    if cout % g:
        fail(OP_TYPE, f"weight output channels {cout} are not divisible by group {g}")
    bh, bw = attrs["block"]
    if kh > bh or kw > bw:
        fail(OP_TYPE, f"kernel {kh}x{kw} is larger than the block {bh}x{bw}")
    if bias is not None and bias.shape != (cout,):
        fail(OP_TYPE, f"bias must have shape [{cout}], got {list(bias.shape)}")
    check_gather_range(OP_TYPE, indices, frame_hw(OP_TYPE, x.shape[2:], attrs), attrs["block"])
    check_broadcast(OP_TYPE, "scale", scale, x.shape)
    check_broadcast(OP_TYPE, "shift", shift, x.shape)
    check_resample_params(OP_TYPE, x, scale, shift, attrs)


def np_conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, strides: tuple[int, int],
              group: int) -> np.ndarray:
    """Grouped conv, no padding, float64 accumulation (sliding windows + einsum)."""
    m, c, _, _ = x.shape
    cout, cg, kh, kw = weight.shape
    sh, sw = strides
    win = sliding_window_view(x.astype(np.float64), (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    oh, ow = win.shape[2], win.shape[3]
    win = win.reshape(m, group, cg, oh, ow, kh, kw)
    w = weight.astype(np.float64).reshape(group, cout // group, cg, kh, kw)
    y = np.einsum("mgcxyij,gdcij->mgdxy", win, w, optimize=True).reshape(m, cout, oh, ow)
    if bias is not None:
        y = y + bias.astype(np.float64)[None, :, None, None]
    return y.astype(x.dtype)


def compute(x: np.ndarray, indices: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
            scale: np.ndarray | None = None, shift: np.ndarray | None = None, *, block: tuple[int, int],
            strides: tuple[int, int], group: int, activation: str, alpha: float,
            activation_first: int, upsample: tuple[int, int] = (1, 1),
            downsample: tuple[int, int] = (1, 1), padding_mode: str = "zeros") -> np.ndarray:
    g = sige_gather.compute(x, indices, scale, shift, block=block, activation=activation, alpha=alpha,
                            activation_first=activation_first, upsample=upsample, downsample=downsample,
                            padding_mode=padding_mode)
    return np_conv2d(g, weight, bias, strides, group)


def body(bd: Body, inputs: list[str | None], attrs: dict[str, Any]) -> str:
    x, indices, weight, bias, scale, shift = inputs
    assert x is not None and indices is not None and weight is not None
    g = sige_gather.body_blocks(bd, [x, indices, scale, shift], attrs, out=bd.fresh("gathered"))
    conv_in = [g, weight] + ([bias] if bias is not None else [])
    return bd.op("Conv", *conv_in, out="y", strides=list(attrs["strides"]), group=attrs["group"],
                 pads=[0, 0, 0, 0])


def shape(shapes: list[Shape | None], attrs: dict[str, Any]) -> list[Shape]:
    b, _, _, _ = need_rank(OP_TYPE, "x", shapes[0], 4)
    n, _ = need_rank(OP_TYPE, "indices", shapes[1], 2)
    cout, _, kh, kw = need_rank(OP_TYPE, "weight", shapes[2], 4)
    (bh, bw), (sh, sw) = attrs["block"], attrs["strides"]
    if not (isinstance(kh, int) and isinstance(kw, int)):
        fail(OP_TYPE, "the weight's kernel size must be static")
    return [(dim_mul(b, n), cout, (bh - kh) // sh + 1, (bw - kw) // sw + 1)]


OP = register(OpDef(OP_TYPE, INPUTS, 3, ATTRS, validate, compute, body, shape, doc=__doc__ or ""))


class SigeSparseConv2d(SigeOpRun):
    """onnx.reference implementation of SigeSparseConv2d (the numpy reference above)."""

    op_def = OP
