"""The SIGE op set (ONNX domain ``ai.sige``, opset 1); see docs/sige-ops.md.

Each op lives in its own module (numpy reference as an ``onnx.reference`` OpRun, ONNX function
body of standard opset-18 ops, shape inference).  This module is the public API:

* :func:`make_node` builds a validated node with its canonical function overload,
* :func:`function_for` / :func:`attach_functions` give the FunctionProto bodies so a model runs in
  stock onnxruntime,
* :func:`reference_ops` plugs the numpy references into ``onnx.reference.ReferenceEvaluator``,
* :func:`infer_shape`, :func:`validate_inputs`, :func:`reference` expose the per-op pieces.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper
from onnx.reference.op_run import OpRun

from . import (sige_gather, sige_scatter, sige_scatter_gather, sige_scatter_moments, sige_scatter_with_block_residual,
               sige_sparse_conv2d, sige_tile_moments)
from ._common import (DOMAIN, IR_VERSION, ONNX_OPSET, OPSET_VERSION, REGISTRY, Body, OpDef, attrs_from_node,
                      normalise_attrs)
from ._common import overload_name as _overload_name
from .sige_gather import SigeGather
from .sige_scatter import SigeScatter
from .sige_scatter_gather import SigeScatterGather
from .sige_scatter_moments import SigeScatterMoments
from .sige_scatter_with_block_residual import SigeScatterWithBlockResidual
from .sige_sparse_conv2d import SigeSparseConv2d
from .sige_tile_moments import SigeTileMoments

__all__ = [
    "DOMAIN", "OPSET_VERSION", "OP_TYPES", "MIN_MODEL_OPSET", "make_node", "function_for", "attach_functions",
    "reference_ops", "infer_shape", "validate_inputs", "reference", "normalize_attrs", "overload_for",
    "SigeGather", "SigeSparseConv2d", "SigeScatter", "SigeScatterGather", "SigeScatterWithBlockResidual",
    "SigeTileMoments", "SigeScatterMoments",
]

_MODULES = (sige_gather, sige_sparse_conv2d, sige_scatter, sige_scatter_gather, sige_scatter_with_block_residual,
            sige_tile_moments, sige_scatter_moments)
OP_TYPES: tuple[str, ...] = tuple(m.OP_TYPE for m in _MODULES)
MIN_MODEL_OPSET = 17  # default-domain opset a model needs for the bodies (checked and run with 17..21)
_OP_RUNS: tuple[type[OpRun], ...] = (SigeGather, SigeSparseConv2d, SigeScatter, SigeScatterGather,
                                     SigeScatterWithBlockResidual, SigeTileMoments, SigeScatterMoments)


def _op(op_type: str) -> OpDef:
    if op_type not in REGISTRY:
        raise ValueError(f"unknown ai.sige op type {op_type!r}; expected one of {list(OP_TYPES)}")
    return REGISTRY[op_type]


def normalize_attrs(op_type: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Validated attributes with defaults filled in (pairs as tuples, ``swish`` -> ``silu``)."""
    op = _op(op_type)
    return normalise_attrs(op_type, op.attrs, attrs)


def _present_optional(op: OpDef, inputs: Sequence[str | None]) -> list[str]:
    return [name for i, name in enumerate(op.inputs) if i >= op.n_required and i < len(inputs) and inputs[i]]


def overload_for(op_type: str, attrs: Mapping[str, Any], present_optional: Sequence[str] = ()) -> str:
    """Canonical overload name for ``attrs`` and the names of the present optional inputs."""
    op = _op(op_type)
    bad = sorted(set(present_optional) - set(op.optional_names()))
    if bad:
        raise ValueError(f"{op_type}: {bad} are not optional inputs; optional: {list(op.optional_names())}")
    order = [n for n in op.optional_names() if n in present_optional]
    return _overload_name(op.attrs, normalize_attrs(op_type, attrs), order)


def make_node(op_type: str, inputs: Sequence[str | None], outputs: Sequence[str], name: str | None = None,
              **attrs: Any) -> onnx.NodeProto:
    """An ``ai.sige`` node with validated, fully spelled-out attributes and its canonical overload.

    Absent optional inputs may be given as ``''`` or ``None`` (trailing ones are dropped).
    """
    op = _op(op_type)
    ins = ["" if i is None else str(i) for i in inputs]
    if len(ins) > len(op.inputs):
        raise ValueError(f"{op_type}: {len(ins)} inputs given, at most {len(op.inputs)} ({list(op.inputs)})")
    missing = [op.inputs[i] for i in range(op.n_required) if i >= len(ins) or not ins[i]]
    if missing:
        raise ValueError(f"{op_type}: missing required input(s) {missing}")
    while len(ins) > op.n_required and not ins[-1]:
        ins.pop()
    if len(outputs) != len(op.outputs) or not all(outputs):
        raise ValueError(f"{op_type}: expected {len(op.outputs)} output name(s), got {list(outputs)}")
    norm = normalize_attrs(op_type, attrs)
    node = helper.make_node(op_type, ins, list(outputs), name=name, domain=DOMAIN,
                            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in norm.items()})
    node.overload = _overload_name(op.attrs, norm, _present_optional(op, ins))
    return node


