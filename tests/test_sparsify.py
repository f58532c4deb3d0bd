"""Sparsifier: the SIGE program's edit pass against its own prime pass and the dense model."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sige_export.program import SigeProgram, all_grid_indices, derived_feeds
from sige_export.runtime import Engine, OnnxRuntimeBackend
from sige_export.sparsify import SparsifyError, SparsifyOptions, SparsifyResult, sparsify
from tests.helpers import assert_close, assert_close_relative


class ResBlockNet(nn.Module):
    """GroupNorm/SiLU/time-embedding res blocks, a 1x1 shortcut, a strided conv, upsampling, BN, IN, GELU."""

    def __init__(self, c: int = 16, co: int = 32) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, 1, 1)
        self.n1 = nn.GroupNorm(4, c)
        self.c1 = nn.Conv2d(c, co, 3, 1, 1)
        self.temb = nn.Linear(8, co)
        self.n2 = nn.GroupNorm(8, co)
        self.c2 = nn.Conv2d(co, co, 3, 1, 1)
        self.sc = nn.Conv2d(c, co, 1)
        self.down = nn.Conv2d(co, co, 3, 2, 0)
        self.bn = nn.BatchNorm2d(co)
        self.inorm = nn.InstanceNorm2d(co, affine=True)
        self.dw = nn.Conv2d(co, co, 3, 1, 1, groups=co)
        self.out = nn.Conv2d(co, 3, 3, 1, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        h = self.c1(F.silu(self.n1(x)))
        h = h + self.temb(F.silu(t))[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        y = self.sc(x) + h
        y = self.down(F.pad(y, (0, 1, 0, 1)))
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        y = F.leaky_relu(self.bn(y), 0.2) + self.dw(F.gelu(self.inorm(y)))
        return self.out(F.silu(y))


class BatchNormNet(nn.Module):
    """Only input-independent normalisation: the edit with all blocks active equals dense in both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 16, 3, 1, 1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, 2, 1)
        self.c3 = nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.bn(self.c1(x)), 0.2)
        h = self.c2(h)
        return torch.tanh(self.c3(F.relu(h)) + h[:, :8])


class ResampleNet(nn.Module):
    """SPADE-like: the edited map downsampled as conditioning, the features upsampled between resolutions."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, 1, 1)
        self.down = nn.Conv2d(c, c, 3, 2, 1)
        self.gamma = nn.Conv2d(3, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c, affine=False)
        self.mid = nn.Conv2d(c, c, 3, 1, 1)
        self.out = nn.Conv2d(c, 3, 3, 1, 1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.interpolate(x, scale_factor=0.5, mode="nearest")  # 16 x 16 conditioning
        h = self.down(self.conv_in(s))  # 8 x 8
        u = F.interpolate(h, scale_factor=2.0, mode="nearest")  # 16 x 16
        h = self.mid(F.leaky_relu(self.bn(u) * (1 + self.gamma(s)), 0.2))
        return self.out(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # 32 x 32


class UpsamplingNet(nn.Module):
    """pix2pix / U-Net decoders: transposed convs (k4 s2 p1, k3 s2 p1 op1, k2 s2, and k3 s2 p1 whose output is
    one short of twice the input)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, c, 3, 2, 1)  # 16 x 16
        self.up4 = nn.ConvTranspose2d(c, c, 4, 2, 1)  # 32
        self.down = nn.Conv2d(c, c, 3, 2, 1)  # 16
        self.up3 = nn.ConvTranspose2d(c, c, 3, 2, 1, output_padding=1)  # 32
        self.down2 = nn.Conv2d(c, c, 2, 2)  # 16
        self.up2 = nn.ConvTranspose2d(c, c, 2, 2)  # 32
        self.odd = nn.ConvTranspose2d(c, 3, 3, 2, 1)  # 63

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.up4(self.conv_in(x)))
        h = F.relu(self.up3(self.down(h))) + h
        h = self.up2(self.down2(h))
        return torch.tanh(self.odd(h))


