"""Micro-benchmarks of the CPU schedules vs onnxruntime (2 threads each):

    python -m sige_export.tvm_schedules.bench [dense] [sparse] [peak] [bandwidth] [--target host] [--threads 2]

(a) dense 3x3 conv 128->128 at 64x64 (+bias): TVM (Conv2dNCHW rule) vs onnxruntime Conv.
(b) SigeSparseConv2d 128->128 over ~60 blocks of 6x6 (+bias): TVM vs onnxruntime Conv on the
    already-gathered blocks [N, 128, 6, 6] (a lower bound for ORT: the gather itself is free there)
    and vs onnxruntime running the op's ONNX function body.
GFLOP/s count 2*Cin*Cout*9 per output pixel.
(c) ``peak``: the machine's fp32 FMA peak as TVM reaches it (:func:`peak_gflops`), the yardstick of the
    per-layer "% of peak" in the benchmarks.
(d) ``bandwidth``: streaming DRAM read bandwidth (:func:`read_bandwidth_gbs`), the memory roof of the
    benchmarks' per-kernel roofline.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, inits):
    g = helper.make_graph(nodes, "bench", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.sige", 1)])
    m.ir_version = 10
    return m


def _ort(model, feeds, threads, reps=30):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = s.run(None, feeds)[0]
    for _ in range(5):
        s.run(None, feeds)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return out, float(np.median(ts))


def _roof_kernel(target: str, threads: int, body):
    """Compile ``acc[p, k, v] = sum_r body(r)(p, k, v)`` (``body(lanes)`` returns the placeholders and the
    reduction) with one thread per ``p`` and the ``k x v`` accumulators in vector registers; returns
    ``(function, placeholders, accumulator shape)``."""
    import tvm
    from tvm import s_tir, te

    from sige_export.targets import get as get_target
    from sige_export.tvm_schedules.cpu import vector_lanes

    tgt = get_target(target).tvm_target()
    placeholders, shape, value = body(vector_lanes(tgt))
    y = te.compute(shape, value, name="acc")
    sch = s_tir.Schedule(te.create_prim_func(list(placeholders) + [y]))
    blk = sch.get_sblock("acc")
    cache = sch.cache_write(blk, 0, "local")
    p, k, v, rr = sch.get_loops(blk)
    sch.reorder(p, rr, k, v)
    sch.reverse_compute_at(cache, p)
    sch.parallel(p)
    sch.unroll(k)
    sch.vectorize(v)
    sch.decompose_reduction(blk, rr)
    return tvm.compile(sch.mod, target=tgt)["main"], placeholders, shape


def _best_seconds(f, args, reps: int = 5) -> float:
    """The best of ``reps`` timed calls after one warm-up: a roof (the machine is shared)."""
    f(*args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_gflops(threads: int = 2, target: str = "host", accumulators: int = 12, steps: int = 1 << 20) -> float:
    """fp32 GFLOP/s of a register-only FMA loop compiled by TVM for ``target`` (one independent chain per
    thread of ``accumulators`` vector registers, no memory traffic in the loop): the practical peak."""
    import tvm
    from tvm import te

    def body(lanes):
        x = te.placeholder((threads, accumulators, lanes), "float32", name="x")
        w = te.placeholder((steps,), "float32", name="w")
        r = te.reduce_axis((0, steps), name="r")
        return (x, w), (threads, accumulators, lanes), lambda p, k, v: te.sum(x[p, k, v] * w[r], axis=r)

    f, (x, w), shape = _roof_kernel(target, threads, body)
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(rng.standard_normal([int(d) for d in t.shape]).astype(np.float32) * 1e-3, dev)
            for t in (x, w)] + [tvm.runtime.empty(shape, "float32", dev)]
    return 2.0 * threads * accumulators * shape[-1] * steps / _best_seconds(f, args) / 1e9


def read_bandwidth_gbs(threads: int = 2, target: str = "host", mib: int = 512) -> float:
    """GB/s of a parallel vectorised sum over a ``mib`` MiB float32 array (far larger than the caches) compiled
    by TVM for ``target``: the streaming DRAM read bandwidth, the other roof of the per-kernel roofline."""
    import tvm
    from tvm import te

    acc = 8  # independent vector accumulators per thread

    def body(lanes):
        rows = (mib << 20) // 4 // (threads * acc * lanes)
        x = te.placeholder((threads, rows, acc, lanes), "float32", name="x")
        r = te.reduce_axis((0, rows), name="r")
        return (x,), (threads, acc, lanes), lambda p, k, v: te.sum(x[p, r, k, v], axis=r)

    f, (x,), shape = _roof_kernel(target, threads, body)
    dev = tvm.cpu()
    a = tvm.runtime.tensor(np.ones([int(d) for d in x.shape], np.float32), dev)
    nbytes = 4 * int(np.prod([int(d) for d in x.shape]))
    return nbytes / _best_seconds(f, [a, tvm.runtime.empty(shape, "float32", dev)]) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("which", nargs="*", default=["dense", "sparse"])
    ap.add_argument("--target", default="host")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", "2")))
    ap.add_argument("--blocks", type=int, default=60)
    a = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(a.threads))
    if "peak" in a.which:
        print(f"(c) fp32 FMA peak ({a.threads} threads, TVM, {a.target}): {peak_gflops(a.threads, a.target):.0f} GFLOP/s")
    if "bandwidth" in a.which:
        print(f"(d) streaming read bandwidth ({a.threads} threads, TVM, {a.target}): "
              f"{read_bandwidth_gbs(a.threads, a.target):.1f} GB/s")
    from sige_export import custom_ops
    from sige_export.compiler import compile_program

    rng = np.random.default_rng(0)
    C = Co = 128
    H = W = 64
    w = (rng.standard_normal((Co, C, 3, 3)) * 0.05).astype(np.float32)
    b = rng.standard_normal(Co).astype(np.float32)
    x = rng.standard_normal((1, C, H, W)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    xin = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])
    if "dense" in a.which:
        m = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], [xin], inits)
        t0 = time.time()
        lib = compile_program(m, a.target, {"x": (1, C, H, W)})
        ct = time.time() - t0
        ref, tort = _ort(m, {"x": x}, a.threads)
        err = float(np.abs(lib.run(x) - ref).max())
        tt = lib.time(x, number=20, repeat=5)
        fl = 2 * C * Co * 9 * H * W
        print(f"(a) dense conv3x3 {C}->{Co} @{H}x{W}: TVM {tt * 1e3:.2f} ms = {fl / tt / 1e9:.1f} GFLOP/s | "
              f"ORT {tort * 1e3:.2f} ms = {fl / tort / 1e9:.1f} GFLOP/s | TVM/ORT speed {tort / tt:.2f}x | "
              f"max err {err:.1e} | compile {ct:.1f}s | rules {sorted({r for _, r, _ in lib.schedule_log})}")
    if "sparse" in a.which:
        hs = list(range(-1, H, 4))
        cells = [(h, v) for h in hs for v in hs]
        pick = np.sort(rng.choice(len(cells), a.blocks, replace=False))
        idx = np.array([cells[i] for i in pick], np.int32)
        N = idx.shape[0]
        node = custom_ops.make_node("SigeSparseConv2d", ["x", "idx", "w", "b"], ["y"], block=[6, 6], strides=[1, 1])
        iin = helper.make_tensor_value_info("idx", TensorProto.INT32, ["N", 2])
        m = _model([node], [xin, iin], inits)
        t0 = time.time()
        lib = compile_program(m, a.target, {"x": (1, C, H, W)})
        ct = time.time() - t0
        want = custom_ops.reference("SigeSparseConv2d", x, idx, w, b, block=[6, 6], strides=[1, 1])
        err = float(np.abs(lib.run(x, idx) - want).max())
        tt = lib.time(x, idx, number=50, repeat=5)
        fl = 2 * C * Co * 9 * 16 * N
        g = custom_ops.reference("SigeGather", x, idx, block=[6, 6]).astype(np.float32)
        mo = _model([helper.make_node("Conv", ["g", "w", "b"], ["y"])],
                    [helper.make_tensor_value_info("g", TensorProto.FLOAT, [N, C, 6, 6])], inits)
        _, tort = _ort(mo, {"g": g}, a.threads)
        line = (f"(b) SigeSparseConv2d {C}->{Co}, N={N} blocks 6x6: TVM {tt * 1e3:.3f} ms = {fl / tt / 1e9:.1f} GFLOP/s"
                f" | ORT Conv on pre-gathered blocks {tort * 1e3:.3f} ms = {fl / tort / 1e9:.1f} GFLOP/s"
                f" (TVM/ORT speed {tort / tt:.2f}x)")
        try:
            mb = custom_ops.attach_functions(onnx.ModelProto.FromString(m.SerializeToString()))
            _, tb = _ort(mb, {"x": x, "idx": idx}, a.threads)
            line += f" | ORT on the ONNX function body {tb * 1e3:.3f} ms = {fl / tb / 1e9:.1f} GFLOP/s ({tb / tt:.2f}x)"
        except Exception as e:  # the body may not be available
            line += f" | ORT function body: n/a ({type(e).__name__})"
        print(line + f" | max err {err:.1e} | compile {ct:.1f}s")
        for n in (0, 1, 30, 120):
            sel = np.array([cells[i] for i in np.sort(rng.choice(len(cells), n, replace=False))], np.int32).reshape(-1, 2)
            t = lib.time(x, sel, number=20, repeat=3)
            print(f"    same module, N={n}: {t * 1e3:.3f} ms" + (f" = {2 * C * Co * 9 * 16 * n / t / 1e9:.1f} GFLOP/s" if n else ""))


if __name__ == "__main__":
    main()
