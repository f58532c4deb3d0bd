"""Compiled SIGE artifacts: one file per (model, target).

    build_artifact(program, "host", Path("m.host.sige"))      # export (needs the TVM compiler)
    manifest, backend = open_artifact("m.host.sige")          # run (tvm_ffi + libtvm_runtime only)
    backend.prime({"x": x, "t": t})                          # -> {output and cache name: array}

File layout: an uncompressed POSIX tar (never half-written: temp file in the same folder + rename):

* ``manifest.json``   -- the program manifest plus an ``artifact`` section (below); first member
* ``weights.bin``     -- every lifted weight once (float32/..., 64-byte aligned), shared by all passes
* host / x86: ``prime.so``, ``edit.so``  (Relax VM executables; weights are *inputs*, not embedded)
* m1 (arm):   ``prime/<obj>.o``, ``edit/<obj>.o`` (Mach-O arm64 objects; link with ``clang -dynamiclib``)
* CUDA:       ``prime.so``, ``edit.so`` (host code + CUDA source) and, compiled at export with NVRTC for
  the target's ``sm_XX``, ``prime.sm_XX.<k>.cubin`` / ``.ptx`` (one per device module)

The ``dense`` pass is the ``prime`` executable (its first outputs are the model outputs; the caches are
intermediate tensors the dense model computes anyway), so weights and code exist once.

``manifest["artifact"]``::

    {"format": "sige-artifact", "format_version": 1, "tvm_version": "...", "tvm_ffi_version": "...",
     "target": {"name", "family", "tvm_target": <TVM target JSON>, "spec": <targets/NAME.json resolved>},
     "requires": {"machine": "x86_64", "os": "linux", "cpu_flags": [...], "gpu": "sm_86"|None},
     "passes": {"prime": {"library": member, "objects": [...], "device_code": [...],
                          "inputs": [{"name", "shape", "dtype", "kind"}], "params": [names], "outputs": [...]},
                "edit": {...}, "dense": {"uses": "prime", "outputs": [...]}},
     "weights": {"member": "weights.bin", "tensors": [{"name", "shape", "dtype", "offset", "nbytes"}]},
     "caches": [{"name", "shape", "dtype"}],   # cache layout (same as the program manifest)
     "members": {member: {"sha256": hex, "size": bytes}}}   # every member except manifest.json

Symbolic dimensions are strings (``"N_0"``): the block count of each index input varies per edit.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .mask import ALIGN, aligned_empty

FORMAT = "sige-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
# Working copies are put back region by region (scattered rows) until the regions written hold this fraction
# of the maps' bytes; above it one memcpy per map costs less.
RESTORE_FULL_FRACTION = 0.25
# float initializers with at least this many elements become shared weight inputs; smaller ones stay
# compile-time constants of each pass (they may be folded)
PARAM_MIN_ELEMENTS = 64


class ArtifactError(RuntimeError):
    """A compiled artifact that cannot be opened or run here; the message says why."""


# ============================================================================ export
def _lift_params(model, names: set[str]):
    """A copy of ``model`` whose initializers in ``names`` are graph inputs (appended, sorted by name)."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, lifted = [], []
    for t in m.graph.initializer:
        (lifted if t.name in names else keep).append(t)
    lifted.sort(key=lambda t: t.name)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    existing = {i.name for i in m.graph.input}
    for t in lifted:
        if t.name not in existing:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m, [t.name for t in lifted]


def _liftable(t) -> bool:
    from onnx import TensorProto

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    return t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and n >= PARAM_MIN_ELEMENTS


def _input_kinds(manifest: dict) -> dict[str, str]:
    kinds = {i["name"]: "input" for i in manifest["inputs"]}
    kinds.update({c["name"]: "cache" for c in manifest.get("caches", [])})
    kinds.update({g["name"]: "indices" for g in manifest.get("indices", [])})
    kinds.update({s["name"]: "scatter_map" for s in manifest.get("scatter_maps", [])})
    for src, edited in manifest.get("edit", {}).get("edited", {}).items():
        kinds[edited] = "edited"
    return kinds


