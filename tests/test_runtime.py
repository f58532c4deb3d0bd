"""The thin runtime on exported tiny zoo programs: prime/edit/commit, crossover, cache budget, threads, errors."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from sige_export import zoo
from sige_export.edits import apply_edit, psnr, synthetic_mask
from sige_export.runtime import Engine, EngineError, load
from tests.helpers import assert_close, assert_close_relative

ROOT = Path(__file__).resolve().parents[1]
ONE_HOT = {"gaugan-cityscapes": 7}  # tiny GauGAN: 7 labels + instance edge
# Removed when the session ends (the programs below are cached for the whole session).
_EXPORTS = tempfile.TemporaryDirectory(prefix="sige-rt-")


@functools.lru_cache(maxsize=None)
def exported(name: str, norm_stats: str = "original") -> Path:
    """The tiny zoo model exported as a portable program through the CLI's export (cached per session)."""
    from sige_export.cli import ExportOptions, export

    out = Path(_EXPORTS.name) / f"{name}-{norm_stats}.sige.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export(name, "onnx", out, options=ExportOptions(size="tiny", norm_stats=norm_stats))


def inputs(name: str) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in zoo.example_inputs(name, "tiny").items()}


def edited(name: str, x: np.ndarray, m: np.ndarray, seed: int) -> np.ndarray:
    return apply_edit(x, m, seed=seed, one_hot_channels=ONE_HOT.get(name))


def used_caches(engine: Engine) -> set[str]:
    em = engine.program.edit_model()
    return {i for n in em.graph.node for i in n.input} & set(engine.program.cache_names)


def test_prime_edit_cached_and_stats() -> None:
    name = "ddpm-church256"
    e = load(exported(name), crossover_ratio=1.0)
    ins = inputs(name)
    primed = e.prime(**ins)
    assert_close_relative(primed, e.dense(**ins), rel=1e-5, what="prime vs dense")
    m = synthetic_mask("blob", (32, 32), 0.05, seed=1)
    # Edit of the unedited input with a mask: prime's output; every grid gets its indices.
    out = e.edit(**ins, mask=m)
    assert e.last_edit.mode == "sparse" and 0 < e.last_edit.ratio < 0.1
    assert set(e.last_edit.blocks) == {g["name"] for g in e.manifest["indices"]}
    assert all(n > 0 for n in e.last_edit.blocks.values())
    assert_close_relative(out, primed, rel=1e-5, what="edit(unedited)")
    # Auto mask: the difference against the primed input.
    x2 = edited(name, ins["x"], m, seed=2)
    out = e.edit(x2, ins["t"])
    assert e.last_edit.mode == "sparse" and e.last_edit.ratio == pytest.approx(m.mean())
    assert psnr(out, e.dense(x2, ins["t"])) > 30
    # Empty mask: the cached output, nothing run.
    e.backend.edit = None  # would fail if called
    out = e.edit(**ins)
    assert e.last_edit.mode == "cached"
    assert_close(out, primed, rtol=0, atol=0)
    assert e.cache_bytes > 0 and e.keys() == [None]


def test_dense_fallback_and_calibrate() -> None:
    name = "gaugan-cityscapes"
    e = load(exported(name), crossover_ratio=0.1)
    ins = inputs(name)
    e.prime(**ins)
    m = synthetic_mask("blob", (64, 128), 0.3, seed=0)
    x2 = edited(name, ins["segmap"], m, seed=1)
    out = e.edit(x2)
    assert e.last_edit.mode == "dense"
    assert_close(out, e.dense(x2), rtol=1e-6, atol=1e-6, what="dense fallback")
    small = edited(name, ins["segmap"], synthetic_mask("blob", (64, 128), 0.03, seed=0), seed=1)
    e.edit(small)
    assert e.last_edit.mode == "sparse"
    # calibrate: a crossover in [0, 1], stored on the engine and in the manifest's runtime section.
    report = e.calibrate(ratios=(0.05, 0.3), repeats=1)
    assert 0.0 <= report["crossover_ratio"] <= 1.0 and len(report["edit_s"]) == 2
    assert e.crossover_ratio == report["crossover_ratio"] == e.manifest["runtime"]["crossover_ratio"]
    assert e.keys() == [None]  # caches unchanged
    assert load(exported(name), crossover_ratio=0.25).crossover_ratio == 0.25


