"""Compilation targets: one declarative JSON file per target in this package.

Each file holds ``name``, ``description``, ``family`` (``cuda``/``x86``/``arm``/``host``/``onnx``),
``tvm_target`` (the TVM target as a JSON dict, ``null`` for ``onnx``), ``tvm_host`` (CUDA only),
``produces`` (what the artifact is), ``artifact`` (format details) and ``toolchain`` (what must be
installed). The ``host`` target is filled in at load time from LLVM's host detection.

    >>> from sige_export.targets import get, list_targets
    >>> get("rtx3090").tvm_target()          # tvm.target.Target, tvm imported lazily
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

_DIR = Path(__file__).resolve().parent
FAMILIES = ("cuda", "x86", "arm", "host", "onnx")
_REQUIRED = ("name", "description", "family", "tvm_target", "produces", "toolchain")

NVRTC_INSTALL_HINT = ("pip install nvidia-cuda-nvrtc-cu12 cuda-bindings nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12"
                      "  (or: pip install 'sige-export[cuda]')")


class ToolchainError(RuntimeError):
    """A tool needed to build for a target is missing; the message says how to install it."""


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    family: str
    tvm_target_dict: dict[str, Any] | None
    produces: str
    toolchain: tuple[str, ...]
    tvm_host_dict: dict[str, Any] | None = None
    vector_bits: int | None = None
    artifact: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    # -- TVM ---------------------------------------------------------------------------------
    @property
    def compiles(self) -> bool:
        """False for the portable ``onnx`` target (no TVM compilation)."""
        return self.tvm_target_dict is not None

    @property
    def is_gpu(self) -> bool:
        return self.family == "cuda"

    @property
    def cuda_arch(self) -> str | None:
        return self.tvm_target_dict.get("arch") if self.family == "cuda" and self.tvm_target_dict else None

    def tvm_target(self):
        """The ``tvm.target.Target`` (with its host for CUDA). Imports tvm lazily."""
        if self.tvm_target_dict is None:
            raise ValueError(f"target {self.name!r} ({self.family}) is not compiled with TVM")
        from tvm.target import Target

        if self.tvm_host_dict is not None:
            return Target(dict(self.tvm_target_dict), host=dict(self.tvm_host_dict))
        return Target(dict(self.tvm_target_dict))

    @property
    def vector_lanes_f32(self) -> int:
        """float32 lanes of one SIMD register (16 on AVX-512, 8 on AVX2, 4 on NEON)."""
        return max(1, (self.vector_bits or 128) // 32)

    # -- toolchain -----------------------------------------------------------------------------
    def missing_toolchain(self) -> list[str]:
        """Names of the required tools that are not importable/available here."""
        missing = []
        if "nvrtc" in self.toolchain:
            if not _nvrtc_available():
                missing.append("nvrtc")
        return missing

    def check_toolchain(self) -> None:
        """Raise ToolchainError, with install instructions, if a needed tool is missing."""
        missing = self.missing_toolchain()
        if missing:
            raise ToolchainError(
                f"target {self.name!r} needs NVRTC (CUDA runtime compiler, via cuda-bindings) and the CUDA "
                f"runtime/CCCL headers to compile CUDA kernels to cubin; not available here. Install them "
                f"with:\n    {NVRTC_INSTALL_HINT}"
            )

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "description": self.description, "family": self.family,
             "tvm_target": self.tvm_target_dict, "produces": self.produces, "toolchain": list(self.toolchain),
             "artifact": dict(self.artifact)}
        if self.tvm_host_dict is not None:
            d["tvm_host"] = self.tvm_host_dict
        if self.vector_bits is not None:
            d["vector_bits"] = self.vector_bits
        return d


@lru_cache(maxsize=1)
def _nvrtc_available() -> bool:
    try:
        if importlib.util.find_spec("cuda") is None:
            return False
        from cuda.bindings import nvrtc  # noqa: F401

        err, _major, _minor = nvrtc.nvrtcVersion()
        if int(err) != 0:
            return False
    except Exception:  # ImportError, missing libnvrtc.so, ...
        return False
    # TVM's generated CUDA includes the CUDA runtime and CCCL headers: a toolkit (CUDA_PATH / nvcc)
    # or the PyPI header packages.
    if os.environ.get("CUDA_PATH") and os.path.isfile(os.path.join(os.environ["CUDA_PATH"], "include", "cuda_runtime.h")):
        return True
    return all(importlib.util.find_spec(f"nvidia.{p}") is not None for p in ("cuda_runtime", "cuda_cccl"))


# -- host detection ---------------------------------------------------------------------------
_X86_512 = ("avx512f",)


@lru_cache(maxsize=1)
def detect_host() -> dict[str, Any]:
    """LLVM's view of this machine: ``{"tvm_target": {...}, "vector_bits": int}``."""
    from tvm.target import codegen

    triple = str(codegen.llvm_get_system_triple())
    cpu = str(codegen.llvm_get_system_cpu())
    # conda-built LLVMs report e.g. x86_64-conda-linux-gnu; normalise the vendor field.
    parts = triple.split("-")
    if len(parts) == 4 and parts[1] not in ("unknown", "pc", "apple"):
        triple = f"{parts[0]}-unknown-{parts[2]}-{parts[3]}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    tgt: dict[str, Any] = {"kind": "llvm", "mtriple": triple, "mcpu": cpu, "num-cores": int(cores)}
    try:
        bits = int(codegen.llvm_get_vector_width(_make_target(tgt)))
    except Exception:
        bits = 0
    if bits <= 0:
        arch = parts[0]
        if arch in ("x86_64", "i686"):
            bits = 512 if _cpu_has(tgt, "avx512f") else 256 if _cpu_has(tgt, "avx2") else 128
        else:
            bits = 128
    return {"tvm_target": tgt, "vector_bits": bits}


