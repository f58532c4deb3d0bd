"""Difference masks, mask pyramids, block snapping and block indices for SIGE (numpy, vectorised).

Conventions follow docs/sige-ops.md: a conv with kernel ``k``, stride ``s`` and padding ``p`` is
computed on a grid of input blocks whose top-left corners are ``-p + i * block_stride``; block
indices are int32 ``[N, 2]`` ``(h, w)`` in the coordinates of the conv's input.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np

__all__ = [
    "BlockConfig", "difference_mask", "dilate", "downsample", "mask_pyramid", "snap_block", "block_grid",
    "block_indices", "all_block_indices", "mask_integral", "scatter_map",
]

IntPair = Union[int, Sequence[int]]


ALIGN = 64  # bytes: compiled kernels read their inputs in place and assume this alignment


def aligned_empty(shape: Sequence[int], dtype=np.uint8) -> np.ndarray:
    """An uninitialised, writable, ``ALIGN``-byte aligned array (no copy when handed to a compiled pass)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    # np.ndarray with an offset: a slice of zero bytes would keep the unaligned start
    return np.ndarray(tuple(shape), dtype, buffer=raw, offset=(-raw.ctypes.data) % ALIGN)


def _pair(v: IntPair, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v), int(v)
    try:
        a, b = v  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (a, b)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(a), int(b)


def _mask2d(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [H, W] array, got shape {list(m.shape)}")
    return m.astype(bool, copy=False)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def difference_mask(a: np.ndarray, b: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Bool ``[H, W]``: ``|a - b| > eps`` anywhere over batch/channels (``[C,H,W]`` or ``[B,C,H,W]``)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"difference_mask: shape mismatch {list(a.shape)} vs {list(b.shape)}")
    if a.ndim not in (3, 4):
        raise ValueError(f"difference_mask: expected [C, H, W] or [B, C, H, W], got shape {list(a.shape)}")
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64)) > eps
    return diff.reshape(-1, *a.shape[-2:]).any(axis=0)