def test_full_mask_commit_equals_reprime() -> None:
    """GauGAN (BatchNorm only): an all-blocks edit is exact, so the scatter commit equals re-priming."""
    name = "gaugan-cityscapes"
    e = load(exported(name), crossover_ratio=1.0)
    ins = inputs(name)
    e.prime(**ins)
    calls = {"prime": 0}
    prime = e.backend.prime

    def counting(feeds):
        calls["prime"] += 1
        return prime(feeds)

    e.backend.prime = counting
    full = np.ones((64, 128), bool)
    x2 = edited(name, ins["segmap"], full, seed=3)
    e.edit(x2, mask=full, commit=True)
    assert e.last_edit.commit == "scatter" and calls["prime"] == 0
    ref = load(exported(name))
    ref.prime(x2)
    used = used_caches(e)
    assert used
    for c in used:
        assert_close(e._entry(None).caches[c], ref._entry(None).caches[c], rtol=1e-4, atol=1e-4, what=c)


@pytest.mark.parametrize("name", ["gaugan-cityscapes", "ddpm-church256"])
def test_sequential_edits_with_commit(name: str) -> None:
    """Three successive edits, each committed: close to dense, near single edits and re-priming."""
    e = load(exported(name), crossover_ratio=1.0)
    exact = load(exported(name), crossover_ratio=1.0)
    ins = inputs(name)
    src = e.manifest["mask"]["source"]
    hw = tuple(e.manifest["mask"]["resolution"])
    e.prime(**ins)
    exact.prime(**ins)
    single = load(exported(name), crossover_ratio=1.0)
    single.prime(**ins)
    cur = ins[src]
    for i in range(3):
        cur = edited(name, cur, synthetic_mask("blob", hw, 0.05, seed=10 + i), seed=20 + i)
        feeds = {**ins, src: cur}
        dense = e.dense(**feeds)
        out = e.edit(**feeds, commit=True)
        assert e.last_edit.mode == "sparse" and e.last_edit.commit == "scatter"
        got_exact = exact.edit(**feeds)
        assert exact.commit(exact=True) == "prime"
        one = single.edit(**feeds)  # all edits so far as one edit of the original
        p_commit, p_exact, p_single = psnr(out, dense), psnr(got_exact, dense), psnr(one, dense)
        # Measured (tiny, seed 0): gaugan 41.4/39.1/37.4 dB, ddpm 39.1/35.6/34.6 dB for commits; single
        # edits 41.4/40.0/39.1 and 39.1/35.6/35.2. Commits compound SIGE's receptive-field truncation.
        assert p_commit > 32, (i, p_commit)
        assert p_commit > p_single - 3.0, (i, p_commit, p_single)
        assert p_exact > p_single - 0.5, (i, p_exact, p_single)
        if i == 0:
            assert_close(out, got_exact, rtol=1e-5, atol=1e-5, what="first edit: same caches")
    # The committed state is the new baseline: the auto mask of the last inputs is empty.
    e.edit(**{**ins, src: cur})
    assert e.last_edit.mode == "cached"


def test_update_norm_stats_program_commits_at_edit_cost() -> None:
    """norm_stats="update" programs read derived feeds (statistics tiles); their commit writes the
    corrected statistics and scattered blocks into the caches (no re-prime)."""
    name = "ddpm-church256"
    e = load(exported(name, "update"), crossover_ratio=1.0)
    ins = inputs(name)
    e.prime(**ins)
    assert e.manifest["cache_updates"], "the program lists the statistics the edit corrects"
    x2 = edited(name, ins["x"], synthetic_mask("blob", (32, 32), 0.05, seed=6), seed=7)
    out = e.edit(x2, ins["t"], commit=True)
    assert e.last_edit.mode == "sparse" and e.last_edit.commit == "scatter"
    assert psnr(out, e.dense(x2, ins["t"])) > 35
    e.edit(x2, ins["t"])
    assert e.last_edit.mode == "cached"
    # A second edit on top of the committed caches still tracks dense.
    x3 = edited(name, x2, synthetic_mask("blob", (32, 32), 0.05, seed=8), seed=9)
    assert psnr(e.edit(x3, ins["t"]), e.dense(x3, ins["t"])) > 30


