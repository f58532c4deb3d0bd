"""CUDA schedule rules.

* ``SigeCuda`` -- ai.sige ops: gather inlined into the sparse conv (never materialised), every
  remaining block's spatial loops fused and bound to ``blockIdx.x`` x ``threadIdx.x``; reductions
  run per thread (one output element per thread: correct everywhere, not tuned).
* the stock ``s_tir.dlight.gpu`` rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback) for
  everything the Relax legaliser produces.

No GPU is available where this was written: these schedules are compiled (NVRTC -> cubin) and
inspected, not timed.
"""
from __future__ import annotations

from tvm import s_tir, tirx

from ..base import ScheduleRule
from ..cpu import DATA_PAR, _func_op, _iter_types, _root_blocks

THREADS = 128


def _bind_block(sch, block, threads: int = THREADS):
    loops = list(sch.get_loops(block))
    types = _iter_types(sch, block)
    n_sp = 0
    for t in types:
        if t != DATA_PAR:
            break
        n_sp += 1
    sp = loops[:n_sp]
    if not sp:
        fused = sch.add_unit_loop(block)
        sp = [fused]
    fused = sch.fuse(*sp) if len(sp) > 1 else sp[0]
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


class SigeCuda(ScheduleRule):
    name = "cuda.sige"

    def apply(self, func, target):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        sch = s_tir.Schedule(func)
        op = _func_op(func)
        gather = None
        for name in ("sige_gather", "sige_scatter_gather"):
            try:  # a sparse conv fused with its epilogue keeps its gather block but loses the op attribute
                gather = sch.get_sblock(name)
                break
            except Exception:  # noqa: BLE001 - no such block
                pass
        if not op and gather is None:
            return None
        for b in _root_blocks(sch):  # a two-stage pre-op (sige_te._gather_compute): one thread does both
            if sch.get(b).name_hint.endswith("_raw"):
                sch.compute_inline(b)
        if gather is not None and op in ("SigeSparseConv2d", ""):
            sch.compute_inline(gather)
        for b in _root_blocks(sch):
            _bind_block(sch, b)
        return sch


class DlightRule(ScheduleRule):
    """Adapter: a ``s_tir.dlight`` rule as a ``ScheduleRule``."""

    def __init__(self, rule):
        self.rule = rule
        self.name = f"dlight.{type(rule).__name__}"

    def apply(self, func, target):
        out = self.rule.apply(func, target, False)
        if isinstance(out, list):
            out = out[0] if out else None
        return out


def default_rules():
    from tvm.s_tir import dlight as dl

    return [SigeCuda()] + [DlightRule(r) for r in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                     dl.gpu.GeneralReduction(), dl.gpu.Fallback())]


__all__ = ["SigeCuda", "DlightRule", "default_rules"]
