"""GauGAN (SPADE) generators for Cityscapes: the original and GAN Compression's compressed one.

``gaugan-cityscapes``: NVlabs/SPADE ``SPADEGenerator`` with the Cityscapes options
(``label_nc=35``, no dont-care label, instance edges on -> ``semantic_nc = 35 + 1 = 36`` input
channels; ``crop_size=512``, ``aspect_ratio=2``, ``num_upsampling_layers='more'``, ``ngf=64``,
``use_vae=False``; norm ``spectralspadesyncbatch3x3``). With 'more' the latent is 4x8 and six 2x
upsamplings give 256x512; the blocks are ``head_0, G_middle_0, G_middle_1, up_0 .. up_3`` (SPADE
creates ``up_4`` only for 'most'). Spectral norm is removed: a released state dict holding
``weight_orig``/``weight_u``/``weight_v`` is folded on load into ``weight = weight_orig / sigma``
(``sigma = u . W v``, the eval-mode value), by a load-state-dict pre-hook and by
:meth:`SPADEGenerator.convert_state_dict`. Parameter-free SyncBatchNorm is a plain
``BatchNorm2d(affine=False)`` using its running statistics (same state-dict names).

``gancomp-gaugan``: mit-han-lab/gan-compression ``SubMobileSPADEGenerator`` with config
``32_32_32_48_32_24_24_32``: per block ``channel`` = config x (16, 16, 16, 16, 8, 4, 2, 1),
SPADE hidden width = 2 x config; ``mlp_gamma``/``mlp_beta`` are separable convs (depthwise 3x3,
InstanceNorm affine=False, pointwise 1x1); the parameter-free BatchNorm keeps the uncompressed
width's statistics and normalises the first C channels.

Weights are random (seeded) unless a checkpoint is loaded; norm running statistics are drawn too.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .registry import ZooEntry, register
from .spade_layers import (
    SPADEResnetBlock,
    SubMobileSPADEResnetBlock,
    _fold_hook,
    fold_spectral_norm,
    leaky,
    randomize_norm_stats,
)

CITYSCAPES_LABEL_NC = 35  # + 1 instance-edge channel = 36 input channels
GANCOMP_CONFIG = (32, 32, 32, 48, 32, 24, 24, 32)

_NUM_UP = {"normal": 5, "more": 6, "most": 7}


def _latent_size(crop_size: int, aspect_ratio: float, num_upsampling_layers: str) -> tuple[int, int]:
    if num_upsampling_layers not in _NUM_UP:
        raise ValueError(f"num_upsampling_layers {num_upsampling_layers!r} not in {sorted(_NUM_UP)}")
    sw = crop_size // (2 ** _NUM_UP[num_upsampling_layers])
    sh = round(sw / aspect_ratio)
    if sw < 1 or sh < 1:
        raise ValueError(f"crop_size {crop_size} too small for {num_upsampling_layers!r} upsampling")
    return sw, sh


class SPADEGenerator(nn.Module):
    """SPADE generator (``use_vae=False``): ``forward(segmap [B, semantic_nc, H, W]) -> [B, 3, H, W]``."""

    def __init__(self, semantic_nc: int = 36, ngf: int = 64, nhidden: int = 128, crop_size: int = 512,
                 aspect_ratio: float = 2.0, num_upsampling_layers: str = "more") -> None:
        super().__init__()
        nf = ngf
        self.num_upsampling_layers = num_upsampling_layers
        self.sw, self.sh = _latent_size(crop_size, aspect_ratio, num_upsampling_layers)
        self.fc = nn.Conv2d(semantic_nc, 16 * nf, 3, padding=1)
        self.head_0 = SPADEResnetBlock(16 * nf, 16 * nf, semantic_nc, nhidden)
        self.G_middle_0 = SPADEResnetBlock(16 * nf, 16 * nf, semantic_nc, nhidden)
        self.G_middle_1 = SPADEResnetBlock(16 * nf, 16 * nf, semantic_nc, nhidden)
        self.up_0 = SPADEResnetBlock(16 * nf, 8 * nf, semantic_nc, nhidden)
        self.up_1 = SPADEResnetBlock(8 * nf, 4 * nf, semantic_nc, nhidden)
        self.up_2 = SPADEResnetBlock(4 * nf, 2 * nf, semantic_nc, nhidden)
        self.up_3 = SPADEResnetBlock(2 * nf, 1 * nf, semantic_nc, nhidden)
        final_nc = nf
        if num_upsampling_layers == "most":
            self.up_4 = SPADEResnetBlock(1 * nf, nf // 2, semantic_nc, nhidden)
            final_nc = nf // 2
        self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.register_load_state_dict_pre_hook(_fold_hook)

    convert_state_dict = staticmethod(fold_spectral_norm)

    def forward(self, segmap: torch.Tensor) -> torch.Tensor:
        seg = segmap
        x = F.interpolate(seg, size=(self.sh, self.sw))
        x = self.fc(x)
        x = self.head_0(x, seg)
        x = self.up(x)
        x = self.G_middle_0(x, seg)
        if self.num_upsampling_layers in ("more", "most"):
            x = self.up(x)
        x = self.G_middle_1(x, seg)
        for block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = self.up(x)
            x = block(x, seg)
        if self.num_upsampling_layers == "most":
            x = self.up(x)
            x = self.up_4(x, seg)
        x = self.conv_img(leaky(x))
        return torch.tanh(x)


class SubMobileSPADEGenerator(nn.Module):
    """GAN Compression's compressed SPADE generator (``num_upsampling_layers`` 'normal' or 'more')."""

    def __init__(self, semantic_nc: int = 36, ngf: int = 64, channels: Sequence[int] = GANCOMP_CONFIG,
                 crop_size: int = 512, aspect_ratio: float = 2.0, num_upsampling_layers: str = "more") -> None:
        super().__init__()
        if len(channels) != 8:
            raise ValueError(f"config needs 8 channel entries, got {len(channels)}")
        if num_upsampling_layers == "most":
            raise NotImplementedError("SubMobileSPADEGenerator does not support 'most' (as in GAN Compression)")
        nf = ngf
        self.num_upsampling_layers = num_upsampling_layers
        self.sw, self.sh = _latent_size(crop_size, aspect_ratio, num_upsampling_layers)
        c = list(channels)
        self.fc = nn.Conv2d(semantic_nc, 16 * c[0], 3, padding=1)
        ic = 16 * c[0]
        self.head_0 = SubMobileSPADEResnetBlock(16 * nf, 16 * nf, ic, semantic_nc, 16 * c[1], 2 * c[1])
        self.G_middle_0 = SubMobileSPADEResnetBlock(16 * nf, 16 * nf, ic, semantic_nc, 16 * c[2], 2 * c[2])
        self.G_middle_1 = SubMobileSPADEResnetBlock(16 * nf, 16 * nf, ic, semantic_nc, 16 * c[3], 2 * c[3])
        self.up_0 = SubMobileSPADEResnetBlock(16 * nf, 8 * nf, ic, semantic_nc, 8 * c[4], 2 * c[4])
        ic = 8 * c[4]
        self.up_1 = SubMobileSPADEResnetBlock(8 * nf, 4 * nf, ic, semantic_nc, 4 * c[5], 2 * c[5])
        ic = 4 * c[5]
        self.up_2 = SubMobileSPADEResnetBlock(4 * nf, 2 * nf, ic, semantic_nc, 2 * c[6], 2 * c[6])
        ic = 2 * c[6]
        self.up_3 = SubMobileSPADEResnetBlock(2 * nf, 1 * nf, ic, semantic_nc, c[7], 2 * c[7])
        self.conv_img = nn.Conv2d(c[7], 3, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, segmap: torch.Tensor) -> torch.Tensor:
        seg = segmap
        x = F.interpolate(seg, size=(self.sh, self.sw))
        x = self.fc(x)
        x = self.head_0(x, seg)
        x = self.up(x)
        x = self.G_middle_0(x, seg)
        if self.num_upsampling_layers == "more":
            x = self.up(x)
        x = self.G_middle_1(x, seg)
        for block in (self.up_0, self.up_1, self.up_2, self.up_3):
            x = self.up(x)
            x = block(x, seg)
        x = self.conv_img(leaky(x))
        return torch.tanh(x)


