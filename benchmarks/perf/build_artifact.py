"""Dev helper: build a host artifact from a saved SIGE program (``sige-export NAME --target onnx``).

    .venv/bin/python benchmarks/perf/build_artifact.py PROGRAM.sige.onnx OUT.host.sige [--target host]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("program")
    ap.add_argument("output")
    ap.add_argument("--target", default="host")
    a = ap.parse_args()
    from sige_export.artifact import build_artifact
    from sige_export.program import SigeProgram

    t = time.time()
    build_artifact(SigeProgram.load(a.program), a.target, a.output, log=print)
    print(f"built in {time.time() - t:.1f}s")


if __name__ == "__main__":
    main()