def function_for(node: onnx.NodeProto, onnx_opset: int = ONNX_OPSET) -> onnx.FunctionProto:
    """The FunctionProto body (standard ONNX ops) for ``node``'s attributes and inputs.

    The body is written for opset 18 and imports ``max(18, onnx_opset)`` (the ops it uses keep
    their semantics in later versions), so it matches a model on a newer default opset.
    """
    if node.domain != DOMAIN:
        raise ValueError(f"node {node.name!r} has domain {node.domain!r}, not {DOMAIN!r}")
    op = _op(node.op_type)
    ins = list(node.input)
    if len(ins) > len(op.inputs) or any(not ins[i] for i in range(min(op.n_required, len(ins)))) \
            or len(ins) < op.n_required:
        raise ValueError(f"{node.op_type} node {node.name!r}: bad inputs {ins}; expected {list(op.inputs)}")
    attrs = normalize_attrs(node.op_type, attrs_from_node(node))
    present = _present_optional(op, ins)
    formal = list(op.inputs[:len(ins)])
    bd = Body()
    out = op.body(bd, [formal[i] if i < len(ins) and ins[i] else None for i in range(len(op.inputs))], attrs)
    assert out == op.outputs[0]
    return bd.function(node.op_type, _overload_name(op.attrs, attrs, present), formal, out, doc=op.doc,
                       opset=max(ONNX_OPSET, int(onnx_opset)))


def attach_functions(model: onnx.ModelProto, *, in_place: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` (``model`` itself if ``in_place``) with one body per distinct overload of its
    main-graph ``ai.sige`` nodes.

    Sets every such node's ``overload`` to the canonical name, replaces any ``ai.sige`` functions
    already present, adds the ``ai.sige`` v1 opset import and raises ``ir_version`` to >= 10.
    The bodies import the model's default-domain opset (at least 18; a model below 17 is rejected:
    convert it with ``onnx.version_converter`` first). Idempotent.
    """
    if in_place:
        out = model
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    default = [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")]
    if default and default[0] < MIN_MODEL_OPSET:
        raise ValueError(f"attach_functions: the model imports default-domain opset {default[0]}; the ai.sige "
                         f"function bodies need >= {MIN_MODEL_OPSET} (convert with onnx.version_converter)")
    model_opset = default[0] if default else ONNX_OPSET
    funcs: dict[tuple[str, str], onnx.FunctionProto] = {}
    for node in out.graph.node:
        if node.domain != DOMAIN:
            continue
        f = function_for(node, model_opset)
        node.overload = f.overload
        funcs.setdefault((f.name, f.overload), f)
    kept = [f for f in out.functions if f.domain != DOMAIN]
    del out.functions[:]
    out.functions.extend(kept)
    out.functions.extend(funcs[k] for k in sorted(funcs))
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))
    if not any(o.domain in ("", "ai.onnx") for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("", ONNX_OPSET))
    out.ir_version = max(out.ir_version, IR_VERSION)
    return out


def reference_ops() -> list[type[OpRun]]:
    """OpRun classes for ``onnx.reference.ReferenceEvaluator(model, new_ops=reference_ops())``."""
    return list(_OP_RUNS)


def infer_shape(op_type: str, input_shapes: Sequence[Sequence[int | str] | None],
                attrs: Mapping[str, Any]) -> list[tuple[int | str, ...]]:
    """Output shapes from input shapes (``None`` for absent inputs; symbolic dims pass through)."""
    op = _op(op_type)
    shapes = [None if s is None else tuple(s) for s in input_shapes]
    shapes += [None] * (len(op.inputs) - len(shapes))
    return op.shape(shapes, normalize_attrs(op_type, attrs))


def validate_inputs(op_type: str, arrays: Sequence[np.ndarray | None], attrs: Mapping[str, Any]) -> None:
    """Raise ValueError naming the problem when ``arrays`` are not valid inputs of ``op_type``."""
    op = _op(op_type)
    arrs = [None if a is None else np.asarray(a) for a in arrays]
    if len(arrs) > len(op.inputs):
        raise ValueError(f"{op_type}: {len(arrs)} inputs given, at most {len(op.inputs)}")
    arrs += [None] * (len(op.inputs) - len(arrs))
    op.validate(arrs, normalize_attrs(op_type, attrs))


def reference(op_type: str, *arrays: np.ndarray | None, **attrs: Any) -> np.ndarray:
    """Run the numpy reference of ``op_type`` directly (validates inputs and attributes)."""
    op = _op(op_type)
    arrs = [None if a is None else np.asarray(a) for a in arrays]
    arrs += [None] * (len(op.inputs) - len(arrs))
    norm = normalize_attrs(op_type, attrs)
    op.validate(arrs, norm)
    return op.compute(*arrs, **norm)