def _pass_inputs(model, params: list[str], kinds: dict[str, str]) -> list[dict]:
    from onnx import helper

    from .tvm_schedules.importer import default_shapes

    shapes = default_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    pset = set(params)
    out = []
    for name, shp in shapes.items():
        if name in pset:
            continue
        out.append({"name": name, "shape": [d if isinstance(d, str) else int(d) for d in shp],
                    "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(types[name])).name,
                    "kind": kinds.get(name, "input")})
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu_flags_for(spec) -> list[str]:
    if spec.family not in ("x86", "host"):
        return []
    mt = str((spec.tvm_target_dict or {}).get("mtriple", ""))
    if not mt.startswith(("x86_64", "i686")):
        return []
    bits = spec.vector_bits or 128
    return ["avx512f"] if bits >= 512 else ["avx2"] if bits >= 256 else []


def _requires(spec) -> dict:
    t = spec.tvm_target_dict or {}
    host = spec.tvm_host_dict or t
    mt = str(host.get("mtriple", ""))
    machine = mt.split("-")[0] if mt else platform.machine()
    machine = {"arm64": "arm64", "aarch64": "arm64", "x86_64": "x86_64"}.get(machine, machine)
    osname = "macos" if ("apple" in mt or "darwin" in mt or "macos" in mt) else "linux"
    return {"machine": machine, "os": osname, "cpu_flags": _cpu_flags_for(spec),
            "gpu": spec.cuda_arch if spec.family == "cuda" else None,
            "link": "clang -dynamiclib" if spec.family == "arm" else None}


