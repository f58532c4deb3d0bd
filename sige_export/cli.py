"""``sige-export``: command-line entry point.

``sige-export MODEL --target T -o PATH [...]`` exports a model (zoo name or file); subcommands
(``sige-export zoo``, and whatever other modules register on :data:`app`) are dispatched by name
in :func:`main`, so ``MODEL`` can stay positional.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, cache_dir, onnx_io

PROG = "sige-export"
DENSE_ONNX = "dense-onnx"

# Subcommands: add with ``@app.command("name")``; ``main`` routes ``sige-export name ...`` here.
app = typer.Typer(add_completion=False, no_args_is_help=True, help="sige-export subcommands.")
# The default command: ``sige-export MODEL --target T -o PATH``.
export_app = typer.Typer(add_completion=False)

_err = Console(stderr=True)


@app.callback()
def _subcommands() -> None:
    """SIGE export toolchain: model -> dense ONNX -> SIGE ONNX -> TVM artifact."""


class NormStats(str, Enum):
    original = "original"
    update = "update"


class CliError(Exception):
    """User-facing error: printed without a traceback, exit code 2."""


# --------------------------------------------------------------------------- targets
def known_targets() -> list[str]:
    """Names accepted by ``--target`` (the targets module replaces/extends this)."""
    names = [DENSE_ONNX]
    try:
        from . import targets as _targets  # noqa: PLC0415 - optional, owned by the targets engineer

        names += [n for n in _targets.list_targets() if n not in names]
    except Exception:  # noqa: BLE001 - a missing/broken targets package still allows dense-onnx
        pass
    return names


def check_target(target: str) -> str:
    known = known_targets()
    if target not in known:
        raise CliError(f"unknown target {target!r}; known targets: {', '.join(known)}")
    return target


# the sparsifier options ExportOptions passes on, whose errors name the --flag
_SPARSIFY_FLAGS = ("block_size", "sparse_min_res", "sparse_min_blocks", "attention_min_res")


@dataclass
class ExportOptions:
    block_size: Optional[int] = None
    sparse_min_res: Optional[int] = None
    sparse_min_blocks: Optional[int] = None
    attention_min_res: Optional[int] = None
    norm_stats: str = "update"
    opset: int = 17
    size: str = "full"
    seed: int = 0
    # measure the dense-fallback crossover after building (None: only for the host target, which runs here)
    calibrate: Optional[bool] = None

    def sparsify_options(self) -> Any:
        from .sparsify import SparsifyOptions  # noqa: PLC0415

        kw: dict[str, Any] = {"norm_stats": self.norm_stats}
        if self.block_size is not None:
            kw["block_size"] = self.block_size
        if self.sparse_min_res is not None:
            kw["sparse_min_res"] = self.sparse_min_res
        if self.sparse_min_blocks is not None:
            kw["sparse_min_blocks"] = self.sparse_min_blocks
        if self.attention_min_res is not None:
            kw["attention_min_res"] = self.attention_min_res
        return SparsifyOptions(**kw)


def default_output(model: str, target: str) -> Path:
    stem = Path(model).stem if Path(model).suffix else model
    if target == DENSE_ONNX:
        return Path(f"{stem}.dense.onnx")
    if target == "onnx":
        return Path(f"{stem}.sige.onnx")
    return Path(f"{stem}.{target}.sige")


def export(model: str, target: str, output: str | os.PathLike | None = None, *, arch: Optional[str] = None,
           input_shape: Sequence[str] | dict | None = None, trust_pickle: bool = False,
           options: Optional[ExportOptions] = None, log: Callable[[str], None] = lambda s: None) -> Path:
    """Run the pipeline for ``model`` up to ``target`` and write the result to ``output``.

    load -> dense ONNX -> (dense-onnx) | sparsify -> SIGE ONNX -> (onnx) | TVM lowering -> artifact.
    """
    from . import frontend  # noqa: PLC0415 - heavy imports only when exporting
    from .sparsify import SparsifyError, sparsify  # noqa: PLC0415

    options = options or ExportOptions()
    check_target(target)
    try:
        sparsify_options = options.sparsify_options()  # bad values fail before the model is loaded
    except ValueError as e:  # SparsifyOptions names the field; the user gave the flag
        name, _, rest = str(e).partition(" ")
        flag = f"--{name.replace('_', '-')}" if name in _SPARSIFY_FLAGS else name
        raise CliError(f"{flag} {rest}") from None
    output = Path(output) if output is not None else default_output(model, target)
    if target not in (DENSE_ONNX, "onnx"):
        from .targets import ToolchainError, get  # noqa: PLC0415

        try:
            get(target).check_toolchain()
        except ToolchainError as e:
            raise CliError(str(e)) from None
    try:
        loaded = frontend.load_model(model, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape,
                                     size=options.size, seed=options.seed)
        shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in loaded.input_shapes.items())
        log(f"loaded {loaded.name} ({loaded.source}); inputs {shapes}")
        dense = frontend.to_dense_onnx(loaded, opset=options.opset)
        del loaded  # the module's weights, now in the ONNX model: free them before sparsify copies those
    except frontend.FrontendError as e:
        raise CliError(str(e)) from None
    log(f"dense ONNX: {len(dense.graph.node)} nodes")
    if target == DENSE_ONNX:
        onnx_io.save(dense, output)
        return output
    try:
        result = sparsify(dense, sparsify_options)
    except SparsifyError as e:
        raise CliError(str(e)) from None
    del dense
    m = result.manifest
    log(f"SIGE program: {len(m['sparse_convs'])} sparse convolutions, {len(m['indices'])} block grids, "
        f"{len(m['caches'])} caches, {len(m['dense_islands'])} dense ops")
    from .program import SigeProgram  # noqa: PLC0415

    program = SigeProgram(result.model, m)
    if target == "onnx":
        return program.save(output)
    from .artifact import build_artifact  # noqa: PLC0415

    calibrate = options.calibrate if options.calibrate is not None else target == "host"
    return build_artifact(program, target, output, log=log, calibrate=calibrate)


@export_app.command(help="Export MODEL (zoo name or .pt/.pth/.ckpt/.pt2/.onnx file) for --target. "
                         f"Subcommands: run '{PROG} zoo --help' etc.")
def export_command(
    model: str = typer.Argument(..., help="zoo name (see 'sige-export zoo') or model file"),
    target: str = typer.Option(..., "--target", "-t", help=f"target ({DENSE_ONNX}, or a hardware target)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="output path (default: MODEL.TARGET.sige, MODEL.sige.onnx)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="zoo architecture of a state-dict checkpoint"),
    input_shape: Optional[list[str]] = typer.Option(None, "--input-shape",
                                                    help="static input shape NAME=1x3x256x256 (repeatable)"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow full (code-running) pickles"),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="SIGE block size (sparse targets)"),
    sparse_min_res: Optional[int] = typer.Option(None, "--sparse-min-res",
                                                 help="smallest resolution run sparsely (sparse targets)"),
    sparse_min_blocks: Optional[int] = typer.Option(None, "--sparse-min-blocks",
                                                    help="convolutions over fewer blocks run dense (default 8)"),
    attention_min_res: Optional[int] = typer.Option(None, "--attention-min-res",
                                                    help="transformers on smaller maps run dense (default 16)"),
    norm_stats: NormStats = typer.Option(NormStats.update, "--norm-stats",
                                         help="normalisation statistics: original or update"),
    size: str = typer.Option("full", "--size", help="zoo model size: full or tiny"),
    seed: int = typer.Option(0, "--seed", help="seed for zoo weights and example inputs"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset of the dense export"),
    calibrate: Optional[bool] = typer.Option(
        None, "--calibrate/--no-calibrate",
        help="time sparse edits against dense on this machine and store the crossover in the artifact "
             "(default: on for --target host)"),
) -> None:
    opts = ExportOptions(block_size=block_size, sparse_min_res=sparse_min_res, sparse_min_blocks=sparse_min_blocks,
                         attention_min_res=attention_min_res,
                         norm_stats=norm_stats.value, opset=opset, size=size, seed=seed, calibrate=calibrate)
    try:
        path = export(model, target, output, arch=arch, input_shape=input_shape, trust_pickle=trust_pickle,
                      options=opts, log=lambda s: _err.print(f"[dim]{escape(s)}[/dim]", soft_wrap=True))
    except CliError as e:
        _err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _err.print(f"wrote {escape(str(path))}", soft_wrap=True)


# --------------------------------------------------------------------------- zoo
def _entry_key(entry: Any) -> str:
    """Cache key: name + package version + hash of the source file defining the entry."""
    h = hashlib.sha256(f"{entry.name}|{__version__}".encode())
    try:
        h.update(Path(inspect.getsourcefile(entry.build) or "").read_bytes())
    except (OSError, TypeError):
        pass
    return h.hexdigest()[:16]


def zoo_info(name: str, *, use_cache: bool = True) -> dict[str, Any]:
    """``name``, ``family``, ``description``, ``inputs`` (full-size shapes/dtypes), ``params`` and ``macs``.

    MACs are computed, not typed in: the full model is built on the meta device and its aten
    convolutions/matmuls are counted (:func:`sige_export.macs.count_torch_macs`; same conventions as
    :func:`sige_export.macs.count_macs` on the exported ONNX). Results are cached on disk.
    """
    from . import zoo  # noqa: PLC0415

    entry = zoo.get(name)
    key = _entry_key(entry)
    cache = cache_dir() / f"zoo-{name}-{key}.json"
    if use_cache and cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):
            pass
    info = _compute_zoo_info(entry)
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(info))
            tmp.replace(cache)
        except OSError:
            pass
    return info


def _compute_zoo_info(entry: Any) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from . import zoo  # noqa: PLC0415
    from .macs import count_torch_macs  # noqa: PLC0415

    inputs = zoo.example_inputs(entry.name, "full")
    try:
        with torch.device("meta"):
            model = zoo.create(entry.name, "full")
        report = count_torch_macs(model, {k: v.to("meta") for k, v in inputs.items()})
    except Exception:  # noqa: BLE001 - a model that cannot run on meta is counted for real (slower)
        model = zoo.create(entry.name, "full")
        report = count_torch_macs(model, inputs)
    return {
        "name": entry.name,
        "family": entry.family,
        "description": entry.description,
        "inputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                   for k, v in inputs.items()],
        "params": int(sum(p.numel() for p in model.parameters())),
        "macs": int(report.total),
    }


@app.command("targets", help="List the export targets and what each produces.")
def targets_command(json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    from . import targets as _targets  # noqa: PLC0415

    specs = [_targets.get(n) for n in _targets.list_targets()]
    rows = [{"name": DENSE_ONNX, "family": "onnx", "description": "the dense model as ONNX (no sparsity)",
             "produces": "ONNX file", "toolchain": []}]
    for t in specs:
        rows.append({"name": t.name, "family": t.family, "description": t.description, "produces": t.produces,
                     "toolchain": list(t.toolchain), "missing": t.missing_toolchain() if t.compiles else []})
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="sige-export targets")
    for col in ("target", "family", "device", "produces", "toolchain here"):
        table.add_column(col)
    for r in rows:
        missing = r.get("missing") or []
        table.add_row(r["name"], r["family"], r["description"], r["produces"],
                      "[red]missing: " + ", ".join(missing) + "[/red]" if missing else "ok")
    Console().print(table)


@app.command("zoo", help="List the model zoo with input shapes and dense MACs of the full models.")
def zoo_command(
    as_json: bool = typer.Option(False, "--json", help="print JSON (a list of objects)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute MACs instead of using the cache"),
) -> None:
    from . import zoo  # noqa: PLC0415
    from .macs import format_macs  # noqa: PLC0415

    infos = [zoo_info(n, use_cache=not no_cache) for n in zoo.names()]
    if as_json:
        typer.echo(json.dumps(infos, indent=2))
        return
    table = Table(title="sige-export zoo (full-size models)")
    for col in ("name", "family", "inputs", "params", "MACs"):
        table.add_column(col, justify="right" if col in ("params", "MACs") else "left")
    for info in infos:
        ins = ", ".join(f"{i['name']} {'x'.join(map(str, i['shape']))}" for i in info["inputs"])
        table.add_row(info["name"], info["family"], ins, f"{info['params'] / 1e6:.1f}M", format_macs(info["macs"]))
    Console().print(table)


# --------------------------------------------------------------------------- dispatch
def subcommand_names() -> list[str]:
    names = []
    for cmd in app.registered_commands:
        names.append(cmd.name or cmd.callback.__name__.replace("_", "-"))
    for grp in app.registered_groups:
        if grp.name:
            names.append(grp.name)
    return names


def _top_help() -> str:
    subs = "\n".join(f"  {PROG} {n} --help" for n in subcommand_names())
    return (f"Usage: {PROG} MODEL --target TARGET -o PATH [options]   (see '{PROG} MODEL --help')\n"
            f"       {PROG} COMMAND [ARGS]...\n\nCommands:\n{subs}\n")


def main(argv: Optional[Sequence[str]] = None) -> Any:
    """Console entry: ``sige-export COMMAND ...`` for a registered subcommand, else the export command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        if args:
            typer.echo(_top_help())
            return export_app(args, prog_name=PROG)
        typer.echo(_top_help())
        return 0
    if args[0] in subcommand_names():
        return app(args, prog_name=PROG)
    return export_app(args, prog_name=PROG)


if __name__ == "__main__":  # pragma: no cover
    main()