class PaddingModeNet(nn.Module):
    """Reflect / replicate padded convs (pix2pix, CycleGAN): over a BN + ReLU, a pending scatter, a residual
    expression through ReflectionPad2d, a channel concat."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, padding_mode="replicate")
        self.pad = nn.ReflectionPad2d(3)
        self.c3 = nn.Conv2d(c, c, 7)
        self.c4 = nn.Conv2d(2 * c, 3, 3, padding=1, padding_mode="reflect")
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.c1(x)))
        h2 = self.c2(h) + h
        h3 = self.c3(self.pad(F.leaky_relu(h2, 0.2)))
        return self.c4(torch.cat([h3, h2], 1))


class ResnetGeneratorNet(nn.Module):
    """A small CycleGAN / pix2pix ResnetGenerator: reflection padding, instance norm, residual blocks
    ``x + IN(conv(...))``, a strided conv down and a transposed conv up."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()

        def block() -> nn.Sequential:
            return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2 * c, 2 * c, 3), nn.InstanceNorm2d(2 * c),
                                 nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(2 * c, 2 * c, 3),
                                 nn.InstanceNorm2d(2 * c))

        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, c, 7), nn.InstanceNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, 2 * c, 3, 2, 1), nn.InstanceNorm2d(2 * c), nn.ReLU())
        self.blocks = nn.ModuleList([block(), block()])
        self.tail = nn.Sequential(nn.ConvTranspose2d(2 * c, c, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(c),
                                  nn.ReLU(), nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        for b in self.blocks:
            h = h + b(h)
        return self.tail(h)


def _dense_onnx(model: nn.Module, inputs: dict[str, torch.Tensor]) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(inputs.values()), buf, dynamo=False, opset_version=17,
                          input_names=list(inputs), output_names=["out"])
    return onnx.load_from_string(buf.getvalue())


def _engine(dense: onnx.ModelProto, **opts) -> Engine:
    result = sparsify(dense, SparsifyOptions(sparse_min_res=8, **opts))
    onnx.checker.check_model(result.model, full_check=True)
    program = SigeProgram.from_model(result.model)
    return Engine(program, OnnxRuntimeBackend(program))


def _edit_all_blocks(engine: Engine, edited: dict[str, np.ndarray]) -> np.ndarray:
    feeds = {g["name"]: all_grid_indices(g) for g in engine.manifest["indices"]}
    feeds.update(derived_feeds(engine.manifest, feeds))
    entry = engine._entry(None)
    full = {**entry.caches, **feeds}
    for name, e in engine.manifest["edit"]["edited"].items():
        full[e] = edited[name]
    return engine.backend.edit(full)[engine.manifest["edit"]["outputs"][0]]


def _sparsified(net: type[nn.Module], seed: int = 0) -> tuple[nn.Module, torch.Tensor, onnx.ModelProto,
                                                              SparsifyResult, list[onnx.NodeProto]]:
    """``(model, x, dense ONNX, sparsify result, edit-pass nodes)`` of a test net on a 32 x 32 input."""
    torch.manual_seed(seed)
    model = net().eval()
    x = torch.randn(1, 3, 32, 32)
    dense = _dense_onnx(model, {"x": x})
    result = sparsify(dense, SparsifyOptions(sparse_min_res=8))
    return model, x, dense, result, [n for n in result.model.graph.node if n.name.startswith("edit/")]


def _assert_edits_match_dense(model: nn.Module, dense: onnx.ModelProto, x: torch.Tensor, *, seed: int,
                              edit: tuple | None = None, far: tuple | None = None, all_blocks: bool = True,
                              **opts) -> None:
    """With every block active the edit pass equals torch dense on a random input; a local edit (+1 at ``edit``)
    runs sparse and leaves ``far`` as primed."""
    engine = _engine(dense, **opts)
    engine.prime(x.numpy())
    if all_blocks:
        edited = np.random.default_rng(seed).normal(size=x.shape).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(edited)).numpy()
        assert_close_relative(_edit_all_blocks(engine, {"x": edited}), ref, rel=1e-4, what="all blocks vs dense")
    if edit is not None:
        local = x.numpy().copy()
        local[edit] += 1.0
        primed = engine.prime(x.numpy())
        out = engine.edit(local)
        assert engine.last_edit.mode == "sparse"
        if far is not None:
            assert_close(out[far], primed[far], rtol=0, atol=1e-6, what="far from the edit")