def test_commit_api() -> None:
    name = "gaugan-cityscapes"
    e = load(exported(name), crossover_ratio=1.0)
    ins = inputs(name)
    e.prime(**ins)
    with pytest.raises(EngineError, match="nothing to commit"):
        e.commit()
    m = synthetic_mask("blob", (64, 128), 0.05, seed=4)
    x2 = edited(name, ins["segmap"], m, seed=5)
    out = e.edit(x2)
    assert e.commit() == "scatter"
    with pytest.raises(EngineError, match="nothing to commit"):
        e.commit()
    assert_close(e.edit(x2), out, rtol=0, atol=0, what="after commit: cached")
    assert e.last_edit.mode == "cached"


def test_cache_budget_lru() -> None:
    name = "gaugan-cityscapes"
    ins = inputs(name)
    probe = load(exported(name))
    probe.prime(**ins)
    per_key = probe.cache_bytes
    e = load(exported(name), cache_budget_bytes=int(2.5 * per_key))
    for k in range(3):
        e.prime(**ins, key=k)
    assert e.keys() == [1, 2] and e.cache_bytes <= 2.5 * per_key
    e.edit(**ins, key=1)  # touch 1: key 2 is now the least recently used
    e.prime(**ins, key=3)
    assert e.keys() == [1, 3]
    with pytest.raises(EngineError, match="evicted"):
        e.edit(**ins, key=0)
    with pytest.raises(EngineError, match="not primed"):
        e.edit(**ins, key="never")
    e.prime(**ins, key=0)  # usable again
    assert 0 in e.keys()
    with pytest.raises(EngineError, match="cache budget"):
        load(exported(name), cache_budget_bytes=per_key // 2).prime(**ins)


def test_two_threads_share_an_engine() -> None:
    name = "gaugan-cityscapes"
    e = load(exported(name), crossover_ratio=1.0)
    ins = inputs(name)
    work = {}
    for k in range(2):
        m = synthetic_mask("blob", (64, 128), 0.05, seed=30 + k)
        work[k] = (edited(name, ins["segmap"], m, seed=40 + k), m)
        e.prime(**ins, key=k)
    expected = {k: e.edit(x, mask=m, key=k) for k, (x, m) in work.items()}
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            x, m = work[k]
            for _ in range(5):
                results[k].append(e.edit(x, mask=m, key=k))
                results[k].append(e.prime(**ins, key=k))  # mutates shared state between edits
        except BaseException as ex:  # noqa: BLE001
            errors.append(ex)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        for r in results[k][0::2]:
            assert_close(r, expected[k], rtol=0, atol=0, what=f"thread {k}")


def test_bad_inputs_leave_the_engine_usable() -> None:
    name = "ddpm-church256"
    e = load(exported(name), crossover_ratio=1.0)
    ins = inputs(name)
    x, t = ins["x"], ins["t"]
    with pytest.raises(EngineError, match="not primed"):
        e.edit(x, t)
    primed = e.prime(x, t)
    cases = [
        (lambda: e.edit(x[:, :, :16], t), "shape"),
        (lambda: e.edit(x.astype(np.int32), t), "dtype"),
        (lambda: e.prime(x, t.astype(np.int64)), "dtype"),
        (lambda: e.edit(x, t, mask=np.ones((16, 16), bool)), "mask of shape"),
        (lambda: e.edit(x, t, mask=np.ones((32, 32, 3), bool)), "mask of shape"),
        (lambda: e.edit(x, t, y=x), "unknown input"),
        (lambda: e.edit(x), "missing inputs"),
        (lambda: e.edit(x, t + 1), "differs from the one primed"),
        (lambda: e.edit(x, t, key="other"), "not primed"),
    ]
    for fn, msg in cases:
        with pytest.raises(EngineError, match=msg):
            fn()
    m = synthetic_mask("blob", (32, 32), 0.05, seed=0)
    x2 = edited(name, x, m, seed=1)
    assert psnr(e.edit(x2, t), e.dense(x2, t)) > 30
    assert_close(e.edit(x, t, mask=m), primed, rtol=1e-5, atol=1e-5, what="usable after errors")


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    good = exported("gaugan-cityscapes").read_bytes()
    for cut in (len(good) // 2, len(good) - 7, 100):
        p = tmp_path / f"cut{cut}.sige.onnx"
        p.write_bytes(good[:cut])
        with pytest.raises(EngineError, match=str(p.name)):
            load(p)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(EngineError):
        load(garbage)
    import onnx
    from onnx import TensorProto, helper

    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(EngineError, match="not a SIGE program"):
        load(tmp_path / "plain.onnx")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.onnx")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(EngineError, match="unsupported file type"):
        load(tmp_path / "x.txt")
    e = load(exported("gaugan-cityscapes"))  # other engines unaffected
    e.prime(**inputs("gaugan-cityscapes"))


NO_TORCH = r"""
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process: " + name)
        return None

sys.meta_path.insert(0, BlockTorch())
import numpy as np
import sige_export
assert "sige_export.runtime" not in sys.modules  # load is lazy
engine = sige_export.load(sys.argv[1], crossover_ratio=1.0)
rng = np.random.default_rng(0)
x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
t = np.array([500.0], np.float32)
primed = engine.prime(x, t)
x2 = x.copy()
x2[..., 8:14, 8:14] += 1.0
out = engine.edit(x2, t, commit=True)
dense = engine.dense(x2, t)
assert engine.last_edit.mode == "sparse", engine.last_edit
assert engine.last_edit.commit == "scatter", engine.last_edit
expected = np.load(sys.argv[2])  # the same edit in the test's own process
err = float(np.abs(out - expected).max())
assert err < 1e-5, err
assert float(np.abs(out - dense).mean()) < float(np.abs(primed - dense).mean())
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("OK", err)
"""


def test_fresh_process_without_torch(tmp_path: Path) -> None:
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH)
    e = load(exported("ddpm-church256"), crossover_ratio=1.0)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    t = np.array([500.0], np.float32)
    e.prime(x, t)
    x2 = x.copy()
    x2[..., 8:14, 8:14] += 1.0
    np.save(tmp_path / "expected.npy", e.edit(x2, t))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(script), str(exported("ddpm-church256")), str(tmp_path / "expected.npy")],
                       capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr


def test_junk_sige_file_is_a_clear_error(tmp_path: Path) -> None:
    from sige_export.artifact import ArtifactError

    p = tmp_path / "m.host.sige"
    p.write_bytes(b"not really")
    with pytest.raises(ArtifactError, match="m.host.sige"):
        load(p)


ARTIFACT_NO_TORCH = r"""
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process: " + name)
        return None

sys.meta_path.insert(0, BlockTorch())
import numpy as np
import sige_export
engine = sige_export.load(sys.argv[1], crossover_ratio=1.0)
data = np.load(sys.argv[2])
primed = engine.prime(data["seg"])
out = engine.edit(data["seg2"])
assert engine.last_edit.mode == "sparse", engine.last_edit
assert float(np.abs(primed - data["primed"]).max()) < 1e-4
assert float(np.abs(out - data["edited"]).max()) < 1e-4
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("OK", type(engine.backend).__name__)
"""


def test_fresh_process_host_artifact_without_torch(tmp_path: Path) -> None:
    """The x86 host artifact through sige_export.load (open_artifact) in a process where torch cannot import."""
    pytest.importorskip("sige_export.artifact")
    pytest.importorskip("tvm")
    from sige_export.cli import ExportOptions, export

    name = "gaugan-cityscapes"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = export(name, "host", tmp_path / f"{name}.host.sige", options=ExportOptions(size="tiny"))
    ref = load(exported(name), crossover_ratio=1.0)
    seg = inputs(name)["segmap"]
    seg2 = edited(name, seg, synthetic_mask("blob", (64, 128), 0.05, seed=7), seed=8)
    primed = ref.prime(seg)
    np.savez(tmp_path / "data.npz", seg=seg, seg2=seg2, primed=primed, edited=ref.edit(seg2))
    script = tmp_path / "artifact_no_torch.py"
    script.write_text(ARTIFACT_NO_TORCH)
    r = subprocess.run([sys.executable, str(script), str(art), str(tmp_path / "data.npz")], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