# --------------------------------------------------------------------------- sizes
# full: the released Cityscapes setting; tiny: same structure, few channels, 64x128 output,
# 7 label classes + 1 edge channel.
_FULL = dict(semantic_nc=CITYSCAPES_LABEL_NC + 1, ngf=64, crop_size=512, aspect_ratio=2.0,
             num_upsampling_layers="more")
_TINY = dict(semantic_nc=8, ngf=4, crop_size=128, aspect_ratio=2.0, num_upsampling_layers="more")
_TINY_NHIDDEN = 16
_TINY_CONFIG = (2, 2, 2, 3, 2, 2, 2, 4)


def _settings(size: str) -> dict:
    return dict(_FULL if size == "full" else _TINY)


def output_hw(size: str) -> tuple[int, int]:
    s = _settings(size)
    sw, sh = _latent_size(s["crop_size"], s["aspect_ratio"], s["num_upsampling_layers"])
    scale = 2 ** _NUM_UP[s["num_upsampling_layers"]]
    return sh * scale, sw * scale


def build_gaugan(size: str = "full") -> SPADEGenerator:
    s = _settings(size)
    model = SPADEGenerator(nhidden=128 if size == "full" else _TINY_NHIDDEN, **s)
    randomize_norm_stats(model)
    return model


def build_gancomp_gaugan(size: str = "full") -> SubMobileSPADEGenerator:
    s = _settings(size)
    model = SubMobileSPADEGenerator(channels=GANCOMP_CONFIG if size == "full" else _TINY_CONFIG, **s)
    randomize_norm_stats(model)
    return model