def _random_mask(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    m = np.zeros(hw, bool)
    h0, w0 = rng.integers(0, hw[0] - 4), rng.integers(0, hw[1] - 4)
    m[h0:h0 + rng.integers(1, 8), w0:w0 + rng.integers(1, 8)] = True
    return m


@pytest.fixture(scope="module")
def resblock() -> tuple[nn.Module, dict[str, torch.Tensor], onnx.ModelProto]:
    torch.manual_seed(0)
    model = ResBlockNet().eval()
    inputs = {"x": torch.randn(1, 3, 32, 32), "t": torch.randn(1, 8)}
    return model, inputs, _dense_onnx(model, inputs)


@pytest.mark.parametrize("norm_stats", ["original", "update"])
def test_edit_of_unedited_input_equals_prime(resblock, norm_stats: str) -> None:
    model, inputs, dense = resblock
    engine = _engine(dense, norm_stats=norm_stats)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    primed = engine.prime(**feeds)
    with torch.no_grad():
        assert_close_relative(primed, model(**inputs).numpy(), rel=1e-4, what="prime vs torch")
    rng = np.random.default_rng(1)
    for _ in range(3):
        out = engine.edit(**feeds, mask=_random_mask(rng, (32, 32)))
        assert engine.last_edit.mode == "sparse"
        assert_close(out, primed, rtol=1e-5, atol=1e-5, what=f"edit(unedited) vs prime [{norm_stats}]")
    # An empty mask returns the cached output without running.
    out = engine.edit(**feeds, mask=np.zeros((32, 32), bool))
    assert engine.last_edit.mode == "cached"
    assert_close(out, primed, rtol=0, atol=0)


@pytest.mark.parametrize("norm_stats", ["original", "update"])
def test_no_active_blocks_returns_prime(resblock, norm_stats: str) -> None:
    _, inputs, dense = resblock
    engine = _engine(dense, norm_stats=norm_stats)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    primed = engine.prime(**feeds)
    edit_feeds = {g["name"]: np.zeros((0, 2), np.int32) for g in engine.manifest["indices"]}
    edit_feeds.update(derived_feeds(engine.manifest, edit_feeds))
    entry = engine._entry(None)
    edited = feeds["x"] + 1.0  # ignored: no block is active
    out = engine.backend.edit({**entry.caches, **edit_feeds, "edit/x": edited})["edit/out"]
    assert_close(out, primed, rtol=1e-6, atol=1e-6, what="N = 0")


def test_all_blocks_update_equals_dense(resblock) -> None:
    model, inputs, dense = resblock
    engine = _engine(dense, norm_stats="update")
    feeds = {k: v.numpy() for k, v in inputs.items()}
    engine.prime(**feeds)
    edited = feeds["x"] + np.random.default_rng(2).normal(size=feeds["x"].shape).astype(np.float32)
    out = _edit_all_blocks(engine, {"x": edited})
    with torch.no_grad():
        ref = model(torch.from_numpy(edited), inputs["t"]).numpy()
    assert_close_relative(out, ref, rel=1e-4, what="all blocks (update) vs dense")


@pytest.mark.parametrize("norm_stats", ["original", "update"])
def test_batchnorm_model_all_blocks_equals_dense(norm_stats: str) -> None:
    torch.manual_seed(3)
    model = BatchNormNet().eval()
    x = torch.randn(1, 4, 24, 24)
    engine = _engine(_dense_onnx(model, {"x": x}), norm_stats=norm_stats)
    engine.prime(x.numpy())
    edited = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    out = _edit_all_blocks(engine, {"x": edited})
    with torch.no_grad():
        ref = model(torch.from_numpy(edited)).numpy()
    assert_close_relative(out, ref, rel=1e-4, what=f"BN model all blocks [{norm_stats}]")


@pytest.mark.parametrize("norm_stats", ["original", "update"])
def test_local_edit_tracks_dense(resblock, norm_stats: str) -> None:
    model, inputs, dense = resblock
    feeds = {k: v.numpy() for k, v in inputs.items()}
    edited = feeds["x"].copy()
    edited[..., 10:14, 12:18] += 1.0
    with torch.no_grad():
        ref = model(torch.from_numpy(edited), inputs["t"]).numpy()
    errors = []
    for dilation in (1, 3):
        engine = _engine(dense, norm_stats=norm_stats, mask_dilation=dilation)
        primed = engine.prime(**feeds)
        out = engine.edit(edited, feeds["t"])
        assert engine.last_edit.mode == "sparse" and 0 < engine.last_edit.ratio < 0.1
        # Only blocks around the edit are recomputed: far from it the output is the cached one.
        assert_close(out[..., :, 28:], primed[..., :, 28:], rtol=0, atol=1e-6, what="far from the edit")
        errors.append(np.abs(out - ref).max())
        # The edit captures most of the change (SIGE ignores the receptive-field growth beyond the mask).
        assert errors[-1] < 0.5 * np.abs(primed - ref).max()
    assert errors[1] < errors[0], f"a larger dilation should be closer to dense: {errors}"


def test_fusions_are_used(resblock) -> None:
    _, _, dense = resblock
    result = sparsify(dense, SparsifyOptions(sparse_min_res=8))
    ops = {n.op_type for n in result.model.graph.node if n.domain == "ai.sige"}
    assert {"SigeSparseConv2d", "SigeScatterGather", "SigeScatterWithBlockResidual"} <= ops
    assert len(result.manifest["sparse_convs"]) >= 6


def test_dynamic_spatial_size_asks_for_input_shape() -> None:
    model = BatchNormNet().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 4, 16, 16),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {2: "h", 3: "w"}})
    with pytest.raises(SparsifyError, match="--input-shape"):
        sparsify(onnx.load_from_string(buf.getvalue()))


