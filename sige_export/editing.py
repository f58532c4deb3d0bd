"""Editing loops on SIGE engines: SDEdit (DDIM) for the diffusion zoo, label-map edits for GauGAN.

Both loops take an :class:`~sige_export.runtime.Engine` and numpy inputs and return the original
result, the dense result of the edit (the model run in full) and the incremental result (SIGE),
with timings. numpy only (no torch).

SDEdit (Meng et al.) as used by SIGE: noise the original image to ``strength`` with a fixed noise
draw and denoise it with DDIM (``eta = 0``) in ``steps`` model calls. The original trajectory is
primed once, one cache key per step (``(key_prefix, step)``); the edited image takes the same
noise, so its trajectory differs only around the edit, and every step runs sparse against that
step's caches with the same mask (the paper's choice).

Model conventions (see :mod:`sige_export.zoo.ddpm` and :mod:`sige_export.zoo.sd`):

* ``ddpm`` (``ddpm-church256``): eps-prediction, discrete time ``t`` in ``[0, 1000)``, linear betas
  ``1e-4 .. 0.02``;
* ``sd`` (``sd-unet``): eps-prediction, discrete ``t``, "scaled linear" betas ``0.00085 .. 0.012``,
  the ``context`` input held fixed;
* ``pd`` (``pd-church128/256``): conditioned on the log-SNR, cosine schedule (``logsnr`` in
  ``[-20, 20]``), ``mean_type="both"``: 6 output channels, the x-prediction then the eps-prediction
  (``_model_x, _model_eps = split(output, 2)`` in google-research/diffusion_distillation), mixed by
  ``sigmoid(-logsnr)`` and clipped to ``[-1, 1]``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping

import numpy as np

from . import mask as masks
from .runtime import EditStats, Engine

# --------------------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class DiffusionSpec:
    """How a diffusion model is conditioned and what it predicts."""

    name: str
    prediction: str  # "eps" | "both" (x then eps channels)
    time_input: str  # "timestep" (discrete t) | "logsnr"
    betas: tuple[float, float, str] | None = None  # (start, end, "linear" | "scaled_linear") for "timestep"
    num_train_steps: int = 1000
    clip_x: bool = False
    logsnr_range: tuple[float, float] = (-20.0, 20.0)

    def alpha_sigma(self, t: float) -> tuple[float, float, float]:
        """(alpha, sigma, model time input) at continuous time ``t`` in [0, 1] (t = 0: clean)."""
        if self.time_input == "timestep":
            if t <= 0:
                return 1.0, 0.0, 0.0
            k = int(round(t * (self.num_train_steps - 1)))
            abar = float(self._alphas_cumprod()[k])
            return math.sqrt(abar), math.sqrt(1.0 - abar), float(k)
        lo, hi = self.logsnr_range
        b = math.atan(math.exp(-0.5 * hi))
        a = math.atan(math.exp(-0.5 * lo)) - b
        logsnr = -2.0 * math.log(math.tan(a * t + b))
        if t <= 0:
            return 1.0, 0.0, logsnr
        return math.sqrt(_sigmoid(logsnr)), math.sqrt(_sigmoid(-logsnr)), logsnr

    def _alphas_cumprod(self) -> np.ndarray:
        start, end, kind = self.betas or (1e-4, 0.02, "linear")
        n = self.num_train_steps
        if kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
        else:
            raise ValueError(f"unknown beta schedule {kind!r}")
        return np.cumprod(1.0 - betas)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


SPECS: dict[str, DiffusionSpec] = {
    "ddpm": DiffusionSpec("ddpm", "eps", "timestep", (1e-4, 0.02, "linear")),
    "sd": DiffusionSpec("sd", "eps", "timestep", (0.00085, 0.012, "scaled_linear")),
    "pd": DiffusionSpec("pd", "both", "logsnr", clip_x=True),
}
ZOO_SPECS = {"ddpm-church256": "ddpm", "sd-unet": "sd", "pd-church128": "pd", "pd-church256": "pd"}


def spec_for(model: str | DiffusionSpec) -> DiffusionSpec:
    """A :class:`DiffusionSpec` from a spec name (``ddpm``, ``sd``, ``pd``) or a zoo model name."""
    if isinstance(model, DiffusionSpec):
        return model
    name = ZOO_SPECS.get(model, model)
    if name not in SPECS:
        raise ValueError(f"unknown diffusion model {model!r}; expected one of {sorted(SPECS)} "
                         f"or a zoo name in {sorted(ZOO_SPECS)}")
    return SPECS[name]


def ddim_step(spec: DiffusionSpec, z: np.ndarray, out: np.ndarray, cur: tuple[float, float, float],
              nxt: tuple[float, float, float]) -> np.ndarray:
    """One deterministic DDIM step from ``z`` at ``cur`` to ``nxt`` (``(alpha, sigma, time input)``)."""
    a, s, tin = cur
    an, sn, _ = nxt
    c = z.shape[1]
    z64 = z.astype(np.float64)
    if spec.prediction == "eps":
        eps = out.astype(np.float64)
        x = (z64 - s * eps) / a
        if spec.clip_x:
            x = np.clip(x, -1.0, 1.0)
            eps = (z64 - a * x) / s
    elif spec.prediction == "both":
        if out.shape[1] != 2 * c:
            raise ValueError(f"a mean_type='both' model outputs {2 * c} channels (x, eps); got {out.shape[1]}")
        mx, me = out[:, :c].astype(np.float64), out[:, c:].astype(np.float64)
        wx = _sigmoid(-tin)
        x = wx * mx + (1.0 - wx) * (z64 - s * me) / a
        if spec.clip_x:
            x = np.clip(x, -1.0, 1.0)
        eps = (z64 - a * x) / s
    else:
        raise ValueError(f"unknown prediction {spec.prediction!r}")
    return (an * x + sn * eps).astype(z.dtype)


# --------------------------------------------------------------------------------------- results


@dataclass
class EditResult:
    """Original, dense and incremental results of one edit, the mask used and timings (seconds)."""

    original: np.ndarray
    dense: np.ndarray
    incremental: np.ndarray
    mask: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)  # prime_s, dense_s, incremental_s (totals)
    steps: list[dict[str, Any]] = field(default_factory=list)  # per step / call: times and edit stats

    @property
    def speedup(self) -> float:
        return self.timings["dense_s"] / max(self.timings["incremental_s"], 1e-12)

    def summary(self) -> str:
        from .edits import psnr

        t = self.timings
        return (f"edit ratio {self.mask.mean():.1%}; dense {t['dense_s'] * 1e3:.1f} ms, incremental "
                f"{t['incremental_s'] * 1e3:.1f} ms ({self.speedup:.2f}x); PSNR incremental vs dense "
                f"{psnr(self.incremental, self.dense):.1f} dB")


def affected_region(engine: Engine, mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Pixels of an ``out_hw`` output an edit with ``mask`` may change: the output blocks of the grids
    at the output's resolution (their active blocks, as the engine finds them: ``Engine.edit_feeds``),
    scaled to it.

    Outside this region the incremental output equals the cached (original) one exactly.
    """
    m = engine.manifest
    feeds = engine.edit_feeds(np.asarray(mask, bool))
    region = np.zeros(out_hw, bool)
    best = max(g["out_resolution"][0] for g in m["indices"])
    for g in m["indices"]:
        ho, wo = g["out_resolution"]
        if ho != best:
            continue
        fh, fw = out_hw[0] / ho, out_hw[1] / wo
        sh, sw = g["stride"]
        oh, ow = g["out_block"]
        pt, pl = g["offset"]
        for top, left in feeds[g["name"]]:
            r0, c0 = (top + pt) // sh, (left + pl) // sw
            region[max(0, int(r0 * fh)):int(math.ceil((r0 + oh) * fh)),
                   max(0, int(c0 * fw)):int(math.ceil((c0 + ow) * fw))] = True
    return region


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# --------------------------------------------------------------------------------------- SDEdit


