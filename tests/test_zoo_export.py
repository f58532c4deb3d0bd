"""Every registered zoo entry (tiny): dense ONNX export runs in onnxruntime and matches torch."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sige_export import frontend, zoo
from sige_export.macs import count_macs, count_torch_macs
from tests.helpers import assert_close_relative


@pytest.mark.parametrize("name", zoo.names())
def test_tiny_export_matches_torch(name: str) -> None:
    loaded = frontend.load_model(name, size="tiny", seed=0)
    model = frontend.to_dense_onnx(loaded)
    assert [i.name for i in model.graph.input] == loaded.input_names
    for inp in model.graph.input:  # static shapes, as the sparsifier needs them
        dims = inp.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), inp.name
        assert tuple(d.dim_value for d in dims) == loaded.input_shapes[inp.name]

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, loaded.inputs)
    with torch.no_grad():
        want = loaded.module(**loaded.torch_inputs())
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_relative(g, w.numpy(), rel=1e-4, what=f"{name} output {i}")
        assert np.isfinite(g).all()

    # the ONNX MACs counter and the aten-level counter agree on the exported graph
    report = count_macs(model)
    assert not report.unknown
    assert report.total == count_torch_macs(loaded.module, loaded.torch_inputs()).total > 0