def test_model_without_convolutions_is_refused() -> None:
    class NoConv(nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 2

    with pytest.raises(SparsifyError, match="convolution"):
        sparsify(_dense_onnx(NoConv(), {"x": torch.randn(1, 3, 16, 16)}))


def test_unknown_op_becomes_warned_dense_island() -> None:
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, 1, 1)

        def forward(self, x):
            return self.c(torch.cumsum(x, dim=3))

    dense = _dense_onnx(Odd(), {"x": torch.randn(1, 3, 16, 16)})
    with pytest.warns(UserWarning, match="CumSum"):
        result = sparsify(dense, SparsifyOptions(sparse_min_res=8))
    assert any("CumSum" in w for w in result.warnings)


def _check_program_against_dense(dense: onnx.ModelProto, feeds: dict[str, np.ndarray], edited_name: str) -> Engine:
    """Unedited edit == prime and (update mode) all blocks == the dense model in onnxruntime."""
    import onnxruntime as ort

    engine = _engine(dense, norm_stats="update")
    primed = engine.prime(**feeds)
    h, w = feeds[edited_name].shape[2:]
    m = np.zeros((h, w), bool)
    m[h // 3:h // 2, w // 4:w // 2] = True
    assert_close(engine.edit(**feeds, mask=m), primed, rtol=1e-5, atol=1e-5, what="edit(unedited) vs prime")
    edited = dict(feeds)
    edited[edited_name] = feeds[edited_name] + np.random.default_rng(5).normal(
        size=feeds[edited_name].shape).astype(np.float32)
    sess = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, edited)[0]
    assert_close_relative(_edit_all_blocks(engine, edited), ref, rel=1e-4, what="all blocks vs dense")
    return engine


def test_dynamo_exporter_graph(resblock) -> None:
    model, inputs, _ = resblock
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = torch.onnx.export(model, tuple(inputs.values()), dynamo=True, input_names=list(inputs),
                                  output_names=["out"]).model_proto
    engine = _check_program_against_dense(dense, {k: v.numpy() for k, v in inputs.items()}, "x")
    assert len(engine.manifest["sparse_convs"]) == 7


