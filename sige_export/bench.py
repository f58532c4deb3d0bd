"""``sige-bench``: on-device benchmark of a SIGE program or compiled artifact.

    sige-bench model.host.sige --program model.sige.onnx --json out.json --plot out.png
    sige-bench model.sige.onnx                                  # portable program, in onnxruntime
    sige-bench model.sige.onnx --target host                    # compile it first (cached), run the artifact
    sige-bench model.host.sige --program model.sige.onnx --rpc-tracker 127.0.0.1:9190 --rpc-key mydev

What is measured (same machine, same run):

* ``prime``: the prime pass (dense + caches) on the original inputs;
* ``dense``: the subject's own dense pass (an artifact's dense pass is its prime executable);
* ``onnxruntime_dense``: onnxruntime on ``program.dense_model()`` (needs the portable program:
  the ARTIFACT itself, ``--program FILE.onnx``, or ``--dense-onnx FILE``; a compiled artifact does
  not carry the dense ONNX);
* per edit (synthetic ``blob``/``stroke`` masks at ``--edits`` ratios, or ``--mask FILE``): the edit
  pass on prepared feeds (caches of the prime, block indices, the edited input), the host-side index
  preparation (``Engine.edit_feeds``), MACs dense/sparse (``macs.count_macs`` on the dense/edit
  models, the edit model with the indices' block counts), speedups vs both dense baselines and
  fidelity (max abs error, PSNR) of the edit against the subject's dense pass on the edited inputs.

Timing follows TVM's ``time_evaluator``: ``--warmup`` untimed runs, then ``--repeat`` samples, each
the mean of ``--number`` runs; a sample shorter than ``--min-repeat-ms`` is redone with more runs
(``number = max(min_repeat_ms / per_run + 1, number * 1.618)``). Percentiles are over the samples.
Locally a Python wall clock times each pass; on an RPC device the remote module's
``time_evaluator`` does (device time, transfers excluded).

Only runtime dependencies are imported (numpy, onnx, onnxruntime, the TVM runtime; tvm's Python
package for RPC and for ``--target``); never torch. The JSON report's schema is :data:`REPORT_SCHEMA`
(``sige-bench --schema`` prints it).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from . import __version__, cache_dir

PROG = "sige-bench"
SCHEMA_VERSION = 1
DEFAULT_EDITS = (0.01, 0.05, 0.15, 0.33)
DEFAULT_KINDS = ("blob", "stroke")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


class BenchError(RuntimeError):
    """A user-facing benchmark failure (bad input, unreachable device, ...): printed without a traceback."""


# =========================================================================== JSON schema
_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT_OR_NULL = {"type": ["integer", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}

_TIMING = {
    "type": "object",
    "description": "Latency of one measurement: samples are per-run means (ms) of `number` runs each.",
    "required": ["where", "timer", "unit", "number", "repeat", "mean", "std", "min", "max", "percentiles", "samples"],
    "properties": {
        "where": {"type": "string", "description": "'local' or 'rpc://HOST:PORT/KEY'"},
        "timer": {"type": "string", "enum": ["wall-clock", "tvm-time-evaluator"]},
        "unit": {"const": "ms"},
        "number": {"type": "integer", "minimum": 1, "description": "runs per sample (after min_repeat_ms)"},
        "repeat": {"type": "integer", "minimum": 1},
        "mean": _NUM, "std": _NUM, "min": _NUM, "max": _NUM,
        "percentiles": {"type": "object", "description": "'p50', 'p90', ... -> ms",
                        "patternProperties": {"^p[0-9]+(\\.[0-9]+)?$": _NUM}, "additionalProperties": False},
        "samples": {"type": "array", "items": _NUM},
    },
}
_TIMING_OR_NULL = {"oneOf": [_TIMING, {"type": "null"}]}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://sige-export/schemas/sige-bench-report-v1.json",
    "title": "sige-bench report",
    "description": "Latency, MACs, speedups and fidelity of SIGE sparse edits vs dense baselines.",
    "type": "object",
    "required": ["schema_version", "tool", "created", "subject", "config", "machine", "where", "passes",
                 "dense_macs", "edits", "notes"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "tool": {"type": "object", "required": ["name", "version"],
                 "properties": {"name": {"const": PROG}, "version": {"type": "string"}}},
        "created": {"type": "string", "description": "ISO 8601 UTC time of the run"},
        "subject": {
            "type": "object", "required": ["path", "kind", "target", "inputs", "input_source"],
            "properties": {
                "path": {"type": "string"},
                "kind": {"enum": ["program", "artifact"]},
                "target": {"type": "string", "description": "'onnx' (portable program in onnxruntime) or the TVM target"},
                "built_from": _STR_OR_NULL,
                "program": _STR_OR_NULL,
                "input_source": {"type": "string", "description": "'synthetic' or the .npz file"},
                "inputs": {"type": "array", "items": {
                    "type": "object", "required": ["name", "shape", "dtype", "one_hot_channels"],
                    "properties": {"name": {"type": "string"},
                                   "shape": {"type": "array", "items": {"type": "integer"}},
                                   "dtype": {"type": "string"},
                                   "one_hot_channels": _INT_OR_NULL}}},
            },
        },
        "config": {
            "type": "object",
            "required": ["warmup", "repeat", "number", "min_repeat_ms", "percentiles", "seed"],
            "properties": {"warmup": {"type": "integer", "minimum": 0}, "repeat": {"type": "integer", "minimum": 1},
                           "number": {"type": "integer", "minimum": 1}, "min_repeat_ms": {"type": "number", "minimum": 0},
                           "percentiles": {"type": "array", "items": _NUM}, "seed": {"type": "integer"},
                           "threads": _INT_OR_NULL},
        },
        "machine": {
            "type": "object", "required": ["host"],
            "properties": {
                "host": {"type": "object",
                         "required": ["hostname", "os", "cpu_model", "cpu_cores", "cpu_threads", "gpus", "versions"],
                         "properties": {"hostname": {"type": "string"}, "os": {"type": "string"},
                                        "machine": {"type": "string"}, "cpu_model": {"type": "string"},
                                        "cpu_cores": _INT_OR_NULL, "cpu_threads": _INT_OR_NULL,
                                        "cpu_affinity": _INT_OR_NULL,
                                        "gpus": {"type": "array", "items": {"type": "string"}},
                                        "versions": {"type": "object",
                                                     "required": ["sige-export", "numpy", "onnxruntime", "tvm", "python"],
                                                     "additionalProperties": _STR_OR_NULL}}},
                "device": {"type": ["object", "null"],
                           "description": "the RPC device (null when everything ran on the host)",
                           "properties": {"tracker": {"type": "string"}, "key": {"type": "string"},
                                          "cpu": {"type": "boolean"}, "cuda": {"type": "boolean"},
                                          "cuda_name": _STR_OR_NULL}},
            },
        },
        "where": {"type": "object", "required": ["sige", "onnxruntime"],
                  "description": "where each kind of measurement ran: 'local' or 'rpc://HOST:PORT/KEY'",
                  "properties": {"sige": {"type": "string"}, "onnxruntime": _STR_OR_NULL}},
        "passes": {"type": "object", "required": ["prime", "dense", "onnxruntime_dense"],
                   "properties": {"prime": _TIMING, "dense": _TIMING, "onnxruntime_dense": _TIMING_OR_NULL}},
        "dense_macs": _INT_OR_NULL,
        "edits": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "mask_kind", "mask_source", "target_ratio", "ratio", "blocks", "macs", "latency",
                         "index_prep", "baselines", "speedup", "fidelity"],
            "properties": {
                "name": {"type": "string"},
                "mask_kind": {"type": "string", "description": "'blob', 'stroke' or 'file'"},
                "mask_source": {"type": "string", "description": "'synthetic' or the mask file"},
                "target_ratio": _NUM_OR_NULL,
                "ratio": {"type": "number", "minimum": 0, "maximum": 1, "description": "edited fraction of pixels"},
                "blocks": {"type": "object", "additionalProperties": {"type": "integer"}},
                "macs": {"type": "object", "required": ["dense", "sparse", "ratio"],
                         "properties": {"dense": _INT_OR_NULL, "sparse": _INT_OR_NULL, "ratio": _NUM_OR_NULL}},
                "latency": _TIMING,
                "index_prep": _TIMING,
                "baselines": {"type": "object",
                              "description": "median latencies (ms) of the dense baselines of this run",
                              "required": ["dense_ms", "dense_where", "onnxruntime_dense_ms", "onnxruntime_where"],
                              "properties": {"dense_ms": _NUM, "dense_where": {"type": "string"},
                                             "onnxruntime_dense_ms": _NUM_OR_NULL,
                                             "onnxruntime_where": _STR_OR_NULL}},
                "speedup": {"type": "object", "required": ["vs_dense", "vs_onnxruntime"],
                            "description": "median dense / median edit (samples of the same run)",
                            "properties": {"vs_dense": _NUM, "vs_onnxruntime": _NUM_OR_NULL}},
                "fidelity": {"type": "object", "required": ["reference", "max_abs_err", "psnr_db"],
                             "properties": {"reference": {"type": "string"}, "max_abs_err": _NUM,
                                            "psnr_db": {"type": ["number", "null"],
                                                        "description": "null when identical (infinite PSNR)"}}},
            },
        }},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}


# =========================================================================== timing
@dataclasses.dataclass
class TimingConfig:
    warmup: int = 2
    repeat: int = 10
    number: int = 1
    min_repeat_ms: float = 0.0
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES


def _pkey(p: float) -> str:
    return f"p{p:g}"


def summarize(samples_ms: Sequence[float], number: int, cfg: TimingConfig, where: str, timer: str) -> dict:
    a = np.asarray(samples_ms, np.float64)
    return {"where": where, "timer": timer, "unit": "ms", "number": int(number), "repeat": int(a.size),
            "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()),
            "percentiles": {_pkey(p): float(np.percentile(a, p)) for p in cfg.percentiles},
            "samples": [float(x) for x in a]}


def median_ms(t: dict) -> float:
    """The median of a timing's samples (what speedups and plots use, whatever --percentile says)."""
    return float(np.median(t["samples"]))


