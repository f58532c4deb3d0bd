"""Each ai.sige op compiled by TVM for the host equals the numpy reference (custom_ops.reference)
within 1e-5, for several block counts N (including 0) with one compiled module (symbolic N)."""
from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper

from sige_export import custom_ops
from sige_export.compiler import compile_program
from sige_export.mask import scatter_map
from sige_export.targets import get as get_target
from sige_export.tvm_schedules.cpu import vector_lanes
from sige_export.tvm_schedules.importer import UnsupportedNodeError, from_sige_onnx
from tests.helpers import assert_close
from tests.sige_tvm_cases import grid_indices, init, make_model, ref_conv, vi

RNG = np.random.default_rng(1234)
B, C, H, W = 2, 8, 11, 13


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def idx_type():
    return vi("idx", ["N", 2], TensorProto.INT32)


def gather_grid(count, block=(6, 6), stride=(4, 4), offset=(1, 1), hw=(H, W)):
    return grid_indices(hw[0], hw[1], block, stride, offset, RNG, count)


COUNTS = (5, 0, 2, 9)  # varying N on one compiled module, N = 0 included


# -- SigeGather --------------------------------------------------------------------------------
GATHER_ATTRS = dict(block=[6, 6], activation="silu", activation_first=0)


@pytest.fixture(scope="module")
def gather_lib():
    node = custom_ops.make_node("SigeGather", ["x", "idx", "scale", "shift"], ["y"], **GATHER_ATTRS)
    m = make_model([node], [vi("x", [B, C, H, W]), idx_type(), vi("scale", [C, 1, 1]), vi("shift", [1, C, 1, 1])],
                   [vi("y", None)])
    return compile_program(m, "host", {"x": (B, C, H, W)})


def test_gather(gather_lib):
    x, sc, sh = f32(B, C, H, W), f32(C, 1, 1), f32(1, C, 1, 1)
    exe = gather_lib.executable
    for n in COUNTS:
        idx = gather_grid(n)
        got = gather_lib.run(x, idx, sc, sh)
        want = custom_ops.reference("SigeGather", x, idx, sc, sh, **GATHER_ATTRS)
        assert_close(got, want, what=f"SigeGather N={n}")
    assert gather_lib.executable is exe  # same module served every N


# -- SigeSparseConv2d --------------------------------------------------------------------------
CONV_CASES = {
    "s1_bias_relu": dict(attrs=dict(block=[6, 6], strides=[1, 1], activation="relu"), cout=16, group=1,
                         bias=True, pre=False, grid=((6, 6), (4, 4), (1, 1))),
    "s2_gelu_pre": dict(attrs=dict(block=[5, 5], strides=[2, 2], activation="gelu", activation_first=1), cout=8,
                        group=1, bias=False, pre=True, grid=((5, 5), (4, 4), (1, 1))),
    "group2_leaky": dict(attrs=dict(block=[6, 6], strides=[1, 1], group=2, activation="leaky_relu", alpha=0.1),
                         cout=12, group=2, bias=True, pre=True, grid=((6, 6), (4, 4), (1, 1))),
}


