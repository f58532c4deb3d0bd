"""Target registry: listing, unknown-name error, JSON validity, host detection, toolchain checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sige_export import targets
from sige_export.targets import get, list_targets

EXPECTED = {"rtx3090": "cuda", "rtx2080ti": "cuda", "h100": "cuda", "core-i9": "x86", "m1": "arm",
            "host": "host", "onnx": "onnx"}
TARGET_DIR = Path(targets.__file__).resolve().parent


def test_listing():
    names = list_targets()
    assert names == sorted(names)
    assert set(EXPECTED) <= set(names)


def test_unknown_target_lists_known():
    with pytest.raises(ValueError) as e:
        get("no-such-gpu")
    msg = str(e.value)
    assert "no-such-gpu" in msg
    for n in EXPECTED:
        assert n in msg


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_json_valid(name):
    d = json.loads((TARGET_DIR / f"{name}.json").read_text())
    assert d["name"] == name
    assert d["family"] == EXPECTED[name]
    assert isinstance(d["description"], str) and d["description"]
    assert isinstance(d["produces"], str) and d["produces"]
    assert isinstance(d["toolchain"], list)
    spec = get(name)
    assert spec.family == EXPECTED[name]
    if name == "onnx":
        assert not spec.compiles
        with pytest.raises(ValueError):
            spec.tvm_target()
        return
    t = spec.tvm_target()
    assert t.kind.name == spec.tvm_target_dict["kind"]
    if spec.family == "cuda":
        assert str(t.attrs["arch"]) == d["tvm_target"]["arch"]
        assert t.host is not None and t.host.kind.name == "llvm"
        assert "nvrtc" in spec.toolchain


def test_cpu_targets():
    i9 = get("core-i9").tvm_target()
    assert str(i9.attrs["mcpu"]) == "cascadelake" and int(i9.attrs["num-cores"]) == 12
    assert get("core-i9").vector_lanes_f32 == 16
    m1 = get("m1").tvm_target()
    assert str(m1.attrs["mtriple"]).startswith("arm64-apple-macos")
    assert get("m1").vector_lanes_f32 == 4
    assert {get(n).cuda_arch for n in ("rtx3090", "rtx2080ti", "h100")} == {"sm_86", "sm_75", "sm_90"}


def test_host_detection():
    from tvm.target import codegen

    spec = get("host")
    d = spec.tvm_target_dict
    assert d["mcpu"] == str(codegen.llvm_get_system_cpu()) and d["mcpu"] not in ("", "<detected>", "generic")
    assert d["mtriple"].split("-")[0] == str(codegen.llvm_get_system_triple()).split("-")[0]
    assert d["num-cores"] >= 1
    assert spec.vector_bits in (128, 256, 512)
    t = spec.tvm_target()
    assert t.kind.name == "llvm" and str(t.attrs["mcpu"]) == d["mcpu"]


def test_check_toolchain_message(monkeypatch):
    spec = get("rtx3090")
    monkeypatch.setattr(targets, "_nvrtc_available", lambda: False)
    with pytest.raises(targets.ToolchainError, match="pip install nvidia-cuda-nvrtc-cu12 cuda-bindings nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12"):
        spec.check_toolchain()
    get("host").check_toolchain()  # CPU targets need nothing extra
