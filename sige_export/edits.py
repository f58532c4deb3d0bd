"""Synthetic edits for tests, the fidelity report and the benchmark: masks of a target area and edited inputs."""
from __future__ import annotations

import numpy as np

MASK_KINDS = ("blob", "stroke")


def synthetic_mask(kind: str, hw: tuple[int, int], ratio: float, seed: int = 0) -> np.ndarray:
    """A boolean mask covering about ``ratio`` of an ``hw`` image.

    ``blob``: one compact ellipse (an object pasted or recoloured); ``stroke``: a thick random
    polyline (a brush stroke). Deterministic for a seed.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {', '.join(MASK_KINDS)}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"edit ratio must be in (0, 1), got {ratio}")
    h, w = hw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    target = ratio * h * w
    if kind == "blob":
        aspect = rng.uniform(0.6, 1.6)
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w

        def area_mask(r: float) -> np.ndarray:
            return ((yy - cy) / (r * aspect)) ** 2 + ((xx - cx) / (r / aspect)) ** 2 <= 1.0
    else:
        n = 6
        pts = np.stack([rng.uniform(0.15, 0.85, n) * h, rng.uniform(0.15, 0.85, n) * w], 1)
        dist = np.full((h, w), np.inf)
        for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):
            d = np.array([y1 - y0, x1 - x0])
            t = np.clip(((yy - y0) * d[0] + (xx - x0) * d[1]) / max(d @ d, 1e-9), 0, 1)
            dist = np.minimum(dist, np.hypot(yy - (y0 + t * d[0]), xx - (x0 + t * d[1])))

        def area_mask(r: float) -> np.ndarray:
            return dist <= r

    lo, hi = 0.0, float(max(h, w))
    for _ in range(40):  # bisection on the radius / half-width for the target area
        mid = (lo + hi) / 2
        if area_mask(mid).sum() < target:
            lo = mid
        else:
            hi = mid
    m = area_mask(hi)
    if not m.any():
        m[int(h // 2), int(w // 2)] = True
    return m


def apply_edit(x: np.ndarray, mask: np.ndarray, seed: int = 0, *, one_hot_channels: int | None = None) -> np.ndarray:
    """An edited copy of NCHW ``x`` that differs exactly where ``mask`` is set.

    Images get a smooth colour shift; one-hot label maps (GauGAN) get the region relabelled to
    another class (the last ``x.shape[1] - one_hot_channels`` channels, e.g. an instance edge, are
    set to 0 there).
    """
    rng = np.random.default_rng(seed)
    out = x.copy()
    if mask.shape != x.shape[-2:]:
        raise ValueError(f"mask of shape {mask.shape} does not match the input's spatial size {x.shape[-2:]}")
    if one_hot_channels:
        labels = x[:, :one_hot_channels].argmax(1)
        new = (labels + 1 + rng.integers(0, one_hot_channels - 1)) % one_hot_channels
        onehot = np.eye(one_hot_channels, dtype=x.dtype)[new].transpose(0, 3, 1, 2)
        out[:, :one_hot_channels] = np.where(mask, onehot, x[:, :one_hot_channels])
        if x.shape[1] > one_hot_channels:
            out[:, one_hot_channels:] = np.where(mask, 0, x[:, one_hot_channels:])
        return out
    shift = rng.normal(0, 0.7, size=(1, x.shape[1], 1, 1)).astype(x.dtype)
    shift = np.where(np.abs(shift) < 0.2, 0.2, shift)  # never a no-op channel-wide
    return np.where(mask, x + shift, x).astype(x.dtype)


def psnr(actual: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB over the reference's value range (inf when equal)."""
    mse = float(np.mean((actual.astype(np.float64) - reference.astype(np.float64)) ** 2))
    rng = float(np.ptp(reference)) or 1.0
    return float("inf") if mse == 0 else 10.0 * np.log10(rng * rng / mse)
