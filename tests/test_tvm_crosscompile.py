"""Cross-compilation artifacts: m1 -> tar of Mach-O arm64 objects; rtx3090/rtx2080ti/h100 -> cubin for
sm_86/sm_75/sm_90 via NVRTC (skipped with a reason when NVRTC is missing); host -> .so that runs in a
fresh process with the TVM runtime only. GPU execution is skipped without a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from onnx import TensorProto, helper

from sige_export import custom_ops
from sige_export.compiler import compile_program, cubin_arch, macho_arm64
from sige_export.targets import get
from tests.helpers import assert_close
from tests.sige_tvm_cases import grid_indices, init, make_model, vi

C, H, W = 8, 12, 12
RNG = np.random.default_rng(7)
WEIGHT = (RNG.standard_normal((8, C, 3, 3)) * 0.3).astype(np.float32)


def _model():
    nodes = [helper.make_node("Relu", ["x"], ["xr"]),
             custom_ops.make_node("SigeSparseConv2d", ["xr", "idx", "w"], ["c"], block=[6, 6], strides=[1, 1]),
             helper.make_node("Sigmoid", ["c"], ["y"])]
    return make_model(nodes, [vi("x", [1, C, H, W]), vi("idx", ["N", 2], TensorProto.INT32)], [vi("y", None)],
                      [init("w", WEIGHT)])


def _expected(x, idx):
    c = custom_ops.reference("SigeSparseConv2d", np.maximum(x, 0), idx, WEIGHT, block=[6, 6], strides=[1, 1])
    return 1 / (1 + np.exp(-c))


def test_m1_archive_is_macho_arm64(tmp_path):
    lib = compile_program(_model(), "m1", {"x": (1, C, H, W)})
    with pytest.raises(ValueError):
        lib.export_library(tmp_path / "m1.so")
    path = lib.export_library(tmp_path / "m1.tar")
    with tarfile.open(path) as tf:
        objs = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    assert objs, "empty archive"
    for name, data in objs:
        assert name.endswith(".o")
        assert macho_arm64(data), f"{name}: not Mach-O arm64 (magic/cputype {data[:8].hex()})"


@pytest.mark.parametrize("target,arch", [("rtx3090", "sm_86"), ("rtx2080ti", "sm_75"), ("h100", "sm_90")])
def test_cuda_cubin_arch(tmp_path, target, arch):
    spec = get(target)
    missing = spec.missing_toolchain()
    if missing:
        pytest.skip(f"{target}: {missing} not installed (pip install 'sige-export[cuda]')")
    lib = compile_program(_model(), target, {"x": (1, C, H, W)})
    assert any(r == "cuda.sige" for _, r, _ in lib.schedule_log), lib.schedule_log
    bins = lib.device_binaries("cubin")
    assert bins and all(cubin_arch(b) == arch for b in bins), [cubin_arch(b) for b in bins]
    ptx = lib.device_binaries("ptx")
    assert any(f".target {arch}".encode() in p for p in ptx)
    so = lib.export_library(tmp_path / f"{target}.so")
    assert so.read_bytes()[:4] == b"\x7fELF"
    cubins = sorted(tmp_path.glob(f"{target}.{arch}.*.cubin"))
    assert cubins and cubin_arch(cubins[0].read_bytes()) == arch


def test_cuda_compiles_the_moment_ops():
    """The statistics ops (concat parts read in place, per-channel shift) get the cuda.sige schedule and cubin."""
    spec = get("rtx3090")
    missing = spec.missing_toolchain()
    if missing:
        pytest.skip(f"rtx3090: {missing} not installed (pip install 'sige-export[cuda]')")
    g = 4
    nodes = [helper.make_node("Concat", ["a", "b"], ["new"], axis=1),
             helper.make_node("Concat", ["oa", "ob"], ["old"], axis=1),
             custom_ops.make_node("SigeTileMoments", ["new", "old", "tiles", "mean"], ["t"], block=[4, 4], groups=g),
             custom_ops.make_node("SigeScatterMoments", ["blocks", "base", "idx", "mean", "", "shift"], ["s"], groups=g)]
    parts = {k: (1, C // 2, H, W) for k in ("a", "b", "oa", "ob")}
    inputs = [vi(k, list(v)) for k, v in parts.items()] + [
        vi("tiles", ["T", 2], TensorProto.INT32), vi("mean", [1, g, 1]), vi("blocks", ["BN", C, 4, 4]),
        vi("base", [1, C, H, W]), vi("idx", ["N", 2], TensorProto.INT32), vi("shift", [1, C, 1, 1])]
    lib = compile_program(make_model(nodes, inputs, [vi("t", None), vi("s", None)]), "rtx3090",
                          {**parts, "blocks": ("BN", C, 4, 4)})
    assert {r for _, r, _ in lib.schedule_log} == {"cuda.sige"}, lib.schedule_log
    assert all(cubin_arch(b) == "sm_86" for b in lib.device_binaries("cubin"))


def _has_gpu():
    try:
        import tvm

        return tvm.cuda(0).exist
    except Exception:
        return False


@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU on this machine")
def test_cuda_runs_on_gpu():
    lib = compile_program(_model(), "rtx3090" if get("rtx3090").missing_toolchain() == [] else "h100",
                          {"x": (1, C, H, W)})
    x = RNG.standard_normal((1, C, H, W)).astype(np.float32)
    idx = grid_indices(H, W, (6, 6), (4, 4), (1, 1), RNG, 4)
    assert_close(lib.run(x, idx), _expected(x, idx), what="cuda")


RUNNER = textwrap.dedent("""
    import sys, numpy as np
    from sige_export.compiler import load_library
    lib = load_library(sys.argv[1])
    d = np.load(sys.argv[2])
    outs = {k: lib(d["x"], d["idx_" + k]) for k in ("a", "b", "a2")}
    assert "tvm" not in sys.modules, "the tvm compiler package was imported"
    np.savez(sys.argv[3], **outs)
""")



def test_host_so_runs_in_fresh_process(tmp_path):
    lib = compile_program(_model(), "host", {"x": (1, C, H, W)})
    so = lib.export_library(tmp_path / "host.so")
    x = RNG.standard_normal((1, C, H, W)).astype(np.float32)
    ia = grid_indices(H, W, (6, 6), (4, 4), (1, 1), RNG, 5)
    ib = grid_indices(H, W, (6, 6), (4, 4), (1, 1), RNG, 0)
    np.savez(tmp_path / "in.npz", x=x, idx_a=ia, idx_b=ib, idx_a2=ia[:2])
    (tmp_path / "runner.py").write_text(RUNNER)
    r = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(so), str(tmp_path / "in.npz"),
                        str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert_close(out["a"], _expected(x, ia), what="fresh process N=5")
    assert out["b"].shape == (0, 8, 4, 4)
    assert_close(out["a2"], _expected(x, ia[:2]), what="fresh process N=2")