def measure(fn: Callable[[], Any], cfg: TimingConfig, where: str = "local",
            clock: Callable[[], float] = time.perf_counter) -> dict:
    """Time ``fn`` with TVM ``time_evaluator`` semantics (see the module doc)."""
    for _ in range(cfg.warmup):
        fn()
    number = max(1, int(cfg.number))
    samples = []
    for _ in range(max(1, cfg.repeat)):
        duration_ms = 0.0
        tries = 0
        while True:
            if duration_ms > 0.0:
                number = int(max(cfg.min_repeat_ms / (duration_ms / number) + 1, number * 1.618))
            t0 = clock()
            for _ in range(number):
                fn()
            duration_ms = (clock() - t0) * 1e3
            tries += 1
            if duration_ms >= cfg.min_repeat_ms or tries > 64:
                break
        samples.append(duration_ms / number)
    return summarize(samples, number, cfg, where, "wall-clock")


def _run_bounded(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; BenchError if it takes longer than ``seconds``."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    th = threading.Thread(target=target, daemon=True, name=f"sige-bench {what}")
    th.start()
    th.join(seconds)
    if th.is_alive():
        raise BenchError(f"{what}: no answer within {seconds:g}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# =========================================================================== machine
def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def _gpus() -> list[str]:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()] if r.returncode == 0 else []


def machine_info() -> dict:
    """This machine: OS, CPU model, cores/threads, GPUs, package versions."""
    try:
        import psutil  # noqa: PLC0415 - optional

        cores = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001
        cores = None
    threads = os.cpu_count()
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_cores": cores,
        "cpu_threads": threads,
        "cpu_affinity": aff,
        "gpus": _gpus(),
        "versions": {"sige-export": __version__, "numpy": np.__version__, "onnxruntime": _version("onnxruntime"),
                     "onnx": _version("onnx"), "tvm": _version("apache-tvm"), "tvm-ffi": _version("apache-tvm-ffi"),
                     "python": platform.python_version()},
    }


