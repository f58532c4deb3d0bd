"""Stable Diffusion v1 (ldm / CompVis stable-diffusion) networks: the latent UNet and the KL-VAE halves.

``sd-unet``
    ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` with the v1-inference config: 4-channel 64x64
    latents, model channels 320 (x 1,2,4,4), 2 res blocks per level, SpatialTransformers (self-attention,
    cross-attention to a 77x768 text context, GEGLU feed-forward; depth 1, 8 heads) at downsampling factors 1,
    2 and 4, GroupNorm(32) + SiLU.  Names: time_embed.{0,2}, input_blocks.{n}.{m}, middle_block.{0,1,2},
    output_blocks.{n}.{m}, out.{0,2} — the ``model.diffusion_model.*`` keys of an SD v1 checkpoint with that
    prefix removed.  ``forward(x, t, context)``: x [B,4,64,64], t [B] timesteps, context [B,77,768];
    output: predicted noise [B,4,64,64].

``sd-vae-encoder``
    ``ldm.modules.diffusionmodules.model.Encoder`` (ch 128 x 1,2,4,4, 2 res blocks, mid attention only,
    double_z) followed by AutoencoderKL's ``quant_conv``.  Names: ``encoder.*`` and ``quant_conv.*`` — the
    ``first_stage_model.{encoder,quant_conv}.*`` keys of an SD checkpoint with ``first_stage_model.`` removed.
    ``forward(x)``: image [B,3,512,512] in [-1,1] -> posterior moments [B,8,64,64] (mean | logvar along C;
    the latent fed to the UNet is ``0.18215 * mean`` for deterministic encoding).

``sd-vae-decoder``
    AutoencoderKL's ``post_quant_conv`` followed by ``ldm.modules.diffusionmodules.model.Decoder``.  Names:
    ``post_quant_conv.*`` and ``decoder.*``.  ``forward(z)``: latent [B,4,64,64] (already divided by 0.18215)
    -> image [B,3,512,512].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import AttnBlock, Downsample, ResnetBlock, Swish, Upsample, group_norm, randomize_norms, swish
from .registry import Size, ZooEntry, register

# --------------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SDUNetConfig:
    """Fields as in ``configs/stable-diffusion/v1-inference.yaml`` (``unet_config.params``) plus input sizes."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors with a SpatialTransformer
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    dropout: float = 0.0
    norm_groups: int = 32
    # inputs (not architecture)
    image_size: int = 64  # latent side
    context_len: int = 77


SD_UNET_V1 = SDUNetConfig()
SD_UNET_TINY = SDUNetConfig(model_channels=32, num_heads=4, context_dim=32, norm_groups=8, image_size=16,
                            context_len=8)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ldm ``timestep_embedding``: ``[cos(t f_i), sin(t f_i)]``, ``f_i = exp(-log(max_period) i / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """openaimodel ``ResBlock`` (no scale-shift norm, no resampling): in_layers.{0,2}, emb_layers.1,
    out_layers.{0,3}, skip_connection (1x1 conv when channels change, else identity)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *,
                 dropout: float = 0.0, groups: int = 32):
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.in_layers = nn.Sequential(group_norm(channels, groups, 1e-5), Swish(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(Swish(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels, groups, 1e-5), Swish(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """ldm ``CrossAttention``: to_q/to_k/to_v (no bias), to_out.0 (Linear) — matmul + softmax."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [b, n, h*d] -> [b, h, n, d]
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.dim_head).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._split(self.to_q(x))
        k = self._split(self.to_k(context))
        v = self._split(self.to_v(context))
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)  # [b, h, n, m]
        out = torch.matmul(attn, v)  # [b, h, n, d]
        b, _, n, _ = out.shape
        return self.to_out(out.permute(0, 2, 1, 3).reshape(b, n, self.heads * self.dim_head))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dim_out = dim_out
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)  # == chunk(2, dim=-1), with static slice bounds in the export
        return h[..., : self.dim_out] * F.gelu(h[..., self.dim_out:])


class FeedForward(nn.Module):
    """ldm ``FeedForward`` with glu=True: net.0 = GEGLU(dim, 4 dim), net.1 dropout, net.2 Linear(4 dim, dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)  # self-attention
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """ldm v1 ``SpatialTransformer``: norm (GN eps 1e-6), proj_in (1x1 conv), transformer_blocks, proj_out."""

    def __init__(self, channels: int, heads: int, dim_head: int, *, depth: int, context_dim: int,
                 dropout: float = 0.0, groups: int = 32):
        super().__init__()
        inner = self.inner = heads * dim_head
        self.norm = group_norm(channels, groups, 1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        h = self.proj_in(self.norm(x))
        c = self.inner
        h = h.reshape(b, c, hh * ww).permute(0, 2, 1)  # [b, hw, c]
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.permute(0, 2, 1).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class UNetDownsample(nn.Module):
    """openaimodel ``Downsample`` (conv): ``op`` = 3x3 stride-2 conv, padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """Children get (x, emb) if ResBlock, (x, context) if SpatialTransformer, else (x)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class SDUNet(nn.Module):
    """ldm ``UNetModel`` as configured for Stable Diffusion v1."""

    def __init__(self, config: SDUNetConfig = SD_UNET_V1):
        super().__init__()
        cfg = self.config = config
        mc, g = cfg.model_channels, cfg.norm_groups
        ted = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), Swish(), nn.Linear(ted, ted))

        def st(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.num_heads, ch // cfg.num_heads, depth=cfg.transformer_depth,
                                      context_dim=cfg.context_dim, dropout=cfg.dropout, groups=g)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc, dropout=cfg.dropout, groups=g)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(st(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(UNetDownsample(ch)))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, dropout=cfg.dropout, groups=g), st(ch), ResBlock(ch, ted, dropout=cfg.dropout, groups=g))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), ted, mc * mult, dropout=cfg.dropout, groups=g)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(st(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, with_conv=True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch, g, 1e-5), Swish(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


# --------------------------------------------------------------------------------------------------------
# KL autoencoder
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SDVAEConfig:
    """Fields as in v1-inference.yaml ``first_stage_config.params`` (ddconfig + embed_dim) plus input size."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    resamp_with_conv: bool = True
    norm_groups: int = 32
    resolution: int = 512  # image side; the latent side is resolution / 2**(len(ch_mult)-1)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)


