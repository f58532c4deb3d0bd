"""Prepare a run of the C++ example: unpack a host artifact and write plan.txt + raw feeds.

    python examples/cpp/prepare.py m.host.sige work/ [--edit-rect y0 y1 x0 x1]

Writes to ``work/``: the artifact's members (prime.so, edit.so, weights.bin, manifest.json),
``plan.txt`` (the argument list of each pass, see sige_run.cc), the inputs as raw little-endian
``.bin`` files, the edit's index arrays for a rectangle edit, and the Python runtime's outputs
(``expected_prime.bin``, ``expected_edit.bin``) for the C++ program to compare against.
Needs numpy and sige_export (the C++ run itself needs neither Python nor torch).
"""
from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("work")
    p.add_argument("--edit-rect", type=int, nargs=4, default=None, metavar=("Y0", "Y1", "X0", "X1"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(a.artifact, "r:") as tf:
        tf.extractall(work, filter="data")
    manifest = json.loads((work / "manifest.json").read_text())
    art = manifest["artifact"]
    if art["target"]["family"] not in ("x86", "host", "cpu") and not (work / art["passes"]["prime"]["library"]).is_file():
        raise SystemExit("this example runs x86 host artifacts (prime.so / edit.so)")

    import sige_export

    engine = sige_export.load(a.artifact, crossover_ratio=1.0)
    rng = np.random.default_rng(a.seed)
    feeds = {}
    for spec in manifest["inputs"]:
        feeds[spec["name"]] = rng.standard_normal(spec["shape"]).astype(spec["dtype"])
        if not spec.get("editable"):
            feeds[spec["name"]] = np.full(spec["shape"], 500.0, spec["dtype"])  # e.g. a diffusion time step
    src = manifest["mask"]["source"]
    h, w = manifest["mask"]["resolution"]
    y0, y1, x0, x1 = a.edit_rect or (h // 4, h // 4 + max(1, h // 8), w // 4, w // 4 + max(1, w // 8))
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    edited = dict(feeds)
    edited[src] = np.where(mask, feeds[src] + 1.0, feeds[src]).astype(feeds[src].dtype)
    primed = engine.prime(**feeds)
    out = engine.edit(**edited, mask=mask)
    index = engine.edit_feeds(mask)
    named = {**feeds, **index}
    for name, e in manifest["edit"]["edited"].items():
        named[e] = edited[name]

    weights = {t["name"]: t for t in art["weights"]["tensors"]}
    prime_outputs = art["passes"]["prime"]["outputs"]
    lines = [f"weights {art['weights']['member']}"]

    def tensor_line(kind: str, spec: dict, extra: str) -> str:
        dims = " ".join(str(int(d)) for d in spec["shape"])
        return f"{kind} {spec['dtype']} {len(spec['shape'])} {dims} {extra}".replace("  ", " ")

    for pname in ("prime", "edit"):
        entry = art["passes"][pname]
        lines.append(f"pass {pname} {entry['library']} {len(entry['inputs']) + len(entry['params'])} "
                     f"{len(entry['outputs'])}")
        for spec in entry["inputs"]:
            name = spec["name"]
            if name in prime_outputs and pname == "edit" and name not in named:
                lines.append(f"from_prime {prime_outputs.index(name)} {name}")
                continue
            if spec.get("kind") == "working_copy":  # the edit writes into it: a copy of the cached map
                lines.append(f"copy_of_prime {prime_outputs.index(spec['cache'])} {name}")
                continue
            arr = np.ascontiguousarray(named[name], dtype=spec["dtype"])
            fname = f"{pname}.{len(lines)}.bin"
            arr.tofile(work / fname)
            lines.append(tensor_line("file", {"shape": list(arr.shape), "dtype": spec["dtype"]}, f"{fname} {name}"))
        for pn in entry["params"]:
            t = weights[pn]
            lines.append(tensor_line("weight", t, f"{t['offset']} {pn}"))
    lines.append(f"output edit {art['passes']['edit']['outputs'].index(manifest['edit']['outputs'][0])} expected_edit.bin")
    lines.append(f"output prime {prime_outputs.index(manifest['outputs'][0])} expected_prime.bin")
    (work / "plan.txt").write_text("\n".join(lines) + "\n")
    primed.astype(np.float32).tofile(work / "expected_prime.bin")
    out.astype(np.float32).tofile(work / "expected_edit.bin")
    print(f"wrote {work}/plan.txt: edit of {mask.mean():.1%} of {src!r}, "
          f"{sum(v.shape[0] for k, v in index.items() if v.ndim == 2 and v.shape[-1] == 2)} active blocks")


if __name__ == "__main__":
    main()