# =========================================================================== inputs and masks
def one_hot_channels(x: np.ndarray) -> Optional[int]:
    """C or C-1 when ``x`` (NCHW) is a one-hot label map (values in {0,1} summing to 1 over those
    channels; the last channel may be an extra one, e.g. GauGAN's instance edge); else None."""
    if x.ndim != 4 or x.shape[1] < 2 or not np.issubdtype(x.dtype, np.floating):
        return None
    if not np.all((x == 0) | (x == 1)):
        return None
    c = x.shape[1]
    if np.all(x.sum(1) == 1):
        return c
    if c > 2 and np.all(x[:, : c - 1].sum(1) == 1):
        return c - 1
    return None


_LABEL_NAMES = ("segmap", "label", "seg", "semantic")


def synthetic_inputs(manifest: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible inputs from the manifest: one-hot label maps (+ edge channel) for inputs named like
    ``segmap``/``label``, images ~ N(0, 1) for other 4-D inputs, a mid timestep for 1-element inputs."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in manifest["inputs"]:
        shape = tuple(int(d) for d in spec["shape"])
        dtype = np.dtype(spec["dtype"])
        name = spec["name"].lower()
        if len(shape) == 4 and shape[1] >= 3 and any(k in name for k in _LABEL_NAMES):
            n, c, h, w = shape
            classes = c - 1
            cell = max(2, min(h, w) // 8)
            gh, gw = -(-h // cell), -(-w // cell)
            lab = rng.integers(0, classes, (n, gh, gw)).repeat(cell, 1).repeat(cell, 2)[:, :h, :w]
            inst = np.arange(gh * gw).reshape(1, gh, gw).repeat(cell, 1).repeat(cell, 2)[:, :h, :w]
            x = np.zeros(shape, dtype)
            x[:, :classes] = np.eye(classes, dtype=dtype)[lab].transpose(0, 3, 1, 2)
            edge = np.zeros((n, h, w), bool)
            dh, dw = inst[:, 1:] != inst[:, :-1], inst[:, :, 1:] != inst[:, :, :-1]
            edge[:, 1:] |= dh
            edge[:, :-1] |= dh
            edge[:, :, 1:] |= dw
            edge[:, :, :-1] |= dw
            x[:, classes] = np.broadcast_to(edge, (n, h, w))[:, :, :]
            out[spec["name"]] = x
        elif math.prod(shape) <= 4 and np.issubdtype(dtype, np.floating):
            out[spec["name"]] = np.full(shape, 500.0, dtype)
        elif np.issubdtype(dtype, np.integer):
            out[spec["name"]] = rng.integers(0, 10, shape).astype(dtype)
        else:
            out[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return out


def load_inputs(path: Path, manifest: dict) -> dict[str, np.ndarray]:
    try:
        data = np.load(path)
    except Exception as e:  # noqa: BLE001
        raise BenchError(f"--inputs {path}: not a readable .npz/.npy file ({e})") from None
    names = [i["name"] for i in manifest["inputs"]]
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise BenchError(f"--inputs {path}: a single array, but the model has inputs {names}; use an .npz")
        data = {names[0]: data}
    got = {k: np.asarray(data[k]) for k in data}
    missing = [n for n in names if n not in got]
    if missing:
        raise BenchError(f"--inputs {path}: missing {missing}; it holds {sorted(got)}")
    out = {}
    for spec in manifest["inputs"]:
        a = got[spec["name"]].astype(np.dtype(spec["dtype"]), copy=False)
        if tuple(a.shape) != tuple(spec["shape"]):
            raise BenchError(f"--inputs {path}: {spec['name']!r} has shape {a.shape}, expected {tuple(spec['shape'])}")
        out[spec["name"]] = np.ascontiguousarray(a)
    return out


def load_mask(path: Path, hw: tuple[int, int]) -> np.ndarray:
    """A boolean mask from .npy (nonzero = edited) or an image (.png, ...: bright = edited), resized
    (nearest) to ``hw``."""
    if not path.is_file():
        raise BenchError(f"--mask {path}: no such file")
    if path.suffix.lower() == ".npy":
        try:
            m = np.load(path)
        except Exception as e:  # noqa: BLE001
            raise BenchError(f"--mask {path}: not a readable .npy file ({e})") from None
    else:
        try:
            from PIL import Image  # noqa: PLC0415

            m = np.asarray(Image.open(path).convert("L"), np.float64) / 255.0
        except ImportError:
            try:
                import matplotlib.image as mpimg  # noqa: PLC0415

                m = np.asarray(mpimg.imread(str(path)), np.float64)
            except ImportError:
                raise BenchError(f"--mask {path}: reading images needs pillow or matplotlib; use a .npy mask") from None
        except Exception as e:  # noqa: BLE001
            raise BenchError(f"--mask {path}: not a readable image ({e})") from None
        if m.ndim == 3:
            m = m[..., :3].mean(-1) if m.shape[-1] >= 3 else m[..., 0]
        m = m > 0.5
    m = np.squeeze(np.asarray(m))
    if m.ndim != 2:
        raise BenchError(f"--mask {path}: expected a 2-D mask, got shape {m.shape}")
    m = m.astype(bool) if m.dtype == bool else (m > (0.5 if np.issubdtype(m.dtype, np.floating) else 0))
    if m.shape != tuple(hw):
        ys = (np.arange(hw[0]) * m.shape[0] // hw[0]).clip(0, m.shape[0] - 1)
        xs = (np.arange(hw[1]) * m.shape[1] // hw[1]).clip(0, m.shape[1] - 1)
        m = m[ys][:, xs]
    if not m.any():
        raise BenchError(f"--mask {path}: the mask is empty (nothing edited)")
    return m


# =========================================================================== subjects and runners
class _ManifestProgram:
    """Enough of a SigeProgram for :class:`runtime.Engine` (manifest and cache names)."""

    def __init__(self, manifest: dict):
        self.manifest = manifest

    @property
    def cache_names(self) -> list[str]:
        return [c["name"] for c in self.manifest["caches"]]


class LocalRunner:
    """Runs a Backend's passes in this process; times them with a wall clock."""

    where = "local"

    def __init__(self, backend: Any):
        self.backend = backend

    def run(self, pass_: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return getattr(self.backend, pass_)(dict(feeds))

    def time(self, pass_: str, feeds: Mapping[str, np.ndarray], cfg: TimingConfig) -> dict:
        fn = getattr(self.backend, pass_)
        feeds = dict(feeds)
        return measure(lambda: fn(feeds), cfg, self.where)

    def close(self) -> None:
        pass


@dataclasses.dataclass
class Subject:
    path: Path
    kind: str  # "program" | "artifact"
    target: str
    manifest: dict
    runner: Any
    program: Any = None  # SigeProgram when known (MACs, onnxruntime baseline)
    program_path: Optional[Path] = None
    dense_onnx: Any = None  # onnx.ModelProto for the onnxruntime baseline
    built_from: Optional[str] = None


def build_cached_artifact(program_path: Path, target: str, log: Callable[[str], None] = lambda s: None) -> Path:
    """Compile a portable program for ``target`` once (cached by content hash) and return the artifact."""
    h = hashlib.sha256()
    with open(program_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(f"|{target}|{__version__}|{_version('apache-tvm')}".encode())
    out = cache_dir() / "bench" / f"{program_path.stem}-{h.hexdigest()[:16]}.{target}.sige"
    if out.is_file():
        return out
    from .artifact import build_artifact  # noqa: PLC0415 - needs the TVM compiler
    from .program import SigeProgram  # noqa: PLC0415

    from .targets import ToolchainError, get  # noqa: PLC0415

    try:
        get(target)
    except (KeyError, ValueError) as e:
        raise BenchError(f"--target {target!r}: {e}") from None
    log(f"compiling {program_path.name} for {target} (cached in {out.parent})")
    try:
        return build_artifact(SigeProgram.load(program_path), target, out, log=log)
    except ToolchainError as e:
        raise BenchError(str(e)) from None


def open_subject(path: Path, *, program: Optional[Path] = None, dense_onnx: Optional[Path] = None,
                 target: Optional[str] = None, threads: Optional[int] = None, rpc: Optional["RpcDevice"] = None,
                 log: Callable[[str], None] = lambda s: None) -> Subject:
    """Load what is benchmarked; for a remote device, only the manifest and libraries are opened here."""
    from .program import SigeProgram  # noqa: PLC0415

    if not path.exists():
        raise BenchError(f"no such SIGE program or artifact: {path}")
    prog = None
    prog_path = None
    built_from = None
    if path.suffix == ".onnx":
        try:
            prog = SigeProgram.load(path)
        except ValueError as e:
            raise BenchError(str(e)) from None
        prog_path = path
        if target not in (None, "onnx"):
            built_from = str(path)
            path = build_cached_artifact(path, target, log)
        elif rpc is not None:
            raise BenchError("a portable program (.onnx) runs in onnxruntime, which an RPC device cannot run: "
                             "pass --target TARGET (e.g. host) to compile it for the device")
    if program is not None:
        if not program.is_file():
            raise BenchError(f"--program {program}: no such file")
        try:
            prog = SigeProgram.load(program)
        except ValueError as e:
            raise BenchError(f"--program {program}: {e}") from None
        prog_path = program
    dense = None
    if dense_onnx is not None:
        import onnx  # noqa: PLC0415

        if not dense_onnx.is_file():
            raise BenchError(f"--dense-onnx {dense_onnx}: no such file")
        dense = onnx.load(str(dense_onnx))
    elif prog is not None:
        dense = prog.dense_model()

    if path.suffix == ".onnx":  # portable program in onnxruntime
        from .runtime import OnnxRuntimeBackend  # noqa: PLC0415

        return Subject(path, "program", "onnx", prog.manifest, LocalRunner(OnnxRuntimeBackend(prog, threads)), prog,
                       prog_path, dense)
    from .artifact import ArtifactError, open_artifact, read_manifest  # noqa: PLC0415

    try:
        if rpc is not None:
            manifest = read_manifest(path)
            runner = rpc.open(path, manifest)
        else:
            manifest, backend = open_artifact(path)
            runner = LocalRunner(backend)
    except ArtifactError as e:
        raise BenchError(str(e)) from None
    if prog is not None and prog.manifest.get("inputs") != manifest.get("inputs"):
        raise BenchError(f"--program {prog_path}: its inputs {prog.manifest.get('inputs')} do not match the "
                         f"artifact's {manifest.get('inputs')}")
    return Subject(path, "artifact", manifest["artifact"]["target"]["name"], manifest, runner, prog, prog_path, dense,
                   built_from)


# =========================================================================== RPC
class RpcDevice:
    """A device registered with a TVM RPC tracker (checked fast: reachable tracker, known key)."""

    def __init__(self, tracker: str, key: str, *, timeout: float = 60.0, session_timeout: float = 0.0):
        host, sep, port = tracker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise BenchError(f"--rpc-tracker {tracker!r}: expected HOST:PORT")
        self.host, self.port, self.key = host, int(port), key
        self.timeout = timeout
        self.session_timeout = session_timeout
        self.where = f"rpc://{host}:{port}/{key}"
        self.sess = None
        self.info: dict = {"tracker": f"{host}:{port}", "key": key}

    def connect(self) -> None:
        try:
            with socket.create_connection((self.host, self.port), timeout=min(5.0, self.timeout)):
                pass
        except OSError as e:
            raise BenchError(f"RPC tracker {self.host}:{self.port} is unreachable ({e.strerror or e}); start one "
                             f"with `python -m tvm.exec.rpc_tracker --host HOST --port PORT`") from None
        from tvm import rpc  # noqa: PLC0415

        def summary():
            return rpc.connect_tracker(self.host, self.port).summary()

        try:
            summ = _run_bounded(summary, min(10.0, self.timeout), f"RPC tracker {self.host}:{self.port}")
        except BenchError as e:
            raise BenchError(f"{e} (is it a TVM RPC tracker?)") from None
        except Exception as e:  # noqa: BLE001 - TVM raises RPCError/TVMError/socket errors
            raise BenchError(f"RPC tracker {self.host}:{self.port} did not answer as a TVM tracker ({e})") from None
        keys = sorted(set((summ.get("queue_info") or {}).keys())
                      | {s["key"].split(":", 1)[-1] for s in summ.get("server_info", []) if "key" in s})
        if self.key not in keys:
            raise BenchError(f"no device with key {self.key!r} is registered with the RPC tracker "
                             f"{self.host}:{self.port}; registered keys: {', '.join(keys) or '(none)'}")

        def request():
            return rpc.connect_tracker(self.host, self.port).request(
                self.key, priority=1, session_timeout=int(self.session_timeout))

        try:
            self.sess = _run_bounded(request, self.timeout, f"RPC session for key {self.key!r} (device busy?)")
        except BenchError:
            raise
        except Exception as e:  # noqa: BLE001
            raise BenchError(f"could not get an RPC session for key {self.key!r}: {e}") from None
        self.info.update({"cpu": bool(self.sess.cpu(0).exist), "cuda": bool(self.sess.cuda(0).exist)})
        if self.info["cuda"]:
            try:
                self.info["cuda_name"] = str(self.sess.cuda(0).device_name)
            except Exception:  # noqa: BLE001
                self.info["cuda_name"] = None

    def close(self) -> None:
        """Drop the session (the server frees the device once no reference to it remains)."""
        self.sess = None
        import gc  # noqa: PLC0415

        gc.collect()

    def open(self, path: Path, manifest: dict) -> "RemoteRunner":
        if self.sess is None:
            self.connect()
        return RemoteRunner(self, path, manifest)


class RemoteRunner:
    """An artifact's prime/edit executables on an RPC device (weights uploaded once)."""

    def __init__(self, dev: RpcDevice, path: Path, manifest: dict):
        import tarfile

        import tvm  # noqa: PLC0415
        from tvm import relax  # noqa: PLC0415

        self.tvm = tvm
        self.where = dev.where
        self.manifest = manifest
        art = manifest["artifact"]
        tname, fam = art["target"]["name"], art["target"]["family"]
        req = art.get("requires", {})
        sess = dev.sess
        if fam == "arm" or req.get("os") == "macos":
            raise BenchError(f"{path}: built for target {tname!r} ({req.get('os')} {req.get('machine')}): an archive "
                             f"of Mach-O objects that must be linked on that machine ({req.get('link')}); an RPC "
                             f"device cannot load it")
        if fam == "cuda":
            if not dev.info.get("cuda"):
                raise BenchError(f"{path}: built for target {tname!r} (CUDA {req.get('gpu')}), but the device "
                                 f"{dev.where} has no CUDA GPU")
            self.dev = sess.cuda(0)
        else:
            self.dev = sess.cpu(0)
        self.passes: dict[str, dict] = {}
        with tarfile.open(path, "r:") as tf, tempfile.TemporaryDirectory(prefix="sige-bench-rpc-") as tmpd:
            wm = art["weights"]
            blob = bytearray(tf.extractfile(wm["member"]).read())
            buf = np.frombuffer(blob, np.uint8)
            weights = {}
            for t in wm["tensors"]:
                a = buf[t["offset"]:t["offset"] + t["nbytes"]].view(np.dtype(t["dtype"])).reshape(t["shape"])
                weights[t["name"]] = a
            uploaded: dict[str, Any] = {}
            for pname in ("prime", "edit"):
                entry = art["passes"][pname]
                local = Path(tmpd) / f"sige-{pname}-{os.getpid()}.so"
                local.write_bytes(tf.extractfile(entry["library"]).read())
                try:
                    sess.upload(str(local))
                    mod = sess.load_module(local.name)
                except Exception as e:  # noqa: BLE001
                    raise BenchError(f"{path}: the device {dev.where} cannot load the {pname} library built for "
                                     f"target {tname!r} ({req.get('machine')} {req.get('os')}, CPU features "
                                     f"{req.get('cpu_flags')}): {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                                     ) from None
                for p in entry["params"]:
                    if p not in uploaded:
                        uploaded[p] = tvm.runtime.tensor(np.ascontiguousarray(weights[p]), self.dev)
                vm = relax.VirtualMachine(mod, self.dev)
                self.passes[pname] = {"vm": vm, "inputs": entry["inputs"], "outputs": list(entry["outputs"]),
                                      "params": [uploaded[p] for p in entry["params"]]}

    def _args(self, p: dict, feeds: Mapping[str, np.ndarray]) -> list:
        args = []
        for spec in p["inputs"]:
            # a working copy starts equal to its cache; each upload is a fresh one (edits write into it)
            name = spec["cache"] if spec.get("kind") == "working_copy" else spec["name"]
            if name not in feeds:
                raise BenchError(f"missing input {name!r} for the remote pass")
            a = np.ascontiguousarray(feeds[name], dtype=np.dtype(spec["dtype"]))
            args.append(self.tvm.runtime.tensor(a, self.dev))
        return args + p["params"]

    def run(self, pass_: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self.passes["prime" if pass_ == "dense" else pass_]
        vm = p["vm"]
        vm.set_input("main", *self._args(p, feeds))  # works over RPC (tuples of tensors come back per item)
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        outs = [out] if hasattr(out, "numpy") else list(out)
        res = {n: o.numpy() for n, o in zip(p["outputs"], outs)}
        if pass_ == "dense":
            res = {n: res[n] for n in self.manifest["outputs"]}
        return res

    def time(self, pass_: str, feeds: Mapping[str, np.ndarray], cfg: TimingConfig) -> dict:
        p = self.passes["prime" if pass_ == "dense" else pass_]
        vm = p["vm"]
        vm.set_input("main", *self._args(p, feeds))
        if cfg.warmup:
            vm.time_evaluator("invoke_stateful", self.dev, number=cfg.warmup, repeat=1)("main")
        te = vm.time_evaluator("invoke_stateful", self.dev, number=max(1, cfg.number), repeat=max(1, cfg.repeat),
                               min_repeat_ms=int(math.ceil(cfg.min_repeat_ms)))
        res = te("main")
        samples = [float(r) * 1e3 for r in res.results]
        # time_evaluator grows `number` internally for min_repeat_ms without reporting it
        return summarize(samples, max(1, cfg.number), cfg, self.where, "tvm-time-evaluator")

    def close(self) -> None:
        self.passes.clear()


# =========================================================================== the benchmark
@dataclasses.dataclass
class EditSpec:
    name: str
    kind: str
    source: str
    target_ratio: Optional[float]
    mask: np.ndarray


def make_edits(hw: tuple[int, int], ratios: Sequence[float], kinds: Sequence[str], mask_files: Sequence[Path],
               seed: int = 0) -> list[EditSpec]:
    from .edits import MASK_KINDS, synthetic_mask  # noqa: PLC0415

    edits = []
    for kind in kinds:
        if kind not in MASK_KINDS:
            raise BenchError(f"--mask-kind {kind!r}: expected one of {', '.join(MASK_KINDS)}")
    for r in ratios:
        if not 0.0 < r < 1.0:
            raise BenchError(f"--edits {r}: edit ratios must be in (0, 1)")
    for kind in kinds:
        for r in ratios:
            edits.append(EditSpec(f"{kind}@{r:g}", kind, "synthetic", float(r), synthetic_mask(kind, hw, r, seed)))
    for f in mask_files:
        edits.append(EditSpec(f"file:{f.name}", "file", str(f), None, load_mask(f, hw)))
    return edits


def _count_macs(model, shapes: Mapping[str, Sequence[int]] | None) -> Optional[int]:
    from .macs import count_macs  # noqa: PLC0415

    try:
        return int(count_macs(model, shapes).total)
    except Exception:  # noqa: BLE001 - MACs are informative; never fail the benchmark for them
        return None


def run_benchmark(subject: Subject, edits: Sequence[EditSpec], cfg: TimingConfig, *,
                  inputs: Optional[Mapping[str, np.ndarray]] = None, input_source: str = "synthetic", seed: int = 0,
                  threads: Optional[int] = None, rpc_info: Optional[dict] = None,
                  progress: Callable[[str], None] = lambda s: None) -> dict:
    """Measure prime/dense/baselines and every edit; returns the report (see :data:`REPORT_SCHEMA`)."""
    from .edits import apply_edit, psnr  # noqa: PLC0415
    from .runtime import Engine  # noqa: PLC0415

    m = subject.manifest
    runner = subject.runner
    notes: list[str] = []
    feeds = dict(inputs) if inputs is not None else synthetic_inputs(m, seed)
    onehot = {k: one_hot_channels(v) for k, v in feeds.items()}
    try:  # only for edit_feeds (block indices, scatter maps)
        engine = Engine(m, runner)
    except AttributeError:  # an Engine that takes a program only
        engine = Engine(_ManifestProgram(m), runner)
    out_name = m["outputs"][0]
    src = m["mask"]["source"]

    progress("prime")
    prime_res = runner.run("prime", feeds)
    caches = {c: prime_res[c] for c in (c["name"] for c in m["caches"])}
    t_prime = runner.time("prime", feeds, cfg)
    del prime_res
    progress("dense")
    t_dense = runner.time("dense", feeds, cfg)

    ort_sess = None
    t_ort = None
    shapes = {i["name"]: i["shape"] for i in m["inputs"]}
    dense_macs = _count_macs(subject.dense_onnx, shapes) if subject.dense_onnx is not None else None
    edit_model = None
    if subject.program is not None:
        from .macs import infer_shapes  # noqa: PLC0415

        edit_model = infer_shapes(subject.program.edit_model())  # a light copy: no large weights held
    subject.program = None  # full-size weights: keep at most the baseline session's copy
    if subject.dense_onnx is not None:
        progress("onnxruntime dense")
        from .onnx_io import session  # noqa: PLC0415

        ort_sess = session(subject.dense_onnx, threads)
        subject.dense_onnx = None
        wanted = {i.name for i in ort_sess.get_inputs()}
        ort_feeds = {k: v for k, v in feeds.items() if k in wanted}
        ort_out_name = ort_sess.get_outputs()[0].name
        t_ort = measure(lambda: ort_sess.run([ort_out_name], ort_feeds), cfg, "local")
        if runner.where != "local":
            notes.append(f"onnxruntime baseline ran locally on {socket.gethostname()}: an RPC device runs TVM "
                         f"modules only")
    else:
        notes.append("no onnxruntime baseline: the artifact does not carry the dense ONNX; pass --program "
                     "FILE.sige.onnx or --dense-onnx FILE")
    if edit_model is None:
        notes.append("no sparse MACs: pass --program FILE.sige.onnx (the artifact holds compiled code only)")

    results = []
    for e in edits:
        progress(e.name)
        edited = dict(feeds)
        edited[src] = apply_edit(feeds[src], e.mask, seed, one_hot_channels=onehot.get(src))
        ef = engine.edit_feeds(e.mask)
        full = {**caches, **ef}
        for name, ename in m["edit"]["edited"].items():
            full[ename] = edited[name]
        got = runner.run("edit", full)[m["edit"]["outputs"][0]]
        ref = runner.run("dense", edited)[out_name]
        t_edit = runner.time("edit", full, cfg)
        t_idx = measure(lambda: engine.edit_feeds(e.mask), cfg, "local")
        blocks = {g["name"]: int(ef[g["name"]].shape[0]) for g in m["indices"]}
        sparse_macs = None
        if edit_model is not None:
            sparse_macs = _count_macs(edit_model, {k: v.shape for k, v in ef.items()})
        p50, dref = median_ms(t_edit), median_ms(t_dense)
        oref = median_ms(t_ort) if t_ort else None
        err = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        ps = psnr(got, ref)
        results.append({
            "name": e.name, "mask_kind": e.kind, "mask_source": e.source, "target_ratio": e.target_ratio,
            "ratio": float(e.mask.mean()), "blocks": blocks,
            "macs": {"dense": dense_macs, "sparse": sparse_macs,
                     "ratio": (sparse_macs / dense_macs) if (sparse_macs is not None and dense_macs) else None},
            "latency": t_edit, "index_prep": t_idx,
            "baselines": {"dense_ms": dref, "dense_where": t_dense["where"], "onnxruntime_dense_ms": oref,
                          "onnxruntime_where": t_ort["where"] if t_ort else None},
            "speedup": {"vs_dense": dref / p50 if p50 > 0 else 0.0,
                        "vs_onnxruntime": (oref / p50 if p50 > 0 else 0.0) if oref is not None else None},
            "fidelity": {"reference": f"{'artifact' if subject.kind == 'artifact' else 'program'} dense pass on "
                                      f"the edited inputs", "max_abs_err": err,
                         "psnr_db": None if math.isinf(ps) else float(ps)},
        })
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": PROG, "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "subject": {"path": str(subject.path), "kind": subject.kind, "target": subject.target,
                    "built_from": subject.built_from,
                    "program": str(subject.program_path) if subject.program_path else None,
                    "input_source": input_source,
                    "inputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype), "one_hot_channels": onehot[k]}
                               for k, v in feeds.items()]},
        "config": {"warmup": cfg.warmup, "repeat": cfg.repeat, "number": cfg.number,
                   "min_repeat_ms": cfg.min_repeat_ms, "percentiles": list(cfg.percentiles), "seed": seed,
                   "threads": threads},
        "machine": {"host": machine_info(), "device": rpc_info},
        "where": {"sige": runner.where, "onnxruntime": "local" if t_ort is not None else None},
        "passes": {"prime": t_prime, "dense": t_dense, "onnxruntime_dense": t_ort},
        "dense_macs": dense_macs,
        "edits": results,
        "notes": notes,
    }


def validate_report(report: dict) -> None:
    """Validate against :data:`REPORT_SCHEMA` (needs jsonschema)."""
    import jsonschema  # noqa: PLC0415

    jsonschema.validate(report, REPORT_SCHEMA)


# =========================================================================== plot
def plot_report(report: dict, path: str | os.PathLike) -> dict[str, tuple[list[float], list[float]]]:
    """Latency and speedup vs edit ratio (one series per mask kind; dense baselines as lines).

    Returns the plotted series: label -> (x, y)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    series: dict[str, tuple[list[float], list[float]]] = {}
    edits = report["edits"]
    kinds = sorted({e["mask_kind"] for e in edits})
    passes = report["passes"]
    p50 = median_ms
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs_all = [e["ratio"] for e in edits] or [0.0, 1.0]
    xr = [0.0, max(xs_all) * 1.05 or 1.0]
    for kind in kinds:
        es = sorted((e for e in edits if e["mask_kind"] == kind), key=lambda e: e["ratio"])
        x = [e["ratio"] for e in es]
        y = [p50(e["latency"]) for e in es]
        lab = f"SIGE edit ({kind})"
        ax1.plot(x, y, "o-", label=lab)
        series[lab] = (x, y)
        yd = [e["speedup"]["vs_dense"] for e in es]
        lab2 = f"speedup vs dense pass ({kind})"
        ax2.plot(x, yd, "o-", label=lab2)
        series[lab2] = (x, yd)
        if all(e["speedup"]["vs_onnxruntime"] is not None for e in es) and es:
            yo = [e["speedup"]["vs_onnxruntime"] for e in es]
            lab3 = f"speedup vs onnxruntime dense ({kind})"
            ax2.plot(x, yo, "s--", label=lab3)
            series[lab3] = (x, yo)
    dl = f"dense pass ({report['subject']['target']})"
    ax1.plot(xr, [p50(passes["dense"])] * 2, "k-", label=dl)
    series[dl] = (xr, [p50(passes["dense"])] * 2)
    if passes.get("onnxruntime_dense"):
        ol = "onnxruntime dense"
        ax1.plot(xr, [p50(passes["onnxruntime_dense"])] * 2, "k--", label=ol)
        series[ol] = (xr, [p50(passes["onnxruntime_dense"])] * 2)
    ax2.plot(xr, [1.0, 1.0], "k:", label="break-even")
    series["break-even"] = (xr, [1.0, 1.0])
    ax1.set_xlabel("edited ratio")
    ax1.set_ylabel("latency, median (ms)")
    ax1.set_title("latency vs edit size")
    ax2.set_xlabel("edited ratio")
    ax2.set_ylabel("speedup (x)")
    ax2.set_title("speedup vs edit size")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    name = Path(report["subject"]["path"]).name
    fig.suptitle(f"{name} on {report['where']['sige']} ({report['machine']['host']['cpu_model']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return series


# =========================================================================== rich output
def _fmt_macs(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render_tables(report: dict, console: Any) -> None:
    from rich.table import Table  # noqa: PLC0415

    pk = [_pkey(p) for p in report["config"]["percentiles"]]
    passes = Table(title=f"{report['subject']['path']} ({report['subject']['target']}) on {report['where']['sige']}")
    passes.add_column("pass")
    passes.add_column("where")
    for k in pk:
        passes.add_column(f"{k} ms", justify="right")
    for name, t in report["passes"].items():
        if t is None:
            continue
        passes.add_row(name, t["where"], *[f"{t['percentiles'][k]:.3f}" for k in pk])
    console.print(passes)
    t = Table(title=f"edits (dense MACs {_fmt_macs(report['dense_macs'])})")
    for col in ("edit", "ratio", "MACs sparse", "% dense", *[f"{k} ms" for k in pk], "x dense", "x ORT",
                "max err", "PSNR dB"):
        t.add_column(col, justify="left" if col == "edit" else "right")
    for e in report["edits"]:
        ma = e["macs"]
        t.add_row(e["name"], f"{e['ratio'] * 100:.1f}%", _fmt_macs(ma["sparse"]),
                  f"{ma['ratio'] * 100:.1f}%" if ma["ratio"] is not None else "-",
                  *[f"{e['latency']['percentiles'][k]:.3f}" for k in pk],
                  f"{e['speedup']['vs_dense']:.2f}",
                  f"{e['speedup']['vs_onnxruntime']:.2f}" if e["speedup"]["vs_onnxruntime"] is not None else "-",
                  f"{e['fidelity']['max_abs_err']:.2e}",
                  "inf" if e["fidelity"]["psnr_db"] is None else f"{e['fidelity']['psnr_db']:.1f}")
    console.print(t)
    for n in report["notes"]:
        console.print(f"[dim]note: {n}[/dim]")


# =========================================================================== CLI
def _floats(s: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{what} {s!r}: expected comma-separated numbers") from None
    if not vals:
        raise BenchError(f"{what}: empty list")
    return vals


def _release(exc: BaseException, dev: Optional[RpcDevice]) -> None:
    """Free an RPC session after a failure: frames of the traceback may still hold it."""
    import traceback  # noqa: PLC0415

    tb = exc.__traceback__
    while exc is not None:
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__
    del tb
    if dev is not None:
        dev.close()


def _make_app():
    import typer  # noqa: PLC0415

    app = typer.Typer(add_completion=False)

    @app.command(help="Benchmark a SIGE artifact (.sige) or portable program (.sige.onnx): prime, dense and "
                      "sparse edits over synthetic or given masks, with onnxruntime and dense baselines.")
    def bench(
        artifact: Optional[Path] = typer.Argument(None, help="compiled artifact (.sige) or portable program (.onnx)"),
        edits: Optional[str] = typer.Option(None, "--edits", help="edit ratios (default 0.01,0.05,0.15,0.33; "
                                            "default none when --mask is given)"),
        mask_kind: str = typer.Option("blob,stroke", "--mask-kind", help="synthetic mask kinds: blob,stroke"),
        mask: Optional[list[Path]] = typer.Option(None, "--mask", help="mask file (.npy or image), repeatable"),
        inputs: Optional[Path] = typer.Option(None, "--inputs", help=".npz of the original inputs (default: synthetic)"),
        program: Optional[Path] = typer.Option(None, "--program", help="the portable program (.sige.onnx) of an "
                                               "artifact: onnxruntime baseline and MACs"),
        dense_onnx: Optional[Path] = typer.Option(None, "--dense-onnx", help="dense ONNX for the onnxruntime baseline"),
        target: Optional[str] = typer.Option(None, "--target", help="compile a portable program for this target "
                                             "first (cached) and benchmark the artifact"),
        warmup: int = typer.Option(2, "--warmup", min=0),
        repeat: int = typer.Option(10, "--repeat", min=1),
        number: int = typer.Option(1, "--number", min=1, help="runs per repeat (reported: mean per run)"),
        min_repeat_ms: float = typer.Option(0.0, "--min-repeat-ms", min=0.0,
                                            help="grow --number until one repeat takes this long (TVM semantics)"),
        percentile: str = typer.Option("50,90,99", "--percentile"),
        seed: int = typer.Option(0, "--seed"),
        threads: Optional[int] = typer.Option(None, "--threads", help="threads for onnxruntime and TVM"),
        rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="HOST:PORT of a TVM RPC tracker"),
        rpc_key: Optional[str] = typer.Option(None, "--rpc-key", help="device key registered with the tracker"),
        rpc_timeout: float = typer.Option(60.0, "--rpc-timeout", help="seconds to wait for the tracker/session"),
        session_timeout: float = typer.Option(0.0, "--session-timeout", help="RPC session timeout (0: none)"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON (schema: --schema)"),
        plot: Optional[Path] = typer.Option(None, "--plot", help="write latency/speedup vs edit ratio (.png)"),
        schema: bool = typer.Option(False, "--schema", help="print the JSON Schema of --json reports and exit"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    ) -> None:
        from rich.console import Console  # noqa: PLC0415
        from rich.markup import escape  # noqa: PLC0415

        err = Console(stderr=True)
        if schema:
            typer.echo(json.dumps(REPORT_SCHEMA, indent=2))
            return
        dev = None
        try:
            if artifact is None:
                raise BenchError("missing ARTIFACT (a .sige artifact or a .sige.onnx program)")
            if (rpc_tracker is None) != (rpc_key is None):
                raise BenchError("--rpc-tracker and --rpc-key go together")
            if threads:
                os.environ["TVM_NUM_THREADS"] = str(threads)
            cfg = TimingConfig(warmup, repeat, number, min_repeat_ms, tuple(_floats(percentile, "--percentile")))
            if any(not 0 <= p <= 100 for p in cfg.percentiles):
                raise BenchError("--percentile values must be in [0, 100]")
            ratios = _floats(edits, "--edits") if edits is not None else ([] if mask else list(DEFAULT_EDITS))
            kinds = [k.strip() for k in mask_kind.split(",") if k.strip()]
            log = lambda s: err.print(f"[dim]{escape(s)}[/dim]", soft_wrap=True)  # noqa: E731
            if rpc_tracker is not None:
                dev = RpcDevice(rpc_tracker, rpc_key, timeout=rpc_timeout, session_timeout=session_timeout)
                dev.connect()
            subject = open_subject(artifact, program=program, dense_onnx=dense_onnx, target=target, threads=threads,
                                   rpc=dev, log=log)
            hw = tuple(subject.manifest["mask"]["resolution"])
            edit_specs = make_edits(hw, ratios, kinds, mask or [], seed)
            if not edit_specs:
                raise BenchError("no edits to run: give --edits and/or --mask")
            feeds = load_inputs(inputs, subject.manifest) if inputs is not None else None
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

            steps = 3 + len(edit_specs)
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), console=err, disable=quiet, transient=True) as prog:
                task = prog.add_task("sige-bench", total=steps)
                state = {"n": 0}

                def progress(what: str) -> None:
                    prog.update(task, completed=state["n"], description=f"sige-bench: {what}")
                    state["n"] += 1

                report = run_benchmark(subject, edit_specs, cfg, inputs=feeds,
                                       input_source=str(inputs) if inputs else "synthetic", seed=seed,
                                       threads=threads, rpc_info=dev.info if dev else None, progress=progress)
                prog.update(task, completed=steps)
            subject.runner.close()
        except (BenchError, FileNotFoundError) as e:
            err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
            _release(e, dev if "dev" in locals() else None)
            raise typer.Exit(2) from None
        except BaseException as e:
            _release(e, dev if "dev" in locals() else None)
            raise
        if dev is not None:
            subject.runner = None
            dev.close()
        out = Console()
        render_tables(report, out if out.is_terminal else Console(width=200))
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report, indent=1))
            err.print(f"wrote {escape(str(json_out))}")
        if plot is not None:
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot_report(report, plot)
            err.print(f"wrote {escape(str(plot))}")

    return app


def main(argv: Optional[Sequence[str]] = None) -> Any:
    app = _make_app()
    return app(list(sys.argv[1:] if argv is None else argv), prog_name=PROG)


if __name__ == "__main__":  # pragma: no cover
    main()
