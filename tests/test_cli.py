"""CLI: `sige-export zoo --json`, dispatch between subcommands and the default export command."""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from sige_export import cli, zoo


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGE_EXPORT_CACHE_DIR", str(tmp_path / "cache"))


def test_zoo_json_lists_all_entries_with_macs(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.app, ["zoo", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert sorted(d["name"] for d in data) == zoo.names()
    for d in data:
        assert d["macs"] > 0 and d["params"] > 0 and d["inputs"]
        assert all(i["name"] and all(s > 0 for s in i["shape"]) for i in d["inputs"])
    gaugan = next(d for d in data if d["name"] == "gaugan-cityscapes")
    assert gaugan["inputs"] == [{"name": "segmap", "shape": [1, 36, 256, 512], "dtype": "float32"}]
    assert round(gaugan["macs"] / 1e9) == 281
    assert list((tmp_path / "cache").glob("zoo-gaugan-cityscapes-*.json"))  # cached
    again = json.loads(CliRunner().invoke(cli.app, ["zoo", "--json"]).stdout)
    assert again == data


def test_zoo_table() -> None:
    res = CliRunner().invoke(cli.app, ["zoo"])
    assert res.exit_code == 0 and "gancomp-gaugan" in res.stdout and "31.16G" in res.stdout


def test_main_dispatch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "zoo" in cli.subcommand_names()
    with pytest.raises(SystemExit) as e:
        cli.main(["zoo", "--json"])
    assert e.value.code == 0
    assert {d["name"] for d in json.loads(capsys.readouterr().out)} == set(zoo.names())

    out = tmp_path / "g.onnx"
    with pytest.raises(SystemExit) as e:
        cli.main(["gancomp-gaugan", "--size", "tiny", "--target", "dense-onnx", "-o", str(out)])
    assert e.value.code == 0
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["segmap"]


def test_unknown_target_lists_known(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.export_app, ["gaugan-cityscapes", "--target", "nope", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert "dense-onnx" in res.output and "nope" in res.output
    with pytest.raises(cli.CliError, match="known targets: dense-onnx"):
        cli.export("gaugan-cityscapes", "nope", tmp_path / "x")


def test_export_errors_are_clean(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.export_app, [str(tmp_path / "missing.onnx"), "--target", "dense-onnx",
                                              "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("flag", ["--sparse-min-blocks", "--sparse-min-res", "--block-size"])
def test_bad_sparsify_options_are_clean(tmp_path: Path, flag: str) -> None:
    res = CliRunner().invoke(cli.export_app, ["ddpm-church256", "--size", "tiny", "--target", "onnx", flag, "0",
                                              "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and f"{flag[2:]} must be a positive integer, got 0" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.onnx").exists()


def test_targets_lists_every_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["targets", "--json"])
    assert e.value.code == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"dense-onnx", "onnx", "host", "m1", "core-i9", "rtx3090", "rtx2080ti", "h100"} <= set(rows)
    assert "Mach-O" in rows["m1"]["produces"]


def test_export_portable_program(tmp_path: Path) -> None:
    from sige_export.program import SigeProgram

    out = tmp_path / "prog.onnx"
    with pytest.raises(SystemExit) as e:
        cli.main(["gaugan-cityscapes", "--size", "tiny", "--target", "onnx", "-o", str(out), "--block-size", "8"])
    assert e.value.code == 0
    program = SigeProgram.load(out)
    onnx.checker.check_model(program.model, full_check=True)
    assert program.manifest["options"]["block_size"] == 8
    assert any(n.domain == "ai.sige" for n in program.model.graph.node)
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


def test_model_without_convolutions_is_a_clean_error(tmp_path: Path) -> None:
    import torch

    class NoConv(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x)

    path = tmp_path / "noconv.pt"
    torch.jit.save(torch.jit.trace(NoConv(), torch.randn(1, 3, 16, 16)), str(path))
    res = CliRunner().invoke(cli.export_app, [str(path), "--target", "onnx", "-o", str(tmp_path / "p.onnx"),
                                              "--input-shape", "x=1x3x16x16"])
    assert res.exit_code == 2 and "convolution" in res.output and "Traceback" not in res.output