def build_artifact(program, target: str, output: str | os.PathLike,
                   log: Callable[[str], None] = lambda s: None, *, calibrate: bool = False) -> Path:
    """Compile the prime and edit passes of ``program`` (a :class:`SigeProgram`) for ``target`` and write
    one artifact file to ``output`` (atomically). ``calibrate``: measure the dense-fallback crossover on
    this machine and store it in the artifact (:func:`calibrate_artifact`; the target must run here).
    Returns the path."""
    import time

    import tvm

    from . import onnx_io
    from .compiler import compile_program
    from .targets import get as get_target

    spec = get_target(target)  # ValueError listing the known targets
    if not spec.compiles:
        raise ValueError(f"target {target!r} is the portable ONNX program: use SigeProgram.save, not build_artifact")
    spec.check_toolchain()  # ToolchainError saying what to install
    output = Path(output)
    man = program.manifest
    # The passes are cut from the program without its weights' data (a copy per pass would triple a big
    # model's memory); the weights become inputs, read from ``weights.bin``.
    light, data = onnx_io.detach_weights(program.model)
    light_program = type(program)(light, man)
    models = {"prime": light_program.prime_model(), "edit": light_program.edit_model()}
    # weights: every liftable initializer of either pass, stored once
    weights: dict[str, Any] = {}
    for m in models.values():
        for t in m.graph.initializer:
            if _liftable(t) and t.name not in weights:
                weights[t.name] = data.get(t.name, t)
    # conv weights pre-packed once here ([Cout/v, Cin, kh, kw, v], v = the CPU target's vector width):
    # stored packed, read packed by the kernels, never repacked per call
    packed: dict[str, int] = {}
    if spec.family in ("x86", "arm", "host", "cpu"):
        from .tvm_schedules.cpu import vector_lanes
        from .tvm_schedules.packing import pack_width, packable_conv_weights

        lanes = vector_lanes(spec.tvm_target())
        four_d = [n for n, t in weights.items() if len(t.dims) == 4]
        for name in sorted(packable_conv_weights(models.values(), four_d)):
            packed[name] = pack_width(int(weights[name].dims[0]), lanes)
    kinds = _input_kinds(man)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sige-build-", dir=str(output.parent)) as tmpd:
        tmp = Path(tmpd)
        members: list[str] = []
        passes: dict[str, dict] = {}
        schedule_summary: dict[str, dict] = {}
        for pname, model in models.items():
            working: dict[str, str] = {}
            if pname == "edit":  # scatters write into working copies of the caches (no full-map copies)
                from .tvm_schedules.importer import with_working_copies

                model, working = with_working_copies(model)
            lifted, params = _lift_params(model, set(weights))
            onnx_io.attach_weights(lifted, data)  # big constants that stay constants of the pass
            pk = {n: v for n, v in packed.items() if n in params}
            if pk:
                from .tvm_schedules.packing import with_packed_inputs

                lifted = with_packed_inputs(lifted, {n: _packed_shape(weights[n].dims, v) for n, v in pk.items()})
            t0 = time.time()
            lib = compile_program(lifted, spec, packed_weights=set(pk), working_copies=working)
            dt = time.time() - t0
            unscheduled = [n for n, r, s in lib.schedule_log if s == "unscheduled"]
            rules: dict[str, int] = {}
            for _, r, s in lib.schedule_log:
                if s == "ok":
                    rules[r] = rules.get(r, 0) + 1
            schedule_summary[pname] = {"rules": rules, "unscheduled": unscheduled, "compile_seconds": round(dt, 1)}
            log(f"{pname}: compiled for {spec.name} in {dt:.1f}s ({len(model.graph.node)} nodes; rules "
                f"{', '.join(f'{k} x{v}' for k, v in sorted(rules.items()))}"
                + (f"; UNSCHEDULED {unscheduled}" if unscheduled else "") + ")")
            entry: dict[str, Any] = {"inputs": _pass_inputs(lifted, params, {**kinds, **dict.fromkeys(working, "working_copy")}),
                                     "params": params, "outputs": list(man[pname]["outputs"])}
            for spec_ in entry["inputs"]:
                if spec_["name"] in working:
                    spec_["cache"] = working[spec_["name"]]
            if working:
                entry["restore"] = lib.restore
            if spec.family == "arm":
                objtar = tmp / f"{pname}.objects.tar"
                lib.export_library(objtar)
                objs = []
                with tarfile.open(objtar) as tf:
                    for mem in tf.getmembers():
                        if not mem.isfile():
                            continue
                        dst = tmp / pname / Path(mem.name).name
                        dst.parent.mkdir(exist_ok=True)
                        dst.write_bytes(tf.extractfile(mem).read())
                        objs.append(f"{pname}/{dst.name}")
                objtar.unlink()
                entry["objects"] = sorted(objs)
                entry["library"] = None
                members += sorted(objs)
            else:
                so = tmp / f"{pname}.so"
                lib.executable.export_library(str(so))
                entry["library"] = so.name
                members.append(so.name)
                if spec.family == "cuda":
                    dev = []
                    arch = spec.cuda_arch
                    for fmt in ("cubin", "ptx"):
                        for k, data in enumerate(lib.device_binaries(fmt)):
                            name = f"{pname}.{arch}.{k}.{fmt}"
                            (tmp / name).write_bytes(data)
                            dev.append(name)
                    entry["device_code"] = dev
                    members += dev
            passes[pname] = entry
            del lib
        passes["dense"] = {"uses": "prime", "outputs": list(man["outputs"])}
        # weights blob
        wmeta = []
        with open(tmp / WEIGHTS, "wb") as f:
            off = 0
            for name in sorted(weights):
                from onnx import numpy_helper

                arr = np.ascontiguousarray(numpy_helper.to_array(weights[name]))
                if name in packed:
                    from .tvm_schedules.packing import pack_oihw

                    arr = pack_oihw(arr, packed[name])
                pad = (-off) % ALIGN
                f.write(b"\0" * pad)
                off += pad
                f.write(arr.tobytes())
                wmeta.append({"name": name, "shape": list(arr.shape), "dtype": arr.dtype.name, "offset": off,
                              "nbytes": int(arr.nbytes)})
                if name in packed:  # [O/v, I, kh, kw, v] of the OIHW initializer
                    wmeta[-1]["layout"] = {"packed": "OIHW", "v": packed[name], "shape": list(weights[name].dims)}
                off += arr.nbytes
        members.append(WEIGHTS)
        log(f"weights: {len(wmeta)} tensors, {off / 2**20:.1f} MiB (shared by all passes)")
        import tvm_ffi

        digests = {m: {"sha256": _sha256_file(tmp / m), "size": (tmp / m).stat().st_size} for m in members}
        full = dict(man)
        full["artifact"] = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "tvm_version": str(tvm.__version__), "tvm_ffi_version": str(tvm_ffi.__version__),
            "target": {"name": spec.name, "family": spec.family,
                       "tvm_target": json.loads(json.dumps(dict(spec.tvm_target().export()), default=str)),
                       "spec": spec.to_json()},
            "requires": _requires(spec),
            "passes": passes,
            "weights": {"member": WEIGHTS, "tensors": wmeta},
            "caches": list(man.get("caches", [])),
            "schedules": schedule_summary,
            "members": digests,
        }
        _write_tar(output, full, [(m, (tmp / m).stat().st_size, lambda m=m: open(tmp / m, "rb")) for m in members])
    log(f"artifact: {output} ({output.stat().st_size / 2**20:.1f} MiB, {len(members) + 1} members)")
    if calibrate:
        _calibrate_in_fresh_process(output, log)
    return output