def test_group_normalization_op() -> None:
    """GroupNormalization (opset 21, per-channel scale/bias) folds like the exporters' pattern."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 8
    inits = [numpy_helper.from_array(rng.normal(size=(c, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(1, 0.1, size=c).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(0, 0.1, size=c).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(size=(4, c, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["h", "gamma", "beta"], ["n"], num_groups=2, epsilon=1e-5),
             helper.make_node("Sigmoid", ["n"], ["s"]), helper.make_node("Mul", ["n", "s"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["out"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 24, 24])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 24, 24])], inits)
    dense = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    engine = _check_program_against_dense(dense, {"x": rng.normal(size=(1, 4, 24, 24)).astype(np.float32)}, "x")
    assert engine.manifest["dense_islands"] == []


def test_nearest_resizes_are_read_through_by_the_gathers() -> None:
    """No Resize runs in the edit pass: the gathers read the small (or large) tensor through the factors, and
    the edit with every block active equals the dense model."""
    model, x, dense, result, edit = _sparsified(ResampleNet, seed=5)
    assert not [n.name for n in edit if n.op_type == "Resize"]
    factors = {(tuple(a.ints) if a.name == "upsample" else None, n.op_type) for n in edit if n.domain == "ai.sige"
               for a in n.attribute if a.name == "upsample" and tuple(a.ints) != (1, 1)}
    downs = [n.op_type for n in edit if n.domain == "ai.sige"
             for a in n.attribute if a.name == "downsample" and tuple(a.ints) == (2, 2)]
    assert ((2, 2), "SigeSparseConv2d") in factors and downs, (factors, downs)
    _assert_edits_match_dense(model, dense, x, seed=6, edit=np.s_[..., 4:9, 20:26], far=np.s_[..., 16:, :12])


@pytest.mark.parametrize("seed", range(6))
def test_conv_transposes_become_phase_convs(seed: int) -> None:
    """The rewrite alone, over random geometries, against torch's ConvTranspose2d (run by onnxruntime)."""
    import onnxruntime as ort

    from sige_export.graph import conv_transposes_as_convs

    rng = np.random.default_rng(seed)
    for _ in range(6):
        k, s = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        p, op = int(rng.integers(0, k)), int(rng.integers(0, s))
        ci, co, h, w = (int(v) for v in [*rng.integers(1, 6, 2), *rng.integers(3, 9, 2)])
        torch.manual_seed(seed)
        layer = nn.ConvTranspose2d(ci, co, k, s, p, output_padding=op, bias=bool(rng.integers(0, 2)))
        x = torch.randn(1, ci, h, w)
        rewritten = conv_transposes_as_convs(_dense_onnx(layer, {"x": x}))
        ops = [n.op_type for n in rewritten.graph.node]
        assert "ConvTranspose" not in ops and "Conv" in ops, ops
        onnx.checker.check_model(rewritten, full_check=True)
        got = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()})[0]
        with torch.no_grad():
            assert_close(got, layer(x).numpy(), rtol=1e-5, atol=1e-5, what=f"k{k} s{s} p{p} op{op} {h}x{w}")


@pytest.mark.parametrize("pads,strides,rewritten", [([0, 1, 2, 0], [2, 2], True), ([2, 0, 0, 1], [3, 3], True),
                                                     ([1, 1, 1, 1], [2, 1], False)])
