"""Per-PrimFunc profile of a host artifact's passes (Relax VM instrumentation): time and GFLOP/s.

Used by ``bench_tvm_zoo.py`` and ``perf/ab_edit.py``.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


RUNS = 3


def profile_passes(art_path: Path, feeds: dict, edit_full: dict, manifest: dict, threads: int, top: int,
             passes=("prime", "edit"), quiet: bool = False) -> dict:
    """Per-PrimFunc profile of the prime and edit executables (Relax VM instrumentation, the median of ``RUNS``
    instrumented runs per function); returns
    ``{pass: [{"name", "ms", "calls", "gflop", "gflops", "shapes", "flop_per_byte"}]}`` (every function, slowest
    first; ``flop_per_byte``: :func:`kernel_flops` over :func:`kernel_bytes`, conv, matmul and attention calls)."""
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
            # a working copy (edit pass) starts as a copy of its cache; tvm.runtime.tensor copies
            args = [tvm.runtime.tensor(_aligned(np.asarray(fd[i.get("cache", i["name"])], dtype=i["dtype"])), tvm.cpu())
                    for i in entry["inputs"]] + [tvm.runtime.tensor(_aligned(weights[p].copy()), tvm.cpu())
                                                 for p in entry["params"]]
            for _ in range(2):  # the pooled allocator is warm after two calls: no first-touch page faults timed
                vm["main"](*args)
            agg: dict[str, list] = {}
            state = {}

            def instrument(func, sym, before, ret, *cargs):
                if before:
                    state["t"] = time.perf_counter()
                    return 0
                dt = time.perf_counter() - state["t"]
                a = agg.setdefault(sym, [0.0, 0, 0.0, _arg_shapes(cargs), 0.0])
                a[0] += dt
                a[1] += 1
                a[2] += kernel_flops(sym, cargs)
                a[4] += kernel_bytes(sym, cargs)
                return 0

            # the median of RUNS instrumented runs per function (the machine is shared: one run is noisy)
            runs: list[dict[str, list]] = []
            walls = []
            vm.set_instrument(instrument)
            for _ in range(RUNS):
                agg.clear()
                t0 = time.perf_counter()
                vm["main"](*args)
                walls.append(time.perf_counter() - t0)
                runs.append({k: list(v) for k, v in agg.items()})
            vm.set_instrument(None)
            wall = float(np.median(walls))
            agg = {k: [float(np.median([r[k][0] for r in runs if k in r]))] + v[1:] for k, v in runs[0].items()}
            total = sum(v[0] for k, v in agg.items() if not k.startswith("vm."))
            result[pname] = [{"name": k, "ms": v[0] * 1e3, "calls": v[1], "gflop": v[2] / 1e9,
                              "gflops": (v[2] / v[0] / 1e9) if v[2] and v[0] else None, "shapes": v[3],
                              "flop_per_byte": (v[2] / v[4]) if v[2] and v[4] else None}
                             for k, v in sorted(agg.items(), key=lambda kv: -kv[1][0])]
            if quiet:
                continue
            print(f"\n[{pname}] per-function (instrumented run {wall * 1e3:.1f} ms, kernels {total * 1e3:.1f} ms, "
                  f"{len(agg)} functions); top {top}:")
            for name, (sec, cnt, fl, _, _) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
                gf = f"{fl / sec / 1e9:7.1f} GFLOP/s" if fl else " " * 15
                print(f"  {sec * 1e3:9.3f} ms {100 * sec / max(total, 1e-12):5.1f}%  x{cnt:<3d} {gf}  {name}")
    return result


def _arg_shapes(args) -> list:
    """Argument shapes of one call (first call of a function) as ``"1x128x64x64"`` strings, for the report."""
    try:
        return ["x".join(str(int(d)) for d in a.shape) for a in args if hasattr(a, "shape")]
    except Exception:
        return []


def _shapes(args) -> list[tuple[int, ...]]:
    try:
        return [tuple(int(d) for d in a.shape) for a in args if hasattr(a, "shape")]
    except Exception:
        return []


def _conv_weight(shapes) -> tuple[int, int, int, int] | None:
    """(input channels per group, kh, kw, weight elements) of a conv call's weight (destination-passing)."""
    out = shapes[-1]
    for s in shapes[:-1]:
        if len(s) == 4 and s[0] == out[1] and s != out:
            return s[1], s[2], s[3], int(np.prod(s))
        if len(s) == 5 and s[0] * s[4] == out[1]:  # pre-packed [Cout/v, Cin, kh, kw, v]
            return s[1], s[2], s[3], int(np.prod(s))
    return None


def kernel_bytes(sym: str, args) -> float:
    """The least bytes a conv / matmul call moves: for a conv each output tile's input window
    (``(oh + kh - 1) x (ow + kw - 1)`` per image or block; depthwise when the weight has one input channel),
    its output and the weights once; for a matmul its operands and result. With :func:`kernel_flops` it
    gives the call's arithmetic intensity, which places it under the compute or the memory roof."""
    shapes = _shapes(args)
    if not shapes:
        return 0.0
    out = shapes[-1]
    if "conv" in sym and len(out) == 4:
        w = _conv_weight(shapes)
        if w is None:
            return 0.0
        cin_g, kh, kw, wel = w
        cin = out[1] if cin_g == 1 else cin_g
        return 4.0 * (out[0] * cin * (out[2] + kh - 1) * (out[3] + kw - 1) + int(np.prod(out)) + wel)
    if ("matmul" in sym and len(shapes) >= 2) or _is_attention(sym, shapes):
        return 4.0 * sum(int(np.prod(s)) for s in shapes)
    return 0.0


def kernel_flops(sym: str, args) -> float:
    """FLOPs of a conv / matmul / attention call from its argument shapes (destination-passing: output last)."""
    shapes = _shapes(args)
    if not shapes:
        return 0.0
    out = shapes[-1]
    nout = float(np.prod(out))
    if "conv" in sym and len(out) == 4:
        w = _conv_weight(shapes)
        return 2.0 * nout * w[0] * w[1] * w[2] if w else 0.0
    if "matmul" in sym and len(shapes) >= 2:
        return 2.0 * nout * shapes[0][-1]
    if _is_attention(sym, shapes):  # q @ k^T and probs @ v; the softmax's exp not counted
        q, k, v = shapes[:3]
        return 2.0 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])
    return 0.0


def _is_attention(sym: str, shapes) -> bool:
    """A fused attention call (``sige_te.attention_te``): q [B, H, M, D], k [B, H, N, D], v, out."""
    return "attention" in sym and len(shapes) == 4 and all(len(s) == 4 for s in shapes)
