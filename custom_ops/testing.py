"""Helpers to wrap ``ai.sige`` nodes in a model and run it (onnxruntime with the bodies, or the
numpy references through ``onnx.reference``).  Used by the tests; handy for debugging."""
from __future__ import annotations

from typing import Collection, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from . import attach_functions, reference_ops

_NP_TO_ONNX = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.int32): onnx.TensorProto.INT32,
               np.dtype(np.int64): onnx.TensorProto.INT64, np.dtype(np.float64): onnx.TensorProto.DOUBLE}


def model_from_nodes(nodes: Sequence[onnx.NodeProto], feeds: Mapping[str, np.ndarray], outputs: Sequence[str],
                     *, dynamic: Collection[str] = (), check: bool = True) -> onnx.ModelProto:
    """A float32 model (opset 18, IR 10) over ``nodes`` with graph inputs typed like ``feeds``,
    function bodies attached; inputs named in ``dynamic`` get a symbolic first dim (e.g. the
    number of blocks); ``check`` runs ``check_model(full_check=True)``."""
    def dims(k: str, v: np.ndarray) -> list[int | str]:
        d: list[int | str] = list(np.shape(v))
        if k in dynamic and d:
            d[0] = f"{k}_dim0"
        return d

    ins = [helper.make_tensor_value_info(k, _NP_TO_ONNX[np.asarray(v).dtype], dims(k, v)) for k, v in feeds.items()]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs]
    for o in outs:  # unknown dims, known rank 4: check_model wants a shape field on graph outputs
        o.type.tensor_type.shape.dim.extend([onnx.TensorShapeProto.Dimension() for _ in range(4)])
    graph = helper.make_graph(list(nodes), "sige", ins, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = attach_functions(model)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def run_onnxruntime(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run with stock onnxruntime (CPU, one thread): the ``ai.sige`` nodes execute their bodies."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return list(sess.run(None, dict(feeds)))


def run_reference(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run with ``onnx.reference.ReferenceEvaluator`` and the numpy references of the ``ai.sige`` ops."""
    from onnx.reference import ReferenceEvaluator

    return list(ReferenceEvaluator(model, new_ops=reference_ops()).run(None, dict(feeds)))
