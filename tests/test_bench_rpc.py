"""sige-bench through a loopback TVM RPC tracker + server; fast, clear errors for bad devices/artifacts."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sige_export import bench

pytest.importorskip("tornado")  # the TVM RPC tracker needs it
pytest.importorskip("psutil")
KEY = "sige-bench-test"
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)  # the group this test created (server forks per session)
        except ProcessLookupError:
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("rpc")
    port = _free_port()
    tr = _start(["tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port), "--port-end", str(port + 1)],
                d / "tracker.log")
    sport = _free_port()
    sv = None
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or tr.poll() is not None:
                    pytest.fail(f"tracker did not start: {(d / 'tracker.log').read_text()}")
                time.sleep(0.3)
        sv = _start(["tvm.exec.rpc_server", "--tracker", f"{HOST}:{port}", "--key", KEY, "--host", HOST,
                     "--port", str(sport), "--port-end", str(sport + 20)], d / "server.log")
        from tvm import rpc

        while True:
            summ = rpc.connect_tracker(HOST, port).summary()
            if KEY in summ.get("queue_info", {}):
                break
            if time.time() > deadline or sv.poll() is not None:
                pytest.fail(f"server did not register: {(d / 'server.log').read_text()}")
            time.sleep(0.3)
        yield f"{HOST}:{port}"
    finally:
        if sv is not None:
            _stop(sv)
        _stop(tr)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from sige_export.artifact import build_artifact
    from sige_export.cli import ExportOptions, export
    from sige_export.program import SigeProgram

    d = tmp_path_factory.mktemp("art")
    prog = export("gaugan-cityscapes", "onnx", d / "g.sige.onnx", options=ExportOptions(size="tiny"))
    art = build_artifact(SigeProgram.load(prog), "host", d / "g.host.sige")
    return prog, art


def _retarget(art: Path, out: Path, target: dict, requires: dict) -> Path:
    """A copy of ``art`` whose manifest claims another target (the manifest is not in the member digests)."""
    with tarfile.open(art) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for mem in src.getmembers():
            data = src.extractfile(mem).read()
            if mem.name == "manifest.json":
                man = json.loads(data)
                man["artifact"]["target"].update(target)
                man["artifact"]["requires"].update(requires)
                data = json.dumps(man).encode()
                mem.size = len(data)
            dst.addfile(mem, io.BytesIO(data))
    return out


def _invoke(args: list[str]):
    return CliRunner().invoke(bench._make_app(), args)


def test_rpc_artifact_benchmark(tracker: str, built: tuple[Path, Path], tmp_path: Path) -> None:
    prog, art = built
    js = tmp_path / "rpc.json"
    res = _invoke([str(art), "--program", str(prog), "--rpc-tracker", tracker, "--rpc-key", KEY,
                   "--edits", "0.05,0.33", "--mask-kind", "blob", "--repeat", "3", "--number", "2",
                   "--json", str(js), "--plot", str(tmp_path / "rpc.png"), "-q", "--rpc-timeout", "60"])
    assert res.exit_code == 0, res.output
    report = json.loads(js.read_text())
    bench.validate_report(report)
    where = f"rpc://{tracker}/{KEY}"
    assert report["where"] == {"sige": where, "onnxruntime": "local"}
    assert report["machine"]["device"]["key"] == KEY and report["machine"]["device"]["cpu"] is True
    assert report["passes"]["dense"]["timer"] == "tvm-time-evaluator" and report["passes"]["dense"]["where"] == where
    assert report["passes"]["onnxruntime_dense"]["where"] == "local"
    assert any("onnxruntime baseline ran locally" in n for n in report["notes"])
    for e in report["edits"]:
        assert e["latency"]["where"] == where and e["latency"]["percentiles"]["p50"] > 0
        assert e["macs"]["sparse"] and e["fidelity"]["max_abs_err"] < 1.0
        assert e["speedup"]["vs_dense"] > 0 and e["speedup"]["vs_onnxruntime"] > 0


def test_rpc_program_needs_target(tracker: str, built: tuple[Path, Path]) -> None:
    prog, _ = built
    t0 = time.time()
    res = _invoke([str(prog), "--rpc-tracker", tracker, "--rpc-key", KEY, "--edits", "0.05"])
    assert res.exit_code == 2 and "--target" in res.output and time.time() - t0 < 30


def test_unreachable_tracker_fails_fast(built: tuple[Path, Path]) -> None:
    _, art = built
    t0 = time.time()
    res = _invoke([str(art), "--rpc-tracker", f"{HOST}:{_free_port()}", "--rpc-key", KEY])
    assert res.exit_code == 2, res.output
    assert "unreachable" in res.output and time.time() - t0 < 15


def test_not_a_tracker_fails_fast(built: tuple[Path, Path]) -> None:
    _, art = built
    with socket.socket() as s:  # accepts connections, never answers
        s.bind((HOST, 0))
        s.listen(4)
        t0 = time.time()
        res = _invoke([str(art), "--rpc-tracker", f"{HOST}:{s.getsockname()[1]}", "--rpc-key", KEY,
                       "--rpc-timeout", "5"])
    assert res.exit_code == 2, res.output
    assert "tracker" in res.output and time.time() - t0 < 20


def test_unknown_key_fails_fast(tracker: str, built: tuple[Path, Path]) -> None:
    _, art = built
    t0 = time.time()
    res = _invoke([str(art), "--rpc-tracker", tracker, "--rpc-key", "no-such-device"])
    assert res.exit_code == 2, res.output
    assert "no-such-device" in res.output and KEY in res.output and time.time() - t0 < 15


def test_wrong_target_artifact(tracker: str, built: tuple[Path, Path], tmp_path: Path) -> None:
    _, art = built
    cuda = _retarget(art, tmp_path / "g.rtx3090.sige", {"name": "rtx3090", "family": "cuda"},
                     {"gpu": "sm_86"})
    t0 = time.time()
    res = _invoke([str(cuda), "--rpc-tracker", tracker, "--rpc-key", KEY, "--edits", "0.05"])
    assert res.exit_code == 2, res.output
    assert "rtx3090" in res.output and "no CUDA GPU" in res.output and time.time() - t0 < 30
    m1 = _retarget(art, tmp_path / "g.m1.sige", {"name": "m1", "family": "arm"},
                   {"os": "macos", "machine": "arm64", "link": "clang -dynamiclib"})
    res = _invoke([str(m1), "--rpc-tracker", tracker, "--rpc-key", KEY, "--edits", "0.05"])
    assert res.exit_code == 2 and "Mach-O" in res.output
    res = _invoke([str(m1), "--edits", "0.05"])  # locally too
    assert res.exit_code == 2 and "m1" in res.output


def test_local_artifact_runs_without_torch_or_tvm_compiler(built: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.test_bench import _BLOCK_TORCH

    prog, art = built
    js = tmp_path / "r.json"
    code = _BLOCK_TORCH.replace("#EXTRA", 'assert "tvm.relax" not in sys.modules, "the TVM compiler was imported"')
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code, str(art), "--program", str(prog), "--edits", "0.05",
                        "--mask-kind", "blob", "--repeat", "2", "--json", str(js), "-q"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(js.read_text())
    bench.validate_report(report)
    assert report["subject"]["kind"] == "artifact" and report["where"]["sige"] == "local"