def _box_any_1d(m: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Any over the window ``[i - r, i + r]`` along ``axis`` (cumulative sums)."""
    if r <= 0:
        return m.copy()
    n = m.shape[axis]
    c = np.cumsum(m, axis=axis, dtype=np.int32)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)  # c[i] = sum m[:i]
    i = np.arange(n)
    hi = np.minimum(i + r + 1, n)
    lo = np.maximum(i - r, 0)
    return (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)) > 0


def dilate(mask: np.ndarray, radius: IntPair) -> np.ndarray:
    """Box dilation by ``radius`` (int or ``(rh, rw)``): a ``(2rh+1) x (2rw+1)`` window."""
    m = _mask2d(mask)
    rh, rw = _pair(radius, "radius")
    if rh < 0 or rw < 0:
        raise ValueError(f"dilate: radius must be non-negative, got {(rh, rw)}")
    return _box_any_1d(_box_any_1d(m, rh, 0), rw, 1)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` antialiased bilinear (triangle filter) weights, half-pixel centres.

    The same filter as ``torch.nn.functional.interpolate(mode='bilinear', antialias=True)``:
    every input pixel contributes to some output pixel when downsampling.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale
    lo = np.maximum(np.floor(centre - support + 0.5), 0)[:, None]
    hi = np.minimum(np.floor(centre + support + 0.5), n_in)[:, None]
    x = np.arange(n_in)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs((x - centre[:, None] + 0.5) / support))
    w = np.where((x >= lo) & (x < hi), w, 0.0)
    return w / w.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=64)
def _resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The banded ``_resize_matrix`` as ``(index, weight)`` ``[n_out, taps]`` (padding taps weigh 0)."""
    mat = _resize_matrix(n_in, n_out)
    nz = mat > 0
    first = nz.argmax(axis=1)
    taps = int((n_in - nz[:, ::-1].argmax(axis=1) - first).max())
    idx = np.minimum(first[:, None] + np.arange(taps)[None, :], n_in - 1)
    wts = np.where(first[:, None] + np.arange(taps)[None, :] < n_in, np.take_along_axis(mat, idx, axis=1), 0.0)
    idx.flags.writeable = wts.flags.writeable = False
    return idx, wts


def _resize_axis(m: np.ndarray, n_out: int, axis: int, keep: np.ndarray) -> np.ndarray:
    """The outputs ``keep`` of resizing ``m`` along ``axis`` with the antialiased filter, as a weighted gather (a
    matrix product would go through BLAS, whose worker threads then spin against the TVM runtime's on a small
    CPU)."""
    idx, wts = (t[keep] for t in _resize_taps(m.shape[axis], n_out))
    if axis == 0:
        return np.einsum("ot,otw->ow", wts, m[idx].astype(np.float64), optimize=False)
    return np.einsum("ot,hot->ho", wts, m[:, idx].astype(np.float64), optimize=False)


def _reached(nonzero: np.ndarray, n_out: int) -> np.ndarray:
    """The outputs of resizing a line to ``n_out`` whose filter taps reach one of its ``nonzero`` positions
    (every other output is exactly 0)."""
    idx, wts = _resize_taps(len(nonzero), n_out)
    return np.flatnonzero((nonzero[idx] & (wts > 0)).any(axis=1))


def downsample(mask: np.ndarray, size: IntPair, threshold: float = 0.3, eps: float = 1e-6) -> np.ndarray:
    """Resize the float mask bilinearly (antialiased) to ``size = (h, w)`` and threshold it.

    The threshold is ``min(threshold, max - eps)`` so a non-empty mask stays non-empty.
    """
    m = _mask2d(mask)
    h, w = _pair(size, "size")
    if h < 1 or w < 1:
        raise ValueError(f"downsample: size must be positive, got {(h, w)}")
    if (h, w) == m.shape:
        return m.copy()
    # only the outputs an edited pixel reaches are computed: an edit is a small part of the image
    nz = m != 0
    rows, cols = _reached(nz.any(axis=1), h), _reached(nz.any(axis=0), w)
    f = np.zeros((h, w))
    if rows.size and cols.size:
        f[np.ix_(rows, cols)] = _resize_axis(_resize_axis(m, h, 0, rows), w, 1, cols)
    top = float(f.max()) if f.size else 0.0
    if top <= 0.0:
        return np.zeros((h, w), bool)
    return f > min(threshold, top - eps)


def mask_pyramid(mask: np.ndarray, resolutions: Iterable[IntPair], dilation: IntPair = 1
                 ) -> dict[tuple[int, int], np.ndarray]:
    """``{(h, w): dilate(downsample(mask, (h, w)), dilation)}`` for every requested resolution."""
    m = _mask2d(mask)
    out: dict[tuple[int, int], np.ndarray] = {}
    for res in resolutions:
        hw = _pair(res, "resolution")
        out[hw] = dilate(downsample(m, hw), dilation)
    return out


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockConfig:
    """Snapped block geometry of one conv (all ``(h, w)``).

    ``block``: input block; ``block_stride``: distance between input blocks; ``out_block``: output
    block; ``offset``: scatter offset (= top/left padding). ``kernel``, ``stride``, ``padding``: the
    conv's, padding as (top, left, bottom, right) since exporters fold asymmetric pads into convs.
    """

    block: tuple[int, int]
    block_stride: tuple[int, int]
    out_block: tuple[int, int]
    offset: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]

    def out_hw(self, in_hw: IntPair) -> tuple[int, int]:
        """The conv's output size for input ``in_hw``."""
        H, W = _pair(in_hw, "in_hw")
        pt, pl, pb, pr = self.padding
        return tuple((n + p0 + p1 - k) // s + 1  # type: ignore[return-value]
                     for n, p0, p1, k, s in zip((H, W), (pt, pl), (pb, pr), self.kernel, self.stride))