SD_VAE_V1 = SDVAEConfig()
SD_VAE_TINY = SDVAEConfig(ch=32, norm_groups=8, resolution=64)


class Encoder(nn.Module):
    """ldm ``Encoder`` (no timestep embedding)."""

    def __init__(self, cfg: SDVAEConfig):
        super().__init__()
        g = cfg.norm_groups
        self.num_resolutions, self.num_res_blocks = len(cfg.ch_mult), cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        curr_res = cfg.resolution
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = cfg.ch * in_ch_mult[i_level], cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, temb_channels=0, dropout=cfg.dropout, groups=g))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in, groups=g))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, cfg.resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_channels=0, dropout=cfg.dropout, groups=g)
        self.mid.attn_1 = AttnBlock(block_in, groups=g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_channels=0, dropout=cfg.dropout, groups=g)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            down = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """ldm ``Decoder`` (no timestep embedding, give_pre_end=False, tanh_out=False)."""

    def __init__(self, cfg: SDVAEConfig):
        super().__init__()
        g = cfg.norm_groups
        self.num_resolutions, self.num_res_blocks = len(cfg.ch_mult), cfg.num_res_blocks
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.latent_size
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, temb_channels=0, dropout=cfg.dropout, groups=g)
        self.mid.attn_1 = AttnBlock(block_in, groups=g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, temb_channels=0, dropout=cfg.dropout, groups=g)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, temb_channels=0, dropout=cfg.dropout, groups=g))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in, groups=g))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, cfg.resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class SDVAEEncoder(nn.Module):
    """AutoencoderKL encode path up to the posterior moments: ``quant_conv(encoder(x))``."""

    def __init__(self, config: SDVAEConfig = SD_VAE_V1):
        super().__init__()
        self.config = config
        if not config.double_z:
            raise ValueError("the KL autoencoder's encoder needs double_z=True (mean and logvar)")
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))


class SDVAEDecoder(nn.Module):
    """AutoencoderKL decode path: ``decoder(post_quant_conv(z))``."""

    def __init__(self, config: SDVAEConfig = SD_VAE_V1):
        super().__init__()
        self.config = config
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


# --------------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------------

UNET_CONFIGS = {"full": SD_UNET_V1, "tiny": SD_UNET_TINY}
VAE_CONFIGS = {"full": SD_VAE_V1, "tiny": SD_VAE_TINY}


def _unet_inputs(size: Size, gen: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = UNET_CONFIGS[size]
    return {
        "x": torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen),
        "t": torch.full((1,), 500.0),
        "context": torch.randn(1, cfg.context_len, cfg.context_dim, generator=gen),
    }


def _encoder_inputs(size: Size, gen: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = VAE_CONFIGS[size]
    return {"x": torch.rand(1, cfg.in_channels, cfg.resolution, cfg.resolution, generator=gen) * 2.0 - 1.0}


def _decoder_inputs(size: Size, gen: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = VAE_CONFIGS[size]
    return {"z": torch.randn(1, cfg.embed_dim, cfg.latent_size, cfg.latent_size, generator=gen)}


register(ZooEntry(
    name="sd-unet",
    family="diffusion",
    description="Stable Diffusion v1 UNet (ldm UNetModel names); forward(x, t, context) -> eps",
    build=lambda size: randomize_norms(SDUNet(UNET_CONFIGS[size])),
    make_inputs=_unet_inputs,
))
register(ZooEntry(
    name="sd-vae-encoder",
    family="diffusion",
    description="Stable Diffusion v1 VAE encoder + quant_conv; forward(x) -> moments (mean|logvar, 8 ch)",
    build=lambda size: randomize_norms(SDVAEEncoder(VAE_CONFIGS[size])),
    make_inputs=_encoder_inputs,
))
register(ZooEntry(
    name="sd-vae-decoder",
    family="diffusion",
    description="Stable Diffusion v1 VAE post_quant_conv + decoder; forward(z) -> image",
    build=lambda size: randomize_norms(SDVAEDecoder(VAE_CONFIGS[size])),
    make_inputs=_decoder_inputs,
))
