"""The portable SIGE program: one ONNX file holding the prime and edit passes, plus its manifest."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import onnx

from . import onnx_io
from .graph import extract
from .mask import BlockConfig, all_block_indices, block_indices, scatter_map
from .sparsify import MANIFEST_KEY


@dataclass
class SigeProgram:
    """A SIGE ONNX program and its manifest (see :mod:`sige_export.sparsify` for the layout)."""

    model: onnx.ModelProto
    manifest: dict

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> "SigeProgram":
        props = {p.key: p.value for p in model.metadata_props}
        if MANIFEST_KEY not in props:
            raise ValueError("this ONNX model is not a SIGE program (no 'sige_manifest' in its metadata); "
                             "make one with `sige-export MODEL --target onnx`")
        return cls(model, json.loads(props[MANIFEST_KEY]))

    @classmethod
    def load(cls, path: str | os.PathLike, *, weights: bool = True) -> "SigeProgram":
        """``weights=False`` leaves the data of a big program's weights in its ``.data`` file (the graph, shapes
        and MACs only)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such SIGE program: {path}")
        try:
            model = onnx.load(str(path), load_external_data=weights)
        except Exception as e:  # protobuf raises a variety of DecodeErrors
            raise ValueError(f"{path} is not a readable ONNX file ({e})") from e
        return cls.from_model(model)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file in the same folder, then rename); the weights of a program over
        protobuf's 2 GiB limit go to ``<name>.data`` beside it."""
        return onnx_io.save(self.model, path)

    def prime_model(self) -> onnx.ModelProto:
        m = self.manifest["prime"]
        return extract(self.model, m["inputs"], m["outputs"], "prime")

    def edit_model(self) -> onnx.ModelProto:
        m = self.manifest["edit"]
        return extract(self.model, m["inputs"], m["outputs"], "edit")

    def dense_model(self) -> onnx.ModelProto:
        return extract(self.model, self.manifest["prime"]["inputs"], self.manifest["outputs"], "dense")

    @property
    def cache_names(self) -> list[str]:
        return [c["name"] for c in self.manifest["caches"]]


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` when the ``with`` block completes (through a temporary file and a
    rename): an error or interruption leaves the previous file, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def grid_config(grid: dict) -> BlockConfig:
    """The block geometry of a manifest index entry."""
    return BlockConfig(block=tuple(grid["block"]), block_stride=tuple(grid["block_stride"]),
                       out_block=tuple(grid["out_block"]), offset=tuple(grid["offset"]),
                       kernel=tuple(grid["kernel"]), stride=tuple(grid["stride"]), padding=tuple(grid["pads"]))


def grid_indices(mask: np.ndarray, grid: dict, integral: np.ndarray | None = None, dilation=0) -> np.ndarray:
    """Active block top-lefts (int32 [N, 2]) of a manifest index entry for a boolean mask at its resolution
    (``integral``: the mask's ``mask.mask_integral``, shared by the grids of one resolution; ``dilation``:
    of the mask, see ``mask.block_indices``)."""
    return block_indices(mask, grid_config(grid), tuple(grid["resolution"]), integral, dilation)


def all_grid_indices(grid: dict) -> np.ndarray:
    """Every block of a grid (the edit then equals dense where statistics are exact)."""
    return all_block_indices(grid_config(grid), tuple(grid["resolution"]))


def derived_feeds(manifest: dict, index_feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scatter maps and statistics tiles of the edit pass, computed from its block indices."""
    out: dict[str, np.ndarray] = {}
    for s in manifest["scatter_maps"]:
        out[s["name"]] = scatter_map(tuple(s["out_resolution"]), index_feeds[s["indices"]], tuple(s["offset"]),
                                     tuple(s["stride"]), tuple(s["out_block"]))
    grids = {g["name"]: g for g in manifest["indices"]}
    for t in manifest.get("stat_tiles", []):
        out[t["name"]] = stat_tiles(t, [(grids[n], index_feeds[n]) for n in t["grids"]])
    for t in manifest.get("token_rows", []):
        out[t["name"]] = token_rows(t, stat_tiles(t, [(grids[n], index_feeds[n]) for n in t["grids"]]))
    return out


def _tile_span(start: np.ndarray, length: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile indices [n, k] covering ``[start, start + length)`` per row, and which of them are real."""
    first = np.floor_divide(start, tile)
    last = np.floor_divide(start + length - 1, tile)
    t = first[:, None] + np.arange(int((last - first).max()) + 1)[None, :]
    return t, t <= last[:, None]


def token_rows(entry: dict, tiles: np.ndarray) -> np.ndarray:
    """Flat token positions (int64 [N], ascending) of the pixels of ``tiles`` inside the image."""
    h, w = entry["resolution"]
    th, tw = entry["tile"]
    rr = tiles[:, 0, None, None] + np.arange(th)[None, :, None]
    cc = tiles[:, 1, None, None] + np.arange(tw)[None, None, :]
    rr, cc = np.broadcast_arrays(rr, cc)
    ok = (rr < h) & (cc < w)
    return np.sort((rr[ok].astype(np.int64) * w + cc[ok]).reshape(-1))


def stat_tiles(entry: dict, scattered: list[tuple[dict, np.ndarray]]) -> np.ndarray:
    """Top-lefts (int32 [T, 2]) of the aligned tiles covering every output block scattered at a resolution
    (every tile a block overlaps: tiles need not divide the blocks)."""
    h, w = entry["resolution"]
    th, tw = entry["tile"]
    nh, nw = -(-h // th), -(-w // tw)
    covered = np.zeros((nh, nw), bool)
    for grid, idx in scattered:
        if len(idx) == 0:
            continue
        oh, ow = grid["out_block"]
        sh, sw = grid["stride"]
        r0 = (idx[:, 0].astype(np.int64) + grid["offset"][0]) // sh
        c0 = (idx[:, 1].astype(np.int64) + grid["offset"][1]) // sw
        rr, rok = _tile_span(r0, oh, th)
        cc, cok = _tile_span(c0, ow, tw)
        rr, cc = np.broadcast_arrays(rr[:, :, None], cc[:, None, :])
        ok = rok[:, :, None] & cok[:, None, :] & (rr >= 0) & (rr < nh) & (cc >= 0) & (cc < nw)
        covered[rr[ok], cc[ok]] = True
    ii, jj = np.nonzero(covered)
    return np.stack([ii * th, jj * tw], axis=1).astype(np.int32).reshape(-1, 2)
