"""Time and peak memory of the fused distillation kernels against their references, forward+backward.

    python benchmarks/kernels.py --device cuda          # real sizes (ViT-B attention, LM at vocab 30524)
    python benchmarks/kernels.py --device cpu           # small sizes; the Triton path is CUDA-only here

- attention KD: `attention_kd_loss` backend "triton" vs "torch" (materialised maps), B x 12 heads x d 64,
  N in {64, 197, 577, 1024}, fp16 / bf16 on CUDA (fp32 on CPU);
- LM logit KD: `linear_kd_loss` "chunked" vs "torch" (whole [tokens, 30524] logits);
- representation KD: `repr_kd_loss` "fused" (one baddbmm over stacked pairs) vs "torch" (per pair);
- the student's LM loss + LM KD (`--only lm_loss`, BLIP sizes on every device: width 768, vocabulary
  30524, 24 x 35 and 1536 tokens): "torch" = the old path (whole [tokens, V] logits for the
  label-smoothed cross-entropy, then the chunked `linear_kd_loss`), "chunked" = `linear_cross_entropy`
  + `linear_kd_loss` (two chunked passes), "fused" = `linear_ce_kd_loss` (one pass; "fused-256" with
  chunks of 256 tokens instead of 1024).

Time: fused and reference of one shape run in turn, round after round (CUDA synchronised around each
run), median and min over the rounds. Peak memory: the extra bytes over the inputs during one
forward+backward: torch.cuda.max_memory_allocated on CUDA; on CPU the growth of the process's peak RSS
(resource.ru_maxrss) in a fresh subprocess per measurement.
Writes JSON to benchmarks/results/kernels_<device>.json and a Markdown table to benchmarks/results/kernels_<device>.md (copy it into benchmarks/README.md)
(or --md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VOCAB = 30524

# (batch, heads, head dim) and lengths; CPU sizes keep the whole run to a few minutes on 2 cores
ATTN = {"cuda": {"batch": 32, "heads": 12, "dim": 64, "lengths": [64, 197, 577, 1024]},
        "cpu": {"batch": 2, "heads": 12, "dim": 64, "lengths": [64, 197, 577, 1024]}}
# (tokens, width); vocab 30524 everywhere
LM = {"cuda": {"tokens": [2048, 16384], "width": 768}, "cpu": {"tokens": [256, 2048], "width": 256}}
# student LM loss + LM KD: tokens (24 captions x 35, and 1536), width 768, vocab 30524 on every device
LM_LOSS = {"cuda": {"tokens": [840, 1536, 8192], "width": 768}, "cpu": {"tokens": [840, 1536], "width": 768}}
# (layer pairs, batch, tokens, student width, teacher width)
REPR = {"cuda": [(4, 32, 197, 384, 768), (4, 32, 577, 384, 768)], "cpu": [(4, 4, 197, 384, 768), (2, 4, 577, 384, 768)]}


def make_case(spec: dict, device: str, seed: int = 0):
    """Inputs and a forward+backward closure for one measurement."""
    from dlip_ds.kernels import (
        attention_kd_loss,
        linear_ce_kd_loss,
        linear_cross_entropy,
        linear_kd_loss,
        repr_kd_loss,
    )

    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[spec["dtype"]]

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(grad)

    if spec["op"] == "attention":
        b, h, n, d = spec["batch"], spec["heads"], spec["n"], spec["dim"]
        q_s, k_s = randn(b, h, n, d, grad=True), randn(b, h, n, d, grad=True)
        q_t, k_t = randn(b, h, n, d), randn(b, h, n, d)
        mask = torch.zeros(b, n, dtype=torch.bool, device=device)
        mask[: b // 2, -n // 8 :] = True  # some padding, as text batches have
        inputs = (q_s, k_s)

        def run():
            loss = attention_kd_loss(q_s, k_s, q_t, k_t, key_padding_mask=mask, backend=spec["backend"])
            return (loss, *torch.autograd.grad(loss, inputs))

    elif spec["op"] == "lm":
        t, w = spec["tokens"], spec["width"]
        h_s, w_s, b_s = randn(t, w, grad=True), randn(VOCAB, w, grad=True), randn(VOCAB, grad=True)
        h_t, w_t, b_t = randn(t, w), randn(VOCAB, w), randn(VOCAB)
        inputs = (h_s, w_s, b_s)

        def run():
            loss = linear_kd_loss(h_s, w_s, h_t, w_t, b_s=b_s, b_t=b_t, temperature=2.0, backend=spec["backend"])
            return (loss, *torch.autograd.grad(loss, inputs))

    elif spec["op"] == "lm_loss":
        t, w = spec["tokens"], spec["width"]
        h_s, w_s, b_s = randn(t, w, grad=True), (0.05 * randn(VOCAB, w)).requires_grad_(), randn(VOCAB, grad=True)
        h_t, w_t, b_t = randn(t, w), 0.05 * randn(VOCAB, w), randn(VOCAB)
        labels = torch.randint(0, VOCAB, (t,), generator=g, device=device)
        labels[::8] = -100  # padding / prompt positions predict nothing
        inputs = (h_s, w_s, b_s)

        def run():
            kw = {"b_s": b_s, "b_t": b_t, "temperature": 2.0}
            if spec["backend"].startswith("fused"):  # "fused": chunks of 1024 tokens, "fused-256": of 256
                chunk = int(spec["backend"].partition("-")[2] or 1024)
                ce, kd = linear_ce_kd_loss(h_s, w_s, labels, h_t, w_t, label_smoothing=0.1, chunk_size=chunk, **kw)
            else:
                if spec["backend"] == "chunked":
                    ce = linear_cross_entropy(h_s, w_s, labels, b=b_s, label_smoothing=0.1)
                else:  # the old task: whole logits (lm_loss), fp32 cross-entropy
                    z = torch.nn.functional.linear(h_s, w_s, b_s).float()
                    ce = torch.nn.functional.cross_entropy(z, labels, ignore_index=-100, label_smoothing=0.1)
                kd = linear_kd_loss(h_s, w_s, h_t, w_t, mask=labels == -100, **kw)
            loss = ce + kd
            return (loss, *torch.autograd.grad(loss, inputs))

    else:
        pairs, b, n, ds, dt = spec["pairs"], spec["batch"], spec["n"], spec["ds"], spec["dt"]
        h_s = [randn(b, n, ds, grad=True) for _ in range(pairs)]
        h_t = [randn(b, n, dt) for _ in range(pairs)]
        ws = [randn(dt, ds, grad=True) for _ in range(pairs)]
        bs = [randn(dt, grad=True) for _ in range(pairs)]
        mask = torch.zeros(b, n, dtype=torch.bool, device=device)
        inputs = (*h_s, *ws, *bs)

        def run():
            loss = repr_kd_loss(h_s, h_t, ws, bs, mask=mask, backend=spec["backend"])
            return (loss, *torch.autograd.grad(loss, inputs))

    return run


def peak_memory(spec: dict, device: str) -> float:
    """Extra MiB over the inputs during one forward+backward (after a warm-up run on CUDA)."""
    run = make_case(spec, device)
    if device == "cuda":
        run()  # compile / warm up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # ru_maxrss is a high-water mark (KiB on Linux): read before the first run, in a fresh process
    # (see peak_memory_isolated) that has held nothing bigger than the inputs yet
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def peak_memory_isolated(spec: dict, device: str) -> float:
    """CPU: in a fresh process. Its ru_maxrss starts at the parent's RSS (kept across fork and exec)."""
    if device == "cuda":
        return peak_memory(spec, device)
    cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def time_group(specs: list[dict], device: str, min_run_time: float) -> list[dict]:
    """Milliseconds per forward+backward of each spec, the specs run in turn (interleaved), so that
    load from other processes hits fused and reference alike; median and min over the rounds.
    The reference comes last in `specs`; rel_diff compares each spec's outputs with it."""
    runs = [make_case(spec, device) for spec in specs]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    outputs = [run() for run in runs]  # warm-up (Triton compilation, allocator); same inputs (seed) in each
    # fused vs reference on the same inputs: loss and every gradient, relative to the reference's largest value
    diffs = [max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))
                 for a, b in zip(out, outputs[-1])) for out in outputs]
    del outputs
    times: list[list[float]] = [[] for _ in runs]
    start = time.perf_counter()
    while len(times[0]) < 3 or (time.perf_counter() - start < min_run_time * len(runs) and len(times[0]) < 200):
        for run, ts in zip(runs, times):
            sync()
            t = time.perf_counter()
            run()
            sync()
            ts.append((time.perf_counter() - t) * 1e3)
    return [{"ms": round(statistics.median(ts), 3), "ms_min": round(min(ts), 3), "rounds": len(ts), "rel_diff": d}
            for ts, d in zip(times, diffs)]


