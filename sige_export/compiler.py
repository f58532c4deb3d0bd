"""Compile a SIGE ONNX program for a target into a library (TVM Relax VM executable).

    lib = compile_program(model, "host", {"x": (1, 64, 64, 64)})
    y = lib.run(x, indices)                  # in-process Relax VM
    lib.export_library("model.so")           # .so (host/x86/CUDA) | .tar of Mach-O objects (m1)
    run_library("model.so", [x, indices])    # runtime only: tvm_ffi + libtvm_runtime.so, no compiler

Pipeline: ``from_sige_onnx`` -> LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR
-> per-target schedule rules on every PrimFunc (``tvm_schedules.cpu`` / ``.cuda``) -> Relax VM
lowering -> ``tvm.compile``.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from .targets import TargetSpec, get as get_target


def relax_pipeline(spec: TargetSpec, schedule_log: list | None = None, schedule: bool = True):
    """The Relax pass pipeline for ``spec`` (a ``tvm.transform.Pass``)."""
    import tvm
    from tvm import relax

    from .tvm_schedules import rules_for
    from .tvm_schedules.base import ApplyScheduleRules

    target = spec.tvm_target()
    rules = rules_for(spec.family) if schedule else []
    is_cuda = spec.family == "cuda"
    if not is_cuda:
        # vectorised exp/sigmoid (LLVM would call scalar expf per lane): tvm_schedules.cpu.fastmath
        from .tvm_schedules.cpu import fastmath

        fastmath.register()

    @tvm.transform.module_pass(opt_level=0, name="SigeRelaxPipeline")
    def _pipeline(mod, _ctx):
        with target:
            passes = [
                relax.backend.DispatchSampling(),
                relax.backend.DispatchSortScan(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                ApplyScheduleRules(target, rules, schedule_log),
            ]
            if is_cuda:
                from tvm.s_tir import dlight as dl

                passes.append(dl.ApplyDefaultSchedule(dl.gpu.Fallback()))  # anything left: bind threads
            passes += [
                relax.transform.RewriteDataflowReshape(),
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
                relax.transform.StaticPlanBlockMemory(),
                relax.transform.LowerAllocTensor(),
                relax.transform.KillAfterLastUse(),
                relax.transform.LowerRuntimeBuiltin(),
                relax.transform.ComputePrimValue(),
                relax.transform.VMShapeLower(),
                relax.transform.AttachGlobalSymbol(),
            ]
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


@dataclass
class CompiledLibrary:
    """A built Relax VM executable for one target."""

    executable: Any
    target: TargetSpec
    input_names: list[str]
    output_names: list[str]
    schedule_log: list = field(default_factory=list)
    ir_module: Any = None
    restore: dict = field(default_factory=dict)  # working copies: inputs of ``restore`` / ``restore_full``, regions
    _vm: Any = None

    # -- running (in-process) ---------------------------------------------------------------------
    def _device(self):
        import tvm

        return tvm.cuda(0) if self.target.family == "cuda" else tvm.cpu(0)

    def vm(self):
        """The Relax VM (created once; only for targets that run here: host/x86 matching, CUDA with a GPU)."""
        if self._vm is None:
            from tvm import relax

            from .artifact import use_physical_cores

            use_physical_cores()
            self._vm = relax.VirtualMachine(self.executable, self._device())
        return self._vm

    def run(self, *inputs: np.ndarray, **named: np.ndarray) -> np.ndarray | list[np.ndarray]:
        args = _order_inputs(self.input_names, inputs, named)
        return _run_vm(self.vm(), self._device(), args)

    def time(self, *inputs: np.ndarray, number: int = 20, repeat: int = 3) -> float:
        """Median seconds per call of ``main`` (VM time_evaluator)."""
        import tvm

        dev = self._device()
        vm = self.vm()
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
        vm.set_input("main", *args)
        te = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)
        return float(np.median(te("main").results))

    # -- export -------------------------------------------------------------------------------------
    def export_library(self, path: str | os.PathLike) -> Path:
        """Write the artifact: ``.so`` for host/x86/CUDA, ``.tar`` of Mach-O objects for arm (m1)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.target.family == "arm":
            if path.suffix != ".tar":
                raise ValueError(f"target {self.target.name!r} exports an object archive: use a .tar path, got {path}")
            # No Mach-O linker here: ship the objects; `clang -dynamiclib` on the Mac links them.
            self.executable.export_library(str(path))
        else:
            if path.suffix != ".so":
                raise ValueError(f"target {self.target.name!r} exports a shared library: use a .so path, got {path}")
            self.executable.export_library(str(path))
            if self.target.family == "cuda":
                # TVM 0.27 embeds the CUDA source in the .so (JIT-compiled by NVRTC at load); the
                # ahead-of-time cubin for the target arch is written next to it.
                for k, data in enumerate(self.device_binaries("cubin")):
                    path.with_suffix(f".{self.target.cuda_arch}.{k}.cubin").write_bytes(data)
        return path

    def cuda_sources(self) -> list[str]:
        """CUDA only: the CUDA C++ source of each device module (TVM 0.27 keeps device code as source)."""
        return [m.inspect_source("cuda") for m in _imported_modules(self.executable.mod) if m.kind == "cuda"]

    def device_binaries(self, fmt: str = "cubin") -> list[bytes]:
        """CUDA only: device code compiled ahead of time with NVRTC for the target's arch
        (``cubin``: ELF for exactly ``sm_XX``; ``ptx``: text with ``.target sm_XX``)."""
        if self.target.family != "cuda":
            return []
        key = f"_dev_{fmt}"
        if key not in self.__dict__:
            arch = self.target.cuda_arch
            self.__dict__[key] = [nvrtc_compile(src, arch, fmt) for src in self.cuda_sources()]
        return self.__dict__[key]