def _pads4(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(padding, (int, np.integer)):
        return (int(padding),) * 4
    p = tuple(int(v) for v in padding)
    if len(p) == 2:
        return (p[0], p[1], p[0], p[1])
    if len(p) == 4:
        return p  # type: ignore[return-value]
    raise ValueError(f"padding must be an int, (h, w) or (top, left, bottom, right), got {padding!r}")


def snap_block(block: IntPair, kernel: IntPair, stride: IntPair = 1,
               padding: int | Sequence[int] = 0) -> BlockConfig:
    """Snap a requested block size to the conv: ``n = (b-k)//s``, input ``n*s+k``, stride ``(n+1)*s``."""
    b, k, s = (_pair(v, name) for v, name in ((block, "block"), (kernel, "kernel"), (stride, "stride")))
    p = _pads4(padding)
    if min(k) < 1 or min(s) < 1 or min(p) < 0:
        raise ValueError(f"snap_block: bad conv geometry kernel={k}, stride={s}, padding={p}")
    if b[0] < k[0] or b[1] < k[1]:
        raise ValueError(f"snap_block: block {b} is smaller than the kernel {k}")
    n = tuple((bi - ki) // si for bi, ki, si in zip(b, k, s))
    return BlockConfig(
        block=(n[0] * s[0] + k[0], n[1] * s[1] + k[1]),
        block_stride=((n[0] + 1) * s[0], (n[1] + 1) * s[1]),
        out_block=(n[0] + 1, n[1] + 1),
        offset=(p[0], p[1]),
        kernel=k,
        stride=s,
        padding=p,
    )


def block_grid(config: BlockConfig, in_hw: IntPair) -> tuple[np.ndarray, np.ndarray]:
    """Top-left rows and columns of the block grid: ``-offset + i * block_stride``."""
    ho, wo = config.out_hw(in_hw)
    if ho < 1 or wo < 1:
        raise ValueError(f"block_grid: input {tuple(_pair(in_hw, 'in_hw'))} is too small for kernel "
                         f"{config.kernel} with padding {config.padding}")
    nh, nw = math.ceil(ho / config.out_block[0]), math.ceil(wo / config.out_block[1])
    hs = -config.offset[0] + np.arange(nh, dtype=np.int64) * config.block_stride[0]
    ws = -config.offset[1] + np.arange(nw, dtype=np.int64) * config.block_stride[1]
    return hs, ws


def mask_integral(mask: np.ndarray) -> np.ndarray:
    """int32 ``[H + 1, W + 1]`` summed-area table of a 2-D mask (for :func:`block_indices`)."""
    m = _mask2d(mask)
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int32)
    inner = integral[1:, 1:]
    inner[...] = m  # in place, int32: a cumsum converting a bool array as it goes is 8x slower
    np.cumsum(inner, 1, out=inner)
    np.cumsum(inner, 0, out=inner)
    return integral


def block_indices(mask: np.ndarray, config: BlockConfig, in_hw: IntPair | None = None,
                  integral: np.ndarray | None = None, dilation: IntPair = 0) -> np.ndarray:
    """int32 ``[N, 2]`` top-lefts of the active blocks (row-major).

    A block is active when any mask pixel in its input window (clipped to the image) is set.
    ``in_hw``, when given, is the conv input's size and must equal the mask's. ``integral``: the mask's
    :func:`mask_integral`, when several grids share the mask. ``dilation``: the blocks of
    ``dilate(mask, dilation)``, found by widening each window instead (a box dilation followed by a
    box test is one wider box test; no dilated mask is built).
    """
    m = _mask2d(mask)
    if in_hw is not None and tuple(_pair(in_hw, "in_hw")) != m.shape:
        raise ValueError(f"block_indices: mask size {m.shape[0]}x{m.shape[1]} does not match the input size "
                         f"{_pair(in_hw, 'in_hw')[0]}x{_pair(in_hw, 'in_hw')[1]}")
    H, W = m.shape
    hs, ws = block_grid(config, (H, W))
    if integral is None:
        integral = mask_integral(m)
    dh, dw = _pair(dilation, "dilation")
    if dh < 0 or dw < 0:
        raise ValueError(f"block_indices: dilation must be non-negative, got {(dh, dw)}")
    r0, r1 = np.clip(hs - dh, 0, H), np.clip(hs + config.block[0] + dh, 0, H)
    c0, c1 = np.clip(ws - dw, 0, W), np.clip(ws + config.block[1] + dw, 0, W)
    count = (integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0] + integral[r0][:, c0])
    ii, jj = np.nonzero(count > 0)
    out = aligned_empty((len(ii), 2), np.int32)
    out[:, 0], out[:, 1] = hs[ii], ws[jj]
    return out


def all_block_indices(config: BlockConfig, in_hw: IntPair) -> np.ndarray:
    """int32 ``[N, 2]``: every block of the grid (the dense computation)."""
    hs, ws = block_grid(config, in_hw)
    hh, ww = np.meshgrid(hs, ws, indexing="ij")
    return np.stack([hh.ravel(), ww.ravel()], axis=1).astype(np.int32).reshape(-1, 2)


def scatter_map(out_hw: IntPair, indices: np.ndarray, offset: IntPair, stride: IntPair,
                out_block: IntPair) -> np.ndarray:
    """int32 ``[Ho, Wo]``: flat offset ``n*ph*pw + i*pw + j`` of the block element covering each
    position of the scattered tensor, or -1 (see SigeScatterGather)."""
    Ho, Wo = _pair(out_hw, "out_hw")
    oh, ow = _pair(offset, "offset")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(out_block, "out_block")
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[1] != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"scatter_map: indices must be an integer [N, 2] array, got {idx.dtype} {list(idx.shape)}")
    out = aligned_empty((Ho, Wo), np.int32)
    out.fill(-1)
    n = idx.shape[0]
    if n == 0:
        return out
    r0 = (idx[:, 0].astype(np.int64) + oh) // sh
    c0 = (idx[:, 1].astype(np.int64) + ow) // sw
    rows = np.broadcast_to(r0[:, None, None] + np.arange(ph)[None, :, None], (n, ph, pw))
    cols = np.broadcast_to(c0[:, None, None] + np.arange(pw)[None, None, :], (n, ph, pw))
    vals = np.arange(n * ph * pw, dtype=np.int64).reshape(n, ph, pw)
    valid = (rows >= 0) & (rows < Ho) & (cols >= 0) & (cols < Wo)
    flat = rows[valid] * Wo + cols[valid]
    if np.bincount(flat, minlength=Ho * Wo).max(initial=0) > 1:
        raise ValueError("scatter_map: blocks overlap (indices must come from one block grid)")
    out.reshape(-1)[flat] = vals[valid]
    return out
