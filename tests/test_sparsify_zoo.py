"""Every zoo family, tiny variants: the SIGE program's edit pass against prime and the dense model."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import pytest
import torch

from sige_export import zoo
from sige_export.frontend import load_model, to_dense_onnx
from sige_export.program import SigeProgram, all_grid_indices, derived_feeds
from sige_export.runtime import Engine, OnnxRuntimeBackend
from sige_export.sparsify import SparsifyOptions, sparsify
from tests.helpers import assert_close_relative

# Families whose normalisation does not depend on the input (BatchNorm in eval): the edit with
# all blocks active equals dense in both norm-stats modes.
INPUT_INDEPENDENT_NORM = {"gaugan-cityscapes"}


@functools.lru_cache(maxsize=None)
def _dense(name: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_dense_onnx(load_model(name, size="tiny"))


@functools.lru_cache(maxsize=None)
def _engine(name: str, norm_stats: str) -> Engine:
    # Small thresholds so the tiny variants exercise every rule, token-sparse attention included.
    result = sparsify(_dense(name), SparsifyOptions(norm_stats=norm_stats, sparse_min_res=8, attention_min_res=8))
    program = SigeProgram.from_model(result.model)
    return Engine(program, OnnxRuntimeBackend(program))


def _inputs(name: str) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in zoo.example_inputs(name, "tiny").items()}


def _all_blocks_feeds(engine: Engine) -> dict[str, np.ndarray]:
    feeds = {g["name"]: all_grid_indices(g) for g in engine.manifest["indices"]}
    feeds.update(derived_feeds(engine.manifest, feeds))
    return feeds


def _run_edit(engine: Engine, edited: dict[str, np.ndarray], index_feeds: dict[str, np.ndarray]) -> np.ndarray:
    full = {**engine._entry(None).caches, **index_feeds}
    for name, e in engine.manifest["edit"]["edited"].items():
        full[e] = edited[name]
    return engine.backend.edit(full)[engine.manifest["edit"]["outputs"][0]]


@pytest.mark.parametrize("norm_stats", ["original", "update"])
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_edit_invariants(name: str, norm_stats: str) -> None:
    engine = _engine(name, norm_stats)
    if name == "sd-unet":  # spatial transformers run on the changed tokens only
        assert engine.manifest["token_rows"]
    inputs = _inputs(name)
    primed = engine.prime(**inputs)
    src = engine.manifest["mask"]["source"]
    h, w = inputs[src].shape[2:]
    rng = np.random.default_rng(0)
    # Edit on the unedited input with any mask equals prime's output.
    for _ in range(2):
        m = np.zeros((h, w), bool)
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        m[y:y + rng.integers(1, h // 3), x:x + rng.integers(1, w // 3)] = True
        out = engine.edit(**inputs, mask=m)
        assert engine.last_edit.mode == "sparse"
        assert_close_relative(out, primed, rel=1e-5, what=f"{name} edit(unedited) vs prime")
    # No active block returns prime's output.
    empty = {g["name"]: np.zeros((0, 2), np.int32) for g in engine.manifest["indices"]}
    empty.update(derived_feeds(engine.manifest, empty))
    edited = dict(inputs)
    edited[src] = inputs[src] + 1.0
    assert_close_relative(_run_edit(engine, edited, empty), primed, rel=1e-5, what=f"{name} N = 0")
    # All blocks active equals the dense model on the edited input where statistics are exact.
    if norm_stats == "update" or name in INPUT_INDEPENDENT_NORM:
        edited[src] = inputs[src] + 0.5 * rng.standard_normal(inputs[src].shape).astype(np.float32)
        model = zoo.create(name, "tiny")
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in edited.items()})
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
        out = _run_edit(engine, edited, _all_blocks_feeds(engine))
        assert_close_relative(out, ref, rel=1e-4, what=f"{name} all blocks vs dense [{norm_stats}]")