def random_segmap(batch: int, num_classes: int, height: int, width: int, gen: torch.Generator,
                  cell: int | None = None) -> torch.Tensor:
    """One-hot label map of random rectangular regions plus SPADE's instance-edge channel.

    Regions are cells of a grid with random class labels (several cells may share a class but
    each cell is its own instance); the last channel marks pixels whose 4-neighbour belongs to a
    different instance (``get_edges`` in SPADE). Returns ``[batch, num_classes + 1, H, W]``.
    """
    cell = cell or max(2, min(height, width) // 8)
    gh, gw = -(-height // cell), -(-width // cell)
    labels = torch.randint(0, num_classes, (batch, gh, gw), generator=gen)
    inst = torch.arange(gh * gw).reshape(1, gh, gw).expand(batch, gh, gw)
    labels = labels.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :height, :width]
    inst = inst.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :height, :width]
    onehot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    edge = torch.zeros(batch, height, width, dtype=torch.bool)
    dh = inst[:, 1:, :] != inst[:, :-1, :]
    dw = inst[:, :, 1:] != inst[:, :, :-1]
    edge[:, 1:, :] |= dh
    edge[:, :-1, :] |= dh
    edge[:, :, 1:] |= dw
    edge[:, :, :-1] |= dw
    return torch.cat([onehot, edge[:, None].float()], dim=1)


def make_segmap_inputs(size: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    s = _settings(size)
    h, w = output_hw(size)
    return {"segmap": random_segmap(1, s["semantic_nc"] - 1, h, w, gen)}


register(ZooEntry(
    name="gaugan-cityscapes",
    family="gan",
    description="GauGAN/SPADE generator, Cityscapes 256x512, 35 labels + instance edge (NVlabs/SPADE)",
    build=build_gaugan,
    make_inputs=make_segmap_inputs,
))

register(ZooEntry(
    name="gancomp-gaugan",
    family="gan",
    description="GAN Compression SubMobileSPADEGenerator 32_32_32_48_32_24_24_32, Cityscapes 256x512",
    build=build_gancomp_gaugan,
    make_inputs=make_segmap_inputs,
))