def sdedit(engine: Engine, image: np.ndarray, edited: np.ndarray, *, model: str | DiffusionSpec = "ddpm",
           mask: np.ndarray | None = None, steps: int = 5, strength: float = 0.5, seed: int = 0,
           extra_inputs: Mapping[str, np.ndarray] | None = None, key_prefix: Hashable = "sdedit",
           prime: bool = True, dense: bool = True) -> EditResult:
    """SDEdit of ``image`` -> ``edited`` (NCHW in [-1, 1]) with ``steps`` DDIM steps from ``strength``.

    Primes the original trajectory (one key per step; skip with ``prime=False`` when the same
    ``image``, ``seed``, ``steps`` and ``strength`` were primed before under ``key_prefix``), runs
    the edited trajectory dense (``dense=False`` skips it; ``result.dense`` is then None) and
    incrementally with ``mask`` (default: where ``edited`` differs from ``image``, the manifest's
    eps) at every step. ``extra_inputs``: the model's other inputs held fixed (``context`` of SD).
    """
    spec = spec_for(model)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    names = engine.input_names
    x_name, t_name = names[0], names[1] if len(names) > 1 else None
    if t_name is None:
        raise ValueError(f"a diffusion model takes (x, t, ...); this program's inputs are {names}")
    extra = dict(extra_inputs or {})
    t_spec = next(i for i in engine.manifest["inputs"] if i["name"] == t_name)
    image = np.asarray(image, np.float32)
    edited = np.asarray(edited, np.float32)
    if mask is None:
        mask = masks.difference_mask(image, edited, eps=engine.manifest["mask"]["eps"])
    mask = np.asarray(mask, bool)
    noise = np.random.default_rng(seed).standard_normal(image.shape).astype(np.float32)
    times = [strength * (1.0 - k / steps) for k in range(steps + 1)]
    sched = [spec.alpha_sigma(t) for t in times]

    def feeds(z: np.ndarray, k: int) -> dict[str, np.ndarray]:
        t = np.full(t_spec["shape"], sched[k][2], dtype=np.dtype(t_spec["dtype"]))
        return {x_name: z, t_name: t, **extra}

    a0, s0, _ = sched[0]
    z_orig = (a0 * image + s0 * noise).astype(np.float32)
    z_edit = (a0 * edited + s0 * noise).astype(np.float32)
    zo, zd, zi = z_orig, z_edit, z_edit
    timings = {"prime_s": 0.0, "dense_s": 0.0, "incremental_s": 0.0}
    per_step: list[dict[str, Any]] = []
    original = None
    for k in range(steps):
        key = (key_prefix, k)
        rec: dict[str, Any] = {"step": k, "time_input": sched[k][2]}
        if prime:
            out, dt = _timed(lambda: engine.prime(**feeds(zo, k), key=key))
            timings["prime_s"] += dt
            rec["prime_s"] = dt
            zo = ddim_step(spec, zo, out, sched[k], sched[k + 1])
        if dense:
            out, dt = _timed(lambda: engine.dense(**feeds(zd, k)))
            timings["dense_s"] += dt
            rec["dense_s"] = dt
            zd = ddim_step(spec, zd, out, sched[k], sched[k + 1])
        out, dt = _timed(lambda: engine.edit(**feeds(zi, k), mask=mask, key=key))
        timings["incremental_s"] += dt
        rec["incremental_s"] = dt
        rec["edit"] = _stats(engine.last_edit)
        zi = ddim_step(spec, zi, out, sched[k], sched[k + 1])
        per_step.append(rec)
    original = zo if prime else None
    return EditResult(original, zd if dense else None, zi, mask, timings, per_step)


