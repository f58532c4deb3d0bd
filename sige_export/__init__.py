"""sige-export: spatially sparse inference (SIGE) for image-editing generators.

Pipeline: model -> dense ONNX -> SIGE ONNX (ops of domain ``ai.sige``) -> TVM artifact -> runtime.
"""
from __future__ import annotations

__version__ = "0.1.0"

SIGE_DOMAIN = "ai.sige"
SIGE_OPSET_VERSION = 1
