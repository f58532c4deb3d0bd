"""GauGAN zoo entries: determinism, state-dict names and round trips, full-size structure."""
from __future__ import annotations

import copy

import pytest
import torch

from sige_export import frontend, zoo
from sige_export.zoo import gaugan
from tests.helpers import assert_close

GAN = ["gaugan-cityscapes", "gancomp-gaugan"]


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def spade_params(label: int = 36, ngf: int = 64, hidden: int = 128) -> int:
    """NVlabs SPADEGenerator (use_vae False, 'more'), counted from the reference's layer list."""
    def spade(norm_nc: int) -> int:
        return _conv(label, hidden, 3) + 2 * _conv(hidden, norm_nc, 3)

    def block(fin: int, fout: int) -> int:
        fm = min(fin, fout)
        n = _conv(fin, fm, 3) + _conv(fm, fout, 3) + spade(fin) + spade(fm)
        if fin != fout:
            n += _conv(fin, fout, 1, bias=False) + spade(fin)
        return n

    nf = ngf
    return (_conv(label, 16 * nf, 3) + 3 * block(16 * nf, 16 * nf) + block(16 * nf, 8 * nf)
            + block(8 * nf, 4 * nf) + block(4 * nf, 2 * nf) + block(2 * nf, nf) + _conv(nf, 3, 3))


def gancomp_params(label: int = 36, c: tuple = gaugan.GANCOMP_CONFIG) -> int:
    """GAN Compression SubMobileSPADEGenerator counted from its constructor."""
    def sep(cin: int, cout: int) -> int:
        return cin * 9 + cin + cin * cout + cout

    def spade(hidden: int, oc: int) -> int:
        return _conv(label, hidden, 3) + 2 * sep(hidden, oc)

    def block(ic: int, ch: int, hidden: int, shortcut: bool) -> int:
        n = _conv(ic, ch, 3) + _conv(ch, ch if shortcut else ic, 3) + spade(hidden, ic) + spade(hidden, ch)
        if shortcut:
            n += _conv(ic, ch, 1, bias=False) + spade(hidden, ic)
        return n

    ic = 16 * c[0]
    n = _conv(label, ic, 3)
    for i in (1, 2, 3):
        n += block(ic, 16 * c[i], 2 * c[i], False)
    for i, mult in ((4, 8), (5, 4), (6, 2), (7, 1)):
        n += block(ic, mult * c[i], 2 * c[i], True)
        ic = mult * c[i]
    return n + _conv(c[7], 3, 3)


