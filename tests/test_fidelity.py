"""Fidelity report and sparse MACs: computed from the programs, checked against the paper's claims."""
from __future__ import annotations

import numpy as np

from sige_export.edits import synthetic_mask
from sige_export.fidelity import edit_macs, fidelity_report, one_hot_channels, program_for, to_markdown
from sige_export.macs import count_macs
from sige_export.runtime import Engine


def test_tiny_report_rows_are_meaningful() -> None:
    rows = fidelity_report("ddpm-church256", size="tiny", ratios=(0.05, 0.33), kinds=("blob",))
    assert len(rows) == 4
    for r in rows:
        assert abs(r.edited_ratio - r.target_ratio) < 0.02
        assert r.sparse_macs < r.dense_macs
        # The incremental result is much closer to dense than the stale (unedited) output.
        assert r.psnr_db > r.psnr_unchanged_db + 3, r
    small, large = rows[0], rows[1]
    assert small.macs_reduction > large.macs_reduction > 1
    assert "| ddpm-church256 | original | blob |" in to_markdown(rows)


def test_ddpm_church256_macs_reduction_at_1_2_percent() -> None:
    program, inputs = program_for("ddpm-church256", "full", "original")
    dense = count_macs(program.dense_model()).total
    assert 240e9 < dense < 260e9  # the paper's 248G
    engine = Engine(program, backend=None)  # only index building: no pass runs
    mask = synthetic_mask("blob", (256, 256), 0.012, seed=0)
    sparse = edit_macs(program, engine.edit_feeds(mask))
    assert dense / sparse >= 7, f"dense/sparse MACs = {dense / sparse:.2f} at {mask.mean():.2%}"


def test_one_hot_detection() -> None:
    labels = np.eye(5, dtype=np.float32)[np.random.default_rng(0).integers(0, 5, (1, 8, 8))].transpose(0, 3, 1, 2)
    edge = np.zeros((1, 1, 8, 8), np.float32)
    assert one_hot_channels(np.concatenate([labels, edge], 1)) == 5
    assert one_hot_channels(labels) == 5
    assert one_hot_channels(np.random.default_rng(0).normal(size=(1, 3, 8, 8))) is None
