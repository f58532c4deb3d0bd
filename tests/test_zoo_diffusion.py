"""Diffusion zoo entries: export (ONNX + torch.export), seeded weights, state-dict names and sizes."""
from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sige_export import zoo
from sige_export.zoo.layers import count_parameters

from .helpers import assert_close_relative

DIFFUSION = ["ddpm-church256", "pd-church128", "pd-church256", "sd-unet", "sd-vae-encoder", "sd-vae-decoder"]

FORWARD_ARGS = {
    "ddpm-church256": ["x", "t"],
    "pd-church128": ["x", "t"],
    "pd-church256": ["x", "t"],
    "sd-unet": ["x", "t", "context"],
    "sd-vae-encoder": ["x"],
    "sd-vae-decoder": ["z"],
}

# name -> (input shapes at full size, output shape at full size, parameter count)
FULL = {
    "ddpm-church256": ({"x": (1, 3, 256, 256), "t": (1,)}, (1, 3, 256, 256), 113_673_219),
    "pd-church128": ({"x": (1, 3, 128, 128), "t": (1,)}, (1, 6, 128, 128), 139_578_502),
    "pd-church256": ({"x": (1, 3, 256, 256), "t": (1,)}, (1, 6, 256, 256), 141_312_390),
    "sd-unet": ({"x": (1, 4, 64, 64), "t": (1,), "context": (1, 77, 768)}, (1, 4, 64, 64), 859_520_964),
    "sd-vae-encoder": ({"x": (1, 3, 512, 512)}, (1, 8, 64, 64), 34_163_664),
    "sd-vae-decoder": ({"z": (1, 4, 64, 64)}, (1, 3, 512, 512), 49_490_199),
}


def _tiny(name: str, seed: int = 0):
    return zoo.create(name, "tiny", seed=seed), zoo.example_inputs(name, "tiny", seed=seed)


def _build_meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return zoo.get(name).build("full").eval()


def test_registered():
    for name in DIFFUSION:
        entry = zoo.get(name)
        assert entry.family == "diffusion"
        assert name in zoo.names()


@pytest.mark.parametrize("name", DIFFUSION)
def test_inputs_follow_forward_order(name):
    inputs = zoo.example_inputs(name, "tiny")
    assert list(inputs) == FORWARD_ARGS[name]
    assert all(v.dtype == torch.float32 for v in inputs.values())
    again = zoo.example_inputs(name, "tiny")
    for k in inputs:
        assert torch.equal(inputs[k], again[k])
    if "t" in inputs:
        assert inputs["t"].shape == (1,)


@pytest.mark.parametrize("name", DIFFUSION)
def test_onnx_matches_torch(name):
    model, inputs = _tiny(name)
    with torch.no_grad():
        want = model(**inputs).numpy()
    buf = io.BytesIO()
    torch.onnx.export(model, tuple(inputs.values()), buf, opset_version=17, dynamo=False,
                      input_names=list(inputs), output_names=["out"])
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(inputs)
    (got,) = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    assert_close_relative(got, want, rel=1e-4, what=f"{name} onnxruntime vs torch")


@pytest.mark.parametrize("name", DIFFUSION)
def test_torch_export(name):
    model, inputs = _tiny(name)
    ep = torch.export.export(model, args=tuple(inputs.values()))
    with torch.no_grad():
        want = model(**inputs)
        got = ep.module()(*inputs.values())
    assert_close_relative(got.numpy(), want.numpy(), rel=1e-5, what=f"{name} torch.export vs eager")


