"""sige_export.mask: difference masks, dilation, downsampling, block snapping, block indices and
scatter maps against brute-force / torch references."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sige_export import custom_ops as co
from sige_export.mask import (ALIGN, BlockConfig, all_block_indices, block_grid, block_indices, difference_mask, dilate,
                              downsample, mask_integral, mask_pyramid, scatter_map, snap_block)
from tests.helpers import assert_close

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def masks(draw, max_side: int = 20) -> np.ndarray:
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    density = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]))
    return rng.random((h, w)) < density


# ---------------------------------------------------------------------------------------------- masks
def test_difference_mask_shapes_and_eps() -> None:
    a = np.zeros((2, 3, 5, 6), np.float32)
    b = a.copy()
    b[1, 2, 4, 5] = 0.5
    b[0, 0, 0, 0] = 1e-4
    m = difference_mask(a, b, eps=1e-3)
    assert m.dtype == bool and m.shape == (5, 6)
    assert m.sum() == 1 and m[4, 5]
    assert difference_mask(a[0], b[0], eps=1e-5).sum() == 1 and difference_mask(a[0], b[0], eps=1e-5)[0, 0]
    with pytest.raises(ValueError, match="shape mismatch"):
        difference_mask(a, b[:, :, :4])
    with pytest.raises(ValueError, match=r"\[C, H, W\] or \[B, C, H, W\]"):
        difference_mask(a[0, 0], b[0, 0])


@SETTINGS
@given(masks(), st.integers(0, 3), st.integers(0, 3))
def test_dilate_matches_max_pool(mask: np.ndarray, rh: int, rw: int) -> None:
    t = torch.tensor(mask, dtype=torch.float32)[None, None]
    want = torch.nn.functional.max_pool2d(t, (2 * rh + 1, 2 * rw + 1), stride=1, padding=(rh, rw))[0, 0] > 0
    got = dilate(mask, (rh, rw))
    assert got.dtype == bool and np.array_equal(got, want.numpy())
    assert np.array_equal(dilate(mask, rh), dilate(mask, (rh, rh)))


@SETTINGS
@given(masks(max_side=40), st.integers(1, 12), st.integers(1, 12))
def test_downsample_matches_torch_antialiased_bilinear(mask: np.ndarray, h: int, w: int) -> None:
    got = downsample(mask, (h, w))
    assert got.shape == (h, w) and got.dtype == bool
    if min(mask.shape + (h, w)) < 2:  # torch 2.13 antialias returns zeros for some size-1 axes
        assert got.any() == mask.any()
        return
    f = torch.nn.functional.interpolate(torch.tensor(mask, dtype=torch.float64)[None, None], size=(h, w),
                                        mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
    if not mask.any():
        assert not got.any()
        return
    thr = min(0.3, f.max() - 1e-6)
    assert np.array_equal(got, f > thr) or np.abs(f - thr).min() < 1e-9  # ties at the threshold aside
    assert got.any(), "a non-empty mask must stay non-empty"


def test_downsample_keeps_single_pixel_and_identity() -> None:
    m = np.zeros((64, 64), bool)
    m[63, 0] = True
    d = downsample(m, (4, 4))
    assert d.sum() >= 1 and d[3, 0]
    big = np.zeros((16, 16), bool)
    big[4:12, 4:12] = True
    assert np.array_equal(downsample(big, (16, 16)), big)
    assert np.array_equal(downsample(big, (8, 8))[2:6, 2:6], np.ones((4, 4), bool))


def test_mask_pyramid() -> None:
    m = np.zeros((32, 32), bool)
    m[10, 20] = True
    pyr = mask_pyramid(m, [(32, 32), (16, 16), (8, 8)], dilation=1)
    assert list(pyr) == [(32, 32), (16, 16), (8, 8)]
    assert pyr[(32, 32)].sum() == 9 and pyr[(32, 32)][9:12, 19:22].all()
    for (h, w), mm in pyr.items():
        assert mm.shape == (h, w) and mm.any()
    assert np.array_equal(mask_pyramid(m, [16], dilation=0)[(16, 16)], downsample(m, (16, 16)))


# ---------------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("b,k,s,p,block,stride,out", [
    (6, 3, 1, 1, 6, 4, 4), (6, 3, 2, 1, 5, 4, 2), (4, 1, 1, 0, 4, 4, 4), (4, 1, 2, 0, 3, 4, 2),
    (3, 3, 1, 1, 3, 1, 1), (8, 3, 2, 1, 7, 6, 3), (7, 1, 2, 0, 7, 8, 4),
])
def test_snap_block_rule(b: int, k: int, s: int, p: int, block: int, stride: int, out: int) -> None:
    cfg = snap_block(b, k, s, p)
    assert cfg == BlockConfig(block=(block, block), block_stride=(stride, stride), out_block=(out, out),
                              offset=(p, p), kernel=(k, k), stride=(s, s), padding=(p, p, p, p))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block = (1, 1)  # type: ignore[misc]


def test_snap_block_errors_and_pairs() -> None:
    with pytest.raises(ValueError, match="smaller than the kernel"):
        snap_block(2, 3, 1, 1)
    cfg = snap_block((6, 4), (3, 1), (2, 1), (1, 0))
    assert cfg.block == (5, 4) and cfg.block_stride == (4, 4) and cfg.out_block == (2, 4) and cfg.offset == (1, 0)


def _brute_block_indices(mask: np.ndarray, cfg: BlockConfig) -> np.ndarray:
    H, W = mask.shape
    ho, wo = cfg.out_hw((H, W))
    rows = [-cfg.offset[0] + i * cfg.block_stride[0] for i in range(math.ceil(ho / cfg.out_block[0]))]
    cols = [-cfg.offset[1] + j * cfg.block_stride[1] for j in range(math.ceil(wo / cfg.out_block[1]))]
    out = [(h, w) for h, w in itertools.product(rows, cols)
           if mask[max(h, 0):max(h + cfg.block[0], 0), max(w, 0):max(w + cfg.block[1], 0)].any()]
    return np.array(out, np.int32).reshape(-1, 2)


@SETTINGS
@given(masks(), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.integers(3, 8))
def test_block_indices_match_brute_force(mask: np.ndarray, k: int, s: int, b: int) -> None:
    cfg = snap_block(b, k, s, k // 2)
    if min(cfg.out_hw(mask.shape)) < 1:
        return
    got = block_indices(mask, cfg, in_hw=mask.shape)
    assert got.dtype == np.int32 and got.ndim == 2 and got.shape[1] == 2
    assert got.ctypes.data % ALIGN == 0 and got.flags.c_contiguous  # handed to the compiled pass without a copy
    assert np.array_equal(got, _brute_block_indices(mask, cfg))
    # the summed-area table shared by the grids of one resolution gives the same blocks
    assert np.array_equal(block_indices(mask, cfg, integral=mask_integral(mask)), got)
    if mask.all():
        assert np.array_equal(got, all_block_indices(cfg, mask.shape))


@SETTINGS
@given(masks(), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.integers(3, 8), st.integers(0, 3),
       st.integers(0, 3))
def test_block_indices_of_dilated_mask_by_widened_windows(mask: np.ndarray, k: int, s: int, b: int, rh: int,
                                                          rw: int) -> None:
    """``dilation=`` (wider windows on the mask) finds exactly the blocks of the dilated mask."""
    cfg = snap_block(b, k, s, k // 2)
    if min(cfg.out_hw(mask.shape)) < 1:
        return
    want = _brute_block_indices(dilate(mask, (rh, rw)), cfg)
    assert np.array_equal(block_indices(mask, cfg, dilation=(rh, rw)), want)
    assert np.array_equal(block_indices(mask, cfg, integral=mask_integral(mask), dilation=(rh, rw)), want)


@SETTINGS
@given(st.integers(1, 20), st.integers(1, 20), st.sampled_from([1, 3]), st.sampled_from([1, 2]), st.integers(3, 8))
def test_block_grid_covers_output_and_receptive_fields(h: int, w: int, k: int, s: int, b: int) -> None:
    cfg = snap_block(b, k, s, k // 2)
    ho, wo = cfg.out_hw((h, w))
    if min(ho, wo) < 1:
        return
    hs, _ = block_grid(cfg, (h, w))
    org = (hs + cfg.offset[0]) // cfg.stride[0]
    assert org[0] == 0 and np.all(np.diff(org) == cfg.out_block[0]) and org[-1] < ho <= org[-1] + cfg.out_block[0]
    # output row r of block i reads input rows r*s - p + [0, k): inside the block's window
    for hi, oi in zip(hs, org):
        for r in range(oi, min(oi + cfg.out_block[0], ho)):
            assert hi <= r * s - cfg.padding[0] and r * s - cfg.padding[0] + k <= hi + cfg.block[0]
    assert np.all(hs > -cfg.block[0]) and np.all(hs < h)  # valid SigeGather indices


def test_block_indices_errors_and_empty() -> None:
    cfg = snap_block(6, 3, 1, 1)
    assert block_indices(np.zeros((9, 9), bool), cfg).shape == (0, 2)
    with pytest.raises(ValueError, match="mask size 9x9 does not match the input size 8x9"):
        block_indices(np.zeros((9, 9), bool), cfg, in_hw=(8, 9))
    with pytest.raises(ValueError, match="2-D"):
        block_indices(np.zeros((1, 9, 9), bool), cfg)


@SETTINGS
@given(st.data())
def test_scatter_map_matches_brute_force_and_scatter(data: st.DataObject) -> None:
    ho, wo = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    ph, pw = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    offset, stride = data.draw(st.integers(0, 2)), data.draw(st.sampled_from([1, 2]))
    org = [(r, c) for r in range(0, ho, ph) for c in range(0, wo, pw)]
    keep = data.draw(st.lists(st.booleans(), min_size=len(org), max_size=len(org)))
    idx = np.array([(r * stride - offset, c * stride - offset) for (r, c), k in zip(org, keep) if k],
                   np.int32).reshape(-1, 2)
    got = scatter_map((ho, wo), idx, offset, stride, (ph, pw))
    want = np.full((ho, wo), -1, np.int32)
    for n, (h, w) in enumerate(idx):
        r0, c0 = (h + offset) // stride, (w + offset) // stride
        for i, j in itertools.product(range(ph), range(pw)):
            if r0 + i < ho and c0 + j < wo:
                want[r0 + i, c0 + j] = n * ph * pw + i * pw + j
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert got.ctypes.data % ALIGN == 0 and got.flags.c_contiguous
    # the same positions SigeScatter writes: scatter the flat offsets themselves
    blocks = np.arange(len(idx) * ph * pw, dtype=np.float32).reshape(len(idx), 1, ph, pw)
    base = np.full((1, 1, ho, wo), -1, np.float32)
    y = co.reference("SigeScatter", blocks, base, idx, offset=(offset, offset), stride=(stride, stride))
    assert_close(y[0, 0], got.astype(np.float32), rtol=0, atol=0)


def test_scatter_map_rejects_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        scatter_map((8, 8), np.array([[0, 0], [1, 1]], np.int32), 0, 1, (2, 2))