def _pip_cuda_root() -> str | None:
    """A CUDA_PATH-shaped directory assembled from the PyPI header packages (nvidia-cuda-runtime-cu12,
    nvidia-cuda-cccl-cu12, nvidia-cuda-nvrtc-cu12), for TVM's NVRTC driver; None if they are missing."""
    import importlib.util
    import platform
    import tempfile

    dirs = {}
    for pkg in ("cuda_runtime", "cuda_cccl", "cuda_nvrtc"):
        spec = importlib.util.find_spec(f"nvidia.{pkg}")
        if spec is None or not spec.submodule_search_locations:
            return None
        dirs[pkg] = Path(list(spec.submodule_search_locations)[0]) / "include"
    if not (dirs["cuda_runtime"] / "cuda_runtime.h").is_file():
        return None
    root = Path(tempfile.gettempdir()) / f"sige-export-cuda-{os.getuid()}"
    inc = root / "include"
    tinc = root / "targets" / f"{platform.machine()}-{platform.system().lower()}" / "include"
    inc.mkdir(parents=True, exist_ok=True)
    tinc.mkdir(parents=True, exist_ok=True)
    for pkg in ("cuda_runtime", "cuda_nvrtc"):
        for f in dirs[pkg].iterdir():
            link = inc / f.name
            if not link.exists():
                try:
                    link.symlink_to(f)
                except FileExistsError:
                    pass
    cccl = tinc / "cccl"
    if not cccl.exists():
        try:
            cccl.symlink_to(dirs["cuda_cccl"])
        except FileExistsError:
            pass
    return str(root)


def nvrtc_compile(source: str, arch: str, fmt: str = "cubin") -> bytes:
    """Compile TVM-generated CUDA C++ with NVRTC (cuda-bindings) to ``cubin``/``ptx`` for ``arch``."""
    from tvm.support import nvcc

    env_before = os.environ.get("CUDA_PATH")
    if env_before is None:
        root = _pip_cuda_root()
        if root is not None:
            os.environ["CUDA_PATH"] = root
    try:
        return bytes(nvcc.compile_cuda(source, target_format=fmt, arch=arch, compiler="nvrtc"))
    finally:
        if env_before is None:
            os.environ.pop("CUDA_PATH", None)


