"""ONNX models of any size: protobuf refuses to serialise a message of 2 GiB or more (Stable Diffusion's
UNet holds 3.4 GB of weights), and every ONNX tool that crosses into C++ (shape inference, the version
converter, onnxruntime) serialises first. These helpers run those tools on a copy without the weights'
data and keep big models' weights in a ``.data`` file next to the ``.onnx``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

# protobuf's limit is 2 GiB; the margin leaves room for what a pass adds to a model that was measured to fit
PROTO_LIMIT = (1 << 31) - (1 << 24)
# initializers with more elements than this travel without their data through C++ tools
DETACH_MIN_ELEMENTS = 1 << 12
_EXTERNAL_KEY = "sige-detached"


def fits(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serialises as one protobuf message."""
    try:
        return model.ByteSize() < PROTO_LIMIT
    except Exception:  # noqa: BLE001 - protobuf raises once the size overflows
        return False


def detach_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of ``model`` whose big initializers keep name, type and dims but no data, and those tensors.

    The copy's tensors are marked external (location ``sige-detached``): tools read their shapes and
    leave them alone; :func:`attach_weights` puts the data back.
    """
    light = onnx.ModelProto()
    weights: dict[str, onnx.TensorProto] = {}
    _copy_fields(model, light, skip="graph")
    g, src = light.graph, model.graph
    _copy_fields(src, g, skip="initializer")
    for init in src.initializer:
        t = g.initializer.add()
        if math.prod(init.dims) > DETACH_MIN_ELEMENTS and init.data_location != onnx.TensorProto.EXTERNAL:
            t.name, t.data_type = init.name, init.data_type
            t.dims.extend(init.dims)
            t.data_location = onnx.TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", _EXTERNAL_KEY
            weights[init.name] = init
        else:
            t.CopyFrom(init)
    return light, weights


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if _repeated(field):
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _repeated(field) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29; `label` is deprecated there
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def attach_weights(model: onnx.ModelProto, weights: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """Put detached tensors back into ``model`` (in place; initializers a tool dropped stay dropped)."""
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and t.name in weights and _detached(t):
            t.CopyFrom(weights[t.name])
    return model


def _detached(t: onnx.TensorProto) -> bool:
    return any(e.key == "location" and e.value == _EXTERNAL_KEY for e in t.external_data)


def infer_shapes(model: onnx.ModelProto, *, weights: bool = True, **kwargs) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` for models of any size; ``weights=False`` leaves the big
    initializers of the result without data (when only the shapes are wanted)."""
    light, detached = detach_weights(model)
    inferred = shape_inference.infer_shapes(light, **kwargs)
    return attach_weights(inferred, detached) if weights else inferred


def convert_version(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``onnx.version_converter.convert_version`` for models of any size."""
    from onnx import version_converter

    light, weights = detach_weights(model)
    return attach_weights(version_converter.convert_version(light, version), weights)


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` atomically; a model over protobuf's limit keeps its weights in ``<name>.data`` beside it.

    Both files go through temporary names and renames, the ``.data`` first, so an interrupted save
    leaves the previous files (or none), never a model that points at missing weights.
    """
    from .program import atomic_file

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if fits(model):
        with atomic_file(path) as f:
            f.write(model.SerializeToString())
        data.unlink(missing_ok=True)
        return path
    light, weights = detach_weights(model)
    offset = 0
    with atomic_file(data) as f:
        for t in light.graph.initializer:
            if t.name not in weights or not _detached(t):
                continue
            raw = _raw_bytes(weights[t.name])
            pad = -offset % 64
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
    with atomic_file(path) as f:
        f.write(light.SerializeToString())
    return path


def _raw_bytes(t: onnx.TensorProto) -> bytes:
    return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()


def session(model: onnx.ModelProto, threads: int | None = None) -> "ort.InferenceSession":
    """An onnxruntime CPU session of ``model`` (``threads`` intra-op threads, warnings off); a model over
    protobuf's limit passes its weights as external initializers (in memory, no file)."""
    import onnxruntime as ort

    options = ort.SessionOptions()  # one per session: external initializers stay registered on it
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if fits(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    light, weights = detach_weights(model)
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(numpy_helper.to_array(t)))
              for t in weights.values()]
    options.add_external_initializers(list(weights), values)
    sess = ort.InferenceSession(light.SerializeToString(), options, providers=providers)
    sess._sige_external_initializers = values  # onnxruntime reads them in place: keep them alive
    return sess


__all__ = ["PROTO_LIMIT", "attach_weights", "convert_version", "detach_weights", "fits", "infer_shapes", "save",
           "session"]
