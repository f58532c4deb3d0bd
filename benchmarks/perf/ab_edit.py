"""Dev A/B: edit (and optionally prime) passes of several artifacts of the same program, interleaved in one
process (noisy shared machine: only side-by-side ratios mean something).

    .venv/bin/python -W ignore benchmarks/perf/ab_edit.py A.host.sige B.host.sige [--ratio 0.012] [--reps 10] [--prime]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def primed_subject(path, ratio: float, keys=(None,)):
    """``(manifest, backend, engine, mask, {key: (inputs, edited inputs)})`` of an artifact primed under each of
    ``keys`` (the inputs of key k scaled by 0.9 ** k) for a blob edit of ``ratio``."""
    from sige_export.artifact import open_artifact
    from sige_export.bench import synthetic_inputs
    from sige_export.edits import apply_edit, synthetic_mask
    from sige_export.program import SigeProgram
    from sige_export.runtime import Engine

    man, be = open_artifact(path, verify=False)
    eng = Engine(SigeProgram(None, man), be)
    mask = synthetic_mask("blob", tuple(man["mask"]["resolution"]), ratio, seed=0)
    src = man["mask"]["source"]
    base = synthetic_inputs(man)
    inputs = {}
    for k, key in enumerate(keys):
        feeds = {n: (v * 0.9 ** k if v.dtype.kind == "f" else v) for n, v in base.items()}
        eng.prime(**feeds, key=key)
        inputs[key] = (feeds, {**feeds, src: apply_edit(feeds[src], mask)})
    return man, be, eng, mask, inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--ratio", type=float, default=0.012)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--prime", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)

    subj = []
    for p in a.artifacts:
        man, be, eng, mask, inputs = primed_subject(p, a.ratio)
        feeds, edited = inputs[None]
        out = eng._entry(None).outputs[man["outputs"][0]]
        full = eng._edit_inputs(eng._entry(None), edited, eng.edit_feeds(mask))
        y = be.edit(full)
        subj.append((p, be, feeds, full, out, y[man["edit"]["outputs"][0]], man))
    ref_p, ref_e = subj[0][4], subj[0][5]
    for p, be, feeds, full, out, y, man in subj[1:]:
        print(f"{p}: prime max|d| {np.abs(out - ref_p).max():.2e}, edit max|d| {np.abs(y - ref_e).max():.2e}")
    te = {s[0]: [] for s in subj}
    tp = {s[0]: [] for s in subj}
    for _ in range(a.reps):
        for p, be, feeds, full, *_ in subj:
            t = time.perf_counter()
            be.edit(full)
            te[p].append(time.perf_counter() - t)
    if a.prime:
        for _ in range(max(2, a.reps // 5)):
            for p, be, feeds, full, *_ in subj:
                t = time.perf_counter()
                be.prime(feeds)
                tp[p].append(time.perf_counter() - t)
    base = np.median(te[subj[0][0]])
    for p in te:
        m = np.median(te[p])
        s = f"{p}: edit median {m * 1e3:.1f} ms (min {np.min(te[p]) * 1e3:.1f}) = {base / m:.2f}x of first"
        if tp[p]:
            s += f"; prime median {np.median(tp[p]) * 1e3:.0f} ms (min {np.min(tp[p]) * 1e3:.0f})"
        print(s)
    if a.profile:
        from tvm_profile import profile_passes

        p, be, feeds, full, *_, man = subj[-1]
        profile_passes(Path(p), feeds, full, man, a.threads, 40, passes=("prime", "edit") if a.prime else ("edit",))


if __name__ == "__main__":
    main()
