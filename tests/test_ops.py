"""ai.sige ops: the ONNX function bodies (run in stock onnxruntime) against the numpy references,
over randomised shapes, blocks, strides, kernels, offsets, border/negative indices, N = 0 and
all-active grids, every activation, activation_first, scale/shift shapes and groups."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sige_export import custom_ops as co
from sige_export.custom_ops.testing import model_from_nodes, run_onnxruntime, run_reference
from sige_export.mask import scatter_map
from tests.helpers import assert_close

EXAMPLES = int(os.environ.get("SIGE_TEST_EXAMPLES", "30"))  # raise for a stress run
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACTS = ["identity", "relu", "leaky_relu", "silu", "swish", "sigmoid", "tanh", "gelu"]
PARAM_KINDS = [None, "C11", "1C11", "BC11", "BCHW", "1CHW", "11HW", "scalar"]


def _rng(draw: Any) -> np.random.Generator:
    return np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))


def _param(rng: np.random.Generator, kind: str | None, b: int, c: int, h: int, w: int) -> np.ndarray | None:
    shapes = {"C11": (c, 1, 1), "1C11": (1, c, 1, 1), "BC11": (b, c, 1, 1), "BCHW": (b, c, h, w),
              "1CHW": (1, c, h, w), "11HW": (1, 1, h, w), "scalar": ()}
    if kind is None:
        return None
    return rng.uniform(-1.5, 1.5, shapes[kind]).astype(np.float32)


@st.composite
def pre_attrs(draw: Any) -> dict[str, Any]:
    return {"activation": draw(st.sampled_from(ACTS)), "alpha": draw(st.sampled_from([0.2, 0.01, 0.5])),
            "activation_first": draw(st.integers(0, 1))}


@st.composite
def gather_indices(draw: Any, rng: np.random.Generator, h: int, w: int, bh: int, bw: int) -> np.ndarray:
    """Random block corners overlapping the image (borders, negatives), or none."""
    mode = draw(st.sampled_from(["random", "random", "empty", "corners"]))
    if mode == "empty":
        return np.zeros((0, 2), np.int32)
    if mode == "corners":
        hs, ws = np.meshgrid([-bh + 1, 0, h - 1], [-bw + 1, 0, w - 1], indexing="ij")
        return np.stack([hs.ravel(), ws.ravel()], 1).astype(np.int32)
    n = draw(st.integers(1, 6))
    return np.stack([rng.integers(-bh + 1, h, n), rng.integers(-bw + 1, w, n)], 1).astype(np.int32)


def _grid_indices(draw: Any, rng: np.random.Generator, ho: int, wo: int, ph: int, pw: int,
                  offset: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """Non-overlapping blocks of one grid whose scatter origins (h+o)//s tile the output (shifted)."""
    g0 = [draw(st.integers(-p + 1, 0)) for p in (ph, pw)]
    r0 = np.arange(g0[0], ho, ph)
    c0 = np.arange(g0[1], wo, pw)
    rr, cc = np.meshgrid(r0, c0, indexing="ij")
    org = np.stack([rr.ravel(), cc.ravel()], 1)
    mode = draw(st.sampled_from(["some", "some", "all", "none"]))
    if mode == "none":
        org = org[:0]
    elif mode == "some":
        org = org[rng.random(len(org)) < 0.5]
    sub = rng.integers(0, np.asarray(stride), size=org.shape)  # any h with (h+o)//s == origin
    return (org * np.asarray(stride) - np.asarray(offset) + sub).astype(np.int32).reshape(-1, 2)


