"""One comparison helper used by every test: an implementation against a reference at stated tolerances."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def assert_close(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-5, what: str = "") -> None:
    """Assert elementwise |actual - expected| <= atol + rtol * |expected| with a readable failure message."""
    a = np.asarray(actual)
    e = np.asarray(expected)
    label = f"{what}: " if what else ""
    assert a.shape == e.shape, f"{label}shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    a64 = a.astype(np.float64)
    e64 = e.astype(np.float64)
    assert np.all(np.isfinite(a64) == np.isfinite(e64)), f"{label}non-finite values differ"
    err = np.abs(a64 - e64)
    tol = atol + rtol * np.abs(e64)
    bad = err > tol
    if bad.any():
        idx = np.unravel_index(int(np.argmax(err - tol)), err.shape)
        raise AssertionError(
            f"{label}{int(bad.sum())}/{a.size} elements differ; worst at {idx}: "
            f"got {a64[idx]!r}, expected {e64[idx]!r} (max abs err {err.max():.3g}, rtol={rtol}, atol={atol})"
        )


def assert_close_relative(actual: Any, expected: Any, *, rel: float, what: str = "") -> None:
    """Assert max|actual - expected| <= rel * max|expected| (scale-aware, for deep networks)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    label = f"{what}: " if what else ""
    assert a.shape == e.shape, f"{label}shape {a.shape} != expected {e.shape}"
    scale = max(float(np.abs(e).max()) if e.size else 0.0, 1e-12)
    err = float(np.abs(a - e).max()) if e.size else 0.0
    assert err <= rel * scale, f"{label}max abs err {err:.3g} > {rel} * max|expected| ({scale:.3g})"


def compare(impl: Callable[..., Any], ref: Callable[..., Any], *args: Any, rtol: float = 1e-5,
            atol: float = 1e-5, what: str = "") -> None:
    """Run ``impl`` and ``ref`` on the same arguments and compare every output."""
    got = impl(*args)
    want = ref(*args)
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{what}: {len(got)} outputs != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, rtol=rtol, atol=atol, what=f"{what}[{i}]")
    else:
        assert_close(got, want, rtol=rtol, atol=atol, what=what)