def plan(device: str, dtypes: list[str]) -> list[dict]:
    specs = []
    a = ATTN[device]
    for dtype in dtypes:
        for n in a["lengths"]:
            for backend in ("triton", "torch") if device == "cuda" else ("torch",):
                specs.append({"op": "attention", "backend": backend, "dtype": dtype, "batch": a["batch"],
                              "heads": a["heads"], "dim": a["dim"], "n": n})
    for dtype in dtypes:
        for t in LM[device]["tokens"]:
            for backend in ("chunked", "torch"):
                specs.append({"op": "lm", "backend": backend, "dtype": dtype, "tokens": t, "width": LM[device]["width"]})
    for dtype in dtypes:
        for t in LM_LOSS[device]["tokens"]:
            for backend in ("fused", "fused-256", "chunked", "torch"):
                specs.append({"op": "lm_loss", "backend": backend, "dtype": dtype, "tokens": t,
                              "width": LM_LOSS[device]["width"]})
    for dtype in dtypes:
        for pairs, b, n, ds, dt in REPR[device]:
            for backend in ("fused", "torch"):
                specs.append({"op": "repr", "backend": backend, "dtype": dtype, "pairs": pairs, "batch": b, "n": n,
                              "ds": ds, "dt": dt})
    return specs


def machine(device: str) -> dict:
    info = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        import triton

        info["triton"] = triton.__version__
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["cpu"] = cpu
    info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other processes sharing the machine
    return info


