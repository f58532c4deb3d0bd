"""Frontend: every spec kind loads, exports to a static dense ONNX, and fails with clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sige_export import frontend, zoo
from sige_export.frontend import FrontendError, load_model, parse_input_shape, to_dense_onnx
from tests.helpers import assert_close_relative


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.out = torch.nn.Conv2d(4, 3, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(image)))


def _run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


def _static_input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out = {}
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), f"{i.name} not static"
        out[i.name] = tuple(d.dim_value for d in dims)
    return out


def test_parse_input_shape() -> None:
    assert parse_input_shape("x=1x3x8x8") == {"x": (1, 3, 8, 8)}
    assert parse_input_shape(["x=1x3x8x8", "t=1"]) == {"x": (1, 3, 8, 8), "t": (1,)}
    assert parse_input_shape("1x3x8x8") == {"": (1, 3, 8, 8)}
    with pytest.raises(FrontendError, match="NAME=1x3x256x256"):
        parse_input_shape("x=1xAx8")


def test_zoo_spec_and_input_shape_override() -> None:
    loaded = load_model("gaugan-cityscapes", size="tiny")
    assert loaded.input_names == ["segmap"] and loaded.input_shapes == {"segmap": (1, 8, 64, 128)}
    assert isinstance(loaded.inputs["segmap"], np.ndarray) and loaded.source == "zoo"
    assert load_model("gaugan-cityscapes", size="tiny", input_shape={"segmap": (2, 8, 64, 128)}
                      ).input_shapes["segmap"] == (2, 8, 64, 128)
    with pytest.raises(FrontendError, match="unknown input"):
        load_model("gaugan-cityscapes", size="tiny", input_shape="image=1x3x8x8")


def test_torch_export_program(tmp_path: Path) -> None:
    m = Small().eval()
    x = torch.randn(1, 3, 16, 16)
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "m.pt2")
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.input_shapes == {"image": (1, 3, 16, 16)} and loaded.source == "export"
    model = to_dense_onnx(loaded)
    assert _static_input_shapes(model) == {"image": (1, 3, 16, 16)}
    with torch.no_grad():
        want = m(torch.from_numpy(loaded.inputs["image"])).numpy()
    assert_close_relative(_run(model, loaded.inputs), want, rel=1e-5)


def test_torch_export_dynamic_dims_need_input_shape(tmp_path: Path) -> None:
    h = torch.export.Dim("h", min=4, max=64)
    ep = torch.export.export(Small(), (torch.randn(1, 3, 16, 16),), dynamic_shapes={"image": {2: h}})
    torch.export.save(ep, tmp_path / "d.pt2")
    with pytest.raises(FrontendError, match="--input-shape"):
        load_model(tmp_path / "d.pt2")
    loaded = load_model(tmp_path / "d.pt2", input_shape="image=1x3x24x16")
    assert _static_input_shapes(to_dense_onnx(loaded)) == {"image": (1, 3, 24, 16)}


def test_torchscript_needs_shapes_then_exports(tmp_path: Path) -> None:
    m = Small().eval()
    torch.jit.script(m).save(str(tmp_path / "m.pt"))
    with pytest.raises(FrontendError, match="--input-shape"):
        load_model(tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", input_shape="image=1x3x8x8")
    assert loaded.source == "torchscript" and loaded.input_names == ["image"]
    model = to_dense_onnx(loaded)
    with torch.no_grad():
        want = m(torch.from_numpy(loaded.inputs["image"])).numpy()
    assert_close_relative(_run(model, loaded.inputs), want, rel=1e-5)


def test_onnx_file_dynamic_dims(tmp_path: Path) -> None:
    torch.onnx.export(Small().eval(), (torch.randn(1, 3, 8, 8),), str(tmp_path / "m.onnx"), input_names=["image"],
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    with pytest.raises(FrontendError, match="--input-shape"):
        load_model(tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx", input_shape={"image": (1, 3, 12, 10)})
    assert loaded.source == "onnx"
    model = to_dense_onnx(loaded)
    assert _static_input_shapes(model) == {"image": (1, 3, 12, 10)}
    assert _run(model, loaded.inputs).shape == (1, 3, 12, 10)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_state_dict_wrappers(tmp_path: Path, wrap: str) -> None:
    src = zoo.create("gancomp-gaugan", "tiny", seed=7)
    sd = src.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "ck.ckpt")
    loaded = load_model(tmp_path / "ck.ckpt", arch="gancomp-gaugan", size="tiny")
    assert loaded.source == "state_dict"
    got = loaded.module.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_state_dict_errors(tmp_path: Path) -> None:
    torch.save(zoo.create("gaugan-cityscapes", "tiny").state_dict(), tmp_path / "g.pth")
    with pytest.raises(FrontendError, match="--arch"):
        load_model(tmp_path / "g.pth")
    with pytest.raises(FrontendError, match="unknown --arch"):
        load_model(tmp_path / "g.pth", arch="nope")
    with pytest.raises(FrontendError) as e:
        load_model(tmp_path / "g.pth", arch="gaugan-cityscapes", size="full")
    assert "shape mismatches" in str(e.value) and "fc.weight" in str(e.value)


def test_pickle_refused_unless_trusted(tmp_path: Path) -> None:
    torch.save(Small(), tmp_path / "whole.pth")
    with pytest.raises(FrontendError, match="--trust-pickle"):
        load_model(tmp_path / "whole.pth")
    loaded = load_model(tmp_path / "whole.pth", trust_pickle=True, input_shape="image=1x3x8x8")
    assert loaded.source == "pickle" and loaded.input_shapes == {"image": (1, 3, 8, 8)}


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(FrontendError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")
    (tmp_path / "m.tflite").write_bytes(b"x")
    with pytest.raises(FrontendError) as e:
        load_model(tmp_path / "m.tflite")
    for suffix in (".onnx", ".pt2", ".pt", ".pth", ".ckpt"):
        assert suffix in str(e.value)
    with pytest.raises(FrontendError, match="known"):
        load_model("not-a-model")


def test_fold_constants_makes_pads_static() -> None:
    class P(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 1, 0, 1)).reshape(x.shape[0], -1)

    loaded = frontend.LoadedModel(name="p", module=P(), source="test",
                                  inputs={"x": np.ones((1, 2, 3, 3), np.float32)})
    model = to_dense_onnx(loaded)
    assert {n.op_type for n in model.graph.node} <= {"Pad", "Reshape"}
    assert _run(model, loaded.inputs).shape == (1, 32)
