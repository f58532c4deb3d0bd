"""Dev: one edit-pass kernel of the zoo's shapes, compiled for the host alone and timed (best of 7 x 10 calls),
against its numpy reference once. Run it at two commits (or with a schedule change) to see what a change does to
one kernel; whole models: ab_edit.py.

    .venv/bin/python -W ignore benchmarks/perf/sparse_kernels.py KIND [--blocks N] [--layout blob|random]

KIND (ddpm-church256 / gancomp-gaugan shapes, 256x256 or 256x512 maps):
  gather-conv         3x3 conv 128 -> 128 over a GroupNorm+SiLU gather
  concat-conv         3x3 conv 256 -> 128 over the gathers of a skip concat (two 128-channel maps)
  blocks-conv         gather-conv's conv over blocks already in memory (81, no gather): its bound
  stride2-conv        3x3 stride-2 conv 128 -> 128 over a gather (2 x 2 outputs per block)
  scatter-gather-conv 3x3 conv 128 -> 128 over a scatter-gather (the second conv of a residual block)
  pointwise-sg-conv   1x1 conv 64 -> 48 over a scatter-gather (GAN Compression's separable convs)
  depthwise-sg-conv   3x3 depthwise conv, 64 channels, over a scatter-gather
  scatter-moments     SigeScatterMoments, 64 channels in 64 groups
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

KINDS = ("gather-conv", "concat-conv", "blocks-conv", "stride2-conv", "scatter-gather-conv", "pointwise-sg-conv",
         "depthwise-sg-conv", "scatter-moments")


def block_origins(h: int, w: int, n: int, layout: str, rng) -> np.ndarray:
    """``n`` origins of the 6x6 / stride-4 gather grid: a square of adjacent blocks (a blob edit) or random."""
    from tests.sige_tvm_cases import grid_indices

    if layout == "random":
        return grid_indices(h, w, (6, 6), (4, 4), (1, 1), rng, n)
    k = max(1, int(round(n ** 0.5)))
    h0, w0 = (h // 2) // 4 * 4 - 1, (w // 2) // 4 * 4 - 1
    return np.array([(h0 + 4 * a, w0 + 4 * b) for a in range(k) for b in range(k)], np.int32)


def case(kind: str, n: int, layout: str):
    """``(model, input shapes, packed weight inputs, arguments, reference output, FLOPs)``."""
    from onnx import TensorProto, helper

    from sige_export import custom_ops
    from sige_export.mask import scatter_map
    from sige_export.tvm_schedules.packing import pack_oihw
    from tests.sige_tvm_cases import init, make_model, ref_conv, vi

    rng = np.random.default_rng(0)

    def f(*s):
        return rng.standard_normal(s).astype(np.float32)

    idx_vi = vi("idx", ["N", 2], TensorProto.INT32)
    silu = dict(block=[6, 6], activation="silu")
    if kind in ("gather-conv", "stride2-conv", "concat-conv"):
        parts, co, hw = (2 if kind == "concat-conv" else 1), 128, 256
        s = 2 if kind == "stride2-conv" else 1
        attrs = dict(silu, block=[5, 5], strides=[2, 2]) if s == 2 else silu
        cin = 128 * parts
        w, bias = f(co, cin, 3, 3) * 0.05, f(co)
        names = ["a", "b"][:parts]
        if parts == 1:
            nodes = [custom_ops.make_node("SigeSparseConv2d", ["a", "idx", "w", "bias", "sa", "ta"], ["y"], **attrs)]
        else:  # the sparsifier's form for a skip concat: the importer fuses it into one sparse conv
            nodes = [custom_ops.make_node("SigeGather", [x, "idx", f"s{x}", f"t{x}"], [f"g{x}"], **silu)
                     for x in names]
            nodes += [helper.make_node("Concat", [f"g{x}" for x in names], ["g"], axis=1),
                      helper.make_node("Conv", ["g", "w", "bias"], ["y"])]
        inputs = [vi(x, [1, 128, hw, hw]) for x in names] + [idx_vi]
        inputs += [vi(f"{p}{x}", [1, 128, 1, 1]) for x in names for p in "st"] + [vi("w", [co // 16, cin, 3, 3, 16])]
        idx = block_origins(hw, hw, n, layout, rng)
        xs, st = [f(1, 128, hw, hw) for _ in names], [f(1, 128, 1, 1) for _ in range(2 * parts)]
        args = xs + [idx] + st + [pack_oihw(w, 16)]
        g = np.concatenate([custom_ops.reference("SigeGather", x, idx, st[2 * k], st[2 * k + 1], block=attrs["block"],
                                                 activation="silu") for k, x in enumerate(xs)], 1)
        want = ref_conv(g, w, bias, strides=(s, s))
        return (make_model(nodes, inputs, [vi("y", None)], [init("bias", bias)]),
                {x: (1, 128, hw, hw) for x in names}, ["w"], args, want, 2 * len(idx) * (16 // s ** 2) * co * cin * 9)
    if kind == "blocks-conv":
        w, bias = f(128, 128, 3, 3) * 0.05, f(128)
        m = make_model([helper.make_node("Conv", ["g", "w", "bias"], ["y"])],
                       [vi("g", [n, 128, 6, 6]), vi("w", [8, 128, 3, 3, 16])], [vi("y", None)], [init("bias", bias)])
        g = f(n, 128, 6, 6)
        return m, {"g": (n, 128, 6, 6)}, ["w"], [g, pack_oihw(w, 16)], ref_conv(g, w, bias), 2 * n * 16 * 128 * 128 * 9
    ho, wo, c = (256, 256, 128) if kind == "scatter-gather-conv" else (256, 512, 64)
    sidx = block_origins(ho - 4, wo - 4, n, layout, rng)
    smap = scatter_map((ho, wo), sidx, [1, 1], [1, 1], (4, 4))
    blocks, base = f(len(sidx), c, 4, 4), f(1, c, ho, wo)
    sg_inputs = [vi("blocks", ["BN1", c, 4, 4]), vi("base", [1, c, ho, wo]), vi("smap", [ho, wo], TensorProto.INT32),
                 idx_vi]
    if kind == "scatter-moments":
        attrs = dict(offset=[1, 1], stride=[1, 1], groups=c)
        m = make_model([custom_ops.make_node("SigeScatterMoments", ["blocks", "base", "idx", "mean"], ["y"], **attrs)],
                       [sg_inputs[0], sg_inputs[1], idx_vi, vi("mean", [1, c, 1])], [vi("y", None)])
        args = [blocks, base, sidx, f(1, c, 1)]
        return (m, {"blocks": ("BN1", c, 4, 4)}, [], args, custom_ops.reference("SigeScatterMoments", *args, **attrs),
                0)
    k, co, group = {"scatter-gather-conv": (3, 128, 1), "pointwise-sg-conv": (1, 48, 1),
                    "depthwise-sg-conv": (3, 64, 64)}[kind]
    attrs = dict(block=[k + 3, k + 3], activation="silu" if group == 1 else "identity")
    w, bias, sc, sh = f(co, c // group, k, k) * 0.1, f(co), f(1, c, 1, 1), f(1, c, 1, 1)
    packed = group == 1
    nodes = [custom_ops.make_node("SigeScatterGather", ["blocks", "base", "smap", "idx", "sc", "sh"], ["g"], **attrs),
             helper.make_node("Conv", ["g", "w", "bias"], ["y"], group=group)]
    inputs = sg_inputs + [vi("sc", [1, c, 1, 1]), vi("sh", [1, c, 1, 1])]
    inits = [init("bias", bias)]
    if packed:
        inputs.append(vi("w", [co // 16, c, k, k, 16]))
    else:
        inits.append(init("w", w))
    gidx = sidx + 1 if k == 1 else sidx  # pointwise: the 4 x 4 windows of the scattered blocks themselves
    args = [blocks, base, smap, gidx, sc, sh] + ([pack_oihw(w, 16)] if packed else [])
    g = custom_ops.reference("SigeScatterGather", blocks, base, smap, gidx, sc, sh, **attrs)
    return (make_model(nodes, inputs, [vi("y", None)], inits), {"blocks": ("BN1", c, 4, 4)},
            ["w"] if packed else [], args, ref_conv(g, w, bias, group=group), 2 * len(gidx) * 16 * co * c // group * k * k)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--blocks", type=int, default=81)
    ap.add_argument("--layout", choices=("blob", "random"), default="blob")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    from sige_export.compiler import compile_program
    from tests.helpers import assert_close

    model, shapes, packed, args, want, flops = case(a.kind, a.blocks, a.layout)
    lib = compile_program(model, "host", shapes, packed_weights=packed)
    assert_close(lib.run(*args), want, rtol=1e-3, atol=1e-3, what=a.kind)
    t = min(lib.time(*args, number=10, repeat=1) for _ in range(7))
    rules = sorted({r for _, r, s in lib.schedule_log if s == "ok"})
    rate = f", {flops / t / 1e9:.0f} GFLOP/s" if flops else ""
    print(f"{a.kind} ({a.layout} layout, about {a.blocks} blocks; {', '.join(rules)}): "
          f"{t * 1e6:.0f} us{rate}")


if __name__ == "__main__":
    main()
