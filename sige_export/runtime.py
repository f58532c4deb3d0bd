"""Thin runtime: load a SIGE program or artifact, prime once, edit cheaply; caches held per key.

Import cost is kept low on purpose: numpy and onnxruntime (portable programs) or the TVM runtime
(compiled artifacts) only; never torch or the TVM compiler.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Protocol

import numpy as np

from . import mask as masks
from .program import SigeProgram, grid_indices


class Backend(Protocol):
    """Runs the three passes of a program on numpy arrays."""

    def prime(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def edit(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def dense(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OnnxRuntimeBackend:
    """The portable program in onnxruntime: three sessions cut from the one graph."""

    def __init__(self, program: SigeProgram, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3

        def session(model):
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

        self._prime = session(program.prime_model())
        self._edit = session(program.edit_model())
        self._dense = session(program.dense_model())

    @staticmethod
    def _run(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))

    def prime(self, feeds):
        return self._run(self._prime, feeds)

    def edit(self, feeds):
        return self._run(self._edit, feeds)

    def dense(self, feeds):
        return self._run(self._dense, feeds)


class EngineError(RuntimeError):
    """A runtime failure with a message that names the problem."""


@dataclass
class _Entry:
    inputs: dict[str, np.ndarray]
    caches: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    nbytes: int
    last_edit: dict[str, Any] | None = None


@dataclass
class EditStats:
    """What the last edit did: edited ratio, active blocks per grid, whether it fell back to dense."""

    ratio: float = 0.0
    blocks: dict[str, int] = field(default_factory=dict)
    mode: str = "sparse"  # "sparse", "cached" (empty mask) or "dense" (above the crossover ratio)
    seconds: float = 0.0


class Engine:
    """A loaded SIGE program: ``prime`` caches the original, ``edit`` recomputes only what changed.

    Thread safety: a re-entrant lock serialises calls on one engine (the caches are shared
    state); use one engine per thread for parallel throughput.
    """

    def __init__(self, program: SigeProgram, backend: Backend, *, cache_budget_bytes: int | None = None,
                 crossover_ratio: float | None = None) -> None:
        self.program = program
        self.manifest = program.manifest
        self.backend = backend
        self.cache_budget_bytes = cache_budget_bytes
        runtime = self.manifest.get("runtime", {})
        self.crossover_ratio = crossover_ratio if crossover_ratio is not None else runtime.get("crossover_ratio", 1.0)
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._evicted: set[Hashable] = set()
        self._lock = threading.RLock()
        self.last_edit = EditStats()
        self._inputs = self.manifest["inputs"]
        self._input_names = [i["name"] for i in self._inputs]

    # ------------------------------------------------------------------ inputs
    def _feeds(self, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
        names = self._input_names
        if len(args) > len(names):
            raise EngineError(f"expected at most {len(names)} inputs ({', '.join(names)}), got {len(args)}")
        feeds = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise EngineError(f"unknown input {k!r}; inputs are {', '.join(names)}")
            feeds[k] = v
        missing = [n for n in names if n not in feeds]
        if missing:
            raise EngineError(f"missing inputs: {', '.join(missing)}")
        out = {}
        for spec in self._inputs:
            arr = np.asarray(feeds[spec["name"]])
            want = np.dtype(spec["dtype"])
            if arr.dtype != want:
                if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(want, np.floating):
                    arr = arr.astype(want)
                else:
                    raise EngineError(f"input {spec['name']!r} has dtype {arr.dtype}, expected {want}")
            if tuple(arr.shape) != tuple(spec["shape"]):
                raise EngineError(f"input {spec['name']!r} has shape {tuple(arr.shape)}, expected {tuple(spec['shape'])}")
            out[spec["name"]] = np.ascontiguousarray(arr)
        return out

    # ------------------------------------------------------------------ passes
    def dense(self, *args, **kwargs) -> np.ndarray:
        """The dense model (no caches): for comparisons and as the fallback."""
        feeds = self._feeds(args, kwargs)
        with self._lock:
            out = self.backend.dense(feeds)
        return out[self.manifest["outputs"][0]]

    def prime(self, *args, key: Hashable = None, **kwargs) -> np.ndarray:
        """Run the dense pass on the original inputs and keep its caches under ``key``."""
        feeds = self._feeds(args, kwargs)
        with self._lock:
            res = self.backend.prime(feeds)
            caches = {n: res[n] for n in self.program.cache_names}
            outputs = {n: res[n] for n in self.manifest["outputs"]}
            nbytes = sum(a.nbytes for a in caches.values()) + sum(a.nbytes for a in feeds.values())
            self._entries.pop(key, None)
            self._entries[key] = _Entry(feeds, caches, outputs, nbytes)
            self._evicted.discard(key)
            self._enforce_budget(keep=key)
        return outputs[self.manifest["outputs"][0]]

    def _entry(self, key: Hashable) -> _Entry:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        if key in self._evicted:
            raise EngineError(f"the caches of key {key!r} were evicted (cache budget "
                              f"{self.cache_budget_bytes} bytes): prime it again")
        raise EngineError(f"key {key!r} is not primed: call engine.prime(..., key={key!r}) before edit")

    def _enforce_budget(self, keep: Hashable) -> None:
        if self.cache_budget_bytes is None:
            return
        while self.cache_bytes > self.cache_budget_bytes and len(self._entries) > 1:
            victim = next(k for k in self._entries if k != keep)
            del self._entries[victim]
            self._evicted.add(victim)

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the caches of every primed key (inputs included)."""
        return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def mask_for(self, *args, key: Hashable = None, **kwargs) -> np.ndarray:
        """The automatic difference mask of new inputs against the primed ones (before dilation)."""
        feeds = self._feeds(args, kwargs)
        with self._lock:
            entry = self._entry(key)
            src = self.manifest["mask"]["source"]
            return masks.difference_mask(entry.inputs[src], feeds[src], eps=self.manifest["mask"]["eps"])

    def edit_feeds(self, mask: np.ndarray, key: Hashable = None) -> dict[str, np.ndarray]:
        """Index and scatter-map inputs of the edit pass for ``mask`` (at the source resolution)."""
        m = self.manifest
        res = tuple(m["mask"]["resolution"])
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.shape != res:
            raise EngineError(f"mask of shape {mask.shape} does not match the edited input's size {res}")
        mask = mask.astype(bool)
        levels = sorted({tuple(g["resolution"]) for g in m["indices"]}, reverse=True)
        pyramid = masks.mask_pyramid(mask, levels, dilation=m["mask"]["dilation"])
        feeds: dict[str, np.ndarray] = {}
        for g in m["indices"]:
            feeds[g["name"]] = grid_indices(pyramid[tuple(g["resolution"])], g)
        for s in m["scatter_maps"]:
            feeds[s["name"]] = masks.scatter_map(tuple(s["out_resolution"]), feeds[s["indices"]],
                                                 tuple(s["offset"]), tuple(s["stride"]), tuple(s["out_block"]))
        return feeds

    def edit(self, *args, mask: np.ndarray | None = None, key: Hashable = None, commit: bool = False,
             **kwargs) -> np.ndarray:
        """Recompute only the blocks the edit touches; falls back to dense above the crossover ratio."""
        feeds = self._feeds(args, kwargs)
        t0 = time.perf_counter()
        with self._lock:
            entry = self._entry(key)
            src = self.manifest["mask"]["source"]
            if mask is None:
                mask = masks.difference_mask(entry.inputs[src], feeds[src], eps=self.manifest["mask"]["eps"])
            else:
                mask = np.asarray(mask)
                want = tuple(self.manifest["mask"]["resolution"])
                if mask.shape != want:
                    raise EngineError(f"mask of shape {mask.shape} does not match the edited input's size {want}")
                mask = mask.astype(bool)
            ratio = float(mask.mean())
            out_name = self.manifest["outputs"][0]
            if not mask.any():
                self.last_edit = EditStats(0.0, {}, "cached", time.perf_counter() - t0)
                entry.last_edit = {"feeds": feeds, "outputs": dict(entry.outputs), "dense": False}
                return entry.outputs[out_name].copy()
            if ratio > self.crossover_ratio:
                res = self.backend.prime(feeds)
                self.last_edit = EditStats(ratio, {}, "dense", time.perf_counter() - t0)
                entry.last_edit = {"feeds": feeds, "prime": res}
                out = res[out_name]
            else:
                edit_feeds = self.edit_feeds(mask, key)
                full = {**entry.caches, **edit_feeds}
                for name, edited in self.manifest["edit"]["edited"].items():
                    full[edited] = feeds[name]
                res = self.backend.edit(full)
                out = res[self.manifest["edit"]["outputs"][0]]
                blocks = {g["name"]: int(edit_feeds[g["name"]].shape[0]) for g in self.manifest["indices"]}
                self.last_edit = EditStats(ratio, blocks, "sparse", time.perf_counter() - t0)
                entry.last_edit = {"feeds": feeds, "prime": None}
            if commit:
                self._commit(key, entry)
            return out

    def commit(self, key: Hashable = None) -> None:
        """Fold the last edit into the caches of ``key`` (incremental pre-computation)."""
        with self._lock:
            entry = self._entry(key)
            if entry.last_edit is None:
                raise EngineError(f"nothing to commit for key {key!r}: no edit since prime")
            self._commit(key, entry)

    def _commit(self, key: Hashable, entry: _Entry) -> None:
        # The program's caches are the prime pass's tensors; re-priming on the edited inputs is
        # exact. TODO(perf): scatter only the edited blocks into the caches.
        self.prime(**entry.last_edit["feeds"], key=key)


def load(path: str | Path, *, threads: int | None = None, cache_budget_bytes: int | None = None,
         crossover_ratio: float | None = None) -> Engine:
    """Open a portable SIGE ONNX program (``.onnx``) or a compiled artifact."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such SIGE program or artifact: {path}")
    if path.suffix == ".onnx":
        program = SigeProgram.load(path)
        return Engine(program, OnnxRuntimeBackend(program, threads), cache_budget_bytes=cache_budget_bytes,
                      crossover_ratio=crossover_ratio)
    raise EngineError(f"{path}: unsupported file type {path.suffix!r}; expected a SIGE program (.onnx)")
