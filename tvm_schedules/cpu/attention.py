"""``cpu.attention``: ``sige_te.attention_te`` one tile of query rows at a time.

Per task (batch x head x tile, in parallel) the tile's scores ``[N, rows]`` (rows innermost: two AVX-512
vectors), their max, ``exp`` and sum, then ``probs @ v`` transposed (``[Dv, rows]``). Both products run in
register tiles of a few keys (values) x the row vectors, the other operand a scalar broadcast from ``k`` / ``v``
(AVX-512 folds it into the FMA): each broadcast feeds two FMAs. The tile's scores and probabilities stay in the
core's caches instead of a ``[H, M, N]`` matrix going through memory three times (written, softmaxed, read back:
512 MiB per 64x64 self-attention layer of Stable Diffusion).
"""
from __future__ import annotations

from tvm import s_tir, tirx

from ..base import ScheduleRule
from . import _accumulate_locally, _func_op, _largest_divisor, _loop_extent, vector_lanes


def _broadcast_tile(sch, block, lanes: int, accumulators: int):
    """``block`` with loops ``..., j, r, k`` (``r`` the tile's rows, whole vectors; ``k`` the reduction): register
    tiles of ``jt`` rows of ``j`` x the ``r`` vectors, ``k`` outside them; returns the ``j`` tile loop."""
    *_, j, r, k = sch.get_loops(block)
    per_row = -(-_loop_extent(sch, r) // lanes)
    jo, ji = sch.split(j, [None, _largest_divisor(_loop_extent(sch, j), max(1, accumulators // per_row))])
    sch.reorder(jo, k, ji, r)
    sch.unroll(ji)
    sch.vectorize(r)
    sch.decompose_reduction(block, k)
    return jo


def _over_rows(sch, block) -> None:
    """A reduction over the keys (``..., r, j``) as vector updates over the rows."""
    *_, r, j = sch.get_loops(block)
    sch.reorder(j, r)
    sch.vectorize(r)
    sch.decompose_reduction(block, j)


class Attention(ScheduleRule):
    name = "cpu.attention"

    def apply(self, func, target):
        if not isinstance(func, tirx.PrimFunc) or "cpu" not in target.keys or _func_op(func) != "Attention":
            return None
        lanes = vector_lanes(target)
        # 16 of 32 vector registers hold the scores' tile, 20 the product's (40 values = 4 x 10)
        accumulators = (16, 20) if lanes >= 16 else (16, 16)
        sch = s_tir.Schedule(func)
        blk = sch.get_sblock
        # from the first stage down: a stage moves under the task loop once its producers are there
        b, h, t, *_ = sch.get_loops(blk("attention_rows"))
        outer = sch.fuse(b, h, t)
        sch.parallel(outer)
        for name in ("attention_scores", "attention_max", "attention_probs", "attention_sum", "attention_weighted",
                     "attention"):
            sch.reverse_compute_at(blk(name), outer, preserve_unit_loops=True)
        scores = blk("attention_scores")
        wb = _accumulate_locally(sch, scores, [])
        sch.reverse_compute_at(wb, _broadcast_tile(sch, scores, lanes, accumulators[0]), preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(wb)[-1])
        for name in ("attention_max", "attention_sum"):
            _over_rows(sch, blk(name))
        sch.vectorize(sch.get_loops(blk("attention_probs"))[-1])
        weighted = blk("attention_weighted")
        wb = _accumulate_locally(sch, weighted, [])
        sch.reverse_compute_at(wb, _broadcast_tile(sch, weighted, lanes, accumulators[1]), preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(wb)[-1])
        return sch
