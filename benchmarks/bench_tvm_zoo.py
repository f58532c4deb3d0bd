"""Issue "Performance": onnxruntime dense vs the host artifact (prime = dense pass, edit at several edited
areas), side by side in one process per model, full-size zoo models.

    .venv/bin/python -W ignore benchmarks/bench_tvm_zoo.py [--models ddpm-church256 gaugan-cityscapes gancomp-gaugan]
        [--ratios 0.012 0.05 0.15 0.33 0.66] [--reps 3] [--edit-reps 10] [--threads 2]

Per model: the SIGE program (``sige-export NAME --target onnx``) and the host artifact built from it (the
same pipeline as ``sige-export NAME --target host``), the dense ONNX (``--target dense-onnx``); cached under
``--workdir``. Masks: ``synthetic_mask("blob", hw, ratio)``; index feeds: ``Engine.edit_feeds(mask)``;
edit = the artifact's edit pass alone (median of ``--edit-reps``). MACs ratio = dense MACs / edit MACs
(``sige_export.fidelity.edit_macs`` with the indices' N). Per-layer times and GFLOP/s of the edit pass at
the first ratio (Relax VM instrument) go to the JSON. Memory (``--memory``, a child process per side): the
caches of one primed key, peak RSS during an edit (VmHWM reset before it) vs onnxruntime dense peak RSS +
the caches.

Writes ``benchmarks/results-host.md`` and ``benchmarks/results-host.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sige_export.bench import synthetic_inputs  # noqa: E402 - after the path setup

GOALS = {"ddpm-church256": {0.012: 7.0, 0.33: 1.8}, "gaugan-cityscapes": {0.012: 12.0}, "gancomp-gaugan": {0.012: 4.0}}


def _median(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def ensure(model: str, workdir: Path, log, rebuild: bool = False) -> tuple[Path, Path, Path]:
    from sige_export.cli import ExportOptions, export

    workdir.mkdir(parents=True, exist_ok=True)
    opts = ExportOptions(size="full")
    dense, prog, art = (workdir / f"{model}.dense.onnx", workdir / f"{model}.sige.onnx", workdir / f"{model}.host.sige")
    if not dense.exists():
        export(model, "dense-onnx", dense, options=opts, log=log)
    if rebuild or not prog.exists():  # the sparsifier is part of the compiler: its program is rebuilt too
        export(model, "onnx", prog, options=opts, log=log)
    if rebuild or not art.exists():
        from sige_export.artifact import build_artifact
        from sige_export.program import SigeProgram

        t = time.time()
        build_artifact(SigeProgram.load(prog), "host", art, log=log, calibrate=True)  # as `sige-export --target host`
        log(f"{model}: artifact built in {time.time() - t:.1f}s")
    return dense, prog, art


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        f = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
        flags = "AVX-512" if "avx512f" in f else "AVX2" if "avx2" in f else ""
    except Exception:
        pass
    return f"{cpu} ({os.cpu_count()} cores visible, {flags}), {platform.system()} {platform.release()}"


def bench_model(model: str, a, log) -> dict:
    import onnxruntime as ort

    from tvm_profile import profile_passes
    from sige_export.artifact import open_artifact
    from sige_export.edits import apply_edit, synthetic_mask
    from sige_export.fidelity import edit_macs
    from sige_export.macs import count_macs
    from sige_export.program import SigeProgram
    from sige_export.runtime import Engine

    dense_path, prog_path, art_path = ensure(model, a.workdir, log, a.rebuild)
    manifest, backend = open_artifact(art_path)
    engine = Engine(SigeProgram(None, manifest), backend)
    feeds = synthetic_inputs(manifest)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # ORT's idle workers spin after a run, stealing one of the two cores from the TVM run that follows
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(dense_path), so, providers=["CPUExecutionProvider"])
    ort_in = {i.name for i in sess.get_inputs()}
    ort_feeds = {k: v for k, v in feeds.items() if k in ort_in}
    ref = sess.run(None, ort_feeds)[0]
    out = engine.prime(**feeds)
    prime_err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))
    # side by side: ORT dense and TVM prime interleaved. Steady state: the VM's pooled allocator reuses
    # the previous call's buffers after two calls (the first calls of a process page-fault ~1 GB of caches)
    t_ort, t_prime = [], []
    sess.run(None, ort_feeds)
    t = time.perf_counter()
    backend.prime(feeds)
    t_prime_first = time.perf_counter() - t
    backend.prime(feeds)
    for _ in range(a.reps):
        t = time.perf_counter()
        sess.run(None, ort_feeds)
        t_ort.append(time.perf_counter() - t)
        t = time.perf_counter()
        backend.prime(feeds)
        t_prime.append(time.perf_counter() - t)
    t_ort, t_prime = float(np.median(t_ort)), float(np.median(t_prime))
    log(f"{model}: ORT dense {t_ort * 1e3:.1f} ms, TVM prime {t_prime * 1e3:.1f} ms (rel err {prime_err:.1e})")

    program = SigeProgram.load(prog_path, weights=False)  # for MACs: the artifact holds the weights
    dense_macs = count_macs(program.dense_model()).total
    res = tuple(manifest["mask"]["resolution"])
    src = manifest["mask"]["source"]
    entry = engine._entry(None)
    rows = []
    profile = None
    for r in a.ratios:
        mask = synthetic_mask("blob", res, r, seed=0)
        idx = engine.edit_feeds(mask)
        edited = {**feeds, src: apply_edit(feeds[src], mask)}
        full = engine._edit_inputs(entry, edited, idx)
        t_edit = _median(lambda: backend.edit(full), a.edit_reps)
        t_e2e = _median(lambda: engine.edit(**edited, mask=mask), a.edit_reps)
        e2e_mode = engine.last_edit.mode  # "dense" above the artifact's calibrated crossover
        t_ort_r = _median(lambda: sess.run(None, ort_feeds), 1, warmup=0)  # side by side, one dense run
        emacs = edit_macs(program, idx)
        row = {"ratio": r, "area": float(mask.mean()), "blocks": int(sum(v.shape[0] for k, v in idx.items()
                                                                         if k in {g["name"] for g in manifest["indices"]})),
               "edit_ms": t_edit * 1e3, "edit_e2e_ms": t_e2e * 1e3, "e2e_mode": e2e_mode, "ort_dense_ms_beside": t_ort_r * 1e3,
               "speedup_vs_ort": t_ort / t_edit, "speedup_e2e_vs_ort": t_ort / t_e2e,
               "speedup_vs_prime": t_prime / t_edit, "edit_macs": int(emacs), "macs_ratio": dense_macs / max(emacs, 1)}
        goal = GOALS.get(model, {}).get(r)
        if goal:
            row["goal"] = goal
        rows.append(row)
        log(f"{model} @ {r * 100:.1f}%: edit {t_edit * 1e3:.1f} ms ({t_ort / t_edit:.2f}x vs ORT dense, e2e "
            f"{t_ort / t_e2e:.2f}x), MACs ratio {dense_macs / max(emacs, 1):.1f}x")
        if profile is None and a.profile:
            profile = profile_passes(art_path, feeds, full, manifest, a.threads, 0, passes=("edit",), quiet=True)["edit"]
            if a.profile_prime:
                profile_prime = profile_passes(art_path, feeds, full, manifest, a.threads, 0, passes=("prime",), quiet=True)
                profile = {"edit": profile, "prime": profile_prime["prime"]}
    return {"model": model, "crossover_ratio": engine.crossover_ratio, "ort_dense_ms": t_ort * 1e3, "prime_ms": t_prime * 1e3,
            "prime_first_call_ms": t_prime_first * 1e3, "prime_over_ort": t_prime / t_ort,
            "prime_rel_err": prime_err, "dense_macs": int(dense_macs), "edits": rows, "edit_profile": profile,
            "threads": a.threads}


# -- memory (child processes) ----------------------------------------------------------------------
def _vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(kind: str, model: str, workdir: Path, threads: int, ratio: float) -> dict:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    dense_path, _, art_path = workdir / f"{model}.dense.onnx", None, workdir / f"{model}.host.sige"
    if kind == "ort":
        import onnxruntime as ort

        from sige_export.artifact import read_manifest

        manifest = read_manifest(art_path)
        feeds = synthetic_inputs(manifest)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(dense_path), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        sess.run(None, {k: v for k, v in feeds.items() if k in names})
        return {"ort_dense_peak_rss": _vm_hwm()}
    from sige_export.artifact import open_artifact
    from sige_export.edits import apply_edit, synthetic_mask
    from sige_export.program import SigeProgram
    from sige_export.runtime import Engine

    manifest, backend = open_artifact(art_path, verify=False)
    engine = Engine(SigeProgram(None, manifest), backend)
    feeds = synthetic_inputs(manifest)
    after_open = _vm_hwm()
    engine.prime(**feeds)
    prime_peak = _vm_hwm()
    caches = sum(int(np.asarray(v).nbytes) for v in engine._entry(None).caches.values())
    mask = synthetic_mask("blob", tuple(manifest["mask"]["resolution"]), ratio, seed=0)
    src = manifest["mask"]["source"]
    edited = {**feeds, src: apply_edit(feeds[src], mask)}
    engine.edit(**edited, mask=mask)  # warm
    _reset_hwm()
    engine.edit(**edited, mask=mask)
    return {"caches_bytes": caches, "edit_peak_rss": _vm_hwm(), "prime_peak_rss": prime_peak, "open_rss": after_open}


RESULT = "@@result "


def bench_in_child(model: str, a, argv: list[str], log) -> dict:
    """``bench_model`` in a fresh process per model: nothing (memory pools, thread pools, caches) carries over
    from one model to the next."""
    args = [sys.executable, "-W", "ignore", __file__, *argv, "--model-child", model]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as p:
        result = None
        for line in p.stdout:
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
            else:
                print(line, end="", flush=True)
    if p.returncode or result is None:
        raise RuntimeError(f"{model}: benchmark child failed (exit {p.returncode})")
    return result


def memory(model: str, a, log) -> dict:
    out = {}
    for kind in ("ort", "tvm"):
        p = subprocess.run([sys.executable, "-W", "ignore", __file__, "--memory-child", kind, "--models", model,
                            "--workdir", str(a.workdir), "--threads", str(a.threads), "--ratios", str(a.ratios[0])],
                           capture_output=True, text=True, timeout=1800)
        if p.returncode:
            raise RuntimeError(f"memory child {kind} failed:\n{p.stderr[-2000:]}")
        out.update(json.loads(p.stdout.strip().splitlines()[-1]))
    out["edit_peak_over_ort_plus_caches"] = out["edit_peak_rss"] / (out["ort_dense_peak_rss"] + out["caches_bytes"])
    log(f"{model}: caches {out['caches_bytes'] / 2**20:.1f} MiB, edit peak RSS {out['edit_peak_rss'] / 2**20:.0f} MiB vs "
        f"ORT dense peak {out['ort_dense_peak_rss'] / 2**20:.0f} MiB + caches = {out['edit_peak_over_ort_plus_caches']:.2f}x")
    return out


# -- report -------------------------------------------------------------------------------------------
def roofline_lines(convs: list[dict], peak: float | None, read_gbs: float | None) -> list[str]:
    """The conv/matmul kernels split by the roofline: a kernel whose arithmetic intensity (FLOP per byte it
    must move) times the read bandwidth reaches the FMA peak is compute-bound and judged against the peak;
    below that its roof is intensity x bandwidth (depthwise convs, convs with few channels)."""
    if not (peak and read_gbs) or not convs:
        return []
    balance = peak / read_gbs
    compute = [p for p in convs if (p.get("flop_per_byte") or 0) >= balance]
    memory = [p for p in convs if p not in compute]
    out = []
    if compute:
        ms = sum(p["ms"] for p in compute)
        g = sum(p["gflop"] for p in compute) / max(ms, 1e-9) * 1e3
        out.append(f"- compute-bound ({len(compute)} kernels, >= {balance:.1f} FLOP/byte): {ms:.1f} ms at {g:.1f} GFLOP/s "
                   f"= {100 * g / peak:.0f}% of peak")
    if memory:
        ms = sum(p["ms"] for p in memory)
        roof_ms = sum(p["gflop"] / min(peak, (p.get("flop_per_byte") or 0) * read_gbs) * 1e3 for p in memory
                      if p.get("flop_per_byte"))
        out.append(f"- memory-bound ({len(memory)} kernels, < {balance:.1f} FLOP/byte): {ms:.1f} ms, "
                   f"{100 * roof_ms / max(ms, 1e-9):.0f}% of their roofline bound (intensity x {read_gbs:.0f} GB/s)")
    return [""] + out

def markdown(results: list[dict], meta: dict) -> str:
    L = ["# Host benchmark: SIGE artifact (TVM) vs onnxruntime dense", "",
         f"- machine: {meta['machine']}", f"- date: {meta['date']}", f"- threads: {meta['threads']} (TVM_NUM_THREADS, "
         f"ORT intra-op); TVM {meta['tvm']}, onnxruntime {meta['ort']}",
         f"- command: `{meta['command']}`",
         f"- fp32 peak: {meta['peak_gflops']:.0f} GFLOP/s (register-only FMA loop compiled by TVM, "
         f"`python -m sige_export.tvm_schedules.bench peak`, best of before and after the models)" if meta.get("peak_gflops")
         else "- fp32 peak: not measured",
         f"- streaming read bandwidth: {meta['read_gbs']:.1f} GB/s (`... bench bandwidth`); machine balance "
         f"{meta['peak_gflops'] / meta['read_gbs']:.1f} FLOP/byte" if meta.get("read_gbs") else "- read bandwidth: not measured",
         "- edit = the artifact's edit pass (median); e2e = mask -> indices -> edit (Engine.edit); "
         "speedups = ORT dense / edit; MACs ratio = dense MACs / edit MACs; blob masks", ""]
    L += ["| model | ORT dense ms | TVM prime ms | prime/ORT | edited area | blocks | edit ms | ORT/edit | ORT/edit e2e "
          "| e2e path | MACs ratio | goal |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in results:
        for k, e in enumerate(r["edits"]):
            head = (f"| {r['model']} | {r['ort_dense_ms']:.0f} | {r['prime_ms']:.0f} | {r['prime_over_ort']:.2f}x"
                    if k == 0 else "| | | | ")
            goal = f">= {e['goal']}x {'met' if e['speedup_vs_ort'] >= e['goal'] else 'NOT met'}" if "goal" in e else ""
            L.append(f"{head} | {e['area'] * 100:.1f}% | {e['blocks']} | {e['edit_ms']:.1f} | {e['speedup_vs_ort']:.2f}x | "
                     f"{e['speedup_e2e_vs_ort']:.2f}x | {e.get('e2e_mode', '')} | {e['macs_ratio']:.1f}x | {goal} |")
    L += ["", "TVM prime = steady state (third call of the process); the first call also page-faults the caches "
          "it allocates: " + ", ".join(f"{r['model']} {r['prime_first_call_ms']:.0f} ms" for r in results
                                       if r.get("prime_first_call_ms"))]
    L += ["", "e2e path: `dense` when the edit is above the crossover that `sige-export --target host` measured "
          "and stored in the artifact (runtime fallback): " + ", ".join(
              f"{r['model']} {r['crossover_ratio'] * 100:.0f}%" for r in results if r.get("crossover_ratio") is not None)]
    for r in results:
        if r.get("memory"):
            m = r["memory"]
            L += ["", f"## Memory ({r['model']}, edit at {r['edits'][0]['area'] * 100:.1f}%)", "",
                  f"- caches of one primed key: {m['caches_bytes'] / 2**20:.1f} MiB",
                  f"- peak RSS during an edit: {m['edit_peak_rss'] / 2**20:.0f} MiB; onnxruntime dense peak RSS "
                  f"{m['ort_dense_peak_rss'] / 2**20:.0f} MiB + caches = {(m['ort_dense_peak_rss'] + m['caches_bytes']) / 2**20:.0f} MiB"
                  f" -> {m['edit_peak_over_ort_plus_caches']:.2f}x (goal <= 1.5x)"]
    for r in results:
        prof = r.get("edit_profile")
        if isinstance(prof, dict):
            prof = prof.get("edit")
        if not prof:
            continue
        convs = [p for p in prof if p["gflops"]]
        tot = sum(p["ms"] for p in prof if not p["name"].startswith("vm."))
        cms = sum(p["ms"] for p in convs)
        peak = meta.get("peak_gflops")
        overall = sum(p['gflop'] for p in convs) / max(cms, 1e-9) * 1e3
        pct = (lambda g: f"{100 * g / peak:.0f}%" if peak and g else "")
        in70 = sum(p["ms"] for p in convs if peak and p["gflops"] >= 0.7 * peak)
        L += ["", f"## Edit-pass kernels, {r['model']} at {r['edits'][0]['area'] * 100:.1f}% (instrumented run)", "",
              f"conv/matmul kernels {cms:.1f} ms of {tot:.1f} ms; {overall:.1f} GFLOP/s overall"
              + (f" = {pct(overall)} of the {peak:.0f} GFLOP/s peak; {100 * in70 / max(cms, 1e-9):.0f}% of the conv time "
                 f"in kernels at >= 70% of peak" if peak else "") + " (per-layer numbers in the JSON)"]
        L += roofline_lines(convs, peak, meta.get("read_gbs"))
        L += ["", "| function | calls | ms | GFLOP/s | of peak | FLOP/byte | shapes (first call) |",
              "|---|---:|---:|---:|---:|---:|---|"]
        for p in prof[:15]:
            shapes = " ".join(p.get("shapes", []))
            fpb = f"{p['flop_per_byte']:.1f}" if p.get("flop_per_byte") else ""
            L.append(f"| {p['name']} | {p['calls']} | {p['ms']:.2f} | {p['gflops'] or 0:.1f} | {pct(p['gflops'])} | {fpb} "
                     f"| {shapes} |")
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ddpm-church256", "gaugan-cityscapes", "gancomp-gaugan"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.012, 0.05, 0.15, 0.33, 0.66])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--edit-reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/sige-bench-zoo"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results-host")
    ap.add_argument("--rebuild", action="store_true",
                    help="rebuild the SIGE programs and artifacts (after a compiler change)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--profile-prime", action="store_true")
    ap.add_argument("--memory", nargs="*", default=["ddpm-church256"], help="models whose memory is measured")
    ap.add_argument("--memory-child", choices=["ort", "tvm"], help=argparse.SUPPRESS)
    ap.add_argument("--model-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    if a.memory_child:
        print(json.dumps(memory_child(a.memory_child, a.models[0], a.workdir, a.threads, a.ratios[0])))
        return

    def log(s):
        print(f"  [{s}]", flush=True)

    if a.model_child:
        print(RESULT + json.dumps(bench_model(a.model_child, a, log)), flush=True)
        return

    import onnxruntime as ort
    import tvm

    from sige_export.tvm_schedules.bench import peak_gflops, read_bandwidth_gbs

    meta = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": a.threads,
            "tvm": tvm.__version__, "ort": ort.__version__, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "peak_gflops": peak_gflops(a.threads), "read_gbs": read_bandwidth_gbs(a.threads)}
    log(f"fp32 FMA peak ({a.threads} threads): {meta['peak_gflops']:.0f} GFLOP/s; "
        f"streaming read {meta['read_gbs']:.1f} GB/s")
    results = []
    child_argv = list(argv if argv is not None else sys.argv[1:])
    for model in a.models:
        r = bench_in_child(model, a, child_argv, log)
        if model in (a.memory or []):
            r["memory"] = memory(model, a, log)
        results.append(r)
        write_report(a.out, results, meta)
    # the roofs again, after the models: the machine is shared and a disturbed measurement halves them
    meta["peak_gflops"] = max(meta["peak_gflops"], peak_gflops(a.threads))
    meta["read_gbs"] = max(meta["read_gbs"], read_bandwidth_gbs(a.threads))
    log(f"roofs (best of before and after): {meta['peak_gflops']:.0f} GFLOP/s, {meta['read_gbs']:.1f} GB/s")
    write_report(a.out, results, meta)
    print(markdown(results, meta))


def write_report(out: Path, results: list[dict], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, meta))


if __name__ == "__main__":
    main()