def _tvm_threads() -> int | None:
    try:
        import tvm_ffi

        return int(tvm_ffi.get_global_func("runtime.NumThreads")())
    except Exception:  # noqa: BLE001 - a runtime without the query
        return None


def _calibrate_in_fresh_process(path: Path, log: Callable[[str], None]) -> None:
    """:func:`calibrate_artifact` in a child process, as an app runs the artifact: the compiling process may
    have started TVM's thread pool already (constant folding runs kernels) with TVM's default thread count,
    which :func:`use_physical_cores` can no longer change there."""
    import subprocess
    import sys

    code = "import sys; from sige_export.artifact import calibrate_artifact; calibrate_artifact(sys.argv[1], log=print)"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        log(line)
    if proc.returncode:
        raise ArtifactError(f"{path}: calibration failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _write_tar(output: Path, manifest: dict, members: list[tuple[str, int, Callable[[], Any]]]) -> None:
    """Write the artifact tar atomically: the manifest first, then ``(name, size, open)`` members."""
    from .program import atomic_file

    mbytes = json.dumps(manifest, indent=1, default=str).encode()
    with atomic_file(output) as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(mbytes)
        info.mode = 0o644
        tf.addfile(info, io.BytesIO(mbytes))
        for name, size, opener in members:
            info = tarfile.TarInfo(name)
            info.size = size
            info.mode = 0o644
            with opener() as src:
                tf.addfile(info, src)


def calibrate_artifact(path: str | os.PathLike, *, ratios: Sequence[float] = (0.05, 0.15, 0.33, 0.5, 0.7, 0.9),
                       repeats: int = 2, log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure on this machine where sparse edits stop beating the artifact's dense pass
    (:meth:`Engine.calibrate`) and store it in the artifact's manifest (``runtime.crossover_ratio``, with
    the timings under ``runtime.calibration``): engines loading the artifact then fall back to dense
    above it. Rewrites the file atomically; the compiled members are unchanged. Returns the calibration."""
    import time

    from .bench import synthetic_inputs
    from .program import SigeProgram
    from .runtime import Engine

    path = Path(path)
    manifest, backend = open_artifact(path)
    engine = Engine(SigeProgram(None, manifest), backend)
    engine.prime(**synthetic_inputs(manifest))
    t = time.time()
    cal = engine.calibrate(ratios=ratios, repeats=repeats)
    log(f"calibrated in {time.time() - t:.1f}s: sparse edits beat dense below {cal['crossover_ratio'] * 100:.0f}% "
        f"of the image (dense {cal['dense_s'] * 1e3:.1f} ms)")
    del engine, backend  # the VMs' memory pools go with them
    runtime = dict(manifest.get("runtime", {}))
    runtime["crossover_ratio"] = cal["crossover_ratio"]
    runtime["calibration"] = {"dense_ms": cal["dense_s"] * 1e3, "margin": cal.get("margin"),
                              "edit_ms": [[r, s * 1e3] for r, s in cal["edit_s"]],
                              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                              "threads": _tvm_threads(),
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    manifest = dict(manifest)
    manifest["runtime"] = runtime
    with tarfile.open(path, "r:") as tf:
        members = [m for m in tf.getmembers() if m.name != MANIFEST]
        _write_tar(path, manifest, [(m.name, m.size, lambda m=m: tf.extractfile(m)) for m in members])
    return cal


def _packed_shape(dims, v: int) -> tuple:
    o, i, kh, kw = (int(d) for d in dims)
    return (o // v, i, kh, kw, v)


# ============================================================================ runtime (no tvm compiler)
_KDL_CPU, _KDL_CUDA = 1, 2
_POOLED = 2


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of an artifact (no checks beyond it being a readable artifact)."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:") as tf:
            return _manifest_of(tf, path)
    except tarfile.TarError as e:
        raise ArtifactError(f"{path}: not a SIGE artifact or truncated ({e})") from None


def _manifest_of(tf: tarfile.TarFile, path: Path) -> dict:
    try:
        raw = tf.extractfile(MANIFEST).read()
    except KeyError:
        raise ArtifactError(f"{path}: not a SIGE artifact (no {MANIFEST})") from None
    try:
        man = json.loads(raw)
    except ValueError as e:
        raise ArtifactError(f"{path}: corrupt {MANIFEST} ({e})") from None
    art = man.get("artifact") if isinstance(man, dict) else None
    if not isinstance(art, dict) or art.get("format") != FORMAT:
        raise ArtifactError(f"{path}: {MANIFEST} is not a {FORMAT} manifest")
    if art.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {art.get('format_version')} is not supported by "
                            f"this runtime (version {FORMAT_VERSION}); re-export it with this sige-export")
    return man


def _installed_tvm_version() -> str | None:
    from importlib import metadata

    for dist in ("apache-tvm", "tvm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def _cuda_gpu_count() -> int:
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cu = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if cu.cuInit(0) != 0:
                return 0
            n = ctypes.c_int(0)
            if cu.cuDeviceGetCount(ctypes.byref(n)) != 0:
                return 0
            return int(n.value)
        except Exception:
            return 0
    return 0


def check_runnable(manifest: dict, path: str | os.PathLike = "artifact") -> str:
    """Raise ArtifactError if the artifact cannot run on this machine; return the device ("cpu"/"cuda")."""
    art = manifest["artifact"]
    tname = art["target"]["name"]
    fam = art["target"]["family"]
    req = art.get("requires", {})
    if fam == "arm" or req.get("os") == "macos":
        raise ArtifactError(
            f"{path}: built for target {tname!r} ({req.get('os', '?')} {req.get('machine', '?')}): it holds Mach-O "
            f"objects to link on that machine ({req.get('link') or 'clang -dynamiclib'}), it cannot run on this "
            f"{platform.system()} {platform.machine()} machine; export for --target host to run here")
    here = {"amd64": "x86_64", "aarch64": "arm64"}.get(platform.machine().lower(), platform.machine().lower())
    if req.get("machine") and req["machine"] != here:
        raise ArtifactError(f"{path}: built for target {tname!r} on {req['machine']}; this machine is {here}")
    flags = _cpu_flags()
    missing = [f for f in req.get("cpu_flags", []) if flags is not None and f not in flags]
    if missing:
        raise ArtifactError(f"{path}: built for target {tname!r} which needs CPU features {missing} that this CPU "
                            f"lacks; export for --target host on this machine")
    have = _installed_tvm_version()
    if have is None:
        raise ArtifactError(f"{path}: the TVM runtime is not installed (pip install apache-tvm=={art['tvm_version']})")
    if have != art["tvm_version"]:
        raise ArtifactError(f"{path}: built with TVM {art['tvm_version']}, but TVM {have} is installed here; "
                            f"re-export the artifact or install apache-tvm=={art['tvm_version']}")
    if fam == "cuda":
        if _cuda_gpu_count() == 0:
            raise ArtifactError(f"{path}: built for target {tname!r} (CUDA {req.get('gpu')}), but no NVIDIA GPU / "
                                f"CUDA driver is available on this machine")
        return "cuda"
    return "cpu"


def _load_tvm_runtime(cuda: bool = False):
    """dlopen libtvm_runtime.so (RTLD_GLOBAL) without importing the ``tvm`` compiler package."""
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError("the TVM runtime (libtvm_runtime.so from apache-tvm) is not installed")
    libdir = Path(list(spec.submodule_search_locations)[0]) / "lib"
    ctypes.CDLL(str(libdir / "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
    if cuda and (libdir / "libtvm_runtime_cuda.so").is_file():
        ctypes.CDLL(str(libdir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)


def _aligned(a: np.ndarray) -> np.ndarray:
    """``a`` itself if C-contiguous, writable and ``ALIGN``-aligned, else an aligned copy."""
    if a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % ALIGN == 0:
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


class _Pass:
    def __init__(self, name: str, vm, entry: dict, params: list, runner: "TvmArtifactBackend"):
        self.name = name
        self.vm_main = vm["main"]
        self.inputs = [i["name"] for i in entry["inputs"]]
        self.specs = entry["inputs"]
        self.params = params
        self.outputs = list(entry["outputs"])
        # a weak reference: a cycle backend <-> pass would keep the VMs and their memory pools (GBs) alive
        # until the cyclic garbage collector happens to run
        self.runner = weakref.proxy(runner)
        self._vm = vm
        # working copies (edit pass): {input: cache it mirrors}; ``restore`` makes them equal to the caches again
        self.working = {i["name"]: i["cache"] for i in entry["inputs"] if i.get("kind") == "working_copy"}
        self.restore_plan = entry.get("restore") or {}
        self.vm_restore = {k: vm[k] for k in ("restore", "restore_full")} if self.working else {}

    def __call__(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ArtifactError(f"{self.name} pass: missing inputs {missing[:8]}{'...' if len(missing) > 8 else ''}")
        arrays = []
        for spec in self.specs:
            a = feeds[spec["name"]]
            if isinstance(a, self.runner._ffi.Tensor):  # a working copy on the device: passed as it is
                arrays.append(a)
                continue
            a = _aligned(np.asarray(a, dtype=np.dtype(spec["dtype"])))
            shp = spec["shape"]
            if a.ndim != len(shp) or any(not isinstance(d, str) and d != s for d, s in zip(shp, a.shape)):
                raise ArtifactError(f"{self.name} pass: input {spec['name']!r} has shape {a.shape}, expected {shp}")
            arrays.append(a)
        out = self.runner._call(self.vm_main, arrays, self.params)
        out = [out] if hasattr(out, "__dlpack__") or hasattr(out, "shape") else list(out)
        res = {}
        want = set(outputs) if outputs is not None else None
        for name, o in zip(self.outputs, out):
            if want is None or name in want:
                res[name] = self.runner._to_numpy(o, arrays)  # copied when it is (a view of) an input
        return res

    def restore(self, feeds: Mapping[str, np.ndarray], full: bool = False) -> None:
        """Copy the caches over their working copies (in place): the regions the last call wrote, or whole maps
        (``full``, or when the regions hold more than ``RESTORE_FULL_FRACTION`` of their bytes)."""
        plan = self.restore_plan
        if not full:
            written = sum(len(feeds[r["indices"]]) * r["block_bytes"] for r in plan["regions"])
            full = written > RESTORE_FULL_FRACTION * plan["bytes"]
        names = plan["full_inputs" if full else "inputs"]
        args = [a if isinstance(a, self.runner._ffi.Tensor) else _aligned(np.asarray(a))  # working copies as they are
                for a in (feeds[n] for n in names)]
        self.runner._call(self.vm_restore["restore_full" if full else "restore"], args, [])


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for c in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


def use_physical_cores() -> None:
    """One TVM worker thread per physical core, unless ``TVM_NUM_THREADS`` / ``OMP_NUM_THREADS`` says otherwise.

    TVM's own default on x86 is half the logical CPUs (it assumes 2-way SMT): on a machine without SMT that
    leaves half the cores idle and edits run at half speed. Takes effect if no TVM kernel has run in the
    process yet (the thread pool reads it once)."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())


class TvmArtifactBackend:
    """The runtime's Backend protocol over a compiled artifact: ``prime``/``edit``/``dense`` take and return
    dicts of numpy arrays. Uses tvm_ffi + libtvm_runtime only (never the TVM compiler, never torch).

    The edit pass scatters into working copies of the large caches it updates, held here between edits (one
    set, on the device: see :meth:`_working_copies`); results never alias them. On CUDA the outputs of each
    pass also stay on the device while their host copies live, so the caches are uploaded once, not per edit."""

    def __init__(self, path: str | os.PathLike, manifest: dict, tar: tarfile.TarFile, device: str):
        import tvm_ffi

        self.path = Path(path)
        self.manifest = manifest
        self.device_kind = device
        self._ffi = tvm_ffi
        if device != "cuda":
            use_physical_cores()
        _load_tvm_runtime(cuda=device == "cuda")
        art = manifest["artifact"]
        # weights: one buffer, zero-copy views, one tvm tensor each (converted once)
        wm = art["weights"]
        size = tar.getmember(wm["member"]).size
        buf = aligned_empty((size,))  # writable (DLPack cannot export read-only) and 64-byte aligned
        f, view, got = tar.extractfile(wm["member"]), memoryview(buf), 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise ArtifactError(f"{self.path}: {wm['member']} is truncated")
            got += n
        self._weights_np: dict[str, np.ndarray] = {}
        for t in wm["tensors"]:
            a = buf[t["offset"]:t["offset"] + t["nbytes"]].view(np.dtype(t["dtype"])).reshape(t["shape"])
            self._weights_np[t["name"]] = a
        if device == "cuda":
            self.device = tvm_ffi.device("cuda", 0)
            self._weights = {k: self._to_device(v) for k, v in self._weights_np.items()}
        else:
            self.device = tvm_ffi.device("cpu", 0)
            self._weights = {k: tvm_ffi.from_dlpack(v) for k, v in self._weights_np.items()}
        self._passes: dict[str, _Pass] = {}
        self._work: dict[str, tuple] = {}  # working copy input -> (weakref to its cache array, the copy)
        # Off the host (CUDA) the outputs of a pass stay on the device next to their host copies, so caches are
        # not uploaded again by every edit: id(host array) -> (weakref to it, device tensor).
        self._resident: dict[int, tuple] = {}
        self._uploads = device == "cuda"  # inputs are copied to the device (tests set it on CPU too)
        self._written: dict[str, np.ndarray] | None = None  # indices of the regions the last edit wrote
        self._modules = []
        with tempfile.TemporaryDirectory(prefix="sige-artifact-") as tmpd:
            for pname in ("prime", "edit"):
                entry = art["passes"][pname]
                so = Path(tmpd) / f"{pname}.so"
                with open(so, "wb") as f:
                    shutil.copyfileobj(tar.extractfile(entry["library"]), f)
                mod = tvm_ffi.load_module(str(so))
                vm = mod["vm_load_executable"]()
                dev_type = _KDL_CUDA if device == "cuda" else _KDL_CPU
                init = [dev_type, 0, _POOLED] + ([_KDL_CPU, 0, _POOLED] if dev_type != _KDL_CPU else [])
                vm["vm_initialization"](*init)
                missing = [p for p in entry["params"] if p not in self._weights]
                if missing:
                    raise ArtifactError(f"{self.path}: weights {missing[:5]} of the {pname} pass are not in {wm['member']}")
                params = [self._weights[p] for p in entry["params"]]
                self._modules.append(mod)
                self._passes[pname] = _Pass(pname, vm, entry, params, self)
        self.input_names = {k: p.inputs for k, p in self._passes.items()}

    # -- device helpers
    def _alloc(self, shape, dtype, device):
        ffi = self._ffi
        return ffi.get_global_func("runtime.TVMTensorAllocWithScope")(ffi.Shape(shape), ffi.dtype(str(dtype)), device,
                                                                      None)

    def _to_device(self, a: np.ndarray):
        dst = self._alloc(a.shape, a.dtype, self.device)
        self._ffi.get_global_func("runtime.TVMTensorCopyFromTo")(self._ffi.from_dlpack(np.ascontiguousarray(a)), dst)
        return dst

    def _empty_like(self, a: np.ndarray):
        """An uninitialised buffer shaped like ``a`` where the passes read their inputs."""
        if not self._uploads:
            return aligned_empty(a.shape, a.dtype)
        return self._alloc(a.shape, a.dtype, self.device)

    def _device_arg(self, a):
        """``a`` on the device: a device tensor as it is, the resident copy of a pass output, else an upload."""
        if isinstance(a, self._ffi.Tensor):
            return a
        held = self._resident.get(id(a))
        if held is not None and held[0]() is a:
            return held[1]
        return self._to_device(a)

    def _keep_resident(self, host: np.ndarray, tensor) -> None:
        key, table = id(host), self._resident
        table[key] = (weakref.ref(host, lambda _ref: table.pop(key, None)), tensor)

    def _call(self, fn, arrays, params):
        if self._uploads:
            args = [self._device_arg(a) for a in arrays]
        else:
            args = [a if isinstance(a, self._ffi.Tensor) else self._ffi.from_dlpack(a) for a in arrays]
        return fn(*args, *params)

    def _to_numpy(self, o, inputs):
        if self._uploads:
            ffi = self._ffi
            host = self._alloc(o.shape, o.dtype, ffi.device("cpu", 0))
            ffi.get_global_func("runtime.TVMTensorCopyFromTo")(o, host)
            a = np.from_dlpack(host)
            if not any(isinstance(x, ffi.Tensor) and x.data_ptr() == o.data_ptr() for x in inputs):
                self._keep_resident(a, o)  # a cache passed back to the next edit is not uploaded again
            return a  # (not for a working copy: it changes under its host copy)
        a = np.from_dlpack(o)  # zero-copy: the numpy array keeps the VM's tensor alive
        if any(np.shares_memory(a, x) for x in inputs):
            a = a.copy()
        return a

    # -- Backend protocol
    def prime(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._passes["prime"](feeds)

    def edit(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = self._passes["edit"]
        if not p.working:
            return p(feeds)
        try:
            full = {**feeds, **self._working_copies(p, feeds)}
            out = p(full)
        except BaseException:
            self._work.clear()  # state unknown: the next edit copies the caches afresh
            self._written = None
            raise
        self._written = {r["indices"]: full[r["indices"]] for r in p.restore_plan["regions"]}
        return out

    def _working_copies(self, p: _Pass, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One working copy per cache the edit scatters into, made equal to that cache here, before the pass.
        What an edit writes is put back lazily, at the next edit: the regions the last edit wrote
        (``restore``) when the caches are the same ones, else (another key) the whole maps (``restore_full``,
        the cost the copying scatters had), so switching keys never pays for both."""
        stale = False
        for w, c in p.working.items():
            cache = feeds[c]
            held = self._work.get(w)
            if held is None or held[0]() is not cache:
                buf = held[1] if held is not None and tuple(held[1].shape) == cache.shape else self._empty_like(cache)
                self._work[w] = (weakref.ref(cache), buf)
                stale = True
        out = {w: self._work[w][1] for w in p.working}
        if stale:
            p.restore({**feeds, **out}, full=True)
        elif self._written:
            p.restore({**feeds, **out, **self._written})  # the last edit's block indices
        self._written = None
        return out

    def dense(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The prime executable, keeping only the model outputs."""
        return self._passes["prime"](feeds, outputs=list(self.manifest["outputs"]))


def verify_members(tf: tarfile.TarFile, manifest: dict, path: str | os.PathLike = "artifact") -> None:
    """Check the size and sha256 of every member listed in the manifest (ArtifactError on mismatch)."""
    listed = manifest["artifact"]["members"]
    present = {m.name: m for m in tf.getmembers() if m.isfile()}
    for name, want in listed.items():
        mem = present.get(name)
        if mem is None:
            raise ArtifactError(f"{path}: member {name!r} is missing (truncated or corrupt artifact)")
        if mem.size != want["size"]:
            raise ArtifactError(f"{path}: member {name!r} has {mem.size} bytes, the manifest says {want['size']} "
                                f"(truncated or corrupt artifact)")
        h = hashlib.sha256()
        f = tf.extractfile(mem)
        try:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ArtifactError(f"{path}: member {name!r} cannot be read ({e}); truncated artifact") from None
        if h.hexdigest() != want["sha256"]:
            raise ArtifactError(f"{path}: sha256 mismatch for member {name!r} (corrupt or modified artifact)")


def open_artifact(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict, TvmArtifactBackend]:
    """Open a compiled artifact: ``(manifest, backend)``; ``backend`` implements the runtime's Backend
    protocol (``prime``/``edit``/``dense``: dict of numpy arrays -> dict of numpy arrays).

    Checks (ArtifactError with the reason): readable tar with a sige-artifact manifest, every member's
    size and sha256, the target runs here (CPU architecture/features; CUDA needs a GPU; m1 objects
    need linking on macOS), and the installed TVM runtime version equals the one it was built with.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such SIGE artifact: {path}")
    try:
        tf = tarfile.open(path, "r:")
    except tarfile.TarError as e:
        raise ArtifactError(f"{path}: not a SIGE artifact or truncated ({e})") from None
    try:
        with tf:
            try:
                manifest = _manifest_of(tf, path)
                if verify:
                    verify_members(tf, manifest, path)
            except (tarfile.TarError, EOFError, OSError) as e:
                raise ArtifactError(f"{path}: truncated or corrupt artifact ({e})") from None
            device = check_runnable(manifest, path)
            backend = TvmArtifactBackend(path, manifest, tf, device)
    except tarfile.TarError as e:
        raise ArtifactError(f"{path}: truncated or corrupt artifact ({e})") from None
    return manifest, backend


__all__ = ["ArtifactError", "build_artifact", "calibrate_artifact", "open_artifact", "read_manifest", "check_runnable",
           "verify_members", "TvmArtifactBackend", "FORMAT", "FORMAT_VERSION"]