def _make_target(d):
    from tvm.target import Target

    return Target(dict(d))


def _cpu_has(tgt: dict, feature: str) -> bool:
    try:
        from tvm.target import codegen

        return bool(codegen.llvm_cpu_has_features(feature, _make_target(tgt)))
    except Exception:
        return False


# -- registry ---------------------------------------------------------------------------------
def _validate(d: dict[str, Any], source: str) -> None:
    for k in _REQUIRED:
        if k not in d:
            raise ValueError(f"{source}: missing key {k!r}")
    if d["family"] not in FAMILIES:
        raise ValueError(f"{source}: family {d['family']!r} not in {FAMILIES}")
    if d["family"] != "onnx" and not isinstance(d["tvm_target"], dict):
        raise ValueError(f"{source}: tvm_target must be a JSON object")
    if d["family"] == "cuda" and not isinstance(d.get("tvm_host"), dict):
        raise ValueError(f"{source}: CUDA targets need a tvm_host object")


def _spec_from_json(d: dict[str, Any], source: str) -> TargetSpec:
    _validate(d, source)
    tgt = copy.deepcopy(d["tvm_target"])
    vbits = d.get("vector_bits")
    if d["family"] == "host":
        det = detect_host()
        tgt = dict(det["tvm_target"])
        vbits = det["vector_bits"]
    return TargetSpec(name=d["name"], description=d["description"], family=d["family"], tvm_target_dict=tgt,
                      produces=d["produces"], toolchain=tuple(d["toolchain"]),
                      tvm_host_dict=copy.deepcopy(d.get("tvm_host")),
                      vector_bits=int(vbits) if isinstance(vbits, int) else None,
                      artifact=dict(d.get("artifact", {})), source=source)


def _json_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(_DIR.glob("*.json"))}


def load_json(name: str) -> dict[str, Any]:
    """The raw declarative JSON of a target (host fields unresolved)."""
    files = _json_files()
    if name not in files:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(sorted(files))}")
    return json.loads(files[name].read_text())


def list_targets() -> list[str]:
    """Names of all known targets, sorted."""
    return sorted(_json_files())


@lru_cache(maxsize=None)
def get(name: str) -> TargetSpec:
    """The TargetSpec of ``name``; ValueError listing the known targets if unknown."""
    d = load_json(name)
    if d.get("name") != name:
        raise ValueError(f"targets/{name}.json: name field {d.get('name')!r} != file name {name!r}")
    return _spec_from_json(d, f"targets/{name}.json")


__all__ = ["TargetSpec", "ToolchainError", "get", "list_targets", "load_json", "detect_host", "NVRTC_INSTALL_HINT"]
