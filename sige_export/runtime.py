"""Thin runtime: load a SIGE program or artifact, prime once, edit cheaply; caches held per key.

Import cost is kept low on purpose: numpy and onnxruntime (portable programs) or the TVM runtime
(compiled artifacts) only; never torch or the TVM compiler.

Usage::

    engine = sige_export.load("ddpm.sige.onnx")       # or a compiled ``.sige`` artifact
    engine.prime(x, t, key=step)                        # dense pass, caches kept under ``key``
    y = engine.edit(x_edited, t, key=step)              # only the blocks the edit touches
    y = engine.edit(x_edited, t, key=step, commit=True) # ... and fold the edit into the caches

State and locking: an :class:`Engine` holds, per key, the primed inputs, the caches and the cached
output (an LRU over keys under an optional byte budget). Every public method takes the engine's
re-entrant lock for the whole call, so one engine can be shared by threads: calls are serialised
and each sees a consistent cache state (``last_edit`` is that of the most recent edit from any
thread). For parallel throughput use one engine per thread (the backend sessions are not shared).
Errors (bad inputs, masks, unknown or evicted keys) are raised before any state is changed, so
the engine stays usable after them.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Protocol, Sequence

import numpy as np

from . import mask as masks
from . import onnx_io
from .program import SigeProgram, derived_feeds, grid_indices

# Edit ratio above which an edit runs dense when neither the manifest (``runtime.crossover_ratio``),
# ``load(crossover_ratio=)`` nor :meth:`Engine.calibrate` says otherwise. Above half the image the
# block overlap makes sparse execution slower than dense on every backend we measured.
DEFAULT_CROSSOVER_RATIO = 0.5
SUPPORTED_PROGRAM_VERSION = 1


class Backend(Protocol):
    """Runs the passes of a program on numpy arrays.

    ``prime`` returns the dense outputs and every cache by name; ``edit`` the edit outputs;
    ``dense`` the dense outputs. A backend may also define ``edit_with_caches(feeds)`` returning
    the edit outputs plus ``{cache name: new value}`` for the caches the edit scatters into
    (see :meth:`OnnxRuntimeBackend.edit_with_caches`); without it, commits re-prime.
    """

    def prime(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def edit(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    def dense(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class EngineError(RuntimeError):
    """A runtime failure with a message that names the problem."""


# ------------------------------------------------------------------------------------ commit model


def commit_updates(program: SigeProgram) -> tuple[dict[str, str], list[dict]]:
    """Which edit-pass tensor holds the new value of each cache the edit scatters into.

    Returns ``(updates, extra)``: ``updates`` maps a cache name to the edit tensor that is its new
    value; ``extra`` lists scatters to add (``{"op": "SigeScatter", "inputs": [...], "output":
    ..., "offset": ..., "stride": ...}``) for caches the edit only reads through fused ops:

    * ``SigeScatter(blocks, base, indices[, residual])``: the output is the new ``base``;
    * ``SigeScatterWithBlockResidual``: the output is the new ``base``; the shortcut's cached
      output ``shortcut_base`` gets ``SigeScatter(shortcut_blocks, shortcut_base, shortcut_indices)``;
    * ``SigeScatterGather(blocks, base, scatter_map, ...)``: the scattered tensor is never
      materialised; ``SigeScatter(blocks, base, indices of the map)`` computes it.

    The manifest's ``cache_updates`` adds caches the edit recomputes otherwise (statistics
    corrected over the changed tiles, token maps written at the changed rows). Caches no edit
    touches (normalisation scale/shift of the original's statistics, conditioning tensors) keep
    their primed values, as the edit pass itself does.
    """
    m = program.manifest
    caches = set(program.cache_names)
    smaps = {s["name"]: s for s in m["scatter_maps"]}
    nodes = [n for n in program.model.graph.node if n.domain == "ai.sige"]
    updates: dict[str, str] = {}
    extra: list[dict] = []

    def attrs(n) -> dict:
        import onnx

        return {a.name: list(onnx.helper.get_attribute_value(a)) for a in n.attribute
                if a.type == onnx.AttributeProto.INTS}

    for n in nodes:  # materialised scatters first: their outputs exist already
        if n.op_type in ("SigeScatter", "SigeScatterWithBlockResidual") and n.input[1] in caches:
            updates.setdefault(n.input[1], n.output[0])
    for n in nodes:
        if n.op_type == "SigeScatterWithBlockResidual":
            a = attrs(n)
            sc_blocks, sc_base, sc_idx = n.input[3], n.input[4], n.input[5]
            if sc_base in caches and sc_base not in updates:
                out = f"commit/{sc_base}"
                extra.append({"op": "SigeScatter", "inputs": [sc_blocks, sc_base, sc_idx], "output": out,
                              "offset": a.get("shortcut_offset", [0, 0]), "stride": a.get("shortcut_stride", [1, 1])})
                updates[sc_base] = out
        elif n.op_type == "SigeScatterGather":
            blocks, base, smap = n.input[0], n.input[1], n.input[2]
            if base in caches and base not in updates:
                s = smaps[smap]
                out = f"commit/{base}"
                extra.append({"op": "SigeScatter", "inputs": [blocks, base, s["indices"]], "output": out,
                              "offset": list(s["offset"]), "stride": list(s["stride"])})
                updates[base] = out
    # Caches the edit recomputes without a scatter (corrected statistics, token maps).
    for cache, tensor in m.get("cache_updates", {}).items():
        updates.setdefault(cache, tensor)
    return updates, extra


def commit_model(program: SigeProgram):
    """The edit pass with extra outputs: the edit outputs, then the new value of every updated cache.

    Returns ``(model, cache_names)``: the model's outputs are the edit outputs followed by one
    tensor per name in ``cache_names`` (same order).
    """
    import onnx
    from onnx import helper

    from . import custom_ops
    from .graph import extract

    updates, extra = commit_updates(program)
    model = onnx.ModelProto()
    model.CopyFrom(program.model)
    g = model.graph
    shapes = {c["name"]: c for c in program.manifest["caches"]}
    for e in extra:
        g.node.append(custom_ops.make_node(e["op"], e["inputs"], [e["output"]], name=e["output"],
                                           offset=e["offset"], stride=e["stride"]))
    known = {v.name for v in list(g.value_info) + list(g.input) + list(g.output)}
    for cache, tensor in updates.items():
        if tensor not in known:
            c = shapes[cache]
            g.value_info.append(helper.make_tensor_value_info(
                tensor, helper.np_dtype_to_tensor_dtype(np.dtype(c["dtype"])), c["shape"]))
    if extra:
        model = custom_ops.attach_functions(model)
    names = sorted(updates)
    m = program.manifest["edit"]
    return extract(model, m["inputs"], m["outputs"] + [updates[c] for c in names], "edit_commit"), names


# ------------------------------------------------------------------------------------ backends


class OnnxRuntimeBackend:
    """The portable program in onnxruntime: sessions cut from the one graph.

    ``prime``, ``edit`` and ``dense`` sessions are built at load; the commit session (the edit
    pass with the updated caches as extra outputs, :func:`commit_model`) on the first commit.
    """

    def __init__(self, program: SigeProgram, threads: int | None = None) -> None:
        self.program = program
        self._threads = threads
        self._prime = self._session(program.prime_model())
        self._edit = self._session(program.edit_model())
        self._dense = self._session(program.dense_model())
        self._commit = None
        self._commit_caches: list[str] = []
        try:
            commit_updates(program)
        except NotImplementedError:
            self.edit_with_caches = None  # the engine then commits by re-priming
        self._commit_lock = threading.Lock()

    def _session(self, model):
        return onnx_io.session(model, self._threads)

    @staticmethod
    def _run(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(*OnnxRuntimeBackend._run_all(sess, feeds)))

    @staticmethod
    def _run_all(sess, feeds: dict[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
        """Every output of ``sess`` (names, values), fed the inputs it takes from ``feeds``."""
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        return names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})

    def prime(self, feeds):
        return self._run(self._prime, feeds)

    def edit(self, feeds):
        return self._run(self._edit, feeds)

    def dense(self, feeds):
        return self._run(self._dense, feeds)

    def edit_with_caches(self, feeds) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The edit outputs and ``{cache name: new value}`` of the caches the edit scatters into."""
        with self._commit_lock:
            if self._commit is None:
                model, self._commit_caches = commit_model(self.program)
                self._commit = self._session(model)
        names, values = self._run_all(self._commit, feeds)  # the edit outputs, then the new caches in order
        n_out = len(self.program.manifest["edit"]["outputs"])
        outputs = dict(zip(names[:n_out], values[:n_out]))
        return outputs, dict(zip(self._commit_caches, values[n_out:]))


# ------------------------------------------------------------------------------------ engine


@dataclass
class _Entry:
    inputs: dict[str, np.ndarray]
    caches: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    nbytes: int
    last_edit: dict[str, Any] | None = None  # what commit() needs: inputs and index feeds of the edit


@dataclass
class EditStats:
    """What the last edit did.

    ``ratio``: edited fraction of the mask (before dilation); ``blocks``: active blocks per grid;
    ``mode``: ``"sparse"``, ``"cached"`` (empty mask, nothing ran) or ``"dense"`` (ratio above the
    crossover); ``seconds``: wall time of the call; ``commit``: ``None``, ``"scatter"`` (caches
    updated from the edit pass), ``"prime"`` (re-primed: dense edits, backends without
    ``edit_with_caches``, or ``commit(exact=True)``) or ``"none"`` (empty mask).
    """

    ratio: float = 0.0
    blocks: dict[str, int] = field(default_factory=dict)
    mode: str = "sparse"
    seconds: float = 0.0
    commit: str | None = None


class Engine:
    """A loaded SIGE program: ``prime`` caches the original, ``edit`` recomputes only what changed.

    ``program_or_manifest`` is a :class:`SigeProgram` (portable ONNX) or the manifest dict of a
    compiled artifact; ``backend`` runs the passes (:class:`Backend`).

    Thread safety: a re-entrant lock serialises every public call on one engine (the per-key
    caches are shared state); use one engine per thread for parallel throughput.
    """

    def __init__(self, program_or_manifest: SigeProgram | dict, backend: Backend, *,
                 cache_budget_bytes: int | None = None, crossover_ratio: float | None = None) -> None:
        if isinstance(program_or_manifest, SigeProgram):
            self.program: SigeProgram | None = program_or_manifest
            manifest = program_or_manifest.manifest
        else:
            self.program = None
            manifest = program_or_manifest
        _check_manifest(manifest)
        self.manifest = dict(manifest)
        self.manifest["runtime"] = dict(manifest.get("runtime", {}))
        self.backend = backend
        if cache_budget_bytes is not None and cache_budget_bytes <= 0:
            raise EngineError(f"cache_budget_bytes must be positive, got {cache_budget_bytes}")
        self.cache_budget_bytes = cache_budget_bytes
        if crossover_ratio is None:
            crossover_ratio = self.manifest["runtime"].get("crossover_ratio", DEFAULT_CROSSOVER_RATIO)
        self.crossover_ratio = float(crossover_ratio)
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self._evicted: set[Hashable] = set()
        self._lock = threading.RLock()
        self.last_edit = EditStats()
        self._inputs = self.manifest["inputs"]
        self._input_names = [i["name"] for i in self._inputs]
        self._cache_names = [c["name"] for c in self.manifest["caches"]]
        self._out = self.manifest["outputs"][0]
        self._edit_out = self.manifest["edit"]["outputs"][0]

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    # ------------------------------------------------------------------ inputs
    def _feeds(self, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
        names = self._input_names
        if len(args) > len(names):
            raise EngineError(f"expected at most {len(names)} inputs ({', '.join(names)}), got {len(args)}")
        feeds = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                raise EngineError(f"unknown input {k!r}; inputs are {', '.join(names)}")
            if k in feeds:
                raise EngineError(f"input {k!r} given both by position and by name")
            feeds[k] = v
        missing = [n for n in names if n not in feeds]
        if missing:
            raise EngineError(f"missing inputs: {', '.join(missing)} (inputs are {', '.join(names)})")
        out = {}
        for spec in self._inputs:
            arr = np.asarray(feeds[spec["name"]])
            want = np.dtype(spec["dtype"])
            if arr.dtype != want:
                if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(want, np.floating):
                    arr = arr.astype(want)  # float64 -> float32 is a convenience, not an error
                else:
                    raise EngineError(f"input {spec['name']!r} has dtype {arr.dtype}, expected {want}")
            if tuple(arr.shape) != tuple(spec["shape"]):
                raise EngineError(f"input {spec['name']!r} has shape {tuple(arr.shape)}, "
                                  f"expected {tuple(spec['shape'])}")
            out[spec["name"]] = np.ascontiguousarray(arr)
        return out

    def _check_mask(self, mask: Any) -> np.ndarray:
        want = tuple(self.manifest["mask"]["resolution"])
        mask = np.asarray(mask)
        if mask.shape != want:
            raise EngineError(f"mask of shape {mask.shape} does not match the edited input "
                              f"{self.manifest['mask']['source']!r}'s size {want} ([H, W])")
        if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.number)):
            raise EngineError(f"mask has dtype {mask.dtype}; expected bool or numbers (nonzero = edited)")
        return mask.astype(bool)

    # ------------------------------------------------------------------ passes
    def dense(self, *args, **kwargs) -> np.ndarray:
        """The dense model (no caches): for comparisons and as the fallback."""
        feeds = self._feeds(args, kwargs)
        with self._lock:
            out = self.backend.dense(feeds)
        return out[self._out]

    def prime(self, *args, key: Hashable = None, **kwargs) -> np.ndarray:
        """Run the dense pass on the original inputs and keep its caches under ``key``.

        Re-priming a key replaces its caches. With a cache budget, least recently used keys are
        evicted to make room; a key whose caches alone exceed the budget is refused.
        """
        feeds = self._feeds(args, kwargs)
        with self._lock:
            res = self.backend.prime(feeds)
            self._store(key, feeds, res)
        return res[self._out]

    def _store(self, key: Hashable, feeds: dict[str, np.ndarray], res: dict[str, np.ndarray]) -> None:
        missing = [n for n in self._cache_names if n not in res]
        if missing:
            raise EngineError(f"the backend's prime pass did not return caches {missing[:5]}")
        caches = {n: res[n] for n in self._cache_names}
        outputs = {n: res[n] for n in self.manifest["outputs"]}
        nbytes = (sum(a.nbytes for a in caches.values()) + sum(a.nbytes for a in feeds.values())
                  + sum(a.nbytes for a in outputs.values()))
        if self.cache_budget_bytes is not None and nbytes > self.cache_budget_bytes:
            raise EngineError(f"the caches of one key need {nbytes} bytes, more than the cache budget "
                              f"({self.cache_budget_bytes} bytes): raise cache_budget_bytes")
        self._entries.pop(key, None)
        self._entries[key] = _Entry(feeds, caches, outputs, nbytes)
        self._evicted.discard(key)
        self._enforce_budget(keep=key)

    def _entry(self, key: Hashable) -> _Entry:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        if key in self._evicted:
            raise EngineError(f"the caches of key {key!r} were evicted (cache budget "
                              f"{self.cache_budget_bytes} bytes, least recently used first): prime it again")
        primed = list(self._entries)[:8]
        raise EngineError(f"key {key!r} is not primed: call engine.prime(..., key={key!r}) before edit "
                          f"(primed keys: {primed})")

    def _enforce_budget(self, keep: Hashable) -> None:
        if self.cache_budget_bytes is None:
            return
        while self.cache_bytes > self.cache_budget_bytes and len(self._entries) > 1:
            victim = next(k for k in self._entries if k != keep)
            del self._entries[victim]
            self._evicted.add(victim)

    @property
    def cache_bytes(self) -> int:
        """Bytes held for every primed key: caches, primed inputs and cached outputs."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list[Hashable]:
        """Primed keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def evict(self, key: Hashable = None) -> None:
        """Drop the caches of ``key`` (a later edit of it raises until it is primed again)."""
        with self._lock:
            if self._entries.pop(key, None) is not None:
                self._evicted.add(key)

    def clear(self) -> None:
        """Drop every key's caches."""
        with self._lock:
            self._evicted.update(self._entries)
            self._entries.clear()

    def mask_for(self, *args, key: Hashable = None, **kwargs) -> np.ndarray:
        """The automatic difference mask of new inputs against the primed ones (before dilation)."""
        feeds = self._feeds(args, kwargs)
        with self._lock:
            entry = self._entry(key)
            src = self.manifest["mask"]["source"]
            return masks.difference_mask(entry.inputs[src], feeds[src], eps=self.manifest["mask"]["eps"])

    def edit_feeds(self, mask: np.ndarray, key: Hashable = None) -> dict[str, np.ndarray]:
        """Index inputs of every block grid (each at its own resolution) and scatter maps for ``mask``.

        ``mask`` is at the edited input's resolution; the pyramid is downsampled and dilated by
        the manifest's ``mask.dilation`` at each level.
        """
        m = self.manifest
        mask = self._check_mask(mask)
        levels = sorted({tuple(g["resolution"]) for g in m["indices"]}, reverse=True)
        pyramid = {hw: masks.downsample(mask, hw) for hw in levels}  # dilated through the block windows
        integrals = {hw: masks.mask_integral(pm) for hw, pm in pyramid.items()}
        feeds: dict[str, np.ndarray] = {}
        for g in m["indices"]:
            hw = tuple(g["resolution"])
            feeds[g["name"]] = grid_indices(pyramid[hw], g, integrals[hw], m["mask"]["dilation"])
        feeds.update(derived_feeds(m, feeds))
        return feeds

    def edit(self, *args, mask: np.ndarray | None = None, key: Hashable = None, commit: bool = False,
             **kwargs) -> np.ndarray:
        """Recompute only the blocks the edit touches and return the output.

        ``mask`` ([H, W] of the edited input, nonzero = edited) defaults to the difference of the
        edited input against the primed one (manifest ``mask.eps``), dilated per level by
        ``mask.dilation``. An empty mask returns the cached output without running anything;
        an edit ratio above ``crossover_ratio`` runs the dense model instead. ``commit=True``
        folds the edit into the caches of ``key`` (see :meth:`commit`).
        """
        feeds = self._feeds(args, kwargs)
        user_mask = None if mask is None else self._check_mask(mask)
        t0 = time.perf_counter()
        with self._lock:
            entry = self._entry(key)
            self._check_fixed_inputs(entry, feeds)
            src = self.manifest["mask"]["source"]
            if user_mask is None:
                user_mask = masks.difference_mask(entry.inputs[src], feeds[src], eps=self.manifest["mask"]["eps"])
            ratio = float(user_mask.mean())
            if not user_mask.any():
                self.last_edit = EditStats(0.0, {}, "cached", time.perf_counter() - t0, "none" if commit else None)
                # Nothing above the threshold changed: the caches still describe the primed inputs.
                entry.last_edit = {"feeds": entry.inputs, "index": None, "dense": False, "empty": True}
                return entry.outputs[self._out].copy()
            if ratio > self.crossover_ratio:
                if commit:
                    res = self.backend.prime(feeds)
                    self._replace(key, entry, feeds, res)
                    out = res[self._out]
                else:
                    out = self.backend.dense(feeds)[self._out]
                    entry.last_edit = {"feeds": feeds, "index": None, "dense": True, "empty": False}
                self.last_edit = EditStats(ratio, {}, "dense", time.perf_counter() - t0, "prime" if commit else None)
                return out
            index = self.edit_feeds(user_mask, key)
            blocks = {g["name"]: int(index[g["name"]].shape[0]) for g in self.manifest["indices"]}
            how = None
            if commit:
                out, how = self._commit_sparse(key, entry, feeds, index)
            else:
                out = self.backend.edit(self._edit_inputs(entry, feeds, index))[self._edit_out]
                entry.last_edit = {"feeds": feeds, "index": index, "dense": False, "empty": False}
            self.last_edit = EditStats(ratio, blocks, "sparse", time.perf_counter() - t0, how)
            return out

    def _edit_inputs(self, entry: _Entry, feeds: dict[str, np.ndarray],
                     index: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_fixed_inputs(entry, feeds)
        full = {**entry.caches, **index}
        for name, edited in self.manifest["edit"]["edited"].items():
            full[edited] = feeds[name]
        return full

    def _check_fixed_inputs(self, entry: _Entry, feeds: dict[str, np.ndarray]) -> None:
        # Non-editable inputs (time step, conditioning) reach the edit pass through caches; they
        # must equal the primed ones.
        for name in self._input_names:
            if name not in self.manifest["edit"]["edited"] and not np.array_equal(feeds[name], entry.inputs[name]):
                raise EngineError(f"input {name!r} differs from the one primed for this key; only "
                                  f"{', '.join(self.manifest['edit']['edited'])} may change in an edit "
                                  f"(prime a key per {name!r})")

    def _commit_sparse(self, key: Hashable, entry: _Entry, feeds: dict[str, np.ndarray],
                       index: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
        full = self._edit_inputs(entry, feeds, index)
        run = getattr(self.backend, "edit_with_caches", None)
        if run is None:  # backend (or program) without the commit pass: re-prime (exact, dense cost)
            res = self.backend.prime(feeds)
            self._replace(key, entry, feeds, res)
            return res[self._out], "prime"
        outs, updated = run(full)
        out = outs[self._edit_out]
        entry.caches.update(updated)
        entry.inputs = feeds
        entry.outputs = {self._out: out}
        entry.last_edit = None
        return out, "scatter"

    def _replace(self, key: Hashable, entry: _Entry, feeds: dict[str, np.ndarray],
                 res: dict[str, np.ndarray]) -> None:
        entry.caches = {n: res[n] for n in self._cache_names}
        entry.inputs = feeds
        entry.outputs = {n: res[n] for n in self.manifest["outputs"]}
        entry.last_edit = None

    def commit(self, key: Hashable = None, *, exact: bool = False) -> str:
        """Fold the last edit of ``key`` into its caches, so the next edit is relative to it.

        The default runs the edit pass again with the updated caches as extra outputs: the cost
        is that of the edit (proportional to the edited area), and every cache the edit scatters
        into takes the edit's value. Caches the edit pass does not recompute (normalisation
        statistics with ``norm_stats="original"``, conditioning tensors) keep the primed values,
        exactly as the edit pass itself treats them. ``exact=True`` re-primes on the edited inputs
        instead (dense cost; refreshes statistics and the receptive-field growth beyond the mask).
        Returns how it committed: ``"scatter"``, ``"prime"`` or ``"none"``.
        """
        with self._lock:
            entry = self._entry(key)
            last = entry.last_edit
            if last is None:
                raise EngineError(f"nothing to commit for key {key!r}: no edit since prime or the last commit")
            if last["empty"]:
                entry.last_edit = None
                return "none"
            if exact or last["dense"] or last["index"] is None:
                res = self.backend.prime(last["feeds"])
                self._replace(key, entry, last["feeds"], res)
                return "prime"
            _, how = self._commit_sparse(key, entry, last["feeds"], last["index"])
            return how

    # ------------------------------------------------------------------ crossover
    def calibrate(self, key: Hashable = None, ratios: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7),
                  repeats: int = 3, seed: int = 0, margin: float = 0.9) -> dict[str, Any]:
        """Time dense against sparse edits of the primed ``key`` at a few edit ratios; set the crossover.

        The crossover is where the sparse edit stops being faster than ``margin`` x dense (linear
        interpolation between the measured ratios; 0 when sparse never wins, 1 when it always does):
        the margin keeps timing noise from choosing a sparse edit slower than dense. It is stored
        in ``engine.crossover_ratio`` and ``engine.manifest["runtime"]``; the caches are unchanged.
        Returns ``{"crossover_ratio", "dense_s", "edit_s": [(ratio, seconds), ...], "margin"}``.
        """
        from .edits import synthetic_mask

        with self._lock:
            entry = self._entry(key)
            src = self.manifest["mask"]["source"]
            hw = tuple(self.manifest["mask"]["resolution"])

            def best(fn) -> float:
                fn()  # warm-up (twice: a pooled allocator reuses buffers from the second call on)
                fn()
                times = []
                for _ in range(max(1, repeats)):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                return float(np.median(times))

            dense_s = best(lambda: self.backend.dense(entry.inputs))
            table = []
            for r in sorted(ratios):
                mk = synthetic_mask("blob", hw, float(r), seed)
                feeds = dict(entry.inputs)
                feeds[src] = np.where(mk, feeds[src] + 0.5, feeds[src]).astype(feeds[src].dtype)
                index = self.edit_feeds(mk, key)
                full = self._edit_inputs(entry, feeds, index)
                table.append((float(mk.mean()), best(lambda: self.backend.edit(full))))
            crossover = 1.0
            prev = (0.0, 0.0)  # an empty edit costs nothing
            limit = margin * dense_s
            for r, t in table:
                if t >= limit:
                    r0, t0 = prev
                    crossover = r0 + (r - r0) * (limit - t0) / max(t - t0, 1e-12)
                    break
                prev = (r, t)
            self.crossover_ratio = float(min(max(crossover, 0.0), 1.0))
            self.manifest["runtime"]["crossover_ratio"] = self.crossover_ratio
            return {"crossover_ratio": self.crossover_ratio, "dense_s": dense_s, "edit_s": table, "margin": margin}


def _check_manifest(m: Any) -> None:
    if not isinstance(m, dict):
        raise EngineError(f"the program manifest must be a JSON object, got {type(m).__name__}")
    missing = [k for k in ("inputs", "outputs", "edit", "caches", "mask", "indices", "scatter_maps") if k not in m]
    if missing:
        raise EngineError(f"the program manifest lacks {', '.join(missing)}: not a SIGE program, or a corrupt one")
    if m.get("version", 1) > SUPPORTED_PROGRAM_VERSION:
        raise EngineError(f"program format version {m['version']} is newer than this runtime supports "
                          f"({SUPPORTED_PROGRAM_VERSION}): upgrade sige-export")


def load(path: str | Path, *, threads: int | None = None, cache_budget_bytes: int | None = None,
         crossover_ratio: float | None = None) -> Engine:
    """Open a portable SIGE ONNX program (``.onnx``) or a compiled artifact (``.sige``).

    ``threads``: intra-op threads of the onnxruntime sessions; ``cache_budget_bytes``: LRU budget
    over keys; ``crossover_ratio``: edit ratio above which edits run dense (default: the
    manifest's ``runtime.crossover_ratio``, else :data:`DEFAULT_CROSSOVER_RATIO`; measure it with
    :meth:`Engine.calibrate`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such SIGE program or artifact: {path}")
    opts = dict(cache_budget_bytes=cache_budget_bytes, crossover_ratio=crossover_ratio)
    if path.suffix == ".sige":
        try:
            from .artifact import open_artifact
        except ImportError as e:
            raise EngineError(f"{path}: compiled artifacts need sige_export.artifact, which is not available "
                              f"in this installation ({e}); export with --target onnx for a portable program") from e
        manifest, backend = open_artifact(path)
        return Engine(manifest, backend, **opts)
    if path.suffix == ".onnx":
        try:
            program = SigeProgram.load(path)
        except ValueError as e:
            raise EngineError(f"{path}: cannot load the SIGE program: {e}") from e
        _check_manifest(program.manifest)
        try:
            backend = OnnxRuntimeBackend(program, threads)
        except Exception as e:  # onnxruntime raises its own exception types for malformed graphs
            raise EngineError(f"{path}: onnxruntime cannot run this SIGE program (corrupt or truncated file?): "
                              f"{type(e).__name__}: {e}") from e
        return Engine(program, backend, **opts)
    raise EngineError(f"{path}: unsupported file type {path.suffix!r}; expected a SIGE program (.onnx) "
                      f"or a compiled artifact (.sige)")
