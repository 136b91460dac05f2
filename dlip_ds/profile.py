"""`dlip-ds profile --model A [--vs B]`: parameters per module, FLOPs per task (counted by
`torch.utils.flop_counter.FlopCounterMode`) and latency (median of repeats, same machine, same run),
with the B/A ratios. Works for presets without weights.

Tasks, per image (batch 1 by default): `itc` = vision + unimodal text encoders (retrieval features);
`itm` = vision + multimodal fusion pass; `caption` = vision + one beam-search caption whose length is fixed
(`min_length = max_length`), so that models stopping at different tokens are compared on equal work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dlip_ds.config import ConfigError

TASKS = ("itc", "itm", "caption")


def param_counts(model) -> dict[str, int]:
    """Parameters per module; cross-attention inside text layers counts as fusion; momentum copies apart."""
    counts = dict.fromkeys(("vision", "text", "fusion", "decoder", "itc", "momentum"), 0)
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if top == "text":
            key = "fusion" if ".cross_attn." in name else "text"
        elif top in ("fusion", "itm_head"):
            key = "fusion"
        elif top in ("decoder", "lm_head"):
            key = "decoder"
        else:
            key = top
        counts[key] += p.numel()
    counts["total"] = sum(v for k, v in counts.items() if k != "momentum")
    return counts


def _inputs(model, batch_size: int, text_len: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v, t = model.cfg.vision, model.cfg.text
    pixels = torch.randn(batch_size, 3, v.image_size, v.image_size, generator=g).to(device)
    ids = torch.randint(3, t.vocab_size, (batch_size, text_len), generator=g).to(device)
    return pixels, ids, torch.ones_like(ids)


def _task_fns(model, pixels, ids, mask, caption_len: int, num_beams: int):
    def itc():
        return model.itc_features(pixels, ids, mask)

    def itm():
        return model.itm_logits(pixels, ids, mask)

    def caption():
        return model.generate(pixels, prompt=[], num_beams=num_beams, max_length=caption_len, min_length=caption_len)

    fns = {"itc": itc}
    if model.cfg.fusion.layers:
        fns["itm"] = itm
    if model.cfg.decoder.enabled:
        fns["caption"] = caption
    return fns


@torch.no_grad()
def profile_model(model, *, batch_size: int = 1, text_len: int = 35, caption_len: int = 20, num_beams: int = 3,
                  repeats: int = 3, warmup: int = 1, device: str | torch.device = "cpu") -> dict:
    """{"params": {module: n}, "flops": {task: n}, "latency_ms": {task: median}, "config": {...}} for one model."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    if caption_len > model.cfg.text.max_positions:
        raise ConfigError(f"caption_len={caption_len} exceeds text.max_positions={model.cfg.text.max_positions}")
    text_len = min(text_len, model.cfg.text.max_positions)
    model = model.to(device).eval()
    pixels, ids, mask = _inputs(model, batch_size, text_len, device)
    fns = _task_fns(model, pixels, ids, mask, caption_len, num_beams)
    flops, latency = {}, {}
    for task, fn in fns.items():
        counter = FlopCounterMode(display=False)
        # The math backend decomposes attention into counted matmuls; fused CPU kernels have no formula.
        with counter, sdpa_kernel(SDPBackend.MATH):
            fn()
        flops[task] = int(counter.get_total_flops())
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if torch.cuda.is_available() and str(device).startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available() and str(device).startswith("cuda"):
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        latency[task] = statistics.median(times)
    c = model.cfg
    return {
        "params": param_counts(model),
        "flops": flops,
        "latency_ms": latency,
        "config": {"image_size": c.vision.image_size, "vision": f"{c.vision.depth}x{c.vision.width}",
                   "text": f"{c.text.depth}x{c.text.width}", "fusion": f"{c.fusion.mode}:{c.fusion.layers}",
                   "batch_size": batch_size, "text_len": text_len, "caption_len": caption_len,
                   "num_beams": num_beams, "repeats": repeats, "device": str(device),
                   "threads": torch.get_num_threads()},
    }


def ratios(a: dict, b: dict) -> dict:
    """B/A for total parameters, FLOPs per task and latency per task (tasks both models have)."""
    out = {"params": b["params"]["total"] / a["params"]["total"]}
    for key in ("flops", "latency_ms"):
        out[key] = {t: b[key][t] / a[key][t] for t in TASKS if t in a[key] and t in b[key] and a[key][t]}
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model A: a preset, an exported directory, a BLIP checkpoint")
    p.add_argument("--vs", default="", help="model B, compared with A (ratios are B/A)")
    p.add_argument("--image-size", type=int, default=0, help="override both models' image size (default: theirs)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--text-len", type=int, default=35, help="tokens of the ITC/ITM text (BLIP: 35)")
    p.add_argument("--caption-len", type=int, default=20, help="tokens of the generated caption ([DEC] included)")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per task (the median is reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _table(name: str, r: dict) -> str:
    p, f, lat = r["params"], r["flops"], r["latency_ms"]
    lines = [(f"{name}  ({r['config']['vision']} vision, {r['config']['text']} text, "
             f"fusion {r['config']['fusion']}, {r['config']['image_size']} px)")]
    lines.append("  params   " + "  ".join(f"{k}={_fmt(v)}" for k, v in p.items() if v or k == "total"))
    lines.append("  FLOPs    " + "  ".join(f"{k}={_fmt(v)}" for k, v in f.items()))
    lines.append("  latency  " + "  ".join(f"{k}={v:.1f}ms" for k, v in lat.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dlip_ds.models.checkpoints import load_model

    over = {"vision": {"image_size": args.image_size}} if args.image_size else {}
    kw = {"batch_size": args.batch_size, "text_len": args.text_len, "caption_len": args.caption_len,
              "num_beams": args.num_beams, "repeats": args.repeats, "device": args.device}
    torch.manual_seed(0)
    result = {"a": {"source": args.model, **profile_model(load_model(args.model, **over), **kw)}}
    if args.vs:
        result["b"] = {"source": args.vs, **profile_model(load_model(args.vs, **over), **kw)}
        result["ratios_b_over_a"] = ratios(result["a"], result["b"])
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(_table(f"A: {args.model}", result["a"]))
    if args.vs:
        print(_table(f"B: {args.vs}", result["b"]))
        r = result["ratios_b_over_a"]
        print(f"B/A  params={r['params']:.3f}  "
              + "  ".join(f"FLOPs[{t}]={v:.3f}" for t, v in r["flops"].items()) + "  "
              + "  ".join(f"latency[{t}]={v:.3f}" for t, v in r["latency_ms"].items()))
    return 0