def shape_of(r: dict) -> str:
    if r["op"] == "attention":
        return f"B{r['batch']} H{r['heads']} N{r['n']} d{r['dim']}"
    if r["op"] in ("lm", "lm_loss"):
        return f"{r['tokens']} tok x D{r['width']} x V{VOCAB}"
    return f"{r['pairs']} pairs, B{r['batch']} N{r['n']} {r['ds']}->{r['dt']}"


FUSED = {"attention": "triton", "lm": "chunked", "lm_loss": "fused", "repr": "fused"}


def markdown(results: list[dict], info: dict) -> str:
    where = info.get("gpu") or info["cpu"]
    lines = [
        f"### Kernel benchmarks ({info['device']}: {where}, {info['date']})",
        "",
        f"torch {info['torch']}" + (f", triton {info['triton']}" if "triton" in info else "")
        + f", threads: {info['threads']}, load average {info['load_avg_1m']} at the end. Forward+backward; time is the median over interleaved rounds "
        "(min in the JSON); memory is the peak extra over the inputs "
        + ("(torch.cuda.max_memory_allocated)." if info["device"] == "cuda" else "(peak RSS growth, fresh process)."),
        "",
        ("| op | shape | dtype | fused ms (median / min) | reference ms (median / min) | speed-up (medians) "
        "| fused MiB | reference MiB | memory ratio | max rel. diff |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows: dict = {}
    for r in results:
        rows.setdefault((r["op"], shape_of(r), r["dtype"]), {})[r["backend"]] = r

    def cell(r, k):
        return f"{r[k]:.1f}" if r else "n/a"

    def ms(r):
        return f"{r['ms']:.1f} / {r['ms_min']:.1f}" if r else "n/a"

    lm_loss = {k: v for k, v in rows.items() if k[0] == "lm_loss"}
    if len(lm_loss) == len(rows):  # a run of --only lm_loss: its own table below
        lines = lines[:-3]
    for (op, shape, dtype), by in rows.items():
        if op == "lm_loss":
            continue
        f, ref = by.get(FUSED[op]), by.get("torch")
        speed = f"{ref['ms'] / f['ms']:.2f}x" if f and ref else "n/a"
        mem = f"{f['peak_extra_mib'] / ref['peak_extra_mib']:.1%}" if f and ref and ref["peak_extra_mib"] > 0 else "n/a"
        name = f"{op} ({FUSED[op]} vs torch)"
        diff = f"{f['rel_diff']:.1e}" if f else "n/a"
        lines.append(f"| {name} | {shape} | {dtype} | {ms(f)} | {ms(ref)} | {speed} | "
                     f"{cell(f, 'peak_extra_mib')} | {cell(ref, 'peak_extra_mib')} | {mem} | {diff} |")
    if len(lm_loss) < len(rows):
        lines += ["", ("Fused = Triton for attention (extra memory O(B x heads x N)), chunks of 1024 tokens for LM KD, "
              "one baddbmm over stacked layer pairs for representation KD. Reference = `backend=\"torch\"` "
              "(materialised attention maps / whole logits / one linear per pair).")]
    if lm_loss:
        lines += ["", "Student LM loss (label smoothing 0.1) + LM KD (T = 2), forward+backward to h, W, b:", "",
                  "| shape | dtype | path | ms (median / min) | time vs old | peak extra MiB | memory vs old | max rel. diff |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        names = {"torch": "old: whole logits + chunked KD", "chunked": "chunked CE + chunked KD",
                 "fused": "fused CE + KD", "fused-256": "fused CE + KD, chunks of 256"}
        for (_, shape, dtype), by in lm_loss.items():
            old = by.get("torch")
            for backend in ("torch", "chunked", "fused", "fused-256"):
                r = by.get(backend)
                if not r:
                    continue
                speed = f"{r['ms'] / old['ms']:.2f}x" if old else "n/a"
                mem = f"{r['peak_extra_mib'] / old['peak_extra_mib']:.1%}" if old and old["peak_extra_mib"] > 0 else "n/a"
                lines.append(f"| {shape} | {dtype} | {names[backend]} | {ms(r)} | {speed} | {r['peak_extra_mib']:.1f} | "
                             f"{mem} | {r['rel_diff']:.1e} |")
    if info["device"] != "cuda" and any(k[0] == "attention" for k in rows):
        lines += ["", ("On CPU the attention kernels run only as the PyTorch reference (the Triton path needs CUDA; "
                  "the interpreter is a correctness tool, not a timing one), so attention rows show the reference "
                  "alone. Real sizes on a GPU: `python benchmarks/kernels.py --device cuda` "
                  "(writes benchmarks/results/kernels_cuda.json and .md).")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="default: bf16 fp16 on CUDA, fp32 on CPU")
    p.add_argument("--only", nargs="+", choices=["attention", "lm", "lm_loss", "repr"], help="run only these ops")
    p.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing per measurement")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    p.add_argument("--md", type=Path, help="Markdown table path (default benchmarks/results/kernels_<device>.md)")
    p.add_argument("--table-only", action="store_true", help="rewrite --md from the JSON of --out, measuring nothing")
    p.add_argument("--threads", type=int, help="CPU threads (default 1 on --device cpu: on a shared machine "
                   "OpenMP threads spin-wait on busy cores and small ops slow down by 100x)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    sys.path.insert(0, str(ROOT.parent))
    if args.child:
        print(peak_memory(json.loads(args.child), "cpu"))
        return 0
    suffix = "".join(f"_{op}" for op in args.only or [])  # a partial run does not overwrite the full table
    out = args.out or ROOT / "results" / f"kernels_{args.device}{suffix}.json"
    args.md = args.md or out.with_suffix(".md")
    if args.table_only:
        saved = json.loads(out.read_text())
        args.md.write_text(markdown(saved["results"], saved["machine"]))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    dtypes = args.dtype or (["bf16", "fp16"] if args.device == "cuda" else ["fp32"])
    specs = [s for s in plan(args.device, dtypes) if not args.only or s["op"] in args.only]
    # memory first: a child process inherits the parent's peak RSS, so the parent must still be small
    memory = [round(peak_memory_isolated(spec, args.device), 1) for spec in tqdm(specs, desc="peak memory")]
    groups: dict = {}
    for spec, mib in zip(specs, memory):  # fused and reference of one shape are timed together
        groups.setdefault((spec["op"], shape_of(spec), spec["dtype"]), []).append({**spec, "peak_extra_mib": mib})
    results = []
    for i, group in enumerate(groups.values(), 1):
        for spec, timing in zip(group, time_group(group, args.device, args.min_run_time)):
            r = {**spec, **timing}
            results.append(r)
            print(f"[{i}/{len(groups)}] {r['op']:9s} {r['backend']:7s} {shape_of(r):32s} {r['dtype']}: "
                  f"{r['ms']:9.2f} ms (min {r['ms_min']:.2f})  {r['peak_extra_mib']:9.1f} MiB", flush=True)
    info = machine(args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    args.md.write_text(markdown(results, info))
    print(f"wrote {out} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
