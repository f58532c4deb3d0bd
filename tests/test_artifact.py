"""Compiled artifacts (sige_export.artifact): one file per (model, target).

* host artifact of every zoo family in ``FAMILIES`` (tiny variants): prime, dense and edit outputs equal the
  portable program in onnxruntime (<= 1e-4 relative), two masks with different block counts on one opened
  artifact (no recompilation);
* the host artifact runs in a fresh process where ``import torch`` is blocked and the ``tvm`` compiler
  package is never imported;
* m1 members are Mach-O arm64 objects; rtx3090 / rtx2080ti carry cubin for sm_86 / sm_75;
* errors: unknown target, missing NVRTC, corrupt / truncated members, target not runnable here,
  TVM version mismatch; atomic writes.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper

import sige_export
from sige_export import zoo
from sige_export.artifact import ArtifactError, build_artifact, open_artifact, read_manifest
from sige_export.compiler import cubin_arch, macho_arm64
from sige_export.edits import synthetic_mask
from sige_export.program import SigeProgram
from sige_export.runtime import Engine, OnnxRuntimeBackend
from sige_export.sparsify import SparsifyOptions, sparsify
from sige_export.targets import ToolchainError, get
from tests.helpers import assert_close_relative

ROOT = Path(__file__).resolve().parents[1]
# Every zoo family (tiny variants): compiling one for the host takes ~15-45 s on 2 cores.
FAMILIES = zoo.names()
REL = 1e-4


# ----------------------------------------------------------------------------- fixtures
def _zoo_program(name: str) -> SigeProgram:
    from sige_export.frontend import load_model, to_dense_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = to_dense_onnx(load_model(name, size="tiny"))
        result = sparsify(dense, SparsifyOptions(sparse_min_res=8))
    return SigeProgram(result.model, result.manifest)


def _small_program() -> SigeProgram:
    """Conv3x3 -> Relu -> Conv3x3 (+ residual) on 1x4x16x16: seconds to compile for any target."""
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((4, 8, 3, 3)) * 0.3).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "x"], ["y"])]
    g = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(b1, "b1")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    result = sparsify(m, SparsifyOptions(sparse_min_res=8))
    return SigeProgram(result.model, result.manifest)


@pytest.fixture(scope="module")
def zoo_artifacts(tmp_path_factory):
    """name -> (program, artifact path), built lazily once per module. Every scatter into a cache writes into
    a working copy (the size threshold that keeps small maps copying is lifted: tiny maps only here)."""
    from sige_export.tvm_schedules import importer

    cache: dict[str, tuple[SigeProgram, Path]] = {}
    root = tmp_path_factory.mktemp("zoo_artifacts")

    def get_(name: str):
        if name not in cache:
            program = _zoo_program(name)
            saved, importer.WORKING_COPY_MIN_BYTES = importer.WORKING_COPY_MIN_BYTES, 0
            try:
                path = build_artifact(program, "host", root / f"{name}.host.sige")
            finally:
                importer.WORKING_COPY_MIN_BYTES = saved
            cache[name] = (program, path)
        return cache[name]

    return get_


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    program = _small_program()
    path = build_artifact(program, "host", tmp_path_factory.mktemp("small") / "small.host.sige")
    return program, path


def _inputs(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in manifest["inputs"]:
        a = rng.standard_normal(i["shape"])
        out[i["name"]] = a.astype(i["dtype"]) if np.dtype(i["dtype"]).kind == "f" else np.abs(a).astype(i["dtype"])
    return out


def _edited(manifest: dict, feeds: dict, mask: np.ndarray) -> dict[str, np.ndarray]:
    src = manifest["mask"]["source"]
    x = feeds[src].copy()
    m = np.broadcast_to(mask, x.shape)
    x[m] = x[m] + 0.7
    return {**feeds, src: x}


def _compare_engines(program: SigeProgram, path: Path, ratios=(0.04, 0.15)):
    manifest, backend = open_artifact(path)
    ref = Engine(program, OnnxRuntimeBackend(program))
    got = Engine(program, backend)
    feeds = _inputs(manifest)
    # prime: the model output and every cache
    pr, pg = ref.backend.prime(feeds), got.backend.prime(feeds)
    assert set(pg) == set(pr)
    for k in pr:
        assert_close_relative(pg[k], pr[k], rel=REL, what=f"prime {k}")
    assert_close_relative(got.dense(**feeds), ref.dense(**feeds), rel=REL, what="dense")
    ref.prime(**feeds)
    got.prime(**feeds)
    res = tuple(manifest["mask"]["resolution"])
    counts = []
    for k, ratio in enumerate(ratios):
        mask = synthetic_mask("blob", res, ratio, seed=k + 1)
        edited = _edited(manifest, feeds, mask)
        want = ref.edit(**edited, mask=mask)
        have = got.edit(**edited, mask=mask)
        assert got.last_edit.mode == "sparse", got.last_edit
        assert_close_relative(have, want, rel=REL, what=f"edit ratio {ratio}")
        counts.append(dict(got.last_edit.blocks))
    # two masks, different block counts, one artifact (no recompilation: same backend object)
    assert counts[0] != counts[1] and sum(counts[0].values()) < sum(counts[1].values()), counts
    return manifest


# ----------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("name", FAMILIES)
def test_host_artifact_matches_onnxruntime(zoo_artifacts, name):
    program, path = zoo_artifacts(name)
    manifest = _compare_engines(program, path)
    art = manifest["artifact"]
    assert not any(s["unscheduled"] for s in art["schedules"].values()), art["schedules"]
    assert art["target"]["name"] == "host"
    # weights stored once and shared by both passes
    weights = {t["name"] for t in art["weights"]["tensors"]}
    assert set(art["passes"]["prime"]["params"]) <= weights and set(art["passes"]["edit"]["params"]) <= weights
    assert set(art["passes"]["prime"]["params"]) & set(art["passes"]["edit"]["params"])


def test_small_artifact_layout(small):
    program, path = small
    manifest = _compare_engines(program, path, ratios=(0.01, 0.5))
    with tarfile.open(path) as tf:
        names = tf.getnames()
    assert names[0] == "manifest.json"
    assert {"prime.so", "edit.so", "weights.bin"} <= set(names)
    art = manifest["artifact"]
    assert set(art["members"]) == set(names) - {"manifest.json"}
    assert all(len(v["sha256"]) == 64 for v in art["members"].values())
    import tvm

    assert art["tvm_version"] == tvm.__version__ and art["format_version"] == 1
    assert art["target"]["tvm_target"]["kind"] == "llvm"
    # the program manifest is kept, plus the cache layout and the shapes of every pass input
    for key in ("inputs", "outputs", "caches", "indices", "scatter_maps", "mask"):
        assert manifest[key] == program.manifest[key]
    kinds = {i["kind"] for i in art["passes"]["edit"]["inputs"]}
    assert {"cache", "indices", "edited"} <= kinds
    idx = [i for i in art["passes"]["edit"]["inputs"] if i["kind"] == "indices"]
    assert idx and all(isinstance(i["shape"][0], str) and i["shape"][1] == 2 for i in idx)


RUNNER = textwrap.dedent("""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this process")
            return None
    sys.meta_path.insert(0, _Block())
    import numpy as np
    from sige_export.artifact import open_artifact
    manifest, backend = open_artifact(sys.argv[1])
    d = dict(np.load(sys.argv[2]))
    prime = backend.prime(d)
    edit_feeds = {**{k: prime[k] for k in (c["name"] for c in manifest["caches"])}, **d}
    for src, e in manifest["edit"]["edited"].items():
        edit_feeds[e] = d["edited_" + src]
    edit = backend.edit(edit_feeds)
    bad = sorted(m for m in sys.modules if m == "tvm" or m.startswith("tvm.") or m == "torch" or m.startswith("torch."))
    assert not bad, f"imported: {bad[:10]}"
    out = manifest["outputs"][0]
    np.savez(sys.argv[3], prime=prime[out], edit=edit[manifest["edit"]["outputs"][0]])
