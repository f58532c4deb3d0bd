"""SPADE building blocks with the parameter names of NVlabs/SPADE and mit-han-lab/gan-compression.

Only inference is modelled: the parameter-free BatchNorm (SyncBatchNorm ``affine=False`` in the
releases) uses its running statistics, spectral norm is folded into plain conv weights on load
(see :func:`fold_spectral_norm`).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F


def leaky(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def fold_spectral_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace ``X.weight_orig`` / ``X.weight_u`` / ``X.weight_v`` by ``X.weight = weight_orig / sigma``.

    ``sigma = u . (W_mat v)`` with ``W_mat = weight_orig.reshape(out, -1)`` is exactly what
    ``torch.nn.utils.spectral_norm`` computes in eval mode (no power iteration), so the folded
    plain conv reproduces the released spectral-norm generator bit for bit (up to rounding).
    Other keys pass through unchanged.
    """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".weight_orig")]:
        base = key[: -len("weight_orig")]
        u, v = state_dict.get(base + "weight_u"), state_dict.get(base + "weight_v")
        if u is None or v is None:
            continue
        w = state_dict[key]
        w_mat = w.reshape(w.shape[0], -1)
        sigma = torch.dot(u.reshape(-1).to(w.dtype), torch.mv(w_mat, v.reshape(-1).to(w.dtype)))
        out[base + "weight"] = w / sigma
        for suffix in ("weight_orig", "weight_u", "weight_v"):
            out.pop(base + suffix, None)
    return out


def _fold_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    own = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not any(k.endswith(".weight_orig") for k in own):
        return
    folded = fold_spectral_norm(own)
    for k in own:
        del state_dict[k]
    state_dict.update(folded)


class SlicedBatchNorm2d(nn.BatchNorm2d):
    """Parameter-free BatchNorm whose running stats may have more channels than the input.

    GAN Compression's ``SuperSynchronizedBatchNorm2d(num_features=fin)`` keeps the statistics of
    the uncompressed width and normalises the first ``x.shape[1]`` channels (zero-padding the rest);
    in eval mode that is batch norm with ``running_mean[:C]`` / ``running_var[:C]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.num_features or self.training:
            return super().forward(x)
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], None, None, False, 0.0, self.eps)


class SPADE(nn.Module):
    """``normalized * (1 + gamma) + beta`` with gamma/beta predicted from the resized segmap."""

    def __init__(self, norm_nc: int, label_nc: int, nhidden: int = 128, ks: int = 3) -> None:
        super().__init__()
        self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        pw = ks // 2
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, ks, padding=pw), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(nhidden, norm_nc, ks, padding=pw)
        self.mlp_beta = nn.Conv2d(nhidden, norm_nc, ks, padding=pw)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=tuple(int(s) for s in x.shape[2:]), mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin: int, fout: int, label_nc: int, nhidden: int = 128) -> None:
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = nn.Conv2d(fin, fmiddle, 3, padding=1)
        self.conv_1 = nn.Conv2d(fmiddle, fout, 3, padding=1)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)
        self.norm_0 = SPADE(fin, label_nc, nhidden)
        self.norm_1 = SPADE(fmiddle, label_nc, nhidden)
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, label_nc, nhidden)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(leaky(self.norm_0(x, seg)))
        dx = self.conv_1(leaky(self.norm_1(dx, seg)))
        return x_s + dx


class SeparableConv2d(nn.Module):
    """GAN Compression's separable conv: depthwise k x k, InstanceNorm (affine=False), pointwise 1x1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, groups=in_channels),
            nn.InstanceNorm2d(in_channels, affine=False),
            nn.Conv2d(in_channels, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class SubMobileSPADE(nn.Module):
    """Compressed SPADE: full conv ``mlp_shared``, separable ``mlp_gamma``/``mlp_beta`` with ``oc`` outputs."""

    def __init__(self, norm_nc: int, label_nc: int, nhidden: int, oc: int, ks: int = 3) -> None:
        super().__init__()
        self.param_free_norm = SlicedBatchNorm2d(norm_nc, affine=False)
        pw = ks // 2
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, nhidden, ks, padding=pw), nn.ReLU())
        self.mlp_gamma = SeparableConv2d(nhidden, oc, ks, padding=pw)
        self.mlp_beta = SeparableConv2d(nhidden, oc, ks, padding=pw)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.param_free_norm(x)
        segmap = F.interpolate(segmap, size=tuple(int(s) for s in x.shape[2:]), mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SubMobileSPADEResnetBlock(nn.Module):
    """``fin``/``fout``: widths of the uncompressed block (BN statistics); ``ic``: actual input width."""

    def __init__(self, fin: int, fout: int, ic: int, label_nc: int, channel: int, hidden: int) -> None:
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = nn.Conv2d(ic, channel, 3, padding=1)
        self.conv_1 = nn.Conv2d(channel, channel if self.learned_shortcut else ic, 3, padding=1)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(ic, channel, 1, bias=False)
        self.norm_0 = SubMobileSPADE(fin, label_nc, hidden, oc=ic)
        self.norm_1 = SubMobileSPADE(fmiddle, label_nc, hidden, oc=channel)
        if self.learned_shortcut:
            self.norm_s = SubMobileSPADE(fin, label_nc, hidden, oc=ic)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(leaky(self.norm_0(x, seg)))
        dx = self.conv_1(leaky(self.norm_1(dx, seg)))
        return x_s + dx


def randomize_norm_stats(module: nn.Module) -> None:
    """Non-trivial running statistics (drawn from the global RNG) so exports exercise them."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
