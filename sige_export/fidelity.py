"""Fidelity report: PSNR of edit vs dense and sparse MACs over edit sizes and mask kinds, both norm-stats modes.

    python -m sige_export.fidelity ddpm-church256 [--size tiny] [--json out.json] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .edits import MASK_KINDS, apply_edit, psnr, synthetic_mask
from .macs import count_macs
from .program import SigeProgram
from .runtime import Engine, OnnxRuntimeBackend

DEFAULT_RATIOS = (0.01, 0.05, 0.15, 0.33)


@dataclass
class FidelityRow:
    model: str
    norm_stats: str
    mask_kind: str
    target_ratio: float
    edited_ratio: float
    dense_macs: int
    sparse_macs: int
    macs_reduction: float
    psnr_db: float
    max_abs_error: float
    psnr_unchanged_db: float  # the primed (unedited) output vs dense: what doing nothing would give


def one_hot_channels(x: np.ndarray) -> int | None:
    """Label channels of a one-hot label map (+ optional trailing edge channel), else None."""
    if x.ndim != 4 or not np.isin(x, (0.0, 1.0)).all():
        return None
    for c in (x.shape[1] - 1, x.shape[1]):
        if c > 1 and np.allclose(x[:, :c].sum(1), 1.0):
            return c
    return None


def edit_macs(program: SigeProgram, index_feeds: dict[str, np.ndarray]) -> int:
    """MACs of the edit pass for concrete index inputs (the counter of the dense model, with N fixed)."""
    return count_macs(program.edit_model(), {k: v.shape for k, v in index_feeds.items()}).total


def program_for(model: str, size: str, norm_stats: str, seed: int = 0) -> tuple[SigeProgram, dict[str, np.ndarray]]:
    """Export ``model`` (zoo name or file) to a SIGE program and example inputs."""
    from .frontend import load_model, to_dense_onnx
    from .sparsify import SparsifyOptions, sparsify

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(model, size=size, seed=seed)
        result = sparsify(to_dense_onnx(loaded), SparsifyOptions(norm_stats=norm_stats))
    inputs = {k: np.asarray(v) for k, v in loaded.inputs.items()}
    return SigeProgram(result.model, result.manifest), inputs


def fidelity_report(model: str, *, size: str = "full", ratios=DEFAULT_RATIOS, kinds=MASK_KINDS,
                    modes=("original", "update"), seed: int = 0, log=lambda s: None) -> list[FidelityRow]:
    rows: list[FidelityRow] = []
    for mode in modes:
        t0 = time.perf_counter()
        program, inputs = program_for(model, size, mode, seed)
        engine = Engine(program, OnnxRuntimeBackend(program))
        dense_macs = count_macs(program.dense_model()).total
        primed = engine.prime(**inputs)
        src = program.manifest["mask"]["source"]
        x = inputs[src]
        labels = one_hot_channels(x)
        log(f"{model} [{mode}]: program ready in {time.perf_counter() - t0:.1f}s; dense MACs {dense_macs / 1e9:.2f} G")
        for kind in kinds:
            for k, ratio in enumerate(ratios):
                mask = synthetic_mask(kind, x.shape[2:], ratio, seed=seed + k)
                edited = dict(inputs)
                edited[src] = apply_edit(x, mask, seed=seed + k, one_hot_channels=labels)
                ref = engine.dense(**edited)
                out = engine.edit(**edited, mask=mask)
                feeds = engine.edit_feeds(mask)
                sparse = edit_macs(program, feeds)
                rows.append(FidelityRow(model, mode, kind, ratio, float(mask.mean()), int(dense_macs), int(sparse),
                                        dense_macs / max(sparse, 1), psnr(out, ref), float(np.abs(out - ref).max()),
                                        psnr(primed, ref)))
                r = rows[-1]
                log(f"  {kind:6s} {r.edited_ratio:6.1%}: MACs {r.macs_reduction:5.2f}x fewer, PSNR {r.psnr_db:6.2f} dB "
                    f"(unedited output: {r.psnr_unchanged_db:6.2f} dB)")
    return rows


def to_markdown(rows: list[FidelityRow]) -> str:
    head = ("| model | norm stats | mask | edited | dense MACs | sparse MACs | reduction | PSNR edit vs dense (dB) "
            "| PSNR unedited vs dense (dB) |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r.model} | {r.norm_stats} | {r.mask_kind} | {r.edited_ratio:.1%} | {r.dense_macs / 1e9:.2f} G "
        f"| {r.sparse_macs / 1e9:.2f} G | {r.macs_reduction:.2f}x | {r.psnr_db:.2f} | {r.psnr_unchanged_db:.2f} |\n"
        for r in rows)
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sige_export.fidelity", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="zoo name or model file")
    ap.add_argument("--size", default="full", choices=("full", "tiny"))
    ap.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)))
    ap.add_argument("--kinds", default=",".join(MASK_KINDS))
    ap.add_argument("--modes", default="original,update")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args(argv)
    rows = fidelity_report(a.model, size=a.size, ratios=[float(r) for r in a.ratios.split(",")],
                           kinds=a.kinds.split(","), modes=a.modes.split(","), seed=a.seed,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    md = to_markdown(rows)
    if a.markdown:
        a.markdown.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