def _imported_modules(mod):
    seen = []
    stack = [mod]
    while stack:
        m = stack.pop()
        seen.append(m)
        try:
            stack.extend(list(m.imports))
        except Exception:
            try:
                stack.extend(list(m.imported_modules))
            except Exception:
                pass
    return seen[1:]


def _order_inputs(names, inputs, named):
    if named:
        if inputs:
            raise TypeError("pass inputs either positionally or by name, not both")
        missing = [n for n in names if n not in named]
        if missing:
            raise TypeError(f"missing inputs {missing}; expected {names}")
        return [named[n] for n in names]
    if len(inputs) != len(names):
        raise TypeError(f"expected {len(names)} inputs {names}, got {len(inputs)}")
    return list(inputs)


def _run_vm(vm, dev, arrays):
    import tvm

    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
    out = vm["main"](*args)
    return _to_numpy(out)


def _to_numpy(out):
    if hasattr(out, "numpy"):
        return out.numpy()
    return [_to_numpy(o) for o in out]


def graph_io(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    init = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in init], [o.name for o in model.graph.output]


def _c_identifier(name: str) -> str:
    import re

    s = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "x"
    return s if not s[0].isdigit() else f"_{s}"


def safe_input_names(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Rename graph inputs that are not C identifiers (``idx/16x16/k3x3...``): they become kernel
    parameter names, which CUDA C++ source cannot spell. Returns (model, {old: new})."""
    init = {t.name for t in model.graph.initializer}
    import re

    bad = [i.name for i in model.graph.input if i.name not in init and not re.fullmatch(r"[A-Za-z_][0-9A-Za-z_]*", i.name)]
    if not bad:
        return model, {}
    taken = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    renamed: dict[str, str] = {}
    for k, name in enumerate(bad):
        new = f"{_c_identifier(name)}_i{k}"
        while new in taken:
            new += "_"
        taken.add(new)
        renamed[name] = new
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        if i.name in renamed:
            i.name = renamed[i.name]
    for node in m.graph.node:
        for j, x in enumerate(node.input):
            if x in renamed:
                node.input[j] = renamed[x]
    for o in m.graph.output:  # an input passed straight through to an output keeps its output name
        if o.name in renamed:
            m.graph.node.append(onnx.helper.make_node("Identity", [renamed[o.name]], [o.name]))
    return m, renamed


def compile_program(model: onnx.ModelProto, target: str | TargetSpec, input_shapes: Mapping[str, Sequence] | None = None,
                    *, schedule: bool = True, packed_weights=(), working_copies: Mapping[str, str] | None = None) -> CompiledLibrary:
    """Import, schedule and build ``model`` for ``target``.

    ``input_shapes`` maps input names to shapes (ints, or strings for named symbolic dims);
    ``indices`` inputs of ai.sige ops not listed get a symbolic block count, so the library serves
    any mask without recompiling. ``packed_weights``: graph inputs that hold conv weights pre-packed
    ``[Cout/v, Cin, kh, kw, v]`` (declared with that shape; ``tvm_schedules.packing``).
    ``working_copies``: the map of ``tvm_schedules.importer.with_working_copies`` for a model it rewrote;
    the library then also has ``restore`` and ``restore_full`` (described by ``CompiledLibrary.restore``).
    """
    import tvm

    from .tvm_schedules.importer import from_sige_onnx

    spec = get_target(target) if isinstance(target, str) else target
    if not spec.compiles:
        raise ValueError(f"target {spec.name!r} is a portable ONNX program: nothing to compile")
    spec.check_toolchain()
    model, renamed = safe_input_names(model)
    if input_shapes:
        input_shapes = {renamed.get(k, k): v for k, v in input_shapes.items()}
    mod = from_sige_onnx(model, input_shapes, packed_weights={renamed.get(n, n) for n in packed_weights},
                         working_copies={renamed.get(w, w): renamed.get(c, c) for w, c in (working_copies or {}).items()},
                         fuse_attention=spec.family != "cuda")
    log: list = []
    tgt = spec.tvm_target()
    back = {v: k for k, v in renamed.items()}
    restore: dict = {}
    if "restore" in mod:  # working copies: how to put them back (sige_export.artifact)
        import json

        restore = json.loads(str(mod["restore"].attrs["sige.restore_regions"]))
        for r in restore["regions"]:
            r["indices"] = back.get(r["indices"], r["indices"])
        restore["inputs"] = [back.get(p.name, p.name) for p in mod["restore"].params]
        restore["full_inputs"] = [back.get(p.name, p.name) for p in mod["restore_full"].params]
    ex = tvm.compile(mod, tgt, relax_pipeline=relax_pipeline(spec, log, schedule))
    ins, outs = graph_io(model)
    ins = [back.get(n, n) for n in ins]
    return CompiledLibrary(ex, spec, ins, outs, log, mod, restore=restore)


# -- runtime-only loading ----------------------------------------------------------------------------
_KDL_CPU, _KDL_CUDA = 1, 2
_POOLED = 2


class LoadedLibrary:
    """A Relax VM over an exported ``.so``, driven through tvm_ffi only (no ``import tvm``)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        import tvm_ffi

        from .artifact import _load_tvm_runtime, use_physical_cores

        if device != "cuda":
            use_physical_cores()
        _load_tvm_runtime(cuda=device == "cuda")
        self._ffi = tvm_ffi
        self.module = tvm_ffi.load_module(str(path))
        self.vm = self.module["vm_load_executable"]()
        dev_type = _KDL_CUDA if device == "cuda" else _KDL_CPU
        init = [dev_type, 0, _POOLED] + ([_KDL_CPU, 0, _POOLED] if dev_type != _KDL_CPU else [])
        self.vm["vm_initialization"](*init)
        self.device = tvm_ffi.device("cuda" if device == "cuda" else "cpu", 0)

    def __call__(self, *inputs: np.ndarray):
        from .artifact import _aligned  # TVM kernels assume 64-byte aligned tensors

        args = [self._ffi.from_dlpack(_aligned(np.asarray(a))) for a in inputs]
        if self.device.dlpack_device_type() != _KDL_CPU:
            raise NotImplementedError("copying inputs to the GPU is left to sige_export.runtime")
        out = self.vm["main"](*args)
        return _ffi_to_numpy(out)


def _ffi_to_numpy(out):
    if hasattr(out, "__dlpack__"):
        return np.from_dlpack(out).copy()
    return [_ffi_to_numpy(o) for o in out]


def load_library(path: str | os.PathLike, device: str = "cpu") -> LoadedLibrary:
    """Load an exported ``.so`` with tvm_ffi + libtvm_runtime.so only; call it with numpy arrays."""
    return LoadedLibrary(path, device)


def run_library(path: str | os.PathLike, inputs: Sequence[np.ndarray], device: str = "cpu"):
    return load_library(path, device)(*inputs)


# -- artifact inspection -------------------------------------------------------------------------------
MACHO_MAGIC_64 = 0xFEEDFACF
CPU_TYPE_ARM64 = 0x0100000C


def macho_arm64(data: bytes) -> bool:
    """True for a 64-bit little-endian Mach-O object of cputype arm64."""
    if len(data) < 8:
        return False
    magic, cputype = struct.unpack_from("<II", data, 0)
    return magic == MACHO_MAGIC_64 and cputype == CPU_TYPE_ARM64


def cubin_arch(data: bytes) -> str | None:
    """``sm_XX`` of a CUDA cubin (ELF, e_machine EM_CUDA=190), from its e_flags; None if not a cubin."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        return None
    is64 = data[4] == 2
    e_machine = struct.unpack_from("<H", data, 18)[0]
    if e_machine != 190:
        return None
    e_flags = struct.unpack_from("<I", data, 48 if is64 else 36)[0]
    # ELF ABI v7 and earlier: arch in bits 0-7 (e.g. 0x56 = sm_86); newer (CUDA 12.8+): bits 8-15.
    sm = e_flags & 0xFF
    if data[8] >= 8 or sm == 0:  # EI_ABIVERSION
        sm = (e_flags >> 8) & 0xFF
    return f"sm_{sm}"
