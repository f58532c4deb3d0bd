"""First pipeline stage: load a model from a zoo name or a file, and export it to a static dense ONNX.

Supported specs:

* a zoo name (``sige-export zoo`` lists them), built with seeded random weights;
* ``.pt2``: a ``torch.export`` program (``torch.export.load``);
* ``.onnx``: an ONNX model;
* ``.pt`` / ``.pth`` / ``.ckpt``: a TorchScript archive (``torch.jit.load``), or a state dict
  (``torch.load(weights_only=True)``; needs ``arch=<zoo name>``; ``{"state_dict": ...}``,
  ``{"model": ...}`` and ``{"netG": ...}`` wrappers and DataParallel ``module.`` prefixes are
  unwrapped). A pickle that is not weights-only (e.g. a whole ``nn.Module``) is refused unless
  ``trust_pickle=True``, because unpickling runs arbitrary code.
"""
from __future__ import annotations

import inspect
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch

from . import onnx_io, zoo

SUPPORTED_SUFFIXES = {
    ".onnx": "ONNX model",
    ".pt2": "torch.export program",
    ".pt": "TorchScript archive or state dict",
    ".pth": "TorchScript archive or state dict",
    ".ckpt": "state dict (or TorchScript archive)",
}
_WRAPPER_KEYS = ("state_dict", "model", "netG", "generator", "model_state_dict")


class FrontendError(ValueError):
    """A model could not be loaded or exported; the message says why and what to do."""


@dataclass
class LoadedModel:
    """A loaded model: a torch module or an ONNX model, plus example inputs in forward-argument order."""

    name: str
    module: torch.nn.Module | None = None
    onnx_model: onnx.ModelProto | None = None
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "zoo"  # zoo | state_dict | torchscript | export | onnx | pickle

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.inputs.items()}

    def torch_inputs(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.inputs.items()}


