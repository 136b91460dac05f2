"""Where one loader worker's time goes: cProfile of `make_train_loader` in the main process
(workers=0), 224-px crops, RandAugment off and on, on the JPEGs of `loader.py` (384 and 512 px).

    python benchmarks/loader_profile.py                        # this tree
    PYTHONPATH=/path/to/older/tree python benchmarks/loader_profile.py --out before.json

The split (seconds per pair, from cProfile's cumulative times of the functions that do each part):
decode (header + JPEG decode + EXIF/mode handling), crop+resize (PIL crop and resize), flip (PIL
transpose), RandAugment, to-tensor+normalise (ToTensor/Normalize and the batch stack before issue 10;
uint8 array, then one normalisation per batch after), tokenise (`encode_captions`), other (tar
reading, shuffle, json, captions, RNG, batching: the rest of the wall time). cProfile slows Python
code more than C code, so "other" is inflated; the unprofiled pairs/s is given beside it.
Writes benchmarks/results/loader_profile.json and .md.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import BATCH, ROOT, machine, make_data, make_vocab, ours

PARTS = {  # part -> (file name, function name) whose cumulative times add up to it, before and after issue 10
    "decode": [("sample.py", "decode_image"), ("sample.py", "open_image"), ("sample.py", "load_image")],
    "crop+resize": [("Image.py", "crop"), ("Image.py", "resize")],
    "flip": [("Image.py", "transpose")],
    "RandAugment": [("transforms.py", "apply_randaugment")],  # the timm class's __call__ is added in `split`
    "to-tensor+normalise": [("functional.py", "to_tensor"), ("functional.py", "normalize"),
                            ("~", "<built-in method torch.stack>"), ("transforms.py", "to_pixels"),
                            ("transforms.py", "normalize_batch")],
    "tokenise": [("text.py", "encode_captions")],
}


def split(stats: pstats.Stats, wall: float, pairs: int) -> dict[str, float]:
    """Milliseconds per pair of each part (and "other", "total")."""
    from timm.data.auto_augment import RandAugment

    ra_line = inspect.getsourcelines(RandAugment.__call__)[1]
    cum: dict[tuple[str, str], float] = {}
    for (path, line, name), (_, _, _, ct, _) in stats.stats.items():
        key = (Path(path).name, name)
        if key == ("auto_augment.py", "__call__") and line == ra_line:
            key = ("transforms.py", "apply_randaugment")
        if key[0] == "~" or key[1] in {n for parts in PARTS.values() for _, n in parts}:
            cum[key] = cum.get(key, 0.0) + ct
    out = {part: sum(cum.get(k, 0.0) for k in keys) for part, keys in PARTS.items()}
    out["other"] = max(0.0, wall - sum(out.values()))
    out["total"] = wall
    return {k: round(v / pairs * 1e3, 3) for k, v in out.items()}


def profile(urls, tok, randaugment: bool, batches: int) -> dict:
    it = iter(ours(urls, tok, 0, randaugment=randaugment))
    for _ in range(2):  # shuffle buffer fill
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    plain = batches * BATCH / (time.perf_counter() - start)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(batches):
        next(it)
    prof.disable()
    wall = time.perf_counter() - start
    return {"pairs_per_s": round(plain, 1), "ms_per_pair": split(pstats.Stats(prof), wall, batches * BATCH)}


def markdown(rows: list[dict], info: dict) -> str:
    parts = [*PARTS, "other", "total"]
    lines = [(f"{info['cpu']}, {info['cores']} cores, {info['date']}, load average {info['load_average']}; "
             f"tree {info['dlip_ds_tree']}. ms per pair under cProfile (one process, workers=0)."), "",
             "| JPEG side | RandAugment | pairs/s unprofiled | " + " | ".join(parts) + " |",
             "|---:|---|---:|" + "---:|" * len(parts)]
    for r in rows:
        ms = r["ms_per_pair"]
        lines.append(f"| {r['side']} | {'on' if r['randaugment'] else 'off'} | {r['pairs_per_s']:.0f} | "
                     + " | ".join(f"{ms[p]:.2f} ({100 * ms[p] / ms['total']:.0f}%)" for p in parts[:-1])
                     + f" | {ms['total']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", type=int, nargs="+", default=[384, 512])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "loader_profile.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from dlip_ds.data.text import load_tokenizer

    rows = []
    load = [round(os.getloadavg()[0], 1)]
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(make_vocab(Path(tmp)))
        for side in args.sides:
            urls = make_data(Path(tmp), args.images, side)
            for ra in (False, True):
                rows.append({"side": side, "randaugment": ra, **profile(urls, tok, ra, args.batches)})
                print(rows[-1], flush=True)
    info = {**machine(), "load_average": [*load, round(os.getloadavg()[0], 1)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, info))
    print(markdown(rows, info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
