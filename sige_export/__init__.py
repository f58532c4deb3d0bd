"""sige-export: spatially sparse inference (SIGE) for image-editing generators.

Pipeline: model -> dense ONNX -> SIGE ONNX (ops of domain ``ai.sige``) -> TVM artifact -> runtime.
"""
from __future__ import annotations

__version__ = "0.1.0"

SIGE_DOMAIN = "ai.sige"
SIGE_OPSET_VERSION = 1

__all__ = ["load", "Engine", "EngineError", "SIGE_DOMAIN", "SIGE_OPSET_VERSION", "__version__", "cache_dir"]


def cache_dir():
    """Where sige-export caches computed results (zoo MACs, built benchmark artifacts):
    ``$SIGE_EXPORT_CACHE_DIR``, else ``$XDG_CACHE_HOME/sige-export`` (``~/.cache/sige-export``)."""
    import os
    from pathlib import Path

    env = os.environ.get("SIGE_EXPORT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sige-export"


def __getattr__(name: str):
    """Lazy public API: ``sige_export.load`` imports the runtime (numpy + onnxruntime, never torch) on first use."""
    if name in ("load", "Engine", "EngineError"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'sige_export' has no attribute {name!r}")
