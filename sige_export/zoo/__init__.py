"""Model zoo: the paper's generators as dense PyTorch modules with random (seeded) or loaded weights."""
from __future__ import annotations

from .registry import ZooEntry, create, example_inputs, get, names, register

# Family modules register their entries on import.
from . import cyclegan, ddpm, gaugan, sd  # noqa: E402,F401

__all__ = ["ZooEntry", "create", "example_inputs", "get", "names", "register"]