""")


def test_host_artifact_fresh_process_without_torch_or_tvm_compiler(zoo_artifacts, tmp_path):
    program, path = zoo_artifacts(FAMILIES[0])
    manifest = read_manifest(path)
    feeds = _inputs(manifest)
    ref = Engine(program, OnnxRuntimeBackend(program))
    want_prime = ref.prime(**feeds)
    mask = synthetic_mask("blob", tuple(manifest["mask"]["resolution"]), 0.08, seed=5)
    edited = _edited(manifest, feeds, mask)
    want_edit = ref.edit(**edited, mask=mask)
    index_feeds = ref.edit_feeds(mask)
    np.savez(tmp_path / "in.npz", **feeds, **index_feeds,
             **{"edited_" + k: edited[k] for k in manifest["edit"]["edited"]})
    (tmp_path / "runner.py").write_text(RUNNER)
    r = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(path), str(tmp_path / "in.npz"),
                        str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert_close_relative(out["prime"], want_prime, rel=REL, what="fresh process prime")
    assert_close_relative(out["edit"], want_edit, rel=REL, what="fresh process edit")


# ----------------------------------------------------------------------------- cross targets
def test_m1_artifact_members_are_macho_arm64(tmp_path):
    path = build_artifact(_small_program(), "m1", tmp_path / "small.m1.sige")
    manifest = read_manifest(path)
    with tarfile.open(path) as tf:
        objs = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".o")}
    for p in ("prime", "edit"):
        listed = manifest["artifact"]["passes"][p]["objects"]
        assert listed and all(n in objs for n in listed)
    assert objs
    for name, data in objs.items():
        assert macho_arm64(data), f"{name}: not Mach-O arm64 ({data[:8].hex()})"
    with pytest.raises(ArtifactError, match="cannot run on this"):
        open_artifact(path)


@pytest.mark.parametrize("target,arch", [("rtx3090", "sm_86"), ("rtx2080ti", "sm_75")])
def test_cuda_artifact_carries_cubin(tmp_path, target, arch):
    missing = get(target).missing_toolchain()
    if missing:
        pytest.skip(f"{target}: {missing} not installed (pip install 'sige-export[cuda]')")
    path = build_artifact(_small_program(), target, tmp_path / f"small.{target}.sige")
    manifest = read_manifest(path)
    with tarfile.open(path) as tf:
        data = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    for p in ("prime", "edit"):
        dev = manifest["artifact"]["passes"][p]["device_code"]
        cubins = [n for n in dev if n.endswith(".cubin")]
        assert cubins, dev
        assert all(cubin_arch(data[n]) == arch for n in cubins), [cubin_arch(data[n]) for n in cubins]
        assert any(f".target {arch}".encode() in data[n] for n in dev if n.endswith(".ptx"))
        assert data[manifest["artifact"]["passes"][p]["library"]][:4] == b"\x7fELF"
    assert manifest["artifact"]["requires"]["gpu"] == arch
    from sige_export.artifact import _cuda_gpu_count

    if _cuda_gpu_count() == 0:
        with pytest.raises(ArtifactError, match="no NVIDIA GPU"):
            open_artifact(path)


# ----------------------------------------------------------------------------- errors
def test_unknown_target_lists_known(tmp_path):
    with pytest.raises(ValueError, match="unknown target 'nope'; known targets: .*host.*m1.*rtx3090"):
        build_artifact(_small_program(), "nope", tmp_path / "x.sige")
    assert not (tmp_path / "x.sige").exists()


def test_missing_nvrtc_says_what_to_install(tmp_path, monkeypatch):
    import sige_export.targets as targets

    monkeypatch.setattr(targets, "_nvrtc_available", lambda: False)
    with pytest.raises(ToolchainError, match="pip install nvidia-cuda-nvrtc-cu12"):
        build_artifact(_small_program(), "rtx3090", tmp_path / "x.sige")
    assert not (tmp_path / "x.sige").exists()


def _rewrite(src: Path, dst: Path, edit_member=None, edit_manifest=None):
    with tarfile.open(src) as tf, tarfile.open(dst, "w") as out:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            if m.name == "manifest.json" and edit_manifest:
                man = json.loads(data)
                edit_manifest(man)
                data = json.dumps(man).encode()
            elif edit_member and m.name == edit_member[0]:
                data = edit_member[1](data)
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def test_open_rejects_corrupt_truncated_and_mismatched(small, tmp_path):
    _, path = small
    flip = tmp_path / "flip.sige"
    _rewrite(path, flip, edit_member=("weights.bin", lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:]))
    with pytest.raises(ArtifactError, match="sha256 mismatch for member 'weights.bin'"):
        open_artifact(flip)
    short = tmp_path / "short.sige"
    _rewrite(path, short, edit_member=("edit.so", lambda d: d[: len(d) // 2]))
    with pytest.raises(ArtifactError, match="'edit.so' has .* bytes.*truncated"):
        open_artifact(short)
    raw = path.read_bytes()
    cut = tmp_path / "cut.sige"
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(ArtifactError, match="truncated|corrupt|missing"):
        open_artifact(cut)
    (tmp_path / "junk.sige").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ArtifactError, match="not a SIGE artifact"):
        open_artifact(tmp_path / "junk.sige")
    old = tmp_path / "old.sige"
    _rewrite(path, old, edit_manifest=lambda m: m["artifact"].update(tvm_version="0.19.0"))
    with pytest.raises(ArtifactError, match="built with TVM 0.19.0.*re-export"):
        open_artifact(old)
    gpu = tmp_path / "gpu.sige"

    def as_cuda(m):
        m["artifact"]["target"].update(name="rtx3090", family="cuda")
        m["artifact"]["requires"]["gpu"] = "sm_86"

    _rewrite(path, gpu, edit_manifest=as_cuda)
    from sige_export.artifact import _cuda_gpu_count

    if _cuda_gpu_count() == 0:
        with pytest.raises(ArtifactError, match="no NVIDIA GPU"):
            open_artifact(gpu)


def test_build_is_atomic(tmp_path, monkeypatch):
    import sige_export.artifact as artifact

    program = _small_program()
    out = tmp_path / "a.sige"
    out.write_bytes(b"previous")

    def boom(path):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(artifact, "_sha256_file", boom)
    with pytest.raises(OSError, match="simulated"):
        build_artifact(program, "host", out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.sige"]


TINY_PROGRAM = """
    import numpy as np, onnx
    from onnx import helper, TensorProto
    from sige_export.compiler import compile_program
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi("x")], [vi("y")]),
                          opset_imports=[helper.make_opsetid("", 18)])
    program = compile_program(m, "host")