@pytest.mark.parametrize("name", DIFFUSION)
def test_seeded_weights_and_state_dict_round_trip(name):
    a, inputs = _tiny(name, seed=0)
    b = zoo.create(name, "tiny", seed=0)
    c = zoo.create(name, "tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb) == list(sc)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    # norm affines are randomised too, not left at (1, 0)
    norms = [m for m in a.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert norms and all(not torch.all(m.weight == 1) and not torch.all(m.bias == 0) for m in norms)

    c.load_state_dict(sa, strict=True)
    with torch.no_grad():
        assert torch.equal(a(**inputs), c(**inputs))


def test_ddpm_church256_matches_ddim_checkpoint_layout():
    model = _build_meta("ddpm-church256")
    sd = model.state_dict()
    expected = {
        "temb.dense.0.weight": (512, 128),
        "temb.dense.1.weight": (512, 512),
        "conv_in.weight": (128, 3, 3, 3),
        "down.0.block.0.norm1.weight": (128,),
        "down.0.block.0.temb_proj.weight": (128, 512),
        "down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "down.0.downsample.conv.weight": (128, 128, 3, 3),
        "down.4.attn.0.q.weight": (512, 512, 1, 1),  # level 4 is 16x16 for a 256 input
        "down.4.attn.1.proj_out.bias": (512,),
        "mid.block_1.conv1.weight": (512, 512, 3, 3),
        "mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "mid.block_2.norm2.bias": (512,),
        "up.4.attn.2.k.weight": (512, 512, 1, 1),
        "up.5.block.0.nin_shortcut.weight": (512, 1024, 1, 1),
        "up.5.upsample.conv.weight": (512, 512, 3, 3),
        "up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "norm_out.weight": (128,),
        "conv_out.bias": (3,),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not any(".attn." in k for k in sd if k.startswith(("down.3.", "down.5.", "up.3.", "up.5.")))
    assert "up.0.upsample.conv.weight" not in sd and "down.5.downsample.conv.weight" not in sd
    assert len(sd) == 450


def test_sd_unet_matches_ldm_layout():
    sd = _build_meta("sd-unet").state_dict()
    expected = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.2.emb_layers.1.bias": (1280,),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.transformer_blocks.0.norm3.weight": (320,),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in sd
    assert not any(k.startswith(("input_blocks.10.1", "input_blocks.11.1", "output_blocks.0.1.norm")) for k in sd)
    assert len(sd) == 686


def test_sd_vae_layout():
    enc = _build_meta("sd-vae-encoder").state_dict()
    dec = _build_meta("sd-vae-decoder").state_dict()
    for key, shape in {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
    }.items():
        assert tuple(enc[key].shape) == shape, key
    for key, shape in {
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }.items():
        assert tuple(dec[key].shape) == shape, key
    assert not any("temb_proj" in k for k in list(enc) + list(dec))
    # AutoencoderKL of SD v1 (without the loss) has 83,653,863 parameters.
    assert len(enc) + len(dec) == 248
    assert sum(v.numel() for v in enc.values()) + sum(v.numel() for v in dec.values()) == 83_653_863


def test_pd_layout():
    sd = _build_meta("pd-church128").state_dict()
    for key, shape in {
        "temb.dense.0.weight": (768, 64),
        "down.0.block.2.conv2.weight": (64, 64, 3, 3),
        "down.0.downsample.temb_proj.weight": (128, 768),  # scale and shift
        "down.2.attn.0.qkv.weight": (768, 256, 1, 1),  # 32x32 with 4 heads of 64
        "mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "up.4.upsample.norm1.weight": (512,),
        "up.0.block.3.nin_shortcut.weight": (64, 128, 1, 1),
        "conv_out.weight": (6, 64, 3, 3),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(".attn." in k for k in sd if k.startswith(("down.0.", "down.1.", "up.0.", "up.1.")))
    assert "down.4.downsample.conv1.weight" not in sd and "up.0.upsample.conv1.weight" not in sd


@pytest.mark.parametrize("name", DIFFUSION)
def test_full_size_shapes_and_parameter_count(name):
    in_shapes, out_shape, n_params = FULL[name]
    model = _build_meta(name)
    assert count_parameters(model) == n_params
    inputs = zoo.example_inputs(name, "full")
    assert {k: tuple(v.shape) for k, v in inputs.items()} == in_shapes
    with torch.no_grad():
        out = model(**{k: v.to("meta") for k, v in inputs.items()})
    assert tuple(out.shape) == out_shape