# --------------------------------------------------------------------------- input shapes
def parse_input_shape(text: str | Sequence[str] | Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, ...]]:
    """``"x=1x3x256x256"`` (or several, or ``"1x3x256x256"`` for the first input) -> ``{"x": (1, 3, 256, 256)}``."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return {str(k): tuple(int(d) for d in v) for k, v in text.items()}
    items = [text] if isinstance(text, str) else list(text)
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            name, _, dims = part.rpartition("=")
            try:
                shape = tuple(int(d) for d in dims.lower().replace("*", "x").split("x"))
            except ValueError:
                raise FrontendError(f"bad --input-shape {part!r}; expected NAME=1x3x256x256") from None
            if not shape or any(d <= 0 for d in shape):
                raise FrontendError(f"bad --input-shape {part!r}; dims must be positive integers")
            out[name.strip()] = shape
    return out


def _resolve_shapes(declared: dict[str, tuple[Any, ...] | None], given: Mapping[str, tuple[int, ...]],
                    what: str) -> dict[str, tuple[int, ...]]:
    """Fill dynamic dims of ``declared`` (None / str entries) from ``given``; batch defaults to 1."""
    given = dict(given)
    names = list(declared)
    if "" in given:  # unnamed shape applies to the first input
        if not names:
            raise FrontendError(f"{what} has no inputs to apply --input-shape to")
        given.setdefault(names[0], given.pop(""))
    unknown = [n for n in given if n not in declared]
    if unknown:
        raise FrontendError(f"--input-shape names unknown input(s) {', '.join(unknown)}; "
                            f"{what} has inputs: {', '.join(names) or '(none)'}")
    out: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    for name, shape in declared.items():
        if name in given:
            g = given[name]
            if shape is not None:
                if len(g) != len(shape) or any(isinstance(d, int) and d != gd for d, gd in zip(shape, g)):
                    raise FrontendError(f"--input-shape {name}={'x'.join(map(str, g))} contradicts the "
                                        f"model's declared shape {_fmt(shape)}")
            out[name] = tuple(g)
            continue
        if shape is None:
            missing.append(f"{name} (shape unknown)")
            continue
        dims = list(shape)
        if dims and not isinstance(dims[0], int):
            dims[0] = 1  # dynamic batch: 1
        if any(not isinstance(d, int) for d in dims):
            missing.append(f"{name} {_fmt(shape)}")
            continue
        out[name] = tuple(dims)
    if missing:
        raise FrontendError(f"{what} has dynamic or unknown input dims: {'; '.join(missing)}. "
                            f"Give static shapes with --input-shape NAME=1x3x256x256 (one per input).")
    return out


def _fmt(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _random_inputs(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype], seed: int
                   ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        dt = np.dtype(dtypes.get(name, np.float32))
        if np.issubdtype(dt, np.floating):
            out[name] = rng.standard_normal(shape).astype(dt)
        elif dt == np.bool_:
            out[name] = rng.random(shape) < 0.5
        else:
            out[name] = rng.integers(0, 10, size=shape).astype(dt)
    return out


# --------------------------------------------------------------------------- loaders
def load_model(spec: str | os.PathLike, *, arch: str | None = None, trust_pickle: bool = False,
               input_shape: Mapping[str, Sequence[int]] | str | None = None, size: str = "full",
               seed: int = 0) -> LoadedModel:
    """Load ``spec`` (zoo name or file); see the module docstring for the supported kinds."""
    shapes = parse_input_shape(input_shape) if not isinstance(input_shape, Mapping) else \
        {k: tuple(int(d) for d in v) for k, v in input_shape.items()}
    text = str(spec)
    if text in zoo.names():
        if arch is not None and arch != text:
            raise FrontendError(f"--arch {arch!r} given with zoo model {text!r}; --arch is for state-dict files")
        return _load_zoo(text, size=size, seed=seed, shapes=shapes)
    path = Path(text)
    suffix = path.suffix.lower()
    if not path.exists():
        hint = "" if suffix else f"; not a zoo model either (known: {', '.join(zoo.names())})"
        raise FrontendError(f"model file {text!r} does not exist{hint}")
    if path.is_dir():
        raise FrontendError(f"{text!r} is a directory; give a model file ({_supported()}) or a zoo name")
    if suffix not in SUPPORTED_SUFFIXES:
        raise FrontendError(f"unsupported model file type {suffix or '(no suffix)'!r} for {text!r}; "
                            f"supported: {_supported()}, or a zoo name")
    name = path.stem
    if suffix == ".onnx":
        return _load_onnx(path, name, shapes, seed)
    if suffix == ".pt2":
        return _load_exported(path, name, shapes, seed)
    if _is_torchscript(path):
        module = torch.jit.load(str(path), map_location="cpu").eval()
        return _from_module(module, name, shapes, seed, source="torchscript")
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        return _from_module(obj.eval(), name, shapes, seed, source="pickle")
    if isinstance(obj, Mapping):
        state = _unwrap_state_dict(obj, path)
        if arch is None:
            raise FrontendError(f"{text!r} is a state dict; name its architecture with --arch <zoo name> "
                                f"(known: {', '.join(zoo.names())})")
        if arch not in zoo.names():
            raise FrontendError(f"unknown --arch {arch!r}; known zoo models: {', '.join(zoo.names())}")
        loaded = _load_zoo(arch, size=size, seed=seed, shapes=shapes)
        load_state_dict_checked(loaded.module, state, arch=arch)
        loaded.name, loaded.source = name, "state_dict"
        return loaded
    raise FrontendError(f"{text!r} holds a {type(obj).__name__}, not a state dict or module")


def _supported() -> str:
    return ", ".join(f"{s} ({d})" for s, d in SUPPORTED_SUFFIXES.items())


def _load_zoo(name: str, *, size: str, seed: int, shapes: Mapping[str, tuple[int, ...]]) -> LoadedModel:
    try:
        module = zoo.create(name, size, seed)
        ex = zoo.example_inputs(name, size, seed)
    except (KeyError, ValueError) as e:
        raise FrontendError(str(e.args[0] if e.args else e)) from None
    inputs = {k: v.detach().cpu().numpy() for k, v in ex.items()}
    if shapes:
        declared = {k: tuple(v.shape) for k, v in inputs.items()}
        for k in list(declared):  # any given shape may replace the example's
            if k in shapes or ("" in shapes and k == next(iter(declared))):
                declared[k] = None
        final = _resolve_shapes(declared, shapes, f"zoo model {name!r}")
        regen = {k: s for k, s in final.items() if s != inputs[k].shape}
        inputs.update(_random_inputs(regen, {k: inputs[k].dtype for k in regen}, seed))
    return LoadedModel(name=name, module=module, inputs=inputs, source="zoo")


def _load_onnx(path: Path, name: str, shapes: Mapping[str, tuple[int, ...]], seed: int) -> LoadedModel:
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise FrontendError(f"cannot read ONNX file {str(path)!r}: {e}") from None
    inits = {i.name for i in model.graph.initializer}
    declared: dict[str, tuple[Any, ...] | None] = {}
    dtypes: dict[str, np.dtype] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dtypes[inp.name] = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if not tt.HasField("shape"):
            declared[inp.name] = None
            continue
        declared[inp.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                   for d in tt.shape.dim)
    final = _resolve_shapes(declared, shapes, f"ONNX model {str(path)!r}")
    return LoadedModel(name=name, onnx_model=model, inputs=_random_inputs(final, dtypes, seed), source="onnx")


def _load_exported(path: Path, name: str, shapes: Mapping[str, tuple[int, ...]], seed: int) -> LoadedModel:
    try:
        ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise FrontendError(f"cannot load torch.export program {str(path)!r}: {e}") from None
    user = set(ep.graph_signature.user_inputs)
    declared: dict[str, tuple[Any, ...] | None] = {}
    dtypes: dict[str, np.dtype] = {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise FrontendError(f"{str(path)!r}: input {node.name!r} is not a tensor; only tensor inputs are supported")
        declared[node.name] = tuple(int(d) if isinstance(d, int) else str(d) for d in val.shape)
        dtypes[node.name] = torch.empty((), dtype=val.dtype).numpy().dtype
    final = _resolve_shapes(declared, shapes, f"exported program {str(path)!r}")
    module = _ExportedModule(ep.module())
    return LoadedModel(name=name, module=module, inputs=_random_inputs(final, dtypes, seed), source="export")


class _ExportedModule(torch.nn.Module):
    """Plain-module view of ``ExportedProgram.module()`` (which refuses ``train()``/``eval()``)."""

    def __init__(self, graph_module: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_graph_module", graph_module)  # not a child: train() must not reach it
        for p in graph_module.parameters():  # tracing inlines them as constants
            p.requires_grad_(False)

    def forward(self, *args: Any) -> Any:
        return self._graph_module(*args)


def _from_module(module: torch.nn.Module, name: str, shapes: Mapping[str, tuple[int, ...]], seed: int,
                 source: str) -> LoadedModel:
    names = _forward_arg_names(module)
    declared: dict[str, tuple[Any, ...] | None] = {n: None for n in names}
    final = _resolve_shapes(declared, shapes, f"{source} model {name!r} (no recorded input shapes)")
    return LoadedModel(name=name, module=module, inputs=_random_inputs(final, {}, seed), source=source)


def _forward_arg_names(module: torch.nn.Module) -> list[str]:
    if isinstance(module, torch.jit.ScriptModule):
        args = module.forward.schema.arguments
        return [a.name for a in args if a.name != "self"]
    sig = inspect.signature(module.forward)
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            why = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
            found = re.search(r"(Unsupported global: [^\n]*|GLOBAL [^\n]*)", why)
            why = found.group(1)[:200] if found else "not weights-only"
            raise FrontendError(
                f"{str(path)!r} is not a weights-only checkpoint (it pickles Python objects; {why}). Loading it would run arbitrary code; "
                f"if you trust the file, pass --trust-pickle (trust_pickle=True), "
                f"or save a state dict / TorchScript / torch.export program instead.") from None
    except Exception as e:  # noqa: BLE001
        raise FrontendError(f"cannot read {str(path)!r} as a torch checkpoint: {e}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise FrontendError(f"cannot unpickle {str(path)!r}: {e}") from None


def _unwrap_state_dict(obj: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    cur: Any = obj
    for _ in range(3):
        if isinstance(cur, Mapping) and cur and all(isinstance(v, torch.Tensor) for v in cur.values()):
            break
        nxt = next((cur[k] for k in _WRAPPER_KEYS if isinstance(cur, Mapping) and isinstance(cur.get(k), Mapping)),
                   None)
        if nxt is None:
            break
        cur = nxt
    if not isinstance(cur, Mapping) or not cur or not all(isinstance(v, torch.Tensor) for v in cur.values()):
        keys = ", ".join(list(map(str, obj))[:10])
        raise FrontendError(f"{str(path)!r} is a dict but not a state dict of tensors (top-level keys: {keys}); "
                            f"expected tensors, or a {'/'.join(_WRAPPER_KEYS)} wrapper")
    state = dict(cur)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _limited(items: Sequence[str], n: int = 20) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... and {len(items) - n} more" if len(items) > n else "")


def load_state_dict_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, arch: str = "") -> None:
    """Strictly load ``state`` into ``module``; on any mismatch raise one error listing all of them."""
    convert = getattr(module, "convert_state_dict", None)
    if callable(convert):
        state = convert(state)
    own = module.state_dict()
    optional = lambda k: k.endswith("num_batches_tracked")  # noqa: E731 - old checkpoints lack it
    missing = [k for k in own if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_limited(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_limited(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_limited(mismatched)}")
        raise FrontendError(f"checkpoint does not match architecture {arch or type(module).__name__!r}:\n  "
                            + "\n  ".join(parts))
    full = dict(state)
    for k in own:
        if k not in full:
            full[k] = own[k]
    module.load_state_dict(full, strict=True)


# --------------------------------------------------------------------------- export
def to_dense_onnx(loaded: LoadedModel, opset: int = 17, *, dynamo: bool = False, optimize: bool = True
                  ) -> onnx.ModelProto:
    """Dense ONNX with static input shapes (those of ``loaded.inputs``), inputs named as forward args.

    ``optimize`` runs onnxscript's optimizer (constant folding of shape computations that are
    static once input shapes are fixed, dead-code removal); it is skipped if it fails.
    """
    if loaded.onnx_model is not None:
        model = _fix_onnx_input_shapes(loaded.onnx_model, loaded.input_shapes)
        return _optimize(model) if optimize else model
    if loaded.module is None:
        raise FrontendError(f"{loaded.name!r} has neither a module nor an ONNX model")
    module = loaded.module
    module.eval()
    args = tuple(loaded.torch_inputs().values())
    with tempfile.TemporaryDirectory(prefix="sige-export-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            n_out = _count_outputs(module, args)
            out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
            try:
                torch.onnx.export(module, args, path, input_names=list(loaded.inputs), output_names=out_names,
                                  opset_version=opset, dynamo=dynamo, do_constant_folding=True)
            except Exception as e:  # noqa: BLE001
                msg = str(e).strip().splitlines()[0][:500] if str(e).strip() else ""
                raise FrontendError(f"ONNX export of {loaded.name!r} failed: {type(e).__name__}: {msg}") from e
        model = onnx.load(path)  # loads external data too (models > 2 GiB)
    return _optimize(model) if optimize else model


def _count_outputs(module: Any, args: tuple) -> int:
    out = module(*args)
    if isinstance(out, (tuple, list)):
        return len(out)
    if isinstance(out, Mapping):
        return len(out)
    return 1


def _optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        model = fold_constants(model)
    except Exception:  # noqa: BLE001 - folding is an optimisation only
        pass
    try:
        if not onnx_io.fits(model):
            return model
        import onnxscript.optimizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return onnxscript.optimizer.optimize(model)
    except Exception:  # noqa: BLE001 - an unoptimised but valid model is still correct
        return model


_NOT_FOLDABLE = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                 "Bernoulli", "If", "Loop", "Scan"}


def fold_constants(model: onnx.ModelProto, max_elements: int = 1 << 16) -> onnx.ModelProto:
    """Fold small constant subgraphs (shape arithmetic) into initializers.

    ``Shape`` of tensors whose shape is static after inference, and standard-domain nodes whose
    inputs are all small constants, are evaluated with ``onnx.reference``; outputs up to
    ``max_elements`` elements replace them. Pads/shapes computed by the exporter (e.g. ``F.pad``)
    thus become plain initializers, so shape inference sees static shapes everywhere.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from .macs import ShapeContext, infer_shapes

    ctx = ShapeContext(infer_shapes(model))
    g = model.graph
    consts: dict[str, np.ndarray] = {}
    for init in g.initializer:
        if int(np.prod(init.dims)) <= max_elements and init.data_location != onnx.TensorProto.EXTERNAL:
            consts[init.name] = numpy_helper.to_array(init)
    opsets = list(model.opset_import)
    kept: list[onnx.NodeProto] = []
    folded: dict[str, np.ndarray] = {}
    for node in g.node:
        domain_ok = node.domain in ("", "ai.onnx")
        has_graph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        outs: list[np.ndarray] | None = None
        if domain_ok and node.op_type == "Shape" and ctx.shape(node.input[0]) is not None:
            shape = np.array(ctx.shape(node.input[0]), dtype=np.int64)
            start = ShapeContext.attr(node, "start", 0)
            end = ShapeContext.attr(node, "end", None)
            outs = [shape[start:end]]
        elif (domain_ok and not has_graph and node.op_type not in _NOT_FOLDABLE
              and all((not i) or i in consts for i in node.input)):
            try:
                ins = [i for i in node.input if i]
                vis = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(consts[i].dtype),
                                                     list(consts[i].shape)) for i in ins]
                outvis = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output]
                one = helper.make_model(helper.make_graph([node], "fold", vis, outvis), opset_imports=opsets,
                                        ir_version=model.ir_version)
                res = ReferenceEvaluator(one).run(None, {i: consts[i] for i in ins})
                outs = [np.asarray(r) for r in res]
            except Exception:  # noqa: BLE001 - leave the node as is
                outs = None
        if outs is not None and all(o.size <= max_elements for o in outs):
            for name, val in zip(node.output, outs):
                consts[name] = val
                folded[name] = val
            continue
        kept.append(node)
    if not folded:
        return model
    used = {i for n in kept for i in n.input} | {o.name for o in g.output}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(numpy_helper.from_array(np.array(v, copy=True, order="C"), k)
                                 for k, v in folded.items() if k in used)
    return out


def _fix_onnx_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for inp in out.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape
            dims.ClearField("dim")
            for d in shapes[inp.name]:
                dims.dim.add().dim_value = int(d)
    try:
        out = onnx_io.infer_shapes(out, data_prop=True)
    except Exception:  # noqa: BLE001
        pass
    return out


__all__ = ["FrontendError", "LoadedModel", "SUPPORTED_SUFFIXES", "load_model", "load_state_dict_checked",
           "parse_input_shape", "to_dense_onnx"]
