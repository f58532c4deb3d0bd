"""The compiled ai.sige kernels never read outside their buffers: every float input is placed flush against an
unreadable guard page (once at its start, once at its end) and every block of the grid, the border ones
included, is gathered / scattered. A stray read is a segfault, so the kernels run in a child process
(``python -m tests.test_tvm_bounds``); each case is also compared with the numpy reference."""
from __future__ import annotations

import ctypes
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
pytestmark = pytest.mark.skipif(not hasattr(mmap, "PROT_READ"), reason="guard pages need POSIX mmap/mprotect")

ROOT = Path(__file__).resolve().parents[1]
B, C, H, W = 1, 16, 14, 18  # C: one vector of channels (depthwise path); blocks cross every border; every buffer a multiple of 64 bytes
_PROT_NONE = 0
_keep: list = []  # the mappings stay alive while the kernels run


def guarded(a: np.ndarray, at_end: bool) -> np.ndarray:
    """A copy of ``a`` whose first (or last) byte borders a ``PROT_NONE`` page."""
    page = mmap.PAGESIZE
    span = -(-a.nbytes // page) * page
    buf = mmap.mmap(-1, span + 2 * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for addr in (base, base + page + span):
        if libc.mprotect(addr, page, _PROT_NONE):
            raise OSError(ctypes.get_errno(), "mprotect")
    offset = page + (span - a.nbytes if at_end else 0)
    out = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=offset).reshape(a.shape)
    out[...] = a
    _keep.append(buf)
    return out


def _cases():
    from onnx import TensorProto, helper

    from sige_export import custom_ops
    from sige_export.mask import scatter_map
    from tests.sige_tvm_cases import grid_indices, init, make_model, ref_conv, vi

    rng = np.random.default_rng(7)

    def f(*s):
        return rng.standard_normal(s).astype(np.float32)

    idx_vi = vi("idx", ["N", 2], TensorProto.INT32)
    gidx = grid_indices(H, W, (6, 6), (4, 4), (1, 1), rng, 10 ** 6)  # every block of the grid
    sidx = gidx[(gidx[:, 0] + 1 < H) & (gidx[:, 1] + 1 < W)]  # 4 x 4 scatter blocks that land in the image
    smap = scatter_map((H, W), sidx, [1, 1], [1, 1], (4, 4))
    x, sc, sh = f(B, C, H, W), f(1, C, 1, 1), f(1, C, 1, 1)
    blocks = f(B * len(sidx), C, 4, 4)
    pre = dict(block=[6, 6], activation="silu")

    node = custom_ops.make_node("SigeGather", ["x", "idx", "sc", "sh"], ["y"], **pre)
    yield ("SigeGather", make_model([node], [vi("x", [B, C, H, W]), idx_vi, vi("sc", [1, C, 1, 1]), vi("sh", [1, C, 1, 1])],
                                     [vi("y", None)]), {"x": (B, C, H, W)}, [x, gidx, sc, sh],
           custom_ops.reference("SigeGather", x, gidx, sc, sh, **pre))

    w = f(C, C, 3, 3) * 0.2
    node = custom_ops.make_node("SigeSparseConv2d", ["x", "idx", "w", "", "sc", "sh"], ["y"], **pre)
    yield ("SigeSparseConv2d", make_model([node], [vi("x", [B, C, H, W]), idx_vi, vi("sc", [1, C, 1, 1]),
                                                   vi("sh", [1, C, 1, 1])], [vi("y", None)], [init("w", w)]),
           {"x": (B, C, H, W)}, [x, gidx, sc, sh],
           custom_ops.reference("SigeSparseConv2d", x, gidx, w, None, sc, sh, **pre))

    # frames resized from a smaller / larger x (upsample 2, downsample 2), padded by reflection or the border:
    # every block of the frame's grid
    for up, down, padding in (((2, 2), (1, 1), "zeros"), ((1, 1), (2, 2), "zeros"), ((1, 1), (1, 1), "reflect"),
                              ((2, 2), (1, 1), "edge")):
        xs = f(B, C, H * down[0] // up[0], W * down[1] // up[1])
        rs = dict(block=[6, 6], activation="silu", upsample=list(up), downsample=list(down), padding_mode=padding)
        node = custom_ops.make_node("SigeSparseConv2d", ["x", "idx", "w", "", "sc", "sh"], ["y"], **rs)
        yield (f"SigeSparseConv2d up{up[0]} down{down[0]} {padding}",
               make_model([node], [vi("x", list(xs.shape)), idx_vi, vi("sc", [1, C, 1, 1]), vi("sh", [1, C, 1, 1])],
                          [vi("y", None)], [init("w", w)]),
               {"x": xs.shape}, [xs, gidx, sc, sh], custom_ops.reference("SigeSparseConv2d", xs, gidx, w, None, sc, sh, **rs))

    # the next conv of a residual block; a depthwise conv (cpu.depthwise_blocks); a pointwise one
    for group, k in ((1, 3), (C, 3), (1, 1)):
        w = f(C, C // group, k, k) * 0.2
        pre = dict(block=[k + 3, k + 3], activation="silu")
        nodes = [custom_ops.make_node("SigeScatterGather", ["blocks", "base", "smap", "idx", "sc", "sh"], ["g"], **pre),
                 helper.make_node("Conv", ["g", "w"], ["y"], group=group)]
        inputs = [vi("blocks", ["BN1", C, 4, 4]), vi("base", [B, C, H, W]), vi("smap", [H, W], TensorProto.INT32),
                  idx_vi, vi("sc", [1, C, 1, 1]), vi("sh", [1, C, 1, 1])]
        # 1x1: also the windows of the scattered blocks' own grid (whole blocks, all base, crossing the border)
        windows = np.concatenate([gidx, gidx + 1]).astype(np.int32) if k == 1 else gidx
        g = custom_ops.reference("SigeScatterGather", blocks, x, smap, windows, sc, sh, **pre)
        yield (f"conv{k}x{k}(SigeScatterGather) group={group}", make_model(nodes, inputs, [vi("y", None)], [init("w", w)]),
               {"blocks": ("BN1", C, 4, 4)}, [blocks, x, smap, windows, sc, sh], ref_conv(g, w, group=group))

    node = custom_ops.make_node("SigeScatter", ["blocks", "base", "idx"], ["y"], offset=[1, 1], stride=[1, 1])
    yield ("SigeScatter", make_model([node], [vi("blocks", ["BN1", C, 4, 4]), vi("base", [B, C, H, W]), idx_vi],
                                     [vi("y", None)]), {"blocks": ("BN1", C, 4, 4)}, [blocks, x, sidx],
           custom_ops.reference("SigeScatter", blocks, x, sidx, offset=[1, 1], stride=[1, 1]))

    mean = f(B, 4, 1)
    attrs = dict(offset=[1, 1], stride=[1, 1], groups=4)
    node = custom_ops.make_node("SigeScatterMoments", ["blocks", "base", "idx", "mean"], ["y"], **attrs)
    yield ("SigeScatterMoments", make_model([node], [vi("blocks", ["BN1", C, 4, 4]), vi("base", [B, C, H, W]), idx_vi,
                                                     vi("mean", [B, 4, 1])], [vi("y", None)]),
           {"blocks": ("BN1", C, 4, 4)}, [blocks, x, sidx, mean],
           custom_ops.reference("SigeScatterMoments", blocks, x, sidx, mean, **attrs))

    tidx = grid_indices(H, W, (4, 4), (4, 4), (1, 1), rng, 10 ** 6)
    old = f(B, C, H, W)
    node = custom_ops.make_node("SigeTileMoments", ["x", "old", "idx", "mean"], ["y"], block=[4, 4], groups=4)
    yield ("SigeTileMoments", make_model([node], [vi("x", [B, C, H, W]), vi("old", [B, C, H, W]), idx_vi,
                                                  vi("mean", [B, 4, 1])], [vi("y", None)]),
           {"x": (B, C, H, W), "old": (B, C, H, W)}, [x, old, tidx, mean],
           custom_ops.reference("SigeTileMoments", x, old, tidx, mean, block=[4, 4], groups=4))


def main() -> None:
    import tvm

    from sige_export.compiler import compile_program
    from tests.helpers import assert_close

    for name, model, shapes, args, want in _cases():
        lib = compile_program(model, "host", shapes)
        dev = tvm.cpu()
        for at_end in (False, True):
            print(f"{name} (inputs flush against a guard page at their {'end' if at_end else 'start'})", flush=True)
            tensors = [tvm.runtime.from_dlpack(guarded(a, at_end)) if a.dtype == np.float32 and a.ndim == 4
                       else tvm.runtime.tensor(a, dev) for a in args]
            got = lib.vm()["main"](*tensors).numpy()
            assert_close(got, want, rtol=1e-4, atol=1e-4, what=name)
    print("all in bounds")


def test_kernels_read_only_their_buffers():
    r = subprocess.run([sys.executable, "-m", "tests.test_tvm_bounds"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    last = r.stdout.strip().splitlines()[-1:] or ["(nothing printed)"]
    assert r.returncode == 0, f"exit {r.returncode} during: {last[0]}\n{r.stderr[-3000:]}"
    assert last == ["all in bounds"], r.stdout


if __name__ == "__main__":
    main()
