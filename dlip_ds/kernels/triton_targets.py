"""The Triton attention-KD kernels compiled for a GPU architecture on a machine without one: the
shared memory each needs, and the blocks `attention_kd_triton.choose_blocks` would pick there.

    python -m dlip_ds.kernels.triton_targets            # sm_80 and sm_90, head widths 64..256, fp32/bf16/fp16

writes benchmarks/results/attention_kd_shared_memory.json. Needs triton's NVIDIA backend (it ships
ptxas), no GPU, and a process where TRITON_INTERPRET is off when triton is imported: under the
interpreter the kernels are Python functions and cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

# Shared memory one block may use (opt-in), bytes: what Triton checks a launch against on these GPUs.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
WIDTHS = (64, 80, 96, 128, 256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROOT = Path(__file__).resolve().parents[2]


def _kernels():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("triton_targets compiles the kernels: run it with TRITON_INTERPRET unset or 0")
    from . import attention_kd_triton as m

    return m, {"fwd": m._attn_kd_fwd, "bwd_dq": m._attn_kd_bwd_dq, "bwd_dk": m._attn_kd_bwd_dk}


def compiled_shared(kernel: str, arch: int, d_s: int, d_t: int, dtype_s: torch.dtype, dtype_t: torch.dtype,
                    block_m: int, block_n: int, causal: bool = True, has_kpm: bool = True) -> int:
    """Bytes of shared memory `kernel` ("fwd", "bwd_dq", "bwd_dk") compiles to for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    m, kernels = _kernels()
    fn = kernels[kernel]
    meta = m.kernel_meta(block_m, block_n, d_s, d_t, dtype_s, dtype_t, causal, has_kpm)
    num_warps = meta.pop("num_warps")
    side = {"qs_ptr": dtype_s, "ks_ptr": dtype_s, "dq_ptr": dtype_s, "dk_ptr": dtype_s, "qt_ptr": dtype_t,
            "kt_ptr": dtype_t}
    sig = {}
    for name in fn.arg_names:
        if name in meta:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*u8" if name == "kpm_ptr" else POINTER[side[name]] if name in side else "*fp32"
        else:
            sig[name] = "fp32" if name.startswith("scale") else "i32"
    compiled = triton.compile(ASTSource(fn, sig, meta), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    return int(compiled.metadata.shared)


def blocks_for(arch: int, d_s: int, d_t: int, dtype_s: torch.dtype, dtype_t: torch.dtype,
               causal: bool = True, has_kpm: bool = True) -> dict:
    """What choose_blocks picks on sm_<arch> (its opt-in limit), with the compiled sizes it looked at."""
    m, _ = _kernels()
    tried = {}

    def shared_of(block_m, block_n):
        sizes = {k: compiled_shared(k, arch, d_s, d_t, dtype_s, dtype_t, block_m, block_n, causal, has_kpm)
                 for k in ("fwd", "bwd_dq", "bwd_dk")}
        tried[f"{block_m}x{block_n}"] = sizes
        return max(sizes.values())

    try:
        blocks, error = m.choose_blocks(d_s, d_t, dtype_s, dtype_t, SHARED_LIMIT[arch], shared_of), None
    except ValueError as e:
        blocks, error = None, str(e)
    return {"arch": arch, "limit": SHARED_LIMIT[arch], "blocks": blocks, "error": error, "shared": tried}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--width", type=int, nargs="+", default=list(WIDTHS))
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attention_kd_shared_memory.json")
    args = p.parse_args(argv)
    import triton

    m, _ = _kernels()
    rows, seen = [], {}
    for arch in args.arch:
        for name in args.dtype:
            for width in args.width:
                dtype = DTYPES[name]
                key = (arch, name, m._block_d(width))  # widths that pad alike compile alike
                start = time.perf_counter()
                if key not in seen:
                    seen[key] = blocks_for(arch, width, width, dtype, dtype)
                row = {**seen[key], "width": width, "dtype": name, "block_d": m._block_d(width),
                       "compile_s": round(time.perf_counter() - start, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    info = {"triton": triton.__version__, "torch": torch.__version__, "kernels": "causal, with key padding",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