def check_op(op_type: str, feeds: dict[str, np.ndarray | None], attrs: dict[str, Any],
             use_evaluator: bool = True) -> np.ndarray:
    """Body in onnxruntime == numpy reference (and the OpRun through ReferenceEvaluator); shapes."""
    names = [k if v is not None else "" for k, v in feeds.items()]
    node = co.make_node(op_type, names, ["y"], **attrs)
    present = {k: v for k, v in feeds.items() if v is not None}
    model = model_from_nodes([node], present, ["y"])
    want = co.reference(op_type, *feeds.values(), **attrs)
    got = run_onnxruntime(model, present)[0]
    assert_close(got, want, what=f"{op_type} onnxruntime body vs reference ({node.overload})")
    if use_evaluator:
        assert_close(run_reference(model, present)[0], want, rtol=0, atol=0, what="ReferenceEvaluator")
    shapes = [None if v is None else v.shape for v in feeds.values()]
    assert tuple(co.infer_shape(op_type, shapes, attrs)[0]) == want.shape
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph.output[0]
    dims = tuple(d.dim_value for d in inferred.type.tensor_type.shape.dim)
    assert dims == want.shape, f"onnx shape inference through the body: {dims} != {want.shape}"
    return want


@st.composite
def gather_case(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = _rng(draw)
    b, c, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    bh, bw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    idx = draw(gather_indices(rng, h, w, bh, bw))
    scale = _param(rng, draw(st.sampled_from(PARAM_KINDS)), b, c, h, w)
    shift = _param(rng, draw(st.sampled_from(PARAM_KINDS)), b, c, h, w)
    return {"x": x, "indices": idx, "scale": scale, "shift": shift}, {"block": (bh, bw), **draw(pre_attrs())}


@SETTINGS
@given(gather_case())
def test_gather_body_matches_reference(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    feeds, attrs = case
    y = check_op("SigeGather", feeds, attrs)
    assert y.shape == (feeds["x"].shape[0] * len(feeds["indices"]), feeds["x"].shape[1], *attrs["block"])


@st.composite
def sparse_conv_case(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = _rng(draw)
    kh, kw = draw(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1)]))
    sh, sw = draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
    b, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    c = draw(st.sampled_from([1, 2, 3, 4]))
    group = draw(st.sampled_from(sorted({1, c} | ({2} if c % 2 == 0 else set()))))
    cout = group * draw(st.integers(1, 2))
    bh, bw = kh + draw(st.integers(0, 4)), kw + draw(st.integers(0, 4))
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((cout, c // group, kh, kw)).astype(np.float32)
    bias = rng.standard_normal((cout,)).astype(np.float32) if draw(st.booleans()) else None
    feeds = {"x": x, "indices": draw(gather_indices(rng, h, w, bh, bw)), "weight": wt, "bias": bias,
             "scale": _param(rng, draw(st.sampled_from(PARAM_KINDS)), b, c, h, w),
             "shift": _param(rng, draw(st.sampled_from(PARAM_KINDS)), b, c, h, w)}
    return feeds, {"block": (bh, bw), "strides": (sh, sw), "group": group, **draw(pre_attrs())}


@SETTINGS
@given(sparse_conv_case())
def test_sparse_conv_body_matches_reference(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    feeds, attrs = case
    check_op("SigeSparseConv2d", feeds, attrs)


@st.composite
def resample_case(draw: Any) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """A gather / sparse conv over x resized by upsample or downsample per axis; returns the frame built
    independently (np.repeat / strided slicing)."""
    rng = _rng(draw)
    factors = [draw(st.sampled_from([(1, 1), (2, 1), (3, 1), (1, 2), (1, 3)])) for _ in range(2)]
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = (d * draw(st.integers(1, 4)) for _, d in factors)
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    frame = x
    for axis, (u, d) in zip((2, 3), factors):
        frame = np.repeat(frame.take(np.arange(0, frame.shape[axis], d), axis=axis), u, axis=axis)
    kh, kw = draw(st.sampled_from([(1, 1), (3, 3)]))
    bh, bw = kh + draw(st.integers(0, 3)), kw + draw(st.integers(0, 3))
    per_channel = draw(st.sampled_from([None, "C11", "1C11", "BC11", "scalar"]))
    feeds = {"x": x, "indices": draw(gather_indices(rng, frame.shape[2], frame.shape[3], bh, bw)),
             "weight": rng.standard_normal((2, c, kh, kw)).astype(np.float32), "bias": None,
             "scale": _param(rng, per_channel, b, c, h, w), "shift": _param(rng, per_channel, b, c, h, w)}
    attrs = {"block": (bh, bw), "upsample": (factors[0][0], factors[1][0]),
             "downsample": (factors[0][1], factors[1][1]), **draw(pre_attrs())}
    return feeds, attrs, frame


@SETTINGS
@given(resample_case())
def test_resampled_gather_and_conv_match_gather_of_the_resized_input(
        case: tuple[dict[str, Any], dict[str, Any], np.ndarray]) -> None:
    feeds, attrs, frame = case
    gather_feeds = {k: feeds[k] for k in ("x", "indices", "scale", "shift")}
    gather_attrs = {k: v for k, v in attrs.items() if k not in ("upsample", "downsample")}
    y = check_op("SigeGather", gather_feeds, attrs)
    want = co.reference("SigeGather", frame, feeds["indices"], feeds["scale"], feeds["shift"], **gather_attrs)
    assert_close(y, want, rtol=0, atol=0, what="resampled gather == gather of the resized x")
    conv = check_op("SigeSparseConv2d", feeds, attrs)
    want = co.reference("SigeSparseConv2d", frame, feeds["indices"], feeds["weight"], None, feeds["scale"],
                        feeds["shift"], **gather_attrs)
    assert_close(conv, want, rtol=1e-5, atol=1e-5, what="resampled sparse conv == sparse conv of the resized x")


@st.composite
def padding_case(draw: Any) -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
    """A gather / sparse conv whose windows reach at most ``pads`` outside x, padded by reflection or its border."""
    rng = _rng(draw)
    b, c, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    pads = (draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1)))
    kh, kw = draw(st.sampled_from([(1, 1), (3, 3), (2, 3)]))
    bh = draw(st.integers(kh, max(kh, min(h + 2 * pads[0], kh + 3))))
    bw = draw(st.integers(kw, max(kw, min(w + 2 * pads[1], kw + 3))))
    assume(bh <= h + 2 * pads[0] and bw <= w + 2 * pads[1])
    n = draw(st.integers(0, 5))
    idx = np.stack([rng.integers(-pads[0], h + pads[0] - bh + 1, n),
                    rng.integers(-pads[1], w + pads[1] - bw + 1, n)], 1).astype(np.int32).reshape(-1, 2)
    idx = idx[(idx[:, 0] > -bh) & (idx[:, 0] < h) & (idx[:, 1] > -bw) & (idx[:, 1] < w)]  # blocks overlap x
    kind = draw(st.sampled_from(PARAM_KINDS))
    feeds = {"x": rng.standard_normal((b, c, h, w)).astype(np.float32), "indices": idx,
             "weight": rng.standard_normal((2, c, kh, kw)).astype(np.float32), "bias": None,
             "scale": _param(rng, kind, b, c, h, w), "shift": _param(rng, kind, b, c, h, w)}
    attrs = {"block": (bh, bw), "padding_mode": draw(st.sampled_from(["reflect", "edge"])), **draw(pre_attrs())}
    return feeds, attrs, pads


@SETTINGS
@given(padding_case())
def test_padded_gather_and_conv_match_gather_of_the_padded_input(
        case: tuple[dict[str, Any], dict[str, Any], tuple[int, int]]) -> None:
    """Against np.pad (mode reflect / edge) of the pre-op'ed input, gathered inside the padded image."""
    from sige_export.custom_ops._common import np_pre

    feeds, attrs, (ph, pw) = case
    pre = {k: attrs[k] for k in ("activation", "alpha", "activation_first")}
    # as the op stores them: swish is silu, alpha a float32 attribute
    pre.update(activation={"swish": "silu"}.get(pre["activation"], pre["activation"]),
               alpha=float(np.float32(pre["alpha"])))
    padded = np.pad(np_pre(feeds["x"], feeds["scale"], feeds["shift"], **pre),
                    ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode=attrs["padding_mode"])
    inside = (feeds["indices"] + np.array([ph, pw], np.int32)).astype(np.int32)
    gather_feeds = {k: feeds[k] for k in ("x", "indices", "scale", "shift")}
    y = check_op("SigeGather", gather_feeds, attrs)
    want = co.reference("SigeGather", padded, inside, block=attrs["block"])
    assert_close(y, want, rtol=0, atol=0, what=f"{attrs['padding_mode']} gather == gather of np.pad")
    conv = check_op("SigeSparseConv2d", feeds, attrs)
    want = co.reference("SigeSparseConv2d", padded, inside, feeds["weight"], block=attrs["block"])
    assert_close(conv, want, rtol=1e-5, atol=1e-5, what=f"{attrs['padding_mode']} sparse conv == conv of np.pad")


@st.composite
def scatter_case(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = _rng(draw)
    b, c, ho, wo = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    offset = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    stride = draw(st.sampled_from([(1, 1), (2, 2)]))
    idx = _grid_indices(draw, rng, ho, wo, ph, pw, offset, stride)
    blocks = rng.standard_normal((b * len(idx), c, ph, pw)).astype(np.float32)
    base = rng.standard_normal((b, c, ho, wo)).astype(np.float32)
    residual = rng.standard_normal((b, c, ho, wo)).astype(np.float32) if draw(st.booleans()) else None
    return ({"blocks": blocks, "base": base, "indices": idx, "residual": residual},
            {"offset": offset, "stride": stride})


@SETTINGS
@given(scatter_case())
def test_scatter_body_matches_reference(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    feeds, attrs = case
    y = check_op("SigeScatter", feeds, attrs)
    if len(feeds["indices"]) == 0:
        assert_close(y, feeds["base"], rtol=0, atol=0, what="N = 0 returns base")


@st.composite
def scatter_gather_case(draw: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    rng = _rng(draw)
    b, c, ho, wo = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    offset = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    stride = draw(st.sampled_from([(1, 1), (2, 2)]))
    sidx = _grid_indices(draw, rng, ho, wo, ph, pw, offset, stride)
    blocks = rng.standard_normal((b * len(sidx), c, ph, pw)).astype(np.float32)
    base = rng.standard_normal((b, c, ho, wo)).astype(np.float32)
    bh, bw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    feeds = {"blocks": blocks, "base": base,
             "scatter_map": scatter_map((ho, wo), sidx, offset, stride, (ph, pw)),
             "indices": draw(gather_indices(rng, ho, wo, bh, bw)),
             "scale": _param(rng, draw(st.sampled_from(PARAM_KINDS)), b, c, ho, wo),
             "shift": _param(rng, draw(st.sampled_from(PARAM_KINDS)), b, c, ho, wo)}
    return feeds, {"block": (bh, bw), **draw(pre_attrs())}, {"indices": sidx, "offset": offset, "stride": stride}


@SETTINGS
@given(scatter_gather_case())
def test_scatter_gather_body_matches_reference(case: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]) -> None:
    feeds, attrs, scatter = case
    y = check_op("SigeScatterGather", feeds, attrs)
    # and it is Scatter then Gather (numpy references)
    full = co.reference("SigeScatter", feeds["blocks"], feeds["base"], scatter["indices"],
                        offset=scatter["offset"], stride=scatter["stride"])
    want = co.reference("SigeGather", full, feeds["indices"], feeds["scale"], feeds["shift"], **attrs)
    assert_close(y, want, rtol=0, atol=0, what="ScatterGather == Gather(Scatter)")


@st.composite
def block_residual_case(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = _rng(draw)
    b, c, ho, wo = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    feeds: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    for prefix in ("", "shortcut_"):
        ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        offset = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
        stride = draw(st.sampled_from([(1, 1), (2, 2)]))
        idx = _grid_indices(draw, rng, ho, wo, ph, pw, offset, stride)
        feeds[prefix + "blocks"] = rng.standard_normal((b * len(idx), c, ph, pw)).astype(np.float32)
        feeds[prefix + "base"] = rng.standard_normal((b, c, ho, wo)).astype(np.float32)
        feeds[prefix + "indices"] = idx
        attrs[prefix + "offset"], attrs[prefix + "stride"] = offset, stride
    order = ["blocks", "base", "indices", "shortcut_blocks", "shortcut_base", "shortcut_indices"]
    return {k: feeds[k] for k in order}, attrs


@SETTINGS
@given(block_residual_case())
def test_scatter_with_block_residual_body_matches_reference(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    feeds, attrs = case
    check_op("SigeScatterWithBlockResidual", feeds, attrs)


@st.composite
def tile_moments_case(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = _rng(draw)
    groups = draw(st.integers(1, 3))
    b, c = draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    th, tw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    original = rng.standard_normal((b, c, h, w)).astype(np.float32)
    x = (original + rng.standard_normal((b, c, h, w)) * (rng.random((b, 1, h, w)) < 0.5)).astype(np.float32)
    return ({"x": x, "original": original, "indices": draw(gather_indices(rng, h, w, th, tw)),
             "mean": rng.standard_normal((b, groups, 1)).astype(np.float32)}, {"block": (th, tw), "groups": groups})


def naive_tile_moments(x: np.ndarray, original: np.ndarray, indices: np.ndarray, mean: np.ndarray,
                       block: tuple[int, int], groups: int) -> np.ndarray:
    """The definition, one tile at a time (clipped to the image)."""
    b, c, h, w = x.shape
    y = np.zeros((2, b, groups, 1))
    for r, q in indices.tolist():
        rows, cols = slice(max(r, 0), min(r + block[0], h)), slice(max(q, 0), min(q + block[1], w))
        for g in range(groups):
            ch = slice(g * c // groups, (g + 1) * c // groups)
            new, old = x[:, ch, rows, cols].astype(np.float64), original[:, ch, rows, cols].astype(np.float64)
            d = new - old
            y[0, :, g, 0] += d.sum(axis=(1, 2, 3))
            y[1, :, g, 0] += (d * (new + old - 2.0 * mean[:, g:g + 1, :, None])).sum(axis=(1, 2, 3))
    return y


@SETTINGS
@given(tile_moments_case())
def test_tile_moments_body_matches_reference(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    feeds, attrs = case
    y = check_op("SigeTileMoments", feeds, attrs)
    assert_close(y, naive_tile_moments(*feeds.values(), **attrs), what="SigeTileMoments reference vs definition")


@st.composite
def scatter_moments_case(draw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = _rng(draw)
    groups = draw(st.integers(1, 3))
    b, c = draw(st.integers(1, 2)), groups * draw(st.integers(1, 3))
    ho, wo, ph, pw = draw(st.integers(1, 8)), draw(st.integers(1, 8)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    offset, stride = (draw(st.integers(0, 2)), draw(st.integers(0, 2))), draw(st.sampled_from([(1, 1), (2, 2)]))
    idx = _grid_indices(draw, rng, ho, wo, ph, pw, offset, stride)
    per_channel = draw(st.sampled_from([None, "C11", "1C11", "BC11", "scalar"]))
    return ({"blocks": rng.standard_normal((b * len(idx), c, ph, pw)).astype(np.float32),
             "base": rng.standard_normal((b, c, ho, wo)).astype(np.float32), "indices": idx,
             "mean": rng.standard_normal((b, groups, 1)).astype(np.float32),
             "scale": _param(rng, per_channel, b, c, ho, wo), "shift": _param(rng, per_channel, b, c, ho, wo)},
            {"offset": offset, "stride": stride, "groups": groups})


@SETTINGS
@given(scatter_moments_case())
def test_scatter_moments_body_matches_reference(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Body == reference, and both == SigeTileMoments of the scattered vs the base tensor over 1x1 tiles."""
    feeds, attrs = case
    y = check_op("SigeScatterMoments", feeds, attrs)
    scale, shift = (default if feeds[k] is None else feeds[k] for k, default in (("scale", 1.0), ("shift", 0.0)))
    new = co.reference("SigeScatter", feeds["blocks"], feeds["base"], feeds["indices"], offset=attrs["offset"],
                       stride=attrs["stride"]) * scale + shift
    old = feeds["base"] * scale + shift
    _, _, h, w = old.shape
    pixels = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2).astype(np.int32)
    assert_close(y, naive_tile_moments(new, old, pixels, feeds["mean"], (1, 1), attrs["groups"]), rtol=1e-4,
                 atol=1e-4, what="SigeScatterMoments vs the moments of the scattered tensor")


# ------------------------------------------------------------------------------------------------
# API: make_node, overloads, attach_functions, shape inference
# ------------------------------------------------------------------------------------------------
def test_op_types_and_reference_ops() -> None:
    assert co.OP_TYPES == ("SigeGather", "SigeSparseConv2d", "SigeScatter", "SigeScatterGather",
                           "SigeScatterWithBlockResidual", "SigeTileMoments", "SigeScatterMoments")
    assert co.DOMAIN == "ai.sige" and co.OPSET_VERSION == 1
    assert [c.__name__ for c in co.reference_ops()] == list(co.OP_TYPES)
    assert all(c.op_domain == "ai.sige" for c in co.reference_ops())


def test_make_node_validates_attributes() -> None:
    import pytest

    node = co.make_node("SigeSparseConv2d", ["x", "i", "w", None, "s", ""], ["y"], block=6, activation="swish")
    assert node.domain == "ai.sige" and list(node.input) == ["x", "i", "w", "", "s"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["block"] == [6, 6] and attrs["activation"] == b"silu" and attrs["strides"] == [1, 1]
    assert node.overload == "block=6x6;strides=1x1;group=1;activation=silu;activation_first=0;in=scale"
    with pytest.raises(ValueError, match="unknown attribute.*'kernel'"):
        co.make_node("SigeGather", ["x", "i"], ["y"], block=4, kernel=3)
    with pytest.raises(ValueError, match="'activation'"):
        co.make_node("SigeGather", ["x", "i"], ["y"], block=4, activation="softplus")
    with pytest.raises(ValueError, match="'strides'.*1 or 2"):
        co.make_node("SigeSparseConv2d", ["x", "i", "w"], ["y"], block=4, strides=3)
    with pytest.raises(ValueError, match="missing required attribute 'block'"):
        co.make_node("SigeGather", ["x", "i"], ["y"])
    with pytest.raises(ValueError, match="'block'.*positive"):
        co.make_node("SigeGather", ["x", "i"], ["y"], block=(0, 3))
    with pytest.raises(ValueError, match="missing required input.*'indices'"):
        co.make_node("SigeGather", ["x", ""], ["y"], block=4)
    with pytest.raises(ValueError, match="unknown ai.sige op type"):
        co.make_node("SigeConv", ["x"], ["y"])
    with pytest.raises(ValueError, match="activation_first"):
        co.make_node("SigeGather", ["x", "i"], ["y"], block=4, activation_first=2)


def test_overloads_are_canonical_and_attach_is_idempotent() -> None:
    a = co.make_node("SigeGather", ["x", "i"], ["y1"], block=4, activation="relu", alpha=0.7)
    b = co.make_node("SigeGather", ["x", "i"], ["y2"], block=4, activation="relu", activation_first=1)
    c = co.make_node("SigeGather", ["x", "i", "s"], ["y3"], block=4, activation="relu", activation_first=1)
    d = co.make_node("SigeGather", ["x", "i"], ["y4"], block=4, activation="leaky_relu", alpha=0.7)
    assert a.overload == b.overload  # alpha / activation_first do not change this body
    assert len({a.overload, c.overload, d.overload}) == 3
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    feeds = {"x": x, "i": np.array([[0, 1], [-2, 3]], np.int32), "s": np.ones((2, 1, 1), np.float32)}
    model = model_from_nodes([a, b, c, d], feeds, ["y1", "y2", "y3", "y4"])
    assert len(model.functions) == 3 and model.ir_version >= 10
    assert any(o.domain == "ai.sige" and o.version == 1 for o in model.opset_import)
    again = co.attach_functions(model)
    assert again.SerializeToString() == model.SerializeToString()
    got = run_onnxruntime(model, feeds)
    for node, y in zip([a, b, c, d], got):
        want = co.reference("SigeGather", *(feeds[n] for n in node.input),
                            **{at.name: onnx.helper.get_attribute_value(at) for at in node.attribute})
        assert_close(y, want, what=node.output[0])
    assert co.function_for(c).overload == c.overload


def test_infer_shape_symbolic() -> None:
    assert co.infer_shape("SigeGather", [("B", 8, "H", "W"), ("N", 2)], {"block": 6}) == [("B*N", 8, 6, 6)]
    assert co.infer_shape("SigeGather", [(1, 8, 64, 64), ("N", 2)], {"block": (6, 4)}) == [("N", 8, 6, 4)]
    assert co.infer_shape("SigeSparseConv2d", [(2, 8, "H", "W"), (5, 2), (16, 4, 3, 3)],
                          {"block": 7, "strides": 2, "group": 2}) == [(10, 16, 3, 3)]
    assert co.infer_shape("SigeScatter", [("BN", 4, 2, 2), (1, 4, "Ho", "Wo"), ("N", 2)], {}) == [(1, 4, "Ho", "Wo")]
    assert co.infer_shape("SigeScatterGather", [None, (2, 3, 9, 9), (9, 9), (7, 2)], {"block": 4}) == [(14, 3, 4, 4)]
    assert co.infer_shape("SigeScatterWithBlockResidual",
                          [None, (1, 3, 8, 8), None, None, (1, 3, 8, 8), None], {}) == [(1, 3, 8, 8)]


def test_onnx_shape_inference_through_bodies() -> None:
    """onnx infers the output shapes through the bodies, with and without data propagation:
    fully static for static inputs; with a symbolic block count only the first dim is unknown."""
    rng = np.random.default_rng(1)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    feeds = {"x": f(2, 4, 9, 9), "i": np.zeros((3, 2), np.int32), "w": f(8, 2, 3, 3), "bl": f(6, 8, 4, 4),
             "base": f(2, 8, 7, 7), "sm": np.full((7, 7), -1, np.int32)}
    nodes = [co.make_node("SigeSparseConv2d", ["x", "i", "w"], ["c"], block=6, strides=1, group=2),
             co.make_node("SigeGather", ["x", "i"], ["g"], block=5),
             co.make_node("SigeScatter", ["bl", "base", "i"], ["s"], offset=1),
             co.make_node("SigeScatterGather", ["bl", "base", "sm", "i"], ["sg"], block=(5, 3)),
             co.make_node("SigeScatterWithBlockResidual", ["bl", "base", "i", "bl", "base", "i"], ["r"])]
    want = [[6, 8, 4, 4], [6, 4, 5, 5], [2, 8, 7, 7], [6, 8, 5, 3], [2, 8, 7, 7]]
    for dynamic in (set(), {"i", "bl"}):
        model = model_from_nodes(nodes, feeds, ["c", "g", "s", "sg", "r"], dynamic=dynamic)
        for prop in (True, False):
            out = onnx.shape_inference.infer_shapes(model, data_prop=prop).graph.output
            dims = [[d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
                    for o in out]
            expect = want if not dynamic else [[None, *w[1:]] if k in (0, 1, 3) else w for k, w in enumerate(want)]
            assert dims == expect, (dynamic, prop)


def test_attach_functions_follows_the_model_opset() -> None:
    from onnx import TensorProto, helper

    x = np.random.default_rng(2).standard_normal((1, 2, 5, 5)).astype(np.float32)
    i = np.array([[-1, 3]], np.int32)
    want = co.reference("SigeGather", x, i, block=3, activation="tanh")
    for opset in (13, 17, 21):
        graph = helper.make_graph(
            [co.make_node("SigeGather", ["x", "i"], ["y"], block=3, activation="tanh")], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5]),
             helper.make_tensor_value_info("i", TensorProto.INT32, [1, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
        if opset < co.MIN_MODEL_OPSET:
            import pytest

            with pytest.raises(ValueError, match="opset 13.*need >= 17"):
                co.attach_functions(model)
            continue
        model = co.attach_functions(model)
        assert model.functions[0].opset_import[0].version == max(18, opset)
        onnx.checker.check_model(model, full_check=True)
        assert_close(run_onnxruntime(model, {"x": x, "i": i})[0], want, what=f"opset {opset}")