@pytest.fixture(scope="module")
def conv_libs():
    libs = {}
    for name, case in CONV_CASES.items():
        w = (f32(case["cout"], C // case["group"], 3, 3) * 0.3).astype(np.float32)
        b = f32(case["cout"]) if case["bias"] else None
        ins = ["x", "idx", "w", "b" if b is not None else ""]
        inputs = [vi("x", [B, C, H, W]), idx_type()]
        if case["pre"]:
            ins += ["scale", "shift"]
            inputs += [vi("scale", [1, C, 1, 1]), vi("shift", [B, C, H, W])]
        node = custom_ops.make_node("SigeSparseConv2d", ins, ["y"], **case["attrs"])
        inits = [init("w", w)] + ([init("b", b)] if b is not None else [])
        m = make_model([node], inputs, [vi("y", None)], inits)
        libs[name] = (compile_program(m, "host", {"x": (B, C, H, W)}), w, b)
    return libs


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_sparse_conv(conv_libs, case):
    lib, w, b = conv_libs[case]
    spec = CONV_CASES[case]
    x = f32(B, C, H, W)
    extra = [f32(1, C, 1, 1), f32(B, C, H, W)] if spec["pre"] else []
    for n in COUNTS:
        idx = gather_grid(n, *spec["grid"])
        got = lib.run(x, idx, *extra)
        want = custom_ops.reference("SigeSparseConv2d", x, idx, w, b, *(extra or [None, None]), **spec["attrs"])
        assert_close(got, want, what=f"SigeSparseConv2d[{case}] N={n}")
    assert any(r == "cpu.conv2d_nchw" and s == "ok" for _, r, s in lib.schedule_log), lib.schedule_log


# -- frames: resampled (a nearest Resize folded into the gather), padded by reflection or the border ----
RESAMPLE_CASES = {  # op, source x [H, W], upsample, downsample, pre-ops
    "gather_up2": ("SigeGather", (6, 7), (2, 2), (1, 1), dict(activation="silu")),
    "gather_down2_up3": ("SigeGather", (22, 5), (1, 3), (2, 1), dict()),
    "conv_up2_leaky": ("SigeSparseConv2d", (6, 7), (2, 2), (1, 1), dict(activation="leaky_relu", alpha=0.1)),
    "conv_down4": ("SigeSparseConv2d", (44, 52), (1, 1), (4, 4), dict()),
    # padded by reflection / the border (a reflect- or replicate-padded conv)
    "gather_reflect_silu": ("SigeGather", (11, 13), (1, 1), (1, 1), dict(padding_mode="reflect", activation="silu")),
    "conv_reflect": ("SigeSparseConv2d", (11, 13), (1, 1), (1, 1), dict(padding_mode="reflect")),
    "conv_edge_up2_leaky": ("SigeSparseConv2d", (6, 7), (2, 2), (1, 1),
                            dict(padding_mode="edge", activation="leaky_relu", alpha=0.1)),
}


@pytest.mark.parametrize("case", sorted(RESAMPLE_CASES))
def test_resampled_frame(case):
    op, (h, w), up, down, pre = RESAMPLE_CASES[case]
    frame = (h * up[0] // down[0], w * up[1] // down[1])
    attrs = dict(block=[6, 6], upsample=list(up), downsample=list(down), **pre)
    wt = (f32(16, C, 3, 3) * 0.3).astype(np.float32)
    conv = op == "SigeSparseConv2d"
    node = custom_ops.make_node(op, ["x", "idx"] + (["w", ""] if conv else []) + ["scale", "shift"], ["y"], **attrs)
    m = make_model([node], [vi("x", [B, C, h, w]), idx_type(), vi("scale", [C, 1, 1]), vi("shift", [1, C, 1, 1])],
                   [vi("y", None)], [init("w", wt)] if conv else [])
    lib = compile_program(m, "host", {"x": (B, C, h, w)})
    x, sc, sh = f32(B, C, h, w), f32(C, 1, 1), f32(1, C, 1, 1)
    for n in COUNTS:
        idx = gather_grid(n, hw=frame)
        got = lib.run(x, idx, sc, sh)
        args = (x, idx, wt, None, sc, sh) if conv else (x, idx, sc, sh)
        assert_close(got, custom_ops.reference(op, *args, **attrs), rtol=1e-4, atol=1e-4, what=f"{op}[{case}] N={n}")


# -- SigeScatter --------------------------------------------------------------------------------
SC_ATTRS = dict(offset=[1, 1], stride=[1, 1])
Ho, Wo = H, W


@pytest.fixture(scope="module")
def scatter_libs():
    libs = {}
    for res in (False, True):
        ins = ["blocks", "base", "idx"] + (["res"] if res else [])
        inputs = [vi("blocks", ["BN", C, 4, 4]), vi("base", [B, C, Ho, Wo]), idx_type()]
        inputs += [vi("res", [B, C, Ho, Wo])] if res else []
        node = custom_ops.make_node("SigeScatter", ins, ["y"], **SC_ATTRS)
        m = make_model([node], inputs, [vi("y", None)])
        libs[res] = compile_program(m, "host", {"blocks": ("BN", C, 4, 4)})
    return libs


@pytest.mark.parametrize("residual", [False, True])
def test_scatter(scatter_libs, residual):
    lib = scatter_libs[residual]
    base = f32(B, C, Ho, Wo)
    res = [f32(B, C, Ho, Wo)] if residual else []
    for n in COUNTS:
        idx = gather_grid(n)
        blocks = f32(B * idx.shape[0], C, 4, 4)
        base_copy = base.copy()
        got = lib.run(blocks, base, idx, *res)
        want = custom_ops.reference("SigeScatter", blocks, base, idx, *(res or [None]), **SC_ATTRS)
        assert_close(got, want, what=f"SigeScatter(residual={residual}) N={n}")
        np.testing.assert_array_equal(base, base_copy)  # base is never modified


@pytest.mark.parametrize("affine", [False, True])
def test_scatter_moments(affine):
    """SigeScatterMoments (blocks past the border clipped; per-channel scale/shift) for several N on one module."""
    groups = 4
    ins = ["blocks", "base", "idx", "mean"] + (["scale", "shift"] if affine else [])
    inputs = [vi("blocks", ["BN", C, 4, 4]), vi("base", [B, C, Ho, Wo]), idx_type(), vi("mean", [B, groups, 1])]
    inputs += [vi("scale", [C, 1, 1]), vi("shift", [B, C, 1, 1])] if affine else []
    attrs = dict(SC_ATTRS, groups=groups)
    m = make_model([custom_ops.make_node("SigeScatterMoments", ins, ["y"], **attrs)], inputs, [vi("y", None)])
    lib = compile_program(m, "host", {"blocks": ("BN", C, 4, 4)})
    assert any(r == "cpu.group_moments" for _, r, _ in lib.schedule_log), lib.schedule_log
    base, mean = f32(B, C, Ho, Wo), f32(B, groups, 1)
    extra = [f32(C, 1, 1), f32(B, C, 1, 1)] if affine else []
    for n in COUNTS:
        idx = gather_grid(n)
        blocks = f32(B * idx.shape[0], C, 4, 4)
        got = lib.run(blocks, base, idx, mean, *extra)
        want = custom_ops.reference("SigeScatterMoments", blocks, base, idx, mean, *extra, **attrs)
        assert_close(got, want, rtol=1e-4, atol=1e-4, what=f"SigeScatterMoments(affine={affine}) N={n}")


# -- SigeScatterGather ----------------------------------------------------------------------------
SG_ATTRS = dict(block=[6, 6], activation="tanh")


@pytest.fixture(scope="module")
def scatter_gather_lib():
    node = custom_ops.make_node("SigeScatterGather", ["blocks", "base", "smap", "idx", "scale"], ["y"], **SG_ATTRS)
    inputs = [vi("blocks", ["BN1", C, 4, 4]), vi("base", [B, C, Ho, Wo]), vi("smap", [Ho, Wo], TensorProto.INT32),
              idx_type(), vi("scale", [C, 1, 1])]
    m = make_model([node], inputs, [vi("y", None)])
    return compile_program(m, "host", {"blocks": ("BN1", C, 4, 4)})


def test_scatter_gather(scatter_gather_lib):
    base, sc = f32(B, C, Ho, Wo), f32(C, 1, 1)
    for n1, n2 in [(4, 3), (0, 2), (3, 0), (7, 6)]:
        sidx = gather_grid(n1)
        blocks = f32(B * sidx.shape[0], C, 4, 4)
        smap = scatter_map((Ho, Wo), sidx, SC_ATTRS["offset"], SC_ATTRS["stride"], (4, 4))
        gidx = gather_grid(n2)
        got = scatter_gather_lib.run(blocks, base, smap, gidx, sc)
        want = custom_ops.reference("SigeScatterGather", blocks, base, smap, gidx, sc, None, **SG_ATTRS)
        assert_close(got, want, what=f"SigeScatterGather N1={n1} N2={n2}")


# -- SigeScatterWithBlockResidual -------------------------------------------------------------------
SBR_ATTRS = dict(offset=[1, 1], stride=[1, 1], shortcut_offset=[0, 0], shortcut_stride=[1, 1])


@pytest.fixture(scope="module")
def sbr_lib():
    node = custom_ops.make_node("SigeScatterWithBlockResidual",
                                ["blocks", "base", "idx", "sblocks", "sbase", "sidx"], ["y"], **SBR_ATTRS)
    inputs = [vi("blocks", ["BN", C, 4, 4]), vi("base", [B, C, Ho, Wo]), idx_type(),
              vi("sblocks", ["BM", C, 4, 4]), vi("sbase", [B, C, Ho, Wo]), vi("sidx", ["M", 2], TensorProto.INT32)]
    m = make_model([node], inputs, [vi("y", None)])
    return compile_program(m, "host", {"blocks": ("BN", C, 4, 4), "sblocks": ("BM", C, 4, 4), "sidx": ("M", 2)})


def test_scatter_with_block_residual(sbr_lib):
    base, sbase = f32(B, C, Ho, Wo), f32(B, C, Ho, Wo)
    for n, m in [(4, 5), (0, 3), (3, 0), (0, 0), (8, 2)]:
        idx = gather_grid(n)
        sidx = grid_indices(Ho, Wo, (4, 4), (4, 4), (0, 0), RNG, m)
        blocks, sblocks = f32(B * idx.shape[0], C, 4, 4), f32(B * sidx.shape[0], C, 4, 4)
        got = sbr_lib.run(blocks, base, idx, sblocks, sbase, sidx)
        want = custom_ops.reference("SigeScatterWithBlockResidual", blocks, base, idx, sblocks, sbase, sidx,
                                    **SBR_ATTRS)
        assert_close(got, want, what=f"SigeScatterWithBlockResidual N={n} M={m}")


# -- import: domain dispatch ------------------------------------------------------------------------
def test_symbolic_block_count():
    node = custom_ops.make_node("SigeGather", ["x", "idx"], ["y"], block=[6, 6])
    m = make_model([node], [vi("x", [1, C, H, W]), idx_type()], [vi("y", None)])
    mod = from_sige_onnx(m, {"x": (1, C, H, W)})
    sig = mod["main"].script()
    assert "N" in str(mod["main"].params[1].ty) and "sige_gather" in sig


def test_sige_gather_named_like_onnx_gather_is_rejected():
    """A node `Gather` in domain ai.sige must never be converted as ONNX Gather."""
    node = helper.make_node("Gather", ["x", "idx"], ["y"], domain="ai.sige", name="evil_gather")
    m = make_model([node], [vi("x", [1, C, H, W]), vi("idx", [3, 2], TensorProto.INT64)], [vi("y", None)])
    with pytest.raises(UnsupportedNodeError, match="evil_gather"):
        from_sige_onnx(m, {"x": (1, C, H, W), "idx": (3, 2)})


def test_unknown_domain_rejected():
    node = helper.make_node("Relu", ["x"], ["y"], domain="com.example", name="strange_relu")
    g = helper.make_graph([node], "g", [vi("x", [1, 2])], [vi("y", None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedNodeError, match="strange_relu.*com.example"):
        from_sige_onnx(m, {"x": (1, 2)})


def test_mixed_graph_standard_ops_delegate():
    """Standard ONNX nodes go through TVM's converters, interleaved with ai.sige nodes."""
    w = (f32(8, C, 3, 3) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["xr"]),
             custom_ops.make_node("SigeSparseConv2d", ["xr", "idx", "w"], ["c"], block=[6, 6], strides=[1, 1]),
             helper.make_node("Sigmoid", ["c"], ["y"])]
    m = make_model(nodes, [vi("x", [1, C, H, W]), idx_type()], [vi("y", None)], [init("w", w)])
    lib = compile_program(m, "host", {"x": (1, C, H, W)})
    x = f32(1, C, H, W)
    for n in (3, 0):
        idx = gather_grid(n)
        c = custom_ops.reference("SigeSparseConv2d", np.maximum(x, 0), idx, w, block=[6, 6], strides=[1, 1])
        assert_close(lib.run(x, idx), 1 / (1 + np.exp(-c)), what=f"mixed N={n}")


def test_gather_of_channel_concat_reads_parts():
    """A channel Concat consumed only by SigeGathers is never materialised (the gathers read its parts)."""
    nodes = [helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Concat", ["ar", "b"], ["cat"], axis=1),
             custom_ops.make_node("SigeGather", ["cat", "idx", "scale", "shift"], ["y"], **GATHER_ATTRS),
             custom_ops.make_node("SigeGather", ["cat", "idx"], ["z"], block=[6, 6])]
    m = make_model(nodes, [vi("a", [B, 3, H, W]), vi("b", [B, C - 3, H, W]), idx_type(), vi("scale", [C, 1, 1]),
                           vi("shift", [1, C, 1, 1])], [vi("y", None), vi("z", None)])
    lib = compile_program(m, "host", {"a": (B, 3, H, W), "b": (B, C - 3, H, W)})
    assert not any("concatenate" in n for n, _, _ in lib.schedule_log), lib.schedule_log
    a, b, sc, sh = f32(B, 3, H, W), f32(B, C - 3, H, W), f32(C, 1, 1), f32(1, C, 1, 1)
    cat = np.concatenate([np.maximum(a, 0), b], 1)
    for n in (4, 0):
        idx = gather_grid(n)
        y, z = lib.run(a, b, idx, sc, sh)
        assert_close(y, custom_ops.reference("SigeGather", cat, idx, sc, sh, **GATHER_ATTRS), what=f"concat gather N={n}")
        assert_close(z, custom_ops.reference("SigeGather", cat, idx, block=[6, 6]), what=f"concat gather N={n}")


@pytest.mark.parametrize("split", [3, 4])  # parts of 3 + 5 channels split a group, 4 + 4 do not
def test_tile_moments_reads_concatenated_parts(split):
    """SigeTileMoments over channel concats (never materialised) and tiles past the border (zero there);
    one module for every N; scheduled by the cpu.group_moments rule."""
    groups, tile = 4, (3, 4)
    nodes = [helper.make_node("Concat", ["a", "b"], ["new"], axis=1),
             helper.make_node("Concat", ["oa", "ob"], ["old"], axis=1),
             custom_ops.make_node("SigeTileMoments", ["new", "old", "idx", "mean"], ["y"], block=list(tile),
                                  groups=groups)]
    parts = {"a": (B, split, H, W), "b": (B, C - split, H, W), "oa": (B, split, H, W), "ob": (B, C - split, H, W)}
    m = make_model(nodes, [vi(k, list(v)) for k, v in parts.items()] + [idx_type(), vi("mean", [B, groups, 1])],
                   [vi("y", None)])
    lib = compile_program(m, "host", parts)
    assert not any("concatenate" in n for n, _, _ in lib.schedule_log), lib.schedule_log
    assert any(r == "cpu.group_moments" for _, r, _ in lib.schedule_log), lib.schedule_log
    (a, b, oa, ob), mean = (f32(*parts[k]) for k in ("a", "b", "oa", "ob")), f32(B, groups, 1)
    new, old = np.concatenate([a, b], 1), np.concatenate([oa, ob], 1)
    for n in COUNTS:
        for offset in ((0, 0), (1, 2)):  # tiles past the bottom/right border; also past the top/left one
            idx = gather_grid(n, block=tile, stride=tile, offset=offset)
            got = lib.run(a, b, oa, ob, idx, mean)
            want = custom_ops.reference("SigeTileMoments", new, old, idx, mean, block=tile, groups=groups)
            assert_close(got, want, rtol=1e-4, atol=1e-4, what=f"SigeTileMoments N={n} offset={offset}")


def test_fast_exp_sigmoid_erf_accuracy():
    """CPU targets lower exp/sigmoid/erf to vectorised polynomials (tvm_schedules.cpu.fastmath)."""
    x = np.concatenate([np.linspace(-120, 120, 4093), RNG.standard_normal(3) * 4]).astype(np.float32).reshape(1, 4096)
    near = np.concatenate([np.linspace(-5, 5, 4090), [0.0, -0.0, 1e-30, -1e-7, 3.9, 4.1]]).astype(np.float32)
    nodes = [helper.make_node("Exp", ["x"], ["e"]), helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Erf", ["x"], ["f"]), helper.make_node("Erf", ["z"], ["g"])]
    m = make_model(nodes, [vi("x", [1, 4096]), vi("z", [1, 4096])], [vi(n, None) for n in "esfg"])
    e, s, f, g = compile_program(m, "host").run(x, near.reshape(1, 4096))
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):
        ref_e = np.exp(xd)
    ok = xd < 88.0
    assert np.all(np.abs(e[ok] - ref_e[ok]) <= 1e-6 * ref_e[ok] + 1e-37)
    assert np.abs(s - 1 / (1 + np.exp(-xd))).max() < 1e-6
    erf = np.vectorize(math.erf)
    for got, arg in ((f, xd), (g, near.astype(np.float64))):
        want = erf(arg.reshape(got.shape))
        assert np.all(np.abs(got - want) <= 2e-7 + 2e-6 * np.abs(want)), np.abs(got - want).max()


def _ort_run(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("hw,strides", [((12, 48), (1, 1)), ((9, 32), (1, 1)), ((10, 32), (2, 2))])
def test_dense_depthwise_conv(hw, strides):
    """Depthwise convs over wide rows take the row-vectorised rule and equal onnxruntime (bias + ReLU epilogue)."""
    c = 6
    w, bias = f32(c, 1, 3, 3), f32(c)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=c, pads=[1, 1, 1, 1], strides=list(strides)),
             helper.make_node("Relu", ["c"], ["y"])]
    m = make_model(nodes, [vi("x", [2, c, *hw])], [vi("y", None)], [init("w", w), init("b", bias)])
    lib = compile_program(m, "host", {"x": (2, c, *hw)})
    want_rule = "cpu.depthwise_conv2d" if strides == (1, 1) or (hw[1] // strides[1]) % 16 == 0 else None
    rules = {r for _, r, _ in lib.schedule_log}
    if want_rule:
        assert want_rule in rules, lib.schedule_log
    x = f32(2, c, *hw)
    assert_close(lib.run(x), _ort_run(m, {"x": x})[0], rtol=1e-5, atol=1e-5, what=f"depthwise {hw} s{strides}")


@pytest.mark.parametrize("shape,pads,strides", [((37, 32, 6, 6), 0, 1), ((5, 48, 6, 6), 0, 2), ((2, 32, 4, 4), 1, 1),
                                                ((3, 32, 3, 5), 1, 1)])
def test_depthwise_conv_over_blocks(shape, pads, strides):
    """Depthwise convs over many small images (gathered blocks, tiny dense maps) take the channel-vector
    rule and equal onnxruntime (bias + ReLU epilogue)."""
    c = shape[1]
    w, bias = f32(c, 1, 3, 3), f32(c)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=c, pads=[pads] * 4, strides=[strides] * 2),
             helper.make_node("Relu", ["c"], ["y"])]
    m = make_model(nodes, [vi("x", list(shape))], [vi("y", None)], [init("w", w), init("b", bias)])
    lib = compile_program(m, "host", {"x": shape})
    if c % vector_lanes(get_target("host").tvm_target()) == 0:
        assert "cpu.depthwise_blocks" in {r for _, r, _ in lib.schedule_log}, lib.schedule_log
    x = f32(*shape)
    assert_close(lib.run(x), _ort_run(m, {"x": x})[0], rtol=1e-5, atol=1e-5, what=f"depthwise blocks {shape}")


@pytest.mark.parametrize("mode,pads,hw", [("reflect", (1, 1, 1, 1), (9, 21)), ("reflect", (3, 0, 2, 4), (5, 37)),
                                           ("edge", (2, 5, 0, 1), (4, 3)), ("edge", (1, 1, 1, 1), (1, 16))])
def test_border_pad(mode, pads, hw):
    """ONNX Pad reflect / edge (before a conv, and alone) as ``sige_te.pad_primfunc``, equal to onnxruntime."""
    c = 5
    w = f32(4, c, 3, 3)
    amounts = np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64)
    nodes = [helper.make_node("Pad", ["x", "p"], ["xp"], mode=mode), helper.make_node("Conv", ["xp", "w"], ["y"])]
    m = make_model(nodes, [vi("x", [2, c, *hw])], [vi("xp", None), vi("y", None)], [init("w", w), init("p", amounts)])
    lib = compile_program(m, "host", {"x": (2, c, *hw)})
    assert f"{mode}_pad" in {n for n, _, _ in lib.schedule_log}, lib.schedule_log
    x = f32(2, c, *hw)
    for got, want, what in zip(lib.run(x), _ort_run(m, {"x": x}), ("padded", "conv")):
        assert_close(got, want, rtol=1e-5, atol=1e-5, what=f"{mode} {pads} {hw}: {what}")


def test_reduce_mean_imported_as_sum():
    """ReduceMean (axes as input or attribute) becomes sum x 1/n, so a variance's (x - m)^2 fuses into it."""
    x = f32(2, 4, 300)
    ax = init("axes", np.array([2], np.int64))
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"]), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["v"], keepdims=0)]
    m = make_model(nodes, [vi("x", [2, 4, 300])], [vi("m", None), vi("v", None)], [ax])
    lib = compile_program(m, "host")
    names = [n for n, _, _ in lib.schedule_log]
    assert not any(n.startswith("mean") for n in names), names
    assert any("subtract" in n and "multiply" in n and "sum" in n for n in names), names
    mean, var = lib.run(x)
    assert_close(mean, x.mean(2, keepdims=True), what="mean")
    assert_close(var, x.var(2), what="variance")


def test_conv_of_gathered_concat_is_one_sparse_conv():
    """Conv(Concat(SigeGather(a, idx, sa, ta), SigeGather(b, idx, -, tb))) -- the up-path of a UNet after the
    sparsifier -- compiles to one sparse conv (no gather or concatenation materialised) and equals the reference."""
    ca, cb, co = 5, 11, 16
    w, bias = f32(co, ca + cb, 3, 3) * 0.2, f32(co)
    attrs = dict(block=[6, 6], activation="silu")
    nodes = [custom_ops.make_node("SigeGather", ["a", "idx", "sa", "ta"], ["ga"], **attrs),
             custom_ops.make_node("SigeGather", ["b", "idx", "", "tb"], ["gb"], **attrs),
             helper.make_node("Concat", ["ga", "gb"], ["g"], axis=1),
             helper.make_node("Conv", ["g", "w", "bias"], ["y"])]
    m = make_model(nodes, [vi("a", [1, ca, H, W]), vi("b", [1, cb, H, W]), idx_type(), vi("sa", [1, ca, 1, 1]),
                           vi("ta", [1, ca, 1, 1]), vi("tb", [cb, 1, 1])], [vi("y", None)], [init("w", w), init("bias", bias)])
    lib = compile_program(m, "host", {"a": (1, ca, H, W), "b": (1, cb, H, W)})
    names = [n for n, _, _ in lib.schedule_log]
    # only the per-channel scale/shift vectors are concatenated
    assert not any(n.startswith("sige_gather") for n in names) and names.count("sige_sparse_conv2d") == 1, names
    a, b, sa, ta, tb = f32(1, ca, H, W), f32(1, cb, H, W), f32(1, ca, 1, 1), f32(1, ca, 1, 1), f32(cb, 1, 1)
    for n in (4, 0):
        idx = gather_grid(n)
        g = np.concatenate([custom_ops.reference("SigeGather", a, idx, sa, ta, **attrs),
                            custom_ops.reference("SigeGather", b, idx, None, tb, **attrs)], 1)
        want = ref_conv(g, w, bias)
        assert_close(lib.run(a, b, idx, sa, ta, tb), want, rtol=1e-4, atol=1e-4, what=f"gathered concat conv N={n}")


@pytest.mark.parametrize("kind,activation", [("dense", "silu"), ("depthwise", "identity"), ("depthwise", "silu"),
                                             ("pointwise", "silu")])
def test_conv_of_scatter_gather_is_one_sparse_conv(kind, activation):
    """Conv(SigeScatterGather(...)) -- the next conv of a residual block, a depthwise or pointwise one (separable
    convs of GAN Compression) -- compiles to one sparse conv that gathers from the virtual scatter per tile
    (depthwise, pointwise: per vector of channels, channels innermost), and equals the reference."""
    c, co, group = {"dense": (C, 16, 1), "depthwise": (32, 32, 32), "pointwise": (32, 48, 1)}[kind]
    k = 1 if kind == "pointwise" else 3
    w, bias = f32(co, c // group, k, k) * 0.2, f32(co)
    attrs = dict(block=[k + 3, k + 3], activation=activation)
    nodes = [custom_ops.make_node("SigeScatterGather", ["blocks", "base", "smap", "idx", "scale", "shift"], ["g"], **attrs),
             helper.make_node("Conv", ["g", "w", "bias"], ["y"], group=group)]
    inputs = [vi("blocks", ["BN1", c, 4, 4]), vi("base", [B, c, Ho, Wo]), vi("smap", [Ho, Wo], TensorProto.INT32),
              idx_type(), vi("scale", [c, 1, 1]), vi("shift", [1, c, 1, 1])]
    m = make_model(nodes, inputs, [vi("y", None)], [init("w", w), init("bias", bias)])
    lib = compile_program(m, "host", {"blocks": ("BN1", c, 4, 4)})
    names = [n for n, _, _ in lib.schedule_log]
    assert names.count("sige_sparse_conv2d") == 1 and not any(n.startswith("sige_scatter_gather") for n in names), names
    if kind == "depthwise" and c % vector_lanes(get_target("host").tvm_target()) == 0:
        assert ("sige_sparse_conv2d", "cpu.depthwise_blocks", "ok") in lib.schedule_log, lib.schedule_log
    if kind == "pointwise":  # vectors over the block's 16 pixels, whatever the vector width (16 here, 4 on the M1)
        assert ("sige_sparse_conv2d", "cpu.pointwise_blocks", "ok") in lib.schedule_log, lib.schedule_log
        m1 = compile_program(m, "m1", {"blocks": ("BN1", c, 4, 4)})
        assert ("sige_sparse_conv2d", "cpu.pointwise_blocks", "ok") in m1.schedule_log, m1.schedule_log
    base, sc, sh = f32(B, c, Ho, Wo), f32(c, 1, 1), f32(1, c, 1, 1)
    for n1, n2 in [(4, 3), (0, 2), (3, 0), (7, 9)]:
        sidx = gather_grid(n1)
        blocks = f32(B * sidx.shape[0], c, 4, 4)
        smap = scatter_map((Ho, Wo), sidx, SC_ATTRS["offset"], SC_ATTRS["stride"], (4, 4))
        gidx = gather_grid(n2)
        if kind == "pointwise":  # windows on the scattered blocks' grid too: whole blocks, all base, the border
            gidx = np.concatenate([gidx, sidx + 1, gather_grid(n2) + 1]).astype(np.int32)
        g = custom_ops.reference("SigeScatterGather", blocks, base, smap, gidx, sc, sh, **attrs)
        assert_close(lib.run(blocks, base, smap, gidx, sc, sh), ref_conv(g, w, bias, group=group), rtol=1e-4,
                     atol=1e-4, what=f"scatter-gather {kind} conv N1={n1} N2={n2}")


def test_roof_measurements_are_plausible():
    """The roofs of the benchmarks' roofline (tvm_schedules.bench): an FMA peak and a streaming read bandwidth,
    positive and finite, the peak at least one scalar FMA per nanosecond per thread."""
    from sige_export.tvm_schedules.bench import peak_gflops, read_bandwidth_gbs

    assert 2.0 <= peak_gflops(threads=1, steps=1 << 14) < 1e5
    assert 0.1 <= read_bandwidth_gbs(threads=1, mib=16) < 1e4


def test_reduction_over_no_blocks_is_zero():
    """A reduction over a symbolic block count (the generic rule) is 0 for N = 0 on every call: its init runs
    before the reduction loops, not inside them where N = 0 never enters (the output kept what the memory
    pool held from an earlier call)."""
    nodes = [custom_ops.make_node("SigeGather", ["x", "idx"], ["g"], block=[6, 6]),
             helper.make_node("ReduceSum", ["g", "axes"], ["y"], keepdims=1)]
    m = make_model(nodes, [vi("x", [B, C, H, W]), idx_type()], [vi("y", None)],
                   [init("axes", np.array([0], np.int64))])
    lib = compile_program(m, "host")
    x = f32(B, C, H, W)
    for n in (5, 0, 3, 0, 0):
        idx = gather_grid(n)
        want = custom_ops.reference("SigeGather", x, idx, block=[6, 6]).sum(0, keepdims=True)
        assert_close(lib.run(x, idx), want, rtol=1e-5, atol=1e-5, what=f"sum over N={n} blocks")


# -- MatMul (cpu.matmul) -----------------------------------------------------------------------------
# Transformer shapes at small sizes: token rows of an edit (symbolic R, ragged against the 8-row tiles, 0
# included), attention heads of 40 (5 half-vectors), batched heads and 2-D weights, with a fused epilogue.
MATMUL_CASES = {
    "rows x weight + bias": ([1, "R", 24], [24, 48], True),
    "heads x keys^T": ([1, 2, "R", 40], [1, 2, 40, 64], False),
    "scores x values (40 wide)": ([1, 2, "R", 96], [1, 2, 96, 40], False),
    "static rows, 40 wide": ([3, 20, 32], [32, 40], True),
    "heads x 77 keys^T (ragged columns)": ([1, 2, "R", 40], [1, 2, 40, 77], False),
    "static rows x 45 columns (ragged both)": ([2, 9, 24], [24, 45], True),
}


@pytest.mark.parametrize("case", sorted(MATMUL_CASES))
def test_matmul(case):
    a_shape, b_shape, bias = MATMUL_CASES[case]
    weight = f32(*b_shape) if len(b_shape) == 2 else None
    inputs = [vi("a", a_shape)] + ([] if weight is not None else [vi("b", b_shape)])
    inits = [init("w", weight)] if weight is not None else []
    nodes = [helper.make_node("MatMul", ["a", "w" if weight is not None else "b"], ["m"])]
    if bias:
        inits.append(init("bias", f32(b_shape[-1])))
        nodes.append(helper.make_node("Add", ["m", "bias"], ["y"]))
    else:
        inits.append(init("scale", np.array(0.125, np.float32)))
        nodes.append(helper.make_node("Mul", ["m", "scale"], ["y"]))
    lib = compile_program(make_model(nodes, inputs, [vi("y", None)], inits), "host")
    assert "cpu.matmul" in {r for _, r, s in lib.schedule_log if s == "ok"}, lib.schedule_log
    for rows in ((0, 1, 13, 8) if "R" in a_shape else (None,)):
        a = f32(*[rows if d == "R" else d for d in a_shape])
        b = weight if weight is not None else f32(*b_shape)
        want = a @ b
        want = want + numpy_helper.to_array(inits[-1]) if bias else want * np.float32(0.125)
        got = lib.run(a) if weight is not None else lib.run(a, b)
        assert_close(got, want, what=f"{case}, R={rows}")


# -- Attention (cpu.attention) --------------------------------------------------------------------------
# softmax(q @ kt * scale) @ v as a transformer exports it (kt a Transpose of the token-major keys): query rows
# static in whole and partial 32-row tiles or symbolic (an edit's tokens, 0 and 1 included), key counts from
# 7 to 77 (ragged against the 8-key register tile), value widths of 5 to 40, logits large enough to overflow
# exp without the row max.
ATTENTION_CASES = {
    "self, whole tiles": ([1, 2, 64, 16], 64, 24, 0.25),
    "cross, 77 keys, symbolic rows": ([1, 2, "R", 40], 77, 40, 40 ** -0.5),
    "static partial tile, 19 keys, 5 values": ([2, 3, 45, 8], 19, 5, 1.0),
    "large logits, 7 keys": ([1, 1, 40, 4], 7, 12, 30.0),
    "negative scale": ([1, 2, 32, 8], 16, 8, -0.5),
}


def softmax_attention(q, kt, v, scale):
    s = (q.astype(np.float64) @ kt) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def attention_model(q_shape, keys, values, scale, softmax_axis=-1):
    b, h, _, d = q_shape
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
             helper.make_node("Softmax", ["ss"], ["p"], axis=softmax_axis),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    return make_model(nodes, [vi("q", q_shape), vi("k", [b, keys, h, d]), vi("v", [b, h, keys, values])],
                      [vi("y", None)], [init("scale", np.array(scale, np.float32))])


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention(case):
    q_shape, keys, values, scale = ATTENTION_CASES[case]
    lib = compile_program(attention_model(q_shape, keys, values, scale), "host")
    assert [r for f, r, s in lib.schedule_log if s == "ok" and f == "attention"] == ["cpu.attention"], \
        lib.schedule_log
    b, h, _, d = q_shape
    for rows in ((0, 1, 31, 33, 70) if "R" in q_shape else (None,)):
        q = f32(*[rows if x == "R" else x for x in q_shape])
        k, v = f32(b, keys, h, d), f32(b, h, keys, values)
        want = softmax_attention(q, k.transpose(0, 2, 3, 1), v, scale)
        assert_close(lib.run(q, k, v), want, what=f"{case}, R={rows}")


def test_attention_softmax_over_another_axis_is_not_fused():
    """A Softmax over the queries is no attention: the chain is imported op by op, and still agrees."""
    lib = compile_program(attention_model([1, 2, 16, 8], 16, 8, 0.5, softmax_axis=2), "host")
    assert "cpu.attention" not in {r for _, r, _ in lib.schedule_log}, lib.schedule_log
    q, k, v = f32(1, 2, 16, 8), f32(1, 16, 2, 8), f32(1, 2, 16, 8)
    s = (q.astype(np.float64) @ k.transpose(0, 2, 3, 1)) * 0.5
    p = np.exp(s - s.max(2, keepdims=True))
    assert_close(lib.run(q, k, v), (p / p.sum(2, keepdims=True)) @ v, what="softmax over axis 2")


@pytest.mark.parametrize("shape,axis", [((2, 8, 20), 2), ((2, 8, 20), 1), ((1, 3, 12, 5), 2), ((9, 4), 0)])
def test_scatter_elements_of_changed_tokens(shape, axis):
    """The sparsifier's token scatter (ScatterElements of R rows into a cached map, the same rows for every other
    index) as scheduled blocks, for several R on one module (R = 0 included), against numpy's put_along_axis."""
    ushape = [("R" if k == axis else d) for k, d in enumerate(shape)]
    m = make_model([helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], axis=axis)],
                   [vi("d", list(shape)), vi("i", ushape, TensorProto.INT64), vi("u", ushape)], [vi("y", None)])
    lib = compile_program(m, "host")
    assert [r for f, r, s in lib.schedule_log if s == "ok" and "scatter" in f] == ["cpu.generic"], lib.schedule_log
    for rows in (0, 3, 7):
        pos = RNG.choice(shape[axis], rows, replace=False)
        concrete = [rows if d == "R" else d for d in ushape]
        view = [1] * len(shape)
        view[axis] = rows
        idx = np.ascontiguousarray(np.broadcast_to(pos.reshape(view), concrete), np.int64)
        d, upd = f32(*shape), f32(*concrete)
        want = d.copy()
        np.put_along_axis(want, idx, upd, axis)
        assert_close(lib.run(d, idx, upd), want, rtol=0, atol=0, what=f"R={rows}")
