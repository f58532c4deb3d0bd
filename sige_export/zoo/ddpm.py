"""Pixel-space diffusion UNets of the SIGE paper: DDPM/DDIM LSUN Church 256 and Progressive Distillation.

``ddpm-church256``
    The UNet of DDPM (Ho et al.) as ported by DDIM (ermongroup/ddim ``models/diffusion.py``, ``Model``) with
    the LSUN Church config: ch 128, ch_mult (1,1,2,2,4,4), 2 res blocks per level, attention at 16x16
    (level 4), GroupNorm(32, eps 1e-6), swish, sinusoidal timestep embedding, conv resampling.  Parameter
    names are those of the public DDIM church checkpoint, so ``load_state_dict(strict=True)`` takes it.
    ``forward(x, t)``: x [B,3,256,256], t [B] timesteps (float or int).  Output: predicted noise [B,3,256,256].

``pd-church128`` / ``pd-church256``
    The Progressive Distillation UNet (google-research ``diffusion_distillation/unet.py``, config
    ``church128_base``): ch 64, emb_ch 768, 3 res blocks per level, attention at 8/16/32 with head dim 64,
    BigGAN-style resampling residual blocks, scale/shift timestep conditioning, 6 output channels
    (mean_type "both": eps and x).  Names follow SIGE's PyTorch port (mit-han-lab/sige): temb.dense.{0,1},
    conv_in, down.{i}.block.{j}, down.{i}.attn.{j}.{norm,qkv,proj_out}, down.{i}.downsample (a ResnetBlock),
    mid.{block_1,attn_1,block_2}, up.{i}.block/attn/upsample, norm_out, conv_out.
    ``forward(x, t)``: x [B,3,R,R], t [B] float log-SNR (the PD model is conditioned on log-SNR, mapped
    through the "inv_cos" transform to [0,1] and scaled by 1000 before the sinusoidal embedding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm, randomize_norms, \
    sinusoidal_embedding, swish
from .registry import Size, ZooEntry, register

# --------------------------------------------------------------------------------------------------------
# DDPM / DDIM UNet
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDPMConfig:
    """Fields as in the DDIM yaml configs (``model.*`` and ``data.image_size``)."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    in_channels: int = 3
    resolution: int = 256
    resamp_with_conv: bool = True
    norm_groups: int = 32


DDPM_CHURCH256 = DDPMConfig()
# Same structure (all op kinds, attention at a middle level), 32 channels, 32x32 input.
DDPM_TINY = DDPMConfig(ch=32, ch_mult=(1, 1, 2, 2), attn_resolutions=(8,), resolution=32, norm_groups=8)


