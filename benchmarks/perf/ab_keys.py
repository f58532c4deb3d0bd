"""Dev A/B: ``Engine.edit`` of several artifacts of the same program on one key and alternating between two
keys (a sampling loop edits a different step key each call), interleaved in one process.

    .venv/bin/python -W ignore benchmarks/perf/ab_keys.py A.host.sige B.host.sige [--ratio 0.012] [--reps 6]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--ratio", type=float, default=0.012)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    from sige_export.artifact import open_artifact
    from sige_export.bench import synthetic_inputs
    from sige_export.edits import synthetic_mask
    from sige_export.program import SigeProgram
    from sige_export.runtime import Engine

    subj = []
    for p in a.artifacts:
        man, be = open_artifact(p, verify=False)
        eng = Engine(SigeProgram(None, man), be)
        f0 = synthetic_inputs(man)
        f1 = {k: (v * 0.9 if v.dtype.kind == "f" else v) for k, v in f0.items()}
        eng.prime(**f0, key=0)
        eng.prime(**f1, key=1)
        mask = synthetic_mask("blob", tuple(man["mask"]["resolution"]), a.ratio, seed=0)
        src = man["mask"]["source"]
        edited = [{**f, src: np.ascontiguousarray(f[src] + np.broadcast_to(mask, f[src].shape).astype(np.float32) * 0.5)}
                  for f in (f0, f1)]
        subj.append((p, eng, edited, mask))
    res = {p: {"same": [], "switch": []} for p in a.artifacts}
    outs = {}
    for _ in range(a.reps):
        for p, eng, edited, mask in subj:
            for k in (0, 1):  # every edit switches key
                t0 = time.perf_counter()
                outs[(p, k)] = eng.edit(**edited[k], mask=mask, key=k)
                res[p]["switch"].append(time.perf_counter() - t0)
            for j in range(3):  # the first switches back; the next two stay
                t0 = time.perf_counter()
                eng.edit(**edited[0], mask=mask, key=0)
                if j:
                    res[p]["same"].append(time.perf_counter() - t0)
    first = a.artifacts[0]
    for p in a.artifacts:
        d = max(float(np.abs(outs[(p, k)] - outs[(first, k)]).max()) for k in (0, 1))
        print(f"{p}: same key {np.median(res[p]['same']) * 1e3:.1f} ms, switching keys "
              f"{np.median(res[p]['switch']) * 1e3:.1f} ms, max|d| vs first {d:.1e}")


if __name__ == "__main__":
    main()
