"""`dlip-ds profile --model A [--vs B]`: parameters per module, FLOPs per task (counted by
`torch.utils.flop_counter.FlopCounterMode`) and latency, with the B/A ratios. Works for presets without weights.

Latency method (`profile_models`): per task, every model is warmed up, then timed once per round over
`repeats` rounds, the models interleaved within each round and their order rotated from round to round,
each timed call right after an untimed one of the same model, with the garbage collector paused; each
model's median over rounds is its latency, and the quartiles and min/max over rounds its spread
(`latency_stats_ms`). Interleaving puts load from elsewhere on the machine on every model alike, so that
two models of one architecture measure alike and ratios hold. Each call's
CPU time on the calling thread is taken too (`cpu_ms`, `cpu_stats_ms`): at one torch thread on a CPU it
is what the call costs an idle core, which holds where other jobs preempt the run and wall times do not
(measured in benchmarks/demo_latency.py).

Tasks, per image (batch 1 by default): `itc` = vision + unimodal text encoders (retrieval features);
`itm` = vision + multimodal fusion pass; `caption` = vision + one beam-search caption whose length is fixed
(`min_length = max_length`), so that models stopping at different tokens are compared on equal work;
`vqa` (VQA models, in place of `caption`) = vision + question fusion + one answer of 10 tokens, beams alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from dlip_ds.config import ConfigError

TASKS = ("itc", "itm", "caption", "vqa")
VQA_ANSWER_LEN = 10  # BLIP's answer max_length


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

    def vqa():  # a whole answer generated for the question (`ids`), with the same beams as a caption
        return model.vqa_answer(pixels, ids, mask, num_beams=num_beams, max_length=VQA_ANSWER_LEN,
                                min_length=VQA_ANSWER_LEN)

    fns = {"itc": itc}
    if model.cfg.fusion.layers:
        fns["itm"] = itm
    if model.cfg.decoder.enabled and model.cfg.decoder.context == "question":
        fns["vqa"] = vqa
    elif model.cfg.decoder.enabled:
        fns["caption"] = caption
    return fns


def _timed(fn, device) -> tuple[float, float]:
    """(wall ms, CPU ms of the calling thread) of one call."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    sync()
    c1, t1 = time.thread_time(), time.perf_counter()
    return (t1 - t0) * 1000, (c1 - c0) * 1000


@torch.no_grad()
def profile_models(models: list, *, batch_size: int = 1, text_len: int = 35, caption_len: int = 20,
                   num_beams: int = 3, repeats: int = 3, warmup: int = 1, device: str | torch.device = "cpu") -> list:
    """`profile_model` for several models; their timed runs alternate (A, B, A, B, ...) so that load
    from elsewhere on the machine falls on all of them alike and the ratios stay meaningful."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    results, all_fns = [], []
    for model in models:
        if caption_len > model.cfg.text.max_positions:
            raise ConfigError(f"caption_len={caption_len} exceeds text.max_positions={model.cfg.text.max_positions}")
        length = min(text_len, model.cfg.text.max_positions)
        model = model.to(device).eval()
        fns = _task_fns(model, *_inputs(model, batch_size, length, device), caption_len, num_beams)
        flops = {}
        for task, fn in fns.items():
            counter = FlopCounterMode(display=False)
            # The math backend decomposes attention into counted matmuls; fused CPU kernels have no formula.
            with counter, sdpa_kernel(SDPBackend.MATH):
                fn()
            flops[task] = int(counter.get_total_flops())
        c = model.cfg
        results.append({
            "params": param_counts(model),
            "flops": flops,
            "latency_ms": {},
            "config": {"image_size": c.vision.image_size, "vision": f"{c.vision.depth}x{c.vision.width}",
                       "text": f"{c.text.depth}x{c.text.width}", "fusion": f"{c.fusion.mode}:{c.fusion.layers}",
                       "batch_size": batch_size, "text_len": length, "caption_len": caption_len,
                       "num_beams": num_beams, "repeats": repeats, "device": str(device),
                       "threads": torch.get_num_threads()},
        })
        all_fns.append(fns)
    for task in TASKS:
        runs = [(fns[task], r) for fns, r in zip(all_fns, results) if task in fns]
        for fn, _ in runs:
            for _ in range(warmup):
                fn()
        for (_, r), (wall, cpu) in zip(runs, _interleaved([fn for fn, _ in runs], repeats, device)):
            r["latency_ms"][task] = statistics.median(wall)
            r.setdefault("latency_stats_ms", {})[task] = latency_stats(wall)
            r.setdefault("cpu_ms", {})[task] = statistics.median(cpu)
            r.setdefault("cpu_stats_ms", {})[task] = latency_stats(cpu)
    return results


def _interleaved(fns: list, rounds: int, device) -> list[tuple[list[float], list[float]]]:
    """(wall ms, CPU ms) per call of each fn, one timed call each per round; round r starts at fn r (mod
    n). Each timed call follows an untimed call of the same fn: it finds its own weights in the caches, as
    back-to-back requests would, so that a model's time does not depend on which model ran before it
    (measured on the demo's baseline, means of 6 runs: ITM 1.69 ms after another model, 1.60 ms after
    itself). GC paused: a collection would land on whichever call triggered it."""
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in fns]
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for k in range(len(fns)):
                i = (r + k) % len(fns)
                fns[i]()
                wall, cpu = _timed(fns[i], device)
                times[i][0].append(wall)
                times[i][1].append(cpu)
    finally:
        if enabled:
            gc.enable()
    return times


def latency_stats(times: list[float]) -> dict:
    """Median, quartiles and range of one model's per-round times (ms), and how many rounds."""
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {"median": statistics.median(times), "q1": q1, "q3": q3, "min": min(times), "max": max(times),
            "rounds": len(times)}


def profile_model(model, **kwargs) -> dict:
    """{"params": {module: n}, "flops": {task: n}, "latency_ms": {task: median ms},
    "latency_stats_ms": {task: {median, q1, q3, min, max, rounds}}, "cpu_ms" and "cpu_stats_ms" alike (CPU
    time of the calling thread: all of a call's at one torch thread), "config": {...}}.
    Keywords: batch_size=1, text_len=35, caption_len=20, num_beams=3, repeats=3, warmup=1, device="cpu"."""
    return profile_models([model], **kwargs)[0]


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
    from dlip_ds.models.load import load_model

    over = {"vision": {"image_size": args.image_size}} if args.image_size else {}
    kw = {"batch_size": args.batch_size, "text_len": args.text_len, "caption_len": args.caption_len,
              "num_beams": args.num_beams, "repeats": args.repeats, "device": args.device}
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    torch.manual_seed(0)
    sources = [args.model] + ([args.vs] if args.vs else [])
    profiles = profile_models([load_model(src, **over) for src in sources], **kw)
    result = {key: {"source": src, **prof} for key, src, prof in zip("ab", sources, profiles)}
    if args.vs:
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