class _LevelUNet(nn.Module):
    """The DDIM UNet skeleton (ermongroup/ddim names) shared by DDPM and PD; blocks come from factories.

    ``down.{i}.block/attn[/downsample]``, ``mid.block_1/attn_1/block_2``, ``up.{i}.block/attn[/upsample]``,
    with skip connections concatenated on the way up.
    """

    def _build_levels(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, resolution: int,
                      attn_resolutions: tuple[int, ...], res, attn, downsample, upsample) -> int:
        """Create down/mid/up; returns the channels of the last up level."""
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        curr_res = resolution
        in_ch_mult = (1,) + ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attns = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(res(block_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(attn(block_in))
            down = nn.Module()
            down.block, down.attn = block, attns
            if i_level != self.num_resolutions - 1:
                down.downsample = downsample(block_in)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = res(block_in, block_in)
        self.mid.attn_1 = attn(block_in)
        self.mid.block_2 = res(block_in, block_in)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attns = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            skip_in = ch * ch_mult[i_level]
            for i_block in range(num_res_blocks + 1):
                if i_block == num_res_blocks:
                    skip_in = ch * in_ch_mult[i_level]
                block.append(res(block_in + skip_in, block_out))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(attn(block_in))
            up = nn.Module()
            up.block, up.attn = block, attns
            if i_level != 0:
                up.upsample = upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        return block_in

    def _resample(self, module: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return module(h)

    def _time_input(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = sinusoidal_embedding(self._time_input(t), self.ch)
        temb = self.temb.dense[1](swish(self.temb.dense[0](temb)))

        hs = [self.conv_in(x)]
        for i_level in range(self.num_resolutions):
            down = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](hs[-1], temb)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(self._resample(down.downsample, hs[-1], temb))

        h = hs[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = self._resample(up.upsample, h, temb)

        return self.conv_out(swish(self.norm_out(h)))


class DDPMUNet(_LevelUNet):
    """ermongroup/ddim ``Model`` (type "simple": no learned variance)."""

    def __init__(self, config: DDPMConfig = DDPM_CHURCH256):
        super().__init__()
        cfg = self.config = config
        ch, g = cfg.ch, cfg.norm_groups
        self.ch = ch
        self.temb_ch = ch * 4
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        block_in = self._build_levels(
            ch=ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks, resolution=cfg.resolution,
            attn_resolutions=cfg.attn_resolutions,
            res=lambda cin, cout: ResnetBlock(cin, cout, temb_channels=self.temb_ch, dropout=cfg.dropout, groups=g),
            attn=lambda c: AttnBlock(c, groups=g),
            downsample=lambda c: Downsample(c, cfg.resamp_with_conv),
            upsample=lambda c: Upsample(c, cfg.resamp_with_conv))
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)


# --------------------------------------------------------------------------------------------------------
# Progressive Distillation UNet
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PDConfig:
    """Fields as in diffusion_distillation ``config/church128_base.py`` (``model.args``)."""

    ch: int = 64
    emb_ch: int = 768
    ch_mult: tuple[int, ...] = (1, 2, 4, 6, 8)
    num_res_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (8, 16, 32)
    head_dim: int | None = 64
    num_heads: int | None = None
    dropout: float = 0.0  # 0.1 when training; identity in eval
    in_channels: int = 3
    out_ch: int = 6  # mean_type "both": eps and x predictions
    resolution: int = 128
    logsnr_input_type: str = "inv_cos"  # "linear" | "sigmoid" | "inv_cos"
    logsnr_scale_range: tuple[float, float] = (-10.0, 10.0)
    norm_groups: int = 32


PD_CHURCH128 = PDConfig()
PD_CHURCH256 = PDConfig(ch_mult=(1, 1, 2, 4, 6, 8), resolution=256)
PD_TINY = PDConfig(ch=32, emb_ch=128, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8, 16),
                   head_dim=16, resolution=32, norm_groups=8)


class PDResnetBlock(nn.Module):
    """Residual block with scale/shift conditioning and optional in-block resampling ("up" / "down").

    h = conv2(drop(swish(norm2(conv1(resample(swish(norm1(x))))) * (1 + scale) + shift)));
    out = nin_shortcut(resample(x)) + h, with (scale, shift) = temb_proj(swish(temb)).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int,
                 dropout: float = 0.0, resample: str | None = None, groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if resample not in (None, "up", "down"):
            raise ValueError(f"resample must be None, 'up' or 'down', not {resample!r}")
        self.in_channels, self.out_channels, self.resample = in_channels, out_channels, resample
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.temb_proj = nn.Linear(temb_channels, 2 * out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = swish(self.norm1(x))
        h = self.conv1(self._resample(h))
        x = self._resample(x)
        emb = self.temb_proj(swish(temb))
        scale = emb[:, : self.out_channels, None, None]
        shift = emb[:, self.out_channels:, None, None]
        h = self.norm2(h) * (1.0 + scale) + shift
        h = self.conv2(self.dropout(swish(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class PDAttnBlock(nn.Module):
    """Multi-head self-attention: GroupNorm, fused 1x1-conv ``qkv`` (q|k|v, head-major channels), ``proj_out``."""

    def __init__(self, channels: int, *, head_dim: int | None, num_heads: int | None, groups: int = 32):
        super().__init__()
        if head_dim is None:
            if num_heads is None or channels % num_heads:
                raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
            head_dim = channels // num_heads
        else:
            if num_heads is not None or channels % head_dim:
                raise ValueError(f"{channels} channels cannot be split into heads of {head_dim}")
            num_heads = channels // head_dim
        self.channels, self.num_heads, self.head_dim = channels, num_heads, head_dim
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        c, nh, hd = self.channels, self.num_heads, self.head_dim  # Python ints: static slices in the export
        qkv = self.qkv(self.norm(x))
        q = qkv[:, :c].reshape(b * nh, hd, hh * ww).permute(0, 2, 1)  # [b*nh, hw, hd]
        k = qkv[:, c: 2 * c].reshape(b * nh, hd, hh * ww)  # [b*nh, hd, hw]
        v = qkv[:, 2 * c:].reshape(b * nh, hd, hh * ww)  # [b*nh, hd, hw]
        w = torch.softmax(torch.matmul(q, k) * (hd ** -0.5), dim=2)  # [b*nh, hw_q, hw_k]
        out = torch.matmul(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class PDUNet(_LevelUNet):
    """diffusion_distillation ``UNet`` (unconditional, resblock_resample=True) in PyTorch, NCHW."""

    def __init__(self, config: PDConfig = PD_CHURCH128):
        super().__init__()
        cfg = self.config = config
        ch, g = cfg.ch, cfg.norm_groups
        self.ch = ch

        def res(cin: int, cout: int, resample: str | None = None) -> PDResnetBlock:
            return PDResnetBlock(cin, cout, temb_channels=cfg.emb_ch, dropout=cfg.dropout, resample=resample,
                                 groups=g)

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, cfg.emb_ch), nn.Linear(cfg.emb_ch, cfg.emb_ch)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        block_in = self._build_levels(
            ch=ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks, resolution=cfg.resolution,
            attn_resolutions=cfg.attn_resolutions, res=res,
            attn=lambda c: PDAttnBlock(c, head_dim=cfg.head_dim, num_heads=cfg.num_heads, groups=g),
            downsample=lambda c: res(c, c, "down"), upsample=lambda c: res(c, c, "up"))
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    def _resample(self, module: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return module(h, temb)  # BigGAN-style resampling res blocks take the time embedding

    def _time_input(self, t: torch.Tensor) -> torch.Tensor:
        return self.logsnr_input(t) * 1000.0

    def logsnr_input(self, logsnr: torch.Tensor) -> torch.Tensor:
        kind = self.config.logsnr_input_type
        logsnr = logsnr.to(torch.float32)
        if kind == "linear":
            lo, hi = self.config.logsnr_scale_range
            return (logsnr - lo) / (hi - lo)
        if kind == "sigmoid":
            return torch.sigmoid(logsnr)
        if kind == "inv_cos":
            return torch.atan(torch.exp(-0.5 * torch.clamp(logsnr, -20.0, 20.0))) / (0.5 * math.pi)
        raise NotImplementedError(kind)


# --------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------

DDPM_CONFIGS = {"full": DDPM_CHURCH256, "tiny": DDPM_TINY}
PD_CONFIGS = {
    "pd-church128": {"full": PD_CHURCH128, "tiny": PD_TINY},
    "pd-church256": {"full": PD_CHURCH256, "tiny": replace(PD_TINY, ch_mult=(1, 1, 2, 2))},
}


def _build_ddpm(size: Size) -> DDPMUNet:
    return randomize_norms(DDPMUNet(DDPM_CONFIGS[size]))


def _ddpm_inputs(size: Size, gen: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = DDPM_CONFIGS[size]
    x = torch.randn(1, cfg.in_channels, cfg.resolution, cfg.resolution, generator=gen)
    return {"x": x, "t": torch.full((1,), 500.0)}


register(ZooEntry(
    name="ddpm-church256",
    family="diffusion",
    description="DDPM/DDIM UNet, LSUN Church 256 (ermongroup/ddim Model names); forward(x, t) -> eps",
    build=_build_ddpm,
    make_inputs=_ddpm_inputs,
))


def _pd_entry(name: str, res: int) -> None:
    configs = PD_CONFIGS[name]

    def build(size: Size) -> PDUNet:
        return randomize_norms(PDUNet(configs[size]))

    def make_inputs(size: Size, gen: torch.Generator) -> dict[str, torch.Tensor]:
        cfg = configs[size]
        x = torch.randn(1, cfg.in_channels, cfg.resolution, cfg.resolution, generator=gen)
        return {"x": x, "t": torch.full((1,), 0.5)}  # log-SNR

    register(ZooEntry(
        name=name,
        family="diffusion",
        description=f"Progressive Distillation UNet, LSUN Church {res}; forward(x, t=logSNR) -> [x, eps] (6 ch, as diffusion_distillation splits its output)",
        build=build,
        make_inputs=make_inputs,
    ))


_pd_entry("pd-church128", 128)
_pd_entry("pd-church256", 256)
