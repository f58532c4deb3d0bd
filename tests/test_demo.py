"""`make demo` (python -m sige_export.demo): panels and a summary, on the session's exported programs."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from sige_export.demo import run_demo
from tests.test_runtime import exported


def test_demo_writes_panels(tmp_path: Path) -> None:
    programs = {"gaugan": exported("gaugan-cityscapes"), "ddpm": exported("ddpm-church256")}
    summary = run_demo(tmp_path, steps=2, programs=programs, calibrate=False)
    for key in ("gaugan", "ddpm"):
        s = summary[key]
        png = Path(s["png"])
        assert png.is_file() and png.parent == tmp_path
        w, h = Image.open(png).size
        assert w > 3 * h > 0
        assert s["dense_ms"] > 0 and s["incremental_ms"] > 0
        assert s["psnr_incremental_vs_dense"] > s["psnr_original_vs_dense"]
