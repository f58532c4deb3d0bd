"""``make demo``: export two tiny zoo models, prime, edit, and write PNG panels to out/demo/.

1. GauGAN (tiny, random weights): a label-map edit (a blob relabelled), dense vs incremental.
2. DDPM church (tiny, random weights): SDEdit with a few DDIM steps, one cache key per step.

Each panel shows the original input, the edited input, the original output, the dense result of
the edit, the incremental (SIGE) result, the |dense - incremental| heat map and the mask. The
program runs in onnxruntime (the portable ``.sige.onnx``); with random tiny weights the images
are not pretty, the point is where they change. Timings are printed as measured: on these tiny
models in onnxruntime on CPU, the sparse edit is usually *slower* than dense (per-op overhead of
the gather/scatter bodies dominates); ``engine.calibrate()`` measures that crossover and the runtime
then falls back to dense. Compiled artifacts (``--target host``/GPU) are where the speedups are.

    python -m sige_export.demo [--out out/demo] [--steps 4]
"""
from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .editing import EditResult, affected_region, label_edit, sdedit, spec_for
from .edits import apply_edit, psnr, synthetic_mask
from .runtime import Engine, load

MODELS = {"gaugan": "gaugan-cityscapes", "ddpm": "ddpm-church256"}


def export_tiny(name: str, out_dir: Path) -> Path:
    """The tiny zoo model ``name`` exported as a portable SIGE program (the CLI's export)."""
    from .cli import ExportOptions, export

    path = out_dir / f"{name}.tiny.sige.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export(name, "onnx", path, options=ExportOptions(size="tiny"))


