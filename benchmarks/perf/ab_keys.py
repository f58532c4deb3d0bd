"""Dev A/B: ``Engine.edit`` of several artifacts of the same program on one key and alternating between two
keys (a sampling loop edits a different step key each call), interleaved in one process.

    .venv/bin/python -W ignore benchmarks/perf/ab_keys.py A.host.sige B.host.sige [--ratio 0.012] [--reps 6]
"""
import argparse
import os
import time

import numpy as np

from ab_edit import primed_subject


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--ratio", type=float, default=0.012)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    subj = [(p, *primed_subject(p, a.ratio, keys=(0, 1))[2:]) for p in a.artifacts]
    res = {p: {"same": [], "switch": []} for p in a.artifacts}
    outs = {}
    for _ in range(a.reps):
        for p, eng, mask, inputs in subj:
            for k in (0, 1):  # every edit switches key
                t0 = time.perf_counter()
                outs[(p, k)] = eng.edit(**inputs[k][1], mask=mask, key=k)
                res[p]["switch"].append(time.perf_counter() - t0)
            for j in range(3):  # the first switches back; the next two stay
                t0 = time.perf_counter()
                eng.edit(**inputs[0][1], mask=mask, key=0)
                if j:
                    res[p]["same"].append(time.perf_counter() - t0)
    first = a.artifacts[0]
    for p in a.artifacts:
        d = max(float(np.abs(outs[(p, k)] - outs[(first, k)]).max()) for k in (0, 1))
        print(f"{p}: same key {np.median(res[p]['same']) * 1e3:.1f} ms, switching keys "
              f"{np.median(res[p]['switch']) * 1e3:.1f} ms, max|d| vs first {d:.1e}")


if __name__ == "__main__":
    main()
