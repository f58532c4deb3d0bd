"""Building blocks shared by the diffusion zoo entries (DDPM/DDIM UNet, Progressive Distillation UNet, SD VAE).

Everything here is plain PyTorch (conv, linear, group norm, sigmoid, matmul, softmax, reshape/permute, pad,
nearest interpolation) so that the models export with both ``torch.export`` and the TorchScript ONNX
exporter.  Module attribute names follow the public checkpoints (ermongroup/ddim ``Model`` and the ldm
``Encoder``/``Decoder``), so ``load_state_dict(strict=True)`` accepts those checkpoints' tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) (SiLU), written with elementary ops."""
    return x * torch.sigmoid(x)


class Swish(nn.Module):
    """Parameter-free module form of :func:`swish` (stands where the references put ``nn.SiLU()``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swish(x)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=eps, affine=True)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Fairseq/tensor2tensor timestep embedding used by DDPM, DDIM and Progressive Distillation.

    ``[sin(t * f_i), cos(t * f_i)]`` with ``f_i = exp(-i * log(10000) / (dim/2 - 1))``; ``t`` is [B] (int or
    float), the result [B, dim] float32 (zero-padded when ``dim`` is odd).
    """
    half = dim // 2
    scale = math.log(10000.0) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class ResnetBlock(nn.Module):
    """DDPM/DDIM residual block (also the ldm VAE block, which has ``temb_channels=0``: no ``temb_proj``).

    Names: norm1, conv1, temb_proj, norm2, conv2, and conv_shortcut (3x3) or nin_shortcut (1x1) when the
    channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, *, temb_channels: int = 512,
                 dropout: float = 0.0, conv_shortcut: bool = False, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention of DDPM/DDIM and the ldm VAE: 1x1-conv q, k, v, proj_out.

    Implemented as reshape + matmul + softmax (no fused attention kernels).
    """

    def __init__(self, channels: int, *, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels, groups, eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        c = self.channels  # a Python int, so the exported graph has no shape arithmetic for it
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # [b, hw, c]
        k = self.k(h).reshape(b, c, hh * ww)  # [b, c, hw]
        v = self.v(h).reshape(b, c, hh * ww)  # [b, c, hw]
        w = torch.softmax(torch.matmul(q, k) * (c ** -0.5), dim=2)  # [b, hw_q, hw_k]
        out = torch.matmul(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)  # [b, c, hw_q]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """x2 downsampling: asymmetric zero pad (0,1,0,1) + 3x3 stride-2 conv (``conv``), or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            # (0, 1, 0, 1) spelled for all four dims: the TorchScript exporter then builds the ONNX pads from
            # an empty ConstantOfShape, which constant folding removes, leaving a Pad with constant pads.
            return self.conv(F.pad(x, (0, 1, 0, 1, 0, 0, 0, 0), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """x2 nearest-neighbour upsampling followed by a 3x3 conv (``conv``) when ``with_conv``."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


@torch.no_grad()
def randomize_norms(module: nn.Module, std: float = 0.1) -> nn.Module:
    """Give every GroupNorm/LayerNorm random affine parameters (1 + std*N, std*N) from the global RNG.

    PyTorch initialises norm affines to (1, 0) whatever the seed; randomising them makes seeded weights
    exercise the scale and shift paths (a swapped weight/bias would otherwise go unnoticed).
    """
    for m in module.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            m.weight.copy_(1.0 + std * torch.randn_like(m.weight))
            m.bias.copy_(std * torch.randn_like(m.bias))
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
