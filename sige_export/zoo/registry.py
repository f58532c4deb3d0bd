"""Registry of zoo entries keyed by name; each family module registers its entries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Size = str  # "full" | "tiny"
SIZES = ("full", "tiny")


@dataclass(frozen=True)
class ZooEntry:
    """A named generator: how to build it and how to make inputs for it at a given size."""

    name: str
    family: str
    description: str
    build: Callable[[Size], torch.nn.Module]
    # (size, generator) -> inputs keyed by forward argument name, image-like input first.
    make_inputs: Callable[[Size, torch.Generator], dict[str, torch.Tensor]]


_REGISTRY: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"zoo entry {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> ZooEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known models: {', '.join(names())}") from None


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")


def create(name: str, size: Size = "full", seed: int = 0) -> torch.nn.Module:
    """Build zoo model ``name`` with weights drawn deterministically from ``seed`` (eval mode)."""
    entry = get(name)
    _check_size(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.build(size)
    return model.eval()


def example_inputs(name: str, size: Size = "full", seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``model(**inputs)``, keyed by forward argument name, the image-like input first."""
    entry = get(name)
    _check_size(size)
    gen = torch.Generator().manual_seed(seed)
    return entry.make_inputs(size, gen)