def synthetic_image(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth RGB test image in [-1, 1], NCHW: gradients, a few discs and a horizon."""
    h, w = hw
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.stack([0.6 - yy, 0.2 + 0.4 * xx - 0.3 * yy, 0.8 - 0.6 * yy], 0)
    img[:, yy > 0.65] = np.array([0.25, 0.45, 0.15])[:, None]
    for _ in range(3):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.18)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[:, disc] = rng.uniform(0, 1, 3)[:, None]
    return (img[None] * 2 - 1).clip(-1, 1).astype(np.float32)


# --------------------------------------------------------------------------------------- drawing


def _rgb(x: np.ndarray) -> np.ndarray:
    """NCHW image in about [-1, 1] -> HxWx3 in [0, 1]."""
    a = x[0, :3].transpose(1, 2, 0).astype(np.float64)
    return np.clip((a + 1) / 2, 0, 1)


def _labels(seg: np.ndarray) -> np.ndarray:
    import matplotlib

    n = seg.shape[1] - 1
    lab = seg[0, :n].argmax(0)
    colors = matplotlib.colormaps["tab10"](np.arange(10))[:, :3]
    img = colors[lab % 10]
    img[seg[0, n] > 0.5] *= 0.4  # instance edges
    return img


def panel(path: Path, title: str, original_in: np.ndarray, edited_in: np.ndarray, r: EditResult,
          region: np.ndarray, label_map: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    to_in = _labels if label_map else _rgb
    diff = np.abs(r.dense.astype(np.float64) - r.incremental.astype(np.float64)).max(1)[0]
    change = np.abs(r.dense.astype(np.float64) - r.original.astype(np.float64)).max(1)[0]
    vmax = max(float(change.max()), 1e-6)
    items = [
        ("original input", to_in(original_in), {}),
        ("edited input", to_in(edited_in), {}),
        ("original output", _rgb(r.original), {}),
        ("dense (full model)", _rgb(r.dense), {}),
        ("edit effect\n|dense - original|", change, {"cmap": "inferno", "vmin": 0, "vmax": vmax}),
        ("incremental (SIGE)", _rgb(r.incremental), {}),
        (f"|dense - incremental|\nmax {diff.max():.3g} (scale: edit effect)", diff, {"cmap": "inferno", "vmin": 0,
                                                                                   "vmax": vmax}),
        ("mask (white), recomputed\nregion (grey)", 0.5 * region + 0.5 * r.mask, {"cmap": "gray", "vmin": 0,
                                                                                  "vmax": 1}),
    ]
    h, w = r.mask.shape
    fig, axes = plt.subplots(1, len(items), figsize=(2.3 * len(items) * max(1.0, w / h) ** 0.5, 3.0))
    for ax, (name, img, kw) in zip(axes, items):
        ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- demo


def _report(name: str, r: EditResult, engine: Engine, extra: str = "") -> dict[str, Any]:
    t = r.timings
    out = {
        "model": name, "edit_ratio": float(r.mask.mean()), "dense_ms": t["dense_s"] * 1e3,
        "incremental_ms": t["incremental_s"] * 1e3, "prime_ms": t["prime_s"] * 1e3,
        "psnr_incremental_vs_dense": psnr(r.incremental, r.dense),
        "psnr_original_vs_dense": psnr(r.original, r.dense),
    }
    print(f"  {name}: edit ratio {out['edit_ratio']:.1%}{extra}")
    print(f"    prime {out['prime_ms']:.1f} ms | dense {out['dense_ms']:.1f} ms | incremental "
          f"{out['incremental_ms']:.1f} ms ({t['dense_s'] / max(t['incremental_s'], 1e-12):.2f}x)")
    print(f"    PSNR incremental vs dense {out['psnr_incremental_vs_dense']:.1f} dB "
          f"(original vs dense {out['psnr_original_vs_dense']:.1f} dB: how much the edit changes)")
    return out


def run_demo(out_dir: str | Path = "out/demo", *, steps: int = 4, programs: dict[str, Path] | None = None,
             calibrate: bool = True) -> dict[str, Any]:
    """Run both demos; write ``gaugan_label_edit.png`` and ``ddpm_sdedit.png`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    programs = dict(programs or {})
    summary: dict[str, Any] = {}
    for key, name in MODELS.items():
        if key not in programs:
            t = time.perf_counter()
            programs[key] = export_tiny(name, out_dir / "programs")
            print(f"exported {name} (tiny) -> {programs[key]} in {time.perf_counter() - t:.1f} s")

    from . import zoo

    # 1. GauGAN label-map edit. crossover 1.0: always sparse, to show the incremental result.
    print("GauGAN label-map edit (prime on the original map, edit a relabelled blob):")
    engine = load(programs["gaugan"], crossover_ratio=1.0)
    seg = zoo.example_inputs(MODELS["gaugan"], "tiny")["segmap"].numpy()
    hw = seg.shape[2:]
    m = synthetic_mask("blob", hw, 0.08, seed=3)
    seg2 = apply_edit(seg, m, seed=1, one_hot_channels=seg.shape[1] - 1)
    r = label_edit(engine, seg, seg2, repeats=5)
    crossover = ""
    if calibrate:
        cal = engine.calibrate("label", ratios=(0.02, 0.1, 0.3), repeats=3)
        crossover = f"; calibrated crossover ratio {cal['crossover_ratio']:.3f} (dense {cal['dense_s'] * 1e3:.1f} ms)"
    summary["gaugan"] = _report(MODELS["gaugan"], r, engine, crossover)
    region = affected_region(engine, r.mask, r.dense.shape[2:])
    summary["gaugan"]["png"] = str(panel(out_dir / "gaugan_label_edit.png",
                                         f"GauGAN tiny (random weights): label edit, {r.summary()}", seg, seg2, r,
                                         region, label_map=True))

    # 2. DDPM SDEdit: the original trajectory primed once per step, each step edited sparsely.
    print(f"DDPM SDEdit ({steps} DDIM steps from strength 0.3; one cache key per step):")
    engine = load(programs["ddpm"], crossover_ratio=1.0)
    x_spec = engine.manifest["inputs"][0]
    img = synthetic_image(tuple(x_spec["shape"][2:]), seed=0)
    m = synthetic_mask("blob", img.shape[2:], 0.08, seed=5)
    img2 = apply_edit(img, m, seed=2)
    # DDIM with x0 clipped to [-1, 1] (as DDPM's sampler): random tiny weights predict large eps.
    spec = replace(spec_for("ddpm"), clip_x=True)
    r = sdedit(engine, img, img2, model=spec, steps=steps, strength=0.3)
    summary["ddpm"] = _report(MODELS["ddpm"], r, engine, f"; {len(engine.keys())} primed keys, "
                              f"{engine.cache_bytes / 2**20:.1f} MiB of caches")
    region = affected_region(engine, r.mask, r.dense.shape[2:])
    summary["ddpm"]["png"] = str(panel(out_dir / "ddpm_sdedit.png",
                                       f"DDPM tiny (random weights): SDEdit, {steps} steps, {r.summary()}", img, img2,
                                       r, region, label_map=False))
    for k in MODELS:
        print(f"wrote {summary[k]['png']}")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sige_export.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--steps", type=int, default=4, help="DDIM steps of the SDEdit demo")
    args = p.parse_args(argv)
    t = time.perf_counter()
    run_demo(args.out, steps=args.steps)
    print(f"done in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