def _stats(s: EditStats) -> dict[str, Any]:
    return {"mode": s.mode, "ratio": s.ratio, "blocks": dict(s.blocks), "seconds": s.seconds}


# --------------------------------------------------------------------------------------- GauGAN


def label_edit(engine: Engine, segmap: np.ndarray, edited: np.ndarray, *, mask: np.ndarray | None = None,
               key: Hashable = "label", prime: bool = True, repeats: int = 1) -> EditResult:
    """Label-map editing (GauGAN): prime on ``segmap``, then the edited map dense and incrementally.

    ``mask`` defaults to where the label maps differ. With ``repeats > 1`` the dense and the
    incremental calls are repeated and the median time is reported (the first call warms up).
    """
    segmap = np.asarray(segmap, np.float32)
    edited = np.asarray(edited, np.float32)
    if mask is None:
        mask = masks.difference_mask(segmap, edited, eps=engine.manifest["mask"]["eps"])
    mask = np.asarray(mask, bool)
    name = engine.input_names[0]
    timings = {"prime_s": 0.0}
    original = None
    if prime:
        original, timings["prime_s"] = _timed(lambda: engine.prime(**{name: segmap}, key=key))
    else:
        original = engine.edit(**{name: segmap}, mask=np.zeros_like(mask), key=key)

    def median(fn):
        results = [_timed(fn) for _ in range(max(1, repeats) + (1 if repeats > 1 else 0))]
        if repeats > 1:
            results = results[1:]
        return results[-1][0], float(np.median([r[1] for r in results]))

    dense, timings["dense_s"] = median(lambda: engine.dense(**{name: edited}))
    inc, timings["incremental_s"] = median(lambda: engine.edit(**{name: edited}, mask=mask, key=key))
    return EditResult(original, dense, inc, mask, timings, [{"edit": _stats(engine.last_edit)}])
