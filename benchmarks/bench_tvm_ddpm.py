"""Issue "TVM lowering" benchmark: onnxruntime dense vs the host artifact's prime and edit passes,
side by side in one process, DDPM church256 (full size unless --size tiny).

    .venv/bin/python benchmarks/bench_tvm_ddpm.py [--threads 2] [--ratio 0.012] [--profile]

* ORT dense: the dense ONNX of the same model (frontend export), CPUExecutionProvider, ``--threads``.
* prime: the artifact's prime pass (dense computation + every cache); edit: the artifact's edit pass at
  ``--ratio`` edited area (``synthetic_mask("blob", (256, 256), ratio)``), index inputs built once by the
  runtime (``Engine.edit_feeds``), timed alone (``edit kernel``) and end to end with ``Engine.edit``
  (mask -> indices -> edit, ``edit e2e``).
* ``--profile``: per-PrimFunc times of both passes (Relax VM profiler; needs the TVM compiler package),
  with GFLOP/s for functions whose FLOPs TVM can estimate.

Artifacts and the dense ONNX are cached under ``--workdir`` (default /tmp/sige-bench-ddpm); the export
uses ``sige-export ddpm-church256 --target host``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_time(fn, reps: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), float(np.min(ts))


def _ensure(model: str, size: str, workdir: Path, log) -> tuple[Path, Path]:
    from sige_export.cli import ExportOptions, export

    workdir.mkdir(parents=True, exist_ok=True)
    dense = workdir / f"{model}.{size}.dense.onnx"
    art = workdir / f"{model}.{size}.host.sige"
    opts = ExportOptions(size=size)
    if not dense.exists():
        export(model, "dense-onnx", dense, options=opts, log=log)
    if not art.exists():
        t = time.time()
        export(model, "host", art, options=opts, log=log)
        log(f"export --target host: {time.time() - t:.1f}s")
    return dense, art


def _profile(art_path: Path, feeds: dict, edit_full: dict, manifest: dict, threads: int, top: int,
             passes=("prime", "edit"), quiet: bool = False) -> dict:
    """Per-PrimFunc profile of the prime and edit executables (Relax VM profiler); returns
    ``{pass: [{"name", "ms", "calls", "gflop", "gflops"}]}`` (every function, slowest first)."""
    import tarfile
    import tempfile

    import tvm
    from tvm import relax

    from sige_export.artifact import _aligned

    art = manifest["artifact"]
    with tarfile.open(art_path) as tf, tempfile.TemporaryDirectory() as d:
        wm = art["weights"]
        blob = tf.extractfile(wm["member"]).read()
        weights = {t["name"]: np.frombuffer(blob, np.uint8, t["nbytes"], t["offset"]).view(t["dtype"]).reshape(t["shape"])
                   for t in wm["tensors"]}
        result: dict = {}
        for pname, fd in (("prime", feeds), ("edit", edit_full)):
            if pname not in passes:
                continue
            entry = art["passes"][pname]
            so = Path(d) / entry["library"]
            so.write_bytes(tf.extractfile(entry["library"]).read())
            ex = tvm.runtime.load_module(str(so))
            vm = relax.VirtualMachine(ex, tvm.cpu())
            args = [tvm.runtime.tensor(_aligned(np.asarray(fd[i["name"]], dtype=i["dtype"])), tvm.cpu())
                    for i in entry["inputs"]] + [tvm.runtime.tensor(_aligned(weights[p].copy()), tvm.cpu())
                                                 for p in entry["params"]]
            vm["main"](*args)
            agg: dict[str, list] = {}
            state = {}

            def instrument(func, sym, before, ret, *cargs):
                if before:
                    state["t"] = time.perf_counter()
                    return 0
                dt = time.perf_counter() - state["t"]
                a = agg.setdefault(sym, [0.0, 0, 0.0])
                a[0] += dt
                a[1] += 1
                a[2] += _flops(sym, cargs)
                return 0

            vm.set_instrument(instrument)
            t0 = time.perf_counter()
            vm["main"](*args)
            wall = time.perf_counter() - t0
            vm.set_instrument(None)
            total = sum(v[0] for k, v in agg.items() if not k.startswith("vm."))
            result[pname] = [{"name": k, "ms": v[0] * 1e3, "calls": v[1], "gflop": v[2] / 1e9,
                              "gflops": (v[2] / v[0] / 1e9) if v[2] and v[0] else None}
                             for k, v in sorted(agg.items(), key=lambda kv: -kv[1][0])]
            if quiet:
                continue
            print(f"\n[{pname}] per-function (instrumented run {wall * 1e3:.1f} ms, kernels {total * 1e3:.1f} ms, "
                  f"{len(agg)} functions); top {top}:")
            for name, (sec, cnt, fl) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
                gf = f"{fl / sec / 1e9:7.1f} GFLOP/s" if fl else " " * 15
                print(f"  {sec * 1e3:9.3f} ms {100 * sec / max(total, 1e-12):5.1f}%  x{cnt:<3d} {gf}  {name}")
    return result


def _flops(sym: str, args) -> float:
    """FLOPs of a conv / matmul call from its argument shapes (destination-passing: output last)."""
    try:
        shapes = [tuple(int(d) for d in a.shape) for a in args if hasattr(a, "shape")]
    except Exception:
        return 0.0
    if not shapes:
        return 0.0
    out = shapes[-1]
    nout = float(np.prod(out))
    if "conv" in sym and len(out) == 4:
        for s in shapes[:-1]:
            if len(s) == 4 and s[0] == out[1] and s != out:
                return 2.0 * nout * s[1] * s[2] * s[3]
            if len(s) == 5 and s[0] * s[4] == out[1]:  # pre-packed [Cout/v, Cin, kh, kw, v]
                return 2.0 * nout * s[1] * s[2] * s[3]
    if "matmul" in sym and len(shapes) >= 2:
        return 2.0 * nout * shapes[0][-1]
    return 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ddpm-church256")
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.012)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--edit-reps", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sige-bench-ddpm"))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)

    def log(s):
        print(f"  [{s}]", flush=True)

    dense_path, art_path = _ensure(a.model, a.size, a.workdir, log)

    import onnxruntime as ort

    from sige_export.artifact import open_artifact
    from sige_export.edits import synthetic_mask
    from sige_export.program import SigeProgram
    from sige_export.runtime import Engine

    manifest, backend = open_artifact(art_path)
    engine = Engine(SigeProgram(None, manifest), backend)
    rng = np.random.default_rng(0)
    feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in manifest["inputs"]}
    if "t" in feeds:
        feeds["t"] = np.array([500.0] * int(np.prod(manifest["inputs"][1]["shape"])), np.float32).reshape(feeds["t"].shape)

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(dense_path), so, providers=["CPUExecutionProvider"])
    ort_in = {i.name for i in sess.get_inputs()}
    ort_feeds = {k: v for k, v in feeds.items() if k in ort_in}
    ref = sess.run(None, ort_feeds)[0]

    out = engine.prime(**feeds)
    err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
    t_ort, t_ort_min = _median_time(lambda: sess.run(None, ort_feeds), a.reps)
    t_prime, t_prime_min = _median_time(lambda: backend.prime(feeds), a.reps)

    res = tuple(manifest["mask"]["resolution"])
    mask = synthetic_mask("blob", res, a.ratio, seed=0)
    src = manifest["mask"]["source"]
    edited = dict(feeds)
    edited[src] = feeds[src] + np.broadcast_to(mask, feeds[src].shape).astype(np.float32) * 0.5
    idx_feeds = engine.edit_feeds(mask)
    entry = engine._entry(None)
    full = {**entry.caches, **idx_feeds}
    for name, e in manifest["edit"]["edited"].items():
        full[e] = edited[name]
    t_edit, t_edit_min = _median_time(lambda: backend.edit(full), a.edit_reps)
    t_e2e, _ = _median_time(lambda: engine.edit(**edited, mask=mask), a.edit_reps)
    t_idx, _ = _median_time(lambda: engine.edit_feeds(mask), a.edit_reps)
    # correctness of the edit against ORT dense on the edited input
    want = sess.run(None, {k: v for k, v in edited.items() if k in ort_in})[0]
    got = engine.edit(**edited, mask=mask)
    eerr = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    blocks = {g["name"]: int(idx_feeds[g["name"]].shape[0]) for g in manifest["indices"]}

    art = manifest["artifact"]
    print(f"\n{a.model} ({a.size}), host = {art['target']['tvm_target'].get('mcpu')} "
          f"{art['target']['tvm_target'].get('mtriple')}, threads={a.threads}, TVM {art['tvm_version']}, "
          f"onnxruntime {ort.__version__}")
    print(f"edited area {mask.mean() * 100:.2f}% ({a.ratio * 100:.1f}% requested); active blocks "
          f"{sum(blocks.values())} over {len(blocks)} grids")
    print(f"  ORT dense            {t_ort * 1e3:9.2f} ms  (min {t_ort_min * 1e3:.2f})")
    print(f"  TVM prime            {t_prime * 1e3:9.2f} ms  (min {t_prime_min * 1e3:.2f})   "
          f"prime/ORT = {t_prime / t_ort:.2f}x time  (goal <= 1.5)   max rel err vs ORT {err:.1e}")
    print(f"  TVM edit (kernel)    {t_edit * 1e3:9.2f} ms  (min {t_edit_min * 1e3:.2f})   "
          f"ORT/edit = {t_ort / t_edit:.2f}x faster (goal >= 3)")
    print(f"  TVM edit (e2e)       {t_e2e * 1e3:9.2f} ms  (mask -> indices {t_idx * 1e3:.2f} ms + edit)   "
          f"ORT/edit = {t_ort / t_e2e:.2f}x")
    print(f"  edit vs ORT dense on the edited input: max rel diff {eerr:.1e} (SIGE approximation with cached "
          f"statistics; exactness vs the portable program is tests/test_artifact.py)")
    if a.profile:
        _profile(art_path, feeds, full, manifest, a.threads, a.top)


if __name__ == "__main__":
    main()
