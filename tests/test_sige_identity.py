"""The SIGE identity: sparse recomputation over the active blocks + scatter into the cached output
equals the dense computation on the edited input, through the numpy references and through
onnxruntime with the function bodies."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sige_export import custom_ops as co
from sige_export.custom_ops.testing import model_from_nodes, run_onnxruntime, run_reference
from sige_export.mask import all_block_indices, block_indices, difference_mask, dilate, scatter_map, snap_block
from tests.helpers import assert_close

RUNNERS: dict[str, Callable[..., list[np.ndarray]]] = {"reference": run_reference, "onnxruntime": run_onnxruntime}


def dense_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, padding: int, group: int
               ) -> np.ndarray:
    t = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                 None if b is None else torch.from_numpy(b).double(), stride=stride, padding=padding, groups=group)
    return t.float().numpy()


def torch_act(x: torch.Tensor, act: str) -> torch.Tensor:
    return {"identity": lambda v: v, "relu": F.relu, "silu": F.silu, "gelu": F.gelu,
            "leaky_relu": lambda v: F.leaky_relu(v, 0.2), "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act](x)


def pre_dense(x: np.ndarray, scale: np.ndarray | None, shift: np.ndarray | None, act: str) -> np.ndarray:
    t = torch.from_numpy(x).double()
    if scale is not None:
        t = t * torch.from_numpy(scale).double()
    if shift is not None:
        t = t + torch.from_numpy(shift).double()
    return torch_act(t, act).float().numpy()


def local_edit(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """The original with a random rectangle replaced by noise."""
    y = x.copy()
    _, _, h, w = x.shape
    r0, c0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
    y[:, :, r0:r0 + rng.integers(1, 4), c0:c0 + rng.integers(1, 4)] = rng.standard_normal((1, 1, 1, 1)) + 3.0
    return y


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("k,s,group,block,pre", [
    (3, 1, 1, 6, False), (3, 2, 1, 6, False), (1, 1, 1, 4, False), (1, 2, 1, 4, False),
    (3, 1, "dw", 6, False), (3, 2, 2, 8, False), (1, 1, 2, 5, False), (3, 1, 1, 7, True), (3, 2, "dw", 6, True),
    (1, 2, 1, 4, True),
])
def test_conv_identity(runner: str, k: int, s: int, group: Any, block: int, pre: bool) -> None:
    rng = np.random.default_rng(k * 100 + s * 10 + block + pre)
    B, C, H, W = 2, 4, 13, 17
    g = C if group == "dw" else group
    cout = 2 * g if group != "dw" else C
    pad = k // 2
    x0 = _f32(rng, B, C, H, W)
    wt, bias = _f32(rng, cout, C // g, k, k), _f32(rng, cout)
    pre_attrs: dict[str, Any] = {}
    scale = shift = None
    if pre:
        scale, shift = _f32(rng, C, 1, 1), _f32(rng, 1, C, H, W)
        pre_attrs = {"activation": "silu"}

    def dense(x: np.ndarray) -> np.ndarray:
        xin = pre_dense(x, scale, shift, "silu") if pre else x
        return dense_conv(xin, wt, bias, s, pad, g)

    y0 = dense(x0)  # the cached ("prime") output of the original
    x1 = local_edit(rng, x0)
    cfg = snap_block(block, k, s, pad)
    idx = block_indices(dilate(difference_mask(x0, x1), 1), cfg, in_hw=(H, W))
    assert 0 < len(idx) < len(all_block_indices(cfg, (H, W)))

    pre_in = ["sc", "sh"] if pre else []
    nodes = [
        co.make_node("SigeGather", ["x", "idx", *pre_in], ["g"], block=cfg.block, **pre_attrs),
        onnx_conv("g", "w", "b", "c", s, g),
        co.make_node("SigeScatter", ["c", "base", "idx"], ["y_gather_conv"], offset=cfg.offset, stride=cfg.stride),
        co.make_node("SigeSparseConv2d", ["x", "idx", "w", "b", *pre_in], ["sc_out"], block=cfg.block,
                     strides=cfg.stride, group=g, **pre_attrs),
        co.make_node("SigeScatter", ["sc_out", "base", "idx"], ["y_sparse_conv"], offset=cfg.offset,
                     stride=cfg.stride),
    ]
    feeds = {"x": x1, "idx": idx, "w": wt, "b": bias, "base": y0}
    if pre:
        feeds.update(sc=scale, sh=shift)
    model = model_from_nodes(nodes, feeds, ["y_gather_conv", "y_sparse_conv"], dynamic={"idx"})
    run = RUNNERS[runner]
    want = dense(x1)
    assert np.abs(want - y0).max() > 0.1, "the edit must change the output"
    for name, y in zip(["Gather->Conv->Scatter", "SparseConv2d->Scatter"], run(model, feeds)):
        assert_close(y, want, what=f"{runner} {name} (edited)")
    # every block active: dense, whatever the base holds
    feeds_all = {**feeds, "idx": all_block_indices(cfg, (H, W)), "base": np.full_like(y0, np.nan)}
    for name, y in zip(["Gather->Conv->Scatter", "SparseConv2d->Scatter"], run(model, feeds_all)):
        assert_close(y, want, what=f"{runner} {name} (all active)")
    # no block active: the cached output, unchanged
    feeds_none = {**feeds, "idx": np.zeros((0, 2), np.int32)}
    for name, y in zip(["Gather->Conv->Scatter", "SparseConv2d->Scatter"], run(model, feeds_none)):
        assert_close(y, y0, rtol=0, atol=0, what=f"{runner} {name} (N = 0)")


def onnx_conv(x: str, w: str, b: str, out: str, stride: int, group: int):  # type: ignore[no-untyped-def]
    from onnx import helper

    return helper.make_node("Conv", [x, w, b], [out], pads=[0, 0, 0, 0], strides=[stride, stride], group=group)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("s2,act", [(1, "relu"), (2, "gelu"), (1, "leaky_relu")])
def test_scatter_gather_identity(runner: str, s2: int, act: str) -> None:
    """conv1 -> [pre-ops] -> conv2: SigeScatterGather equals Scatter then Gather equals dense."""
    rng = np.random.default_rng(7 + s2)
    B, C, H, W = 1, 3, 14, 11
    x0 = _f32(rng, B, C, H, W)
    w1, b1, w2, b2 = _f32(rng, 4, C, 3, 3), _f32(rng, 4), _f32(rng, 5, 4, 3, 3), _f32(rng, 5)
    scale, shift = _f32(rng, 1, 4, 1, 1), _f32(rng, 4, H, W)

    def dense(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y1 = dense_conv(x, w1, b1, 1, 1, 1)
        return y1, dense_conv(pre_dense(y1, scale, shift, act), w2, b2, s2, 1, 1)

    y1_0, y2_0 = dense(x0)
    x1 = local_edit(rng, x0)
    m = difference_mask(x0, x1)
    cfg1, cfg2 = snap_block(6, 3, 1, 1), snap_block(6, 3, s2, 1)
    idx1 = block_indices(m, cfg1, in_hw=(H, W))
    idx2 = block_indices(dilate(m, 1), cfg2, in_hw=(H, W))  # conv1 spreads a change by one pixel
    smap = scatter_map((H, W), idx1, cfg1.offset, cfg1.stride, cfg1.out_block)
    pre = {"activation": act}
    nodes = [
        co.make_node("SigeSparseConv2d", ["x", "idx1", "w1", "b1"], ["blk1"], block=cfg1.block),
        # reference chain: scatter the full tensor, then gather
        co.make_node("SigeScatter", ["blk1", "base1", "idx1"], ["full1"], offset=cfg1.offset, stride=cfg1.stride),
        co.make_node("SigeGather", ["full1", "idx2", "sc", "sh"], ["g_ref"], block=cfg2.block, **pre),
        # fused
        co.make_node("SigeScatterGather", ["blk1", "base1", "smap", "idx2", "sc", "sh"], ["g"], block=cfg2.block,
                     **pre),
        onnx_conv("g", "w2", "b2", "blk2", s2, 1),
        co.make_node("SigeScatter", ["blk2", "base2", "idx2"], ["y2"], offset=cfg2.offset, stride=cfg2.stride),
    ]
    feeds = {"x": x1, "idx1": idx1, "w1": w1, "b1": b1, "base1": y1_0, "idx2": idx2, "sc": scale, "sh": shift,
             "smap": smap, "w2": w2, "b2": b2, "base2": y2_0}
    model = model_from_nodes(nodes, feeds, ["g_ref", "g", "y2"])
    g_ref, g, y2 = RUNNERS[runner](model, feeds)
    assert_close(g, g_ref, what=f"{runner}: ScatterGather == Scatter then Gather")
    assert_close(y2, dense(x1)[1], what=f"{runner}: two-conv chain == dense")


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("s", [1, 2])
def test_scatter_with_block_residual_identity(runner: str, s: int) -> None:
    """Resblock-like: conv3x3 main branch + conv1x1 shortcut (each on its own block grid)."""
    rng = np.random.default_rng(11 + s)
    B, C, H, W, Co = 2, 3, 15, 12, 4
    x0 = _f32(rng, B, C, H, W)
    wm, bm, ws, bs = _f32(rng, Co, C, 3, 3), _f32(rng, Co), _f32(rng, Co, C, 1, 1), _f32(rng, Co)

    def branches(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return dense_conv(x, wm, bm, s, 1, 1), dense_conv(x, ws, bs, s, 0, 1)

    main0, short0 = branches(x0)
    x1 = local_edit(rng, x0)
    m = difference_mask(x0, x1)
    cm, cs = snap_block(6, 3, s, 1), snap_block(4, 1, s, 0)
    im, is_ = block_indices(m, cm, in_hw=(H, W)), block_indices(m, cs, in_hw=(H, W))
    nodes = [
        co.make_node("SigeSparseConv2d", ["x", "im", "wm", "bm"], ["bm_out"], block=cm.block, strides=cm.stride),
        co.make_node("SigeSparseConv2d", ["x", "is", "ws", "bs"], ["bs_out"], block=cs.block, strides=cs.stride),
        co.make_node("SigeScatterWithBlockResidual", ["bm_out", "base", "im", "bs_out", "sbase", "is"], ["y"],
                     offset=cm.offset, stride=cm.stride, shortcut_offset=cs.offset, shortcut_stride=cs.stride),
    ]
    feeds = {"x": x1, "im": im, "wm": wm, "bm": bm, "is": is_, "ws": ws, "bs": bs, "base": main0 + short0,
             "sbase": short0}
    model = model_from_nodes(nodes, feeds, ["y"], dynamic={"im", "is"})
    main1, short1 = branches(x1)
    (y,) = RUNNERS[runner](model, feeds)
    assert_close(y, main1 + short1, what=f"{runner}: resblock == dense main + shortcut")
    empty = np.zeros((0, 2), np.int32)
    (y,) = RUNNERS[runner](model, {**feeds, "im": empty, "is": empty})
    assert_close(y, main0 + short0, rtol=0, atol=0, what=f"{runner}: N = 0 returns the cache")
