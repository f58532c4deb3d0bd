"""TVM lowering of SIGE programs: ONNX->Relax import with ai.sige dispatch, TE/TIR op definitions,
and per-target schedule rules (``cpu`` for x86/ARM with per-ISA vector width, ``cuda``)."""
from __future__ import annotations


def rules_for(family: str):
    """The ordered schedule rules of a target family (``x86``/``arm``/``host`` -> cpu, ``cuda``)."""
    if family in ("x86", "arm", "host", "cpu"):
        from .cpu import default_rules

        return default_rules()
    if family == "cuda":
        from .cuda import default_rules

        return default_rules()
    raise ValueError(f"no schedule rules for target family {family!r}")