def _meta_full(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return zoo.create(name, "full")


@pytest.mark.parametrize("name", GAN)
def test_determinism_per_seed(name: str) -> None:
    a, b, c = zoo.create(name, "tiny", 0), zoo.create(name, "tiny", 0), zoo.create(name, "tiny", 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    x0, x0b, x1 = (zoo.example_inputs(name, "tiny", s)["segmap"] for s in (0, 0, 1))
    assert torch.equal(x0, x0b) and not torch.equal(x0, x1)
    with torch.no_grad():
        assert torch.equal(a(x0), b(x0))


@pytest.mark.parametrize("name", GAN)
def test_inputs_are_one_hot_plus_edge(name: str) -> None:
    x = zoo.example_inputs(name, "tiny")["segmap"]
    assert x.shape == (1, 8, 64, 128)
    assert torch.all(x[:, :-1].sum(1) == 1)
    edge = x[:, -1]
    assert set(edge.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("name", GAN)
def test_state_dict_round_trip_strict(name: str) -> None:
    src, dst = zoo.create(name, "tiny", 0), zoo.create(name, "tiny", 3)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = zoo.example_inputs(name, "tiny")["segmap"]
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_spade_release_names_and_shapes() -> None:
    sd = _meta_full("gaugan-cityscapes").state_dict()
    expect = {
        "fc.weight": (1024, 36, 3, 3),
        "head_0.conv_0.weight": (1024, 1024, 3, 3),
        "head_0.norm_0.mlp_shared.0.weight": (128, 36, 3, 3),
        "head_0.norm_0.mlp_gamma.weight": (1024, 128, 3, 3),
        "head_0.norm_0.mlp_beta.bias": (1024,),
        "head_0.norm_0.param_free_norm.running_mean": (1024,),
        "G_middle_0.conv_1.weight": (1024, 1024, 3, 3),
        "G_middle_1.norm_1.mlp_gamma.weight": (1024, 128, 3, 3),
        "up_0.conv_s.weight": (512, 1024, 1, 1),
        "up_0.norm_s.mlp_shared.0.weight": (128, 36, 3, 3),
        "up_3.conv_s.weight": (64, 128, 1, 1),
        "up_3.conv_1.weight": (64, 64, 3, 3),
        "conv_img.weight": (3, 64, 3, 3),
    }
    for k, shape in expect.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    assert "head_0.conv_s.weight" not in sd and not any(k.startswith("up_4.") for k in sd)  # 'more', not 'most'


def test_gancomp_names_and_shapes() -> None:
    sd = _meta_full("gancomp-gaugan").state_dict()
    expect = {
        "fc.weight": (512, 36, 3, 3),
        "head_0.conv_0.weight": (512, 512, 3, 3),
        "head_0.norm_0.mlp_shared.0.weight": (64, 36, 3, 3),
        "head_0.norm_0.mlp_gamma.conv.0.weight": (64, 1, 3, 3),
        "head_0.norm_0.mlp_gamma.conv.2.weight": (512, 64, 1, 1),
        "head_0.norm_0.param_free_norm.running_var": (1024,),
        "G_middle_1.conv_0.weight": (768, 512, 3, 3),
        "G_middle_1.conv_1.weight": (512, 768, 3, 3),
        "up_0.conv_s.weight": (256, 512, 1, 1),
        "up_1.conv_0.weight": (96, 256, 3, 3),
        "up_1.norm_1.param_free_norm.running_mean": (256,),
        "up_3.conv_s.weight": (32, 48, 1, 1),
        "conv_img.weight": (3, 32, 3, 3),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k


@pytest.mark.parametrize("name,expected", [("gaugan-cityscapes", spade_params()),
                                           ("gancomp-gaugan", gancomp_params())])
def test_full_param_count_and_output_shape(name: str, expected: int) -> None:
    m = _meta_full(name)
    assert sum(p.numel() for p in m.parameters()) == expected
    x = zoo.example_inputs(name, "full")["segmap"]
    assert x.shape == (1, 36, 256, 512)
    with torch.no_grad():
        assert m(x.to("meta")).shape == (1, 3, 256, 512)


def test_param_counts_match_published_scale() -> None:
    # GAN Compression reports 93.0M parameters for GauGAN; the compressed model is ~20M.
    assert 92.5e6 < spade_params() < 93.5e6
    assert 19.5e6 < gancomp_params() < 21e6


def test_spectral_norm_checkpoint_folds_on_load() -> None:
    plain = zoo.create("gaugan-cityscapes", "tiny", 0)
    sn = copy.deepcopy(plain)
    for mod in sn.modules():
        if isinstance(mod, gaugan.SPADEResnetBlock):
            for conv in ("conv_0", "conv_1", "conv_s"):
                if hasattr(mod, conv):
                    setattr(mod, conv, torch.nn.utils.spectral_norm(getattr(mod, conv)))
    for mod in sn.modules():  # a few power iterations, then freeze (eval)
        if hasattr(mod, "weight_orig"):
            mod.train()
    x = zoo.example_inputs("gaugan-cityscapes", "tiny")["segmap"]
    with torch.no_grad():
        for _ in range(3):
            sn(x)
    sn.eval()
    state = sn.state_dict()
    assert "head_0.conv_0.weight_orig" in state and "head_0.conv_0.weight_u" in state
    fresh = zoo.create("gaugan-cityscapes", "tiny", 5)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert_close(fresh(x), sn(x), rtol=1e-5, atol=1e-6, what="spectral-norm fold")
    # the frontend's checked loader folds too
    frontend.load_state_dict_checked(zoo.create("gaugan-cityscapes", "tiny", 6), state, arch="gaugan-cityscapes")


def test_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError) as e:
        zoo.create("gaugan-nope")
    for n in GAN:
        assert n in str(e.value)
    with pytest.raises(frontend.FrontendError) as e2:
        frontend.load_model("gaugan-nope")
    assert "gaugan-cityscapes" in str(e2.value)


def test_other_architecture_checkpoint_names_mismatches() -> None:
    state = zoo.create("gaugan-cityscapes", "tiny").state_dict()
    with pytest.raises(frontend.FrontendError) as e:
        frontend.load_state_dict_checked(zoo.create("gancomp-gaugan", "tiny"), state, arch="gancomp-gaugan")
    msg = str(e.value)
    assert "gancomp-gaugan" in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "shape mismatches" in msg and "fc.weight" in msg
    assert "head_0.norm_0.mlp_gamma.conv.0.weight" in msg


def test_cyclegan_resnet_generator_matches_the_reference_layout() -> None:
    """junyanz ResnetGenerator (resnet_9blocks, ngf 64, instance norm): 11,378,179 parameters counted from its layer
    list, and its state-dict names (``model.N...``), so a ``latest_net_G.pth`` loads with ``--arch``."""
    ngf = 64
    blocks = 9 * 2 * _conv(4 * ngf, 4 * ngf, 3)
    expected = (_conv(3, ngf, 7) + _conv(ngf, 2 * ngf, 3) + _conv(2 * ngf, 4 * ngf, 3) + blocks
                + _conv(4 * ngf, 2 * ngf, 3) + _conv(2 * ngf, ngf, 3) + _conv(ngf, 3, 7))
    assert expected == 11_378_179
    with torch.device("meta"):
        model = zoo.get("cyclegan-horse2zebra").build("full")
    assert sum(p.numel() for p in model.parameters()) == expected
    keys = set(model.state_dict())
    for k in ("model.1.weight", "model.4.weight", "model.7.weight", "model.10.conv_block.1.weight",
              "model.18.conv_block.5.bias", "model.19.weight", "model.22.weight", "model.26.bias"):
        assert k in keys, k
    assert not any("running" in k for k in keys)  # instance norm without running statistics


def test_cyclegan_checkpoint_loads_with_arch(tmp_path) -> None:
    """A state dict saved as the reference's ``latest_net_G.pth`` (tiny) loads through ``--arch`` and reproduces the
    source model's output; seeds are deterministic."""
    src = zoo.create("cyclegan-horse2zebra", "tiny", seed=5)
    torch.save(src.state_dict(), tmp_path / "latest_net_G.pth")
    loaded = frontend.load_model(tmp_path / "latest_net_G.pth", arch="cyclegan-horse2zebra", size="tiny")
    x = zoo.example_inputs("cyclegan-horse2zebra", "tiny")["image"]
    assert x.shape == (1, 3, 32, 32) and -1 <= float(x.min()) and float(x.max()) <= 1
    with torch.no_grad():
        assert torch.equal(loaded.module(x), src(x))
        assert torch.equal(zoo.create("cyclegan-horse2zebra", "tiny", seed=5)(x), src(x))