"""
THREAD_USERS = {  # the three ways to run compiled code in-process
    "engine": """
        import numpy as np, sige_export
        engine = sige_export.load({artifact!r})
        engine.prime(**{{i["name"]: np.zeros(i["shape"], i["dtype"]) for i in engine.manifest["inputs"]}})
    """,
    "compiled program": TINY_PROGRAM + """
    program.run(np.zeros(4, np.float32))
    """,
    "loaded library": TINY_PROGRAM + """
    from sige_export.compiler import load_library
    program.export_library({library!r})
    load_library({library!r})(np.zeros(4, np.float32))
    """,
}


@pytest.mark.parametrize("user", sorted(THREAD_USERS))
def test_compiled_code_uses_every_physical_core(small, tmp_path, user):
    """Engines, compiled programs and loaded libraries run one TVM thread per physical core (TVM's x86
    default is half the logical CPUs: half the cores on machines without SMT); an explicit TVM_NUM_THREADS
    wins."""
    from sige_export.artifact import physical_cores

    code = textwrap.dedent(THREAD_USERS[user].format(artifact=str(small[1]), library=str(tmp_path / "tiny.so"))) \
        + "\nimport tvm_ffi; print(tvm_ffi.get_global_func('runtime.NumThreads')())\n"
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(run.stdout.split()[-1]) == physical_cores() >= 1
    run = subprocess.run([sys.executable, "-c", code], env={**env, "TVM_NUM_THREADS": "1"}, capture_output=True,
                         text=True, check=True)
    assert int(run.stdout.split()[-1]) == 1


def test_build_calibrates_in_a_fresh_process(small, tmp_path):
    """``build_artifact(calibrate=True)`` times in a child process (the compiler's process skews timings); its
    log reaches the caller and a failing child is an ArtifactError that says so."""
    import shutil

    from sige_export.artifact import _calibrate_in_fresh_process

    path = tmp_path / "child.host.sige"
    shutil.copy(small[1], path)
    lines: list[str] = []
    _calibrate_in_fresh_process(path, lines.append)
    assert any(line.startswith("calibrated in") for line in lines), lines
    assert 0.0 <= read_manifest(path)["runtime"]["crossover_ratio"] <= 1.0
    with pytest.raises(ArtifactError, match="calibration failed"):
        _calibrate_in_fresh_process(tmp_path / "missing.host.sige", lines.append)


def test_calibration_stored_in_artifact_drives_the_fallback(small, tmp_path):
    """``calibrate_artifact`` measures the crossover here, stores it (members untouched, still verified), and
    engines loading the artifact run edits above it dense and below it sparse, with the same outputs."""
    import shutil

    from sige_export.artifact import calibrate_artifact

    program, built = small
    path = tmp_path / "cal.host.sige"
    shutil.copy(built, path)
    before = read_manifest(path)
    cal = calibrate_artifact(path, ratios=(0.1, 0.5), repeats=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.host.sige"]  # no temp file left
    man = read_manifest(path)
    assert man["artifact"]["members"] == before["artifact"]["members"]
    assert 0.0 <= man["runtime"]["crossover_ratio"] <= 1.0
    assert man["runtime"]["crossover_ratio"] == pytest.approx(cal["crossover_ratio"])
    assert [r for r, _ in man["runtime"]["calibration"]["edit_ms"]] == [r for r, _ in cal["edit_s"]]
    open_artifact(path)  # sha256 of every member still matches
    engine = sige_export.load(path)
    assert engine.crossover_ratio == pytest.approx(cal["crossover_ratio"])
    feeds = _inputs(man)
    engine.prime(**feeds)
    mask = synthetic_mask("blob", tuple(man["mask"]["resolution"]), 0.3, seed=1)
    ref = Engine(program, OnnxRuntimeBackend(program))
    ref.prime(**feeds)
    want = ref.dense(**_edited(man, feeds, mask))
    for crossover, mode in ((0.0, "dense"), (1.0, "sparse")):
        engine.crossover_ratio = crossover
        got = engine.edit(**_edited(man, feeds, mask), mask=mask)
        assert engine.last_edit.mode == mode
        assert_close_relative(got, want, rel=REL, what=f"{mode} edit")


def test_backend_is_freed_without_the_cycle_collector(small):
    """A dropped backend releases its VMs (and their memory pools) at once, not at the next GC cycle."""
    import gc
    import weakref

    _, path = small
    manifest, backend = open_artifact(path)
    backend.prime(_inputs(manifest))
    ref = weakref.ref(backend)
    gc.disable()
    try:
        del backend
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("uploads", [False, True], ids=["host", "device-resident"])
def test_working_copies_are_restored_between_edits(zoo_artifacts, monkeypatch, uploads):
    """Edits scatter into working copies of the caches, put back before the next edit (the regions the last
    edit wrote, by block rows or whole maps; whole maps when the key changes): a sequence of edits of two
    keys, each restore path, a pass that fails after writing, all equal onnxruntime; the caches and earlier
    results are never written. ``device-resident`` runs the CUDA backend's data path on the CPU: inputs
    uploaded, pass outputs kept on the device, working copies device tensors; caches are not uploaded
    again by an edit."""
    import sige_export.artifact as art

    program, path = zoo_artifacts("ddpm-church256")
    manifest, backend = open_artifact(path)
    backend._uploads = uploads
    uploaded: list[int] = []
    to_device = backend._to_device
    monkeypatch.setattr(backend, "_to_device", lambda a: uploaded.append(id(a)) or to_device(a))
    edit = manifest["artifact"]["passes"]["edit"]
    works = {i["name"]: i["cache"] for i in edit["inputs"] if i["kind"] == "working_copy"}
    assert works and set(works.values()) <= {c["name"] for c in manifest["caches"]}
    assert edit["restore"]["regions"] and edit["restore"]["bytes"] > 0
    ref = Engine(program, OnnxRuntimeBackend(program))
    got = Engine(program, backend)
    res = tuple(manifest["mask"]["resolution"])
    feeds = {k: _inputs(manifest, seed=k) for k in (0, 1)}
    for key, f in feeds.items():
        ref.prime(**f, key=key)
        got.prime(**f, key=key)
    primed = {key: {n: a.copy() for n, a in got._entries[key].caches.items()} for key in feeds}
    masks = [synthetic_mask("blob", res, r, seed=s) for r, s in ((0.03, 1), (0.2, 2), (0.03, 3))]
    earlier = []
    for step, (key, mask, fraction) in enumerate([(0, masks[0], 1e9), (0, masks[1], 0.0), (1, masks[2], 1e9),
                                                  (0, masks[2], 1e9), (1, masks[1], 0.0)]):
        monkeypatch.setattr(art, "RESTORE_FULL_FRACTION", fraction)  # region restore / whole-map restore
        edited = _edited(manifest, feeds[key], mask)
        uploaded.clear()
        have = got.edit(**edited, mask=mask, key=key)
        if uploads:  # the inputs, indices and scatter maps; never the caches (on the device since prime)
            caches = {id(a) for a in got._entries[key].caches.values()}
            assert uploaded and not caches & set(uploaded)
        assert got.last_edit.mode == "sparse"
        assert_close_relative(have, ref.edit(**edited, mask=mask, key=key), rel=REL, what=f"edit {step}")
        earlier.append((have, have.copy()))
    for have, snapshot in earlier:
        np.testing.assert_array_equal(have, snapshot)  # results do not alias a working copy
    # an output fed back as an input (a sampling loop) is its value, not a working copy the next edit rewrote
    src = manifest["mask"]["source"]
    fed = {**feeds[1], src: earlier[-1][0]}
    assert_close_relative(got.edit(**fed, mask=masks[0], key=1), ref.edit(**fed, mask=masks[0], key=1),
                          rel=REL, what="edit of a fed-back output")
    for key in feeds:
        for n, a in got._entries[key].caches.items():
            np.testing.assert_array_equal(a, primed[key][n], err_msg=f"cache {n} of key {key} was written")
    # a commit re-primes key 1 on the edited input (new caches): the next edit refills from them
    edited = _edited(manifest, feeds[1], masks[0])
    got.edit(**edited, mask=masks[0], key=1)
    ref.edit(**edited, mask=masks[0], key=1)
    assert got.commit(key=1) == ref.commit(key=1, exact=True) == "prime"
    again = _edited(manifest, edited, masks[2])
    assert_close_relative(got.edit(**again, mask=masks[2], key=1), ref.edit(**again, mask=masks[2], key=1),
                          rel=REL, what="edit after a commit")

    # a pass that fails after writing its working copies: they are dropped and refilled from the caches
    edited = _edited(manifest, feeds[0], masks[0])
    got.edit(**edited, mask=masks[0], key=0)
    run = art._Pass.__call__

    def fail_after(self, feeds_, outputs=None):
        run(self, feeds_, outputs)
        raise RuntimeError("injected failure after the pass")

    monkeypatch.setattr(art._Pass, "__call__", fail_after)
    edited = _edited(manifest, feeds[0], masks[1])
    with pytest.raises(RuntimeError, match="injected"):
        got.edit(**edited, mask=masks[1], key=0)
    monkeypatch.undo()
    assert not backend._work and backend._written is None
    edited = _edited(manifest, feeds[0], masks[0])
    assert_close_relative(got.edit(**edited, mask=masks[0], key=0), ref.edit(**edited, mask=masks[0], key=0),
                          rel=REL, what="edit after a failed pass")


def test_small_maps_keep_the_copying_scatter():
    """Scatters into caches under ``WORKING_COPY_MIN_BYTES`` (and bases shared by two scatters) keep the
    copying form; larger ones get a working-copy input and the in-place attribute."""
    from sige_export import custom_ops
    from sige_export.tvm_schedules.importer import IN_PLACE_ATTR, with_working_copies

    vi = helper.make_tensor_value_info
    nodes = [custom_ops.make_node("SigeScatter", ["b1", "big", "i1"], ["y1"], offset=[0, 0], stride=[1, 1]),
             custom_ops.make_node("SigeScatter", ["b2", "small", "i2"], ["y2"], offset=[0, 0], stride=[1, 1]),
             custom_ops.make_node("SigeScatter", ["b3", "shared", "i3"], ["y3"], offset=[0, 0], stride=[1, 1]),
             custom_ops.make_node("SigeScatter", ["b4", "shared", "i4"], ["y4"], offset=[0, 0], stride=[1, 1])]
    ins = [vi(n, TensorProto.FLOAT, s) for n, s in (("big", [1, 16, 64, 64]), ("small", [1, 16, 8, 8]),
                                                    ("shared", [1, 16, 64, 64]))]
    g = helper.make_graph(nodes, "g", ins, [vi(y, TensorProto.FLOAT, None) for y in ("y1", "y2", "y3", "y4")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.sige", 1)])
    out, plan = with_working_copies(m, min_bytes=4 * 16 * 64 * 64)
    assert plan == {"big#work": "big"}
    assert [i.name for i in out.graph.input] == ["big", "small", "shared", "big#work"]
    marked = [n.input[1] for n in out.graph.node if any(a.name == IN_PLACE_ATTR for a in n.attribute)]
    assert marked == ["big#work"]
