"""CycleGAN / pix2pix ``ResnetGenerator`` (junyanz/pytorch-CycleGAN-and-pix2pix, ``--netG resnet_9blocks``):
reflection padding, instance norm, residual blocks ``x + IN(conv(...))``, strided convs down and transposed convs
up. Module names follow the original, so its ``latest_net_G.pth`` state dicts load with ``--arch``."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import Size, ZooEntry, register

_SIZES = {"full": {"ngf": 64, "blocks": 9, "hw": 256}, "tiny": {"ngf": 8, "blocks": 2, "hw": 32}}


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResnetBlock(nn.Module):
    """``x + conv_block(x)`` with reflection padding (no dropout: the CycleGAN default)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), _norm(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), _norm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """RGB -> RGB in [-1, 1]: 7x7 conv, two stride-2 convs, ``n_blocks`` residual blocks, two transposed convs,
    7x7 conv + tanh."""

    def __init__(self, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=True), _norm(ngf),
                                   nn.ReLU(True)]
        for i in range(2):
            mult = 2 ** i
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=True), _norm(ngf * mult * 2),
                       nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1,
                                          bias=True), _norm(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)


def build_resnet_generator(size: Size) -> nn.Module:
    s = _SIZES[size]
    return ResnetGenerator(ngf=s["ngf"], n_blocks=s["blocks"])


def make_image_inputs(size: Size, gen: torch.Generator) -> dict[str, torch.Tensor]:
    hw = _SIZES[size]["hw"]
    return {"image": torch.rand(1, 3, hw, hw, generator=gen) * 2 - 1}


register(ZooEntry(
    name="cyclegan-horse2zebra",
    family="gan",
    description="CycleGAN ResnetGenerator (9 blocks, ngf 64, instance norm), 256x256 RGB "
                "(junyanz/pytorch-CycleGAN-and-pix2pix)",
    build=build_resnet_generator,
    make_inputs=make_image_inputs,
))