def test_conv_transpose_asymmetric_pads(pads: list[int], strides: list[int], rewritten: bool) -> None:
    """ONNX ConvTransposes torch does not export: asymmetric pads (rewritten), unequal strides (left as they are);
    onnxruntime runs the original node as the reference."""
    import onnxruntime as ort
    from onnx import helper as oh

    from sige_export.graph import conv_transposes_as_convs

    rng = np.random.default_rng(sum(pads))
    w, b = rng.normal(size=(3, 2, 4, 3)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    node = oh.make_node("ConvTranspose", ["x", "w", "b"], ["y"], pads=pads, strides=strides)
    graph = oh.make_graph([node], "ct", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 6])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)
    x = rng.normal(size=(1, 3, 5, 6)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    want = run(model)
    out = conv_transposes_as_convs(onnx.ModelProto.FromString(model.SerializeToString()))
    assert ("ConvTranspose" not in [n.op_type for n in out.graph.node]) == rewritten
    assert_close(run(out), want, rtol=1e-5, atol=1e-5, what=f"pads {pads} strides {strides}")


class ShuffleNormNet(nn.Module):
    """Pixel shuffle (DepthToSpace, CRD) and a transposed conv, each followed by an instance norm."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4 * c, 3, 1, 1)
        self.n1 = nn.InstanceNorm2d(c, affine=True)
        self.up = nn.ConvTranspose2d(c, c, 4, 2, 1)
        self.n2 = nn.InstanceNorm2d(c, affine=True, eps=1e-3)
        with torch.no_grad():
            for n in (self.n1, self.n2):
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(F.pixel_shuffle(self.conv(x), 2)))
        return self.n2(self.up(h))


@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_norms_move_before_depth_to_space(hw: tuple[int, int]) -> None:
    """InstanceNorm(DepthToSpace(y)) -> DepthToSpace(group norm of y), against torch (onnxruntime runs the rewrite)."""
    import onnxruntime as ort

    from sige_export.graph import conv_transposes_as_convs, norms_before_depth_to_space

    torch.manual_seed(hw[1])
    model = ShuffleNormNet().eval()
    x = torch.randn(1, 3, *hw)
    rewritten = norms_before_depth_to_space(conv_transposes_as_convs(_dense_onnx(model, {"x": x})))
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.index("InstanceNormalization") < ops.index("DepthToSpace"), ops
    assert ops.count("InstanceNormalization") == 2 and ops[-1] == "DepthToSpace", ops
    got = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert_close(got, model(x).numpy(), rtol=1e-4, atol=1e-4, what=f"norms before the shuffles {hw}")
    dense = _dense_onnx(model, {"x": x})
    result = sparsify(dense, SparsifyOptions(sparse_min_res=8, sparse_min_blocks=1))
    assert not [n for n in result.manifest["dense_islands"] if "Normalization" in n], result.manifest["dense_islands"]
    _assert_edits_match_dense(model, dense, x, seed=4, sparse_min_blocks=1)


def test_transposed_convs_run_sparse() -> None:
    model, x, dense, result, edit = _sparsified(UpsamplingNet)
    assert not [n.name for n in result.model.graph.node if n.op_type == "ConvTranspose"]
    assert not result.warnings, result.warnings
    assert len(result.manifest["sparse_convs"]) == 7, result.manifest["sparse_convs"]
    assert sum(n.op_type == "DepthToSpace" for n in edit) == 4
    _assert_edits_match_dense(model, dense, x, seed=7, edit=np.s_[..., 2:7, 20:26], far=np.s_[..., 40:, :20])


def test_reflect_and_replicate_padding_is_read_through_by_the_gathers() -> None:
    model, x, dense, result, edit = _sparsified(PaddingModeNet)
    assert not [n.name for n in edit if n.op_type == "Pad"], "no padded copy in the edit pass"
    modes = sorted((n.op_type, a.s.decode()) for n in edit if n.domain == "ai.sige" for a in n.attribute
                   if a.name == "padding_mode")
    # c1 and c3 (over the materialised residual scatter) reflect, c2 edge; c4 gathers both concat parts reflected
    assert modes == ([("SigeGather", "reflect")] * 2 + [("SigeSparseConv2d", "edge")]
                     + [("SigeSparseConv2d", "reflect")] * 2), modes
    assert len(result.manifest["sparse_convs"]) == 4
    _assert_edits_match_dense(model, dense, x, seed=8, edit=np.s_[..., 0:4, 27:32], far=np.s_[..., 20:, :12])


def test_resnet_generator_residuals_scatter_with_the_normalised_blocks() -> None:
    """``x + IN(conv(...))`` scatters the normalised blocks with the residual (no dense Add); reflect pads and the
    transposed conv run sparse; both statistics modes equal torch dense with every block active."""
    torch.manual_seed(0)
    model = ResnetGeneratorNet().eval()
    x = torch.randn(1, 3, 32, 32)
    dense = _dense_onnx(model, {"x": x})
    for norm_stats in ("update", "original"):
        result = sparsify(dense, SparsifyOptions(sparse_min_res=8, norm_stats=norm_stats))
        assert not [n for n in result.manifest["dense_islands"] if "Add" in n or "Pad" in n or "Normalization" in n], \
            result.manifest["dense_islands"]
        assert len(result.manifest["sparse_convs"]) == 8
        # 7x7 convs keep a 3x3 conv's 4x4 outputs per block (block 6 + 4)
        assert {tuple(g["block"]) for g in result.manifest["indices"] if g["kernel"] == [7, 7]} == {(10, 10)}
        # "update": statistics exact for the edited input; "original": far pixels keep their cached values
        update = norm_stats == "update"
        _assert_edits_match_dense(model, dense, x, seed=9, edit=np.s_[..., 2:6, 3:9], all_blocks=update,
                                  far=None if update else np.s_[..., 20:, 20:], norm_stats=norm_stats)
