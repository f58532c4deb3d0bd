"""sige-bench: JSON report vs its schema, plot series, masks from files, timing semantics, no torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sige_export import bench

jsonschema = pytest.importorskip("jsonschema")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sige_export.cli import ExportOptions, export

    out = tmp_path_factory.mktemp("bench") / "gaugan.sige.onnx"
    return export("gaugan-cityscapes", "onnx", out, options=ExportOptions(size="tiny"))


def _invoke(args: list[str]):
    return CliRunner().invoke(bench._make_app(), args)


def test_report_validates_and_plot_has_series(program: Path, tmp_path: Path) -> None:
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    res = _invoke([str(program), "--edits", "0.05,0.33", "--repeat", "3", "--warmup", "1", "--number", "2",
                   "--percentile", "50,90,99", "--json", str(js), "--plot", str(png), "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(js.read_text())
    jsonschema.validate(report, bench.REPORT_SCHEMA)
    bench.validate_report(report)
    assert report["subject"]["kind"] == "program" and report["where"] == {"sige": "local", "onnxruntime": "local"}
    # GauGAN label map: 7 one-hot classes + instance edge
    assert report["subject"]["inputs"][0]["one_hot_channels"] == report["subject"]["inputs"][0]["shape"][1] - 1
    assert len(report["edits"]) == 4 and {e["mask_kind"] for e in report["edits"]} == {"blob", "stroke"}
    for e in report["edits"]:
        assert set(e["latency"]["percentiles"]) == {"p50", "p90", "p99"}
        assert e["latency"]["number"] == 2 and e["latency"]["repeat"] == 3
        assert 0 < e["macs"]["sparse"] < e["macs"]["dense"] == report["dense_macs"]
        assert e["speedup"]["vs_dense"] > 0 and e["speedup"]["vs_onnxruntime"] > 0
        assert e["fidelity"]["max_abs_err"] < 1.0
        assert abs(e["ratio"] - e["target_ratio"]) < 0.05
    blob = sorted((e for e in report["edits"] if e["mask_kind"] == "blob"), key=lambda e: e["ratio"])
    assert blob[0]["macs"]["sparse"] < blob[1]["macs"]["sparse"]
    machine = report["machine"]["host"]
    assert machine["cpu_threads"] and machine["versions"]["onnxruntime"] and machine["versions"]["numpy"]
    assert "edits" in res.output and "p99 ms" in res.output

    from PIL import Image

    with Image.open(png) as im:
        im.verify()
    assert Image.open(png).format == "PNG"
    series = bench.plot_report(report, tmp_path / "again.png")
    assert {"SIGE edit (blob)", "SIGE edit (stroke)", "dense pass (onnx)", "onnxruntime dense",
            "speedup vs dense pass (blob)", "speedup vs onnxruntime dense (stroke)"} <= set(series)
    x, y = series["SIGE edit (blob)"]
    assert x == [e["ratio"] for e in blob] and y == [e["latency"]["percentiles"]["p50"] for e in blob]


def test_mask_files(program: Path, tmp_path: Path) -> None:
    from PIL import Image

    from sige_export.program import SigeProgram

    hw = tuple(SigeProgram.load(program).manifest["mask"]["resolution"])
    m = np.zeros(hw, bool)
    m[: hw[0] // 2, : hw[1] // 4] = True
    np.save(tmp_path / "m.npy", m)
    Image.fromarray((m * 255).astype(np.uint8)).resize((hw[1] * 2, hw[0] * 2), Image.NEAREST).save(tmp_path / "m.png")
    js = tmp_path / "r.json"
    res = _invoke([str(program), "--mask", str(tmp_path / "m.npy"), "--mask", str(tmp_path / "m.png"),
                   "--repeat", "2", "--json", str(js), "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(js.read_text())
    bench.validate_report(report)
    assert [e["mask_kind"] for e in report["edits"]] == ["file", "file"]
    assert all(abs(e["ratio"] - m.mean()) < 1e-9 for e in report["edits"])
    bad = _invoke([str(program), "--mask", str(tmp_path / "nope.npy")])
    assert bad.exit_code == 2 and "no such file" in bad.output


def test_bad_arguments(program: Path, tmp_path: Path) -> None:
    res = _invoke([str(tmp_path / "missing.sige")])
    assert res.exit_code == 2 and "no such" in res.output
    res = _invoke([str(program), "--edits", "1.5"])
    assert res.exit_code == 2 and "(0, 1)" in res.output
    res = _invoke([str(program), "--mask-kind", "circle"])
    assert res.exit_code == 2 and "blob" in res.output
    res = _invoke([str(program), "--rpc-tracker", "127.0.0.1:1"])
    assert res.exit_code == 2 and "go together" in res.output
    res = _invoke(["--schema"])
    assert res.exit_code == 0 and json.loads(res.output)["title"] == "sige-bench report"


def test_one_hot_detection() -> None:
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 5, (1, 8, 8))
    onehot = np.eye(5, dtype=np.float32)[lab].transpose(0, 3, 1, 2)
    assert bench.one_hot_channels(onehot) == 5
    edge = (rng.random((1, 1, 8, 8)) > 0.5).astype(np.float32)
    assert bench.one_hot_channels(np.concatenate([onehot, edge], 1)) == 5
    assert bench.one_hot_channels(rng.standard_normal((1, 3, 8, 8)).astype(np.float32)) is None
    assert bench.one_hot_channels(np.zeros((1, 3, 8, 8), np.float32)) is None


def test_measure_min_repeat_ms_grows_number() -> None:
    calls = []
    cfg = bench.TimingConfig(warmup=1, repeat=3, number=1, min_repeat_ms=20.0, percentiles=(50.0, 90.0))

    def fn():
        calls.append(1)
        time.sleep(0.002)

    t = bench.measure(fn, cfg)
    assert t["number"] > 1 and t["repeat"] == 3 and len(t["samples"]) == 3
    assert all(1.5 < s < 15 for s in t["samples"])  # ~2 ms per run, not the repeat total
    assert set(t["percentiles"]) == {"p50", "p90"}
    t2 = bench.measure(fn, bench.TimingConfig(warmup=0, repeat=2, number=3))
    assert t2["number"] == 3


_BLOCK_TORCH = r"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _Block())
from sige_export.bench import main
try:
    main(sys.argv[1:])
    rc = 0
except SystemExit as e:
    rc = e.code
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
#EXTRA
sys.exit(rc)
"""


def test_cli_runs_without_torch(program: Path, tmp_path: Path) -> None:
    js = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, str(program), "--edits", "0.05", "--mask-kind", "blob",
                        "--repeat", "2", "--json", str(js), "--plot", str(tmp_path / "p.png"), "-q"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    bench.validate_report(json.loads(js.read_text()))
    assert (tmp_path / "p.png").stat().st_size > 0
