"""Triton attention-KD kernels (FlashAttention-style): the [N_q, N_k] maps are never stored.

Forward, one program per (batch * relation head, block of queries), looping over key blocks:
both sides' scores are computed in fp32 from fp16/bf16/fp32 inputs and the row statistics are
kept online, as FlashAttention keeps its output: running max m and sum l of each side, and
acc = sum_j exp(s_t - m_t) (s_t - s_s) rescaled with the teacher's max. At the end of the row
    KL = acc / l_t - lse_t + lse_s,   lse = m + log(l).
This fuses the statistics pass and the KL pass into one sweep over the keys (same result, half the
score recomputation). Only lse_s, lse_t and the per-row KL ([B, R, N_q] fp32) are written.

Backward recomputes the scores block by block: dS_s = (p_s - p_t) * row weight, then
dQ_s = scale_s * dS_s K_s (one program per query block) and dK_s = scale_s * dS_s^T Q_s (one
program per key block), so extra memory stays O(B * R * N).

Masked scores (padding, causal, tails of blocks) are set to a finite -1e30 on both sides, never
-inf, so rows without a visible key stay finite; their weight is 0.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .dispatch import interpreter_enabled
from .relation import RelationInputs

NEG = tl.constexpr(-1.0e30)


@triton.jit
def _load_rows(ptr, offs_n, offs_d, n, d, stride_n, stride_d, UPCAST: tl.constexpr):
    """A [BLOCK_N, BLOCK_D] tile, zero outside [n, d]; UPCAST: as fp32 (see `_upcast`)."""
    mask = (offs_n[:, None] < n) & (offs_d[None, :] < d)
    offs = offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :] * stride_d  # int64: views of big tensors
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _visible(offs_m, offs_n, kpm_ptr, n_k, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: key j exists, is not padding, and (causal) j <= i."""
    keep = offs_n < n_k
    if HAS_KPM:
        keep = keep & (tl.load(kpm_ptr + offs_n, mask=offs_n < n_k, other=1) == 0)
    vis = keep[None, :] & (offs_m[:, None] >= 0)
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None])
    return vis


@triton.jit
def _attn_kd_fwd(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kpm_ptr, lse_s_ptr, lse_t_ptr, kl_ptr,
    sqs_b, sqs_h, sqs_n, sqs_d, sks_b, sks_h, sks_n, sks_d,
    sqt_b, sqt_h, sqt_n, sqt_d, skt_b, skt_h, skt_n, skt_d, skpm_b,
    n_q, n_k, heads, d_s, d_t, scale_s, scale_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 batch/head offsets
    b, h = pid_bh // heads, pid_bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds, offs_dt = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    q_s = _load_rows(qs_ptr + b * sqs_b + h * sqs_h, offs_m, offs_ds, n_q, d_s, sqs_n, sqs_d, UPCAST_S)
    q_t = _load_rows(qt_ptr + b * sqt_b + h * sqt_h, offs_m, offs_dt, n_q, d_t, sqt_n, sqt_d, UPCAST_T)
    ks_base, kt_base = ks_ptr + b * sks_b + h * sks_h, kt_ptr + b * skt_b + h * skt_h
    kpm_base = kpm_ptr + b * skpm_b

    m_s = tl.full([BLOCK_M], NEG, tl.float32)
    m_t = tl.full([BLOCK_M], NEG, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    end = tl.minimum(n_k, (pid_m + 1) * BLOCK_M) if CAUSAL else n_k
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_s = _load_rows(ks_base, offs_n, offs_ds, n_k, d_s, sks_n, sks_d, UPCAST_S)
        k_t = _load_rows(kt_base, offs_n, offs_dt, n_k, d_t, skt_n, skt_d, UPCAST_T)
        vis = _visible(offs_m, offs_n, kpm_base, n_k, CAUSAL, HAS_KPM)
        s_s = tl.where(vis, tl.dot(q_s, tl.trans(k_s), input_precision=PREC_S) * scale_s, NEG)
        s_t = tl.where(vis, tl.dot(q_t, tl.trans(k_t), input_precision=PREC_T) * scale_t, NEG)

        m_s_new = tl.maximum(m_s, tl.max(s_s, 1))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s_s - m_s_new[:, None]), 1)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(s_t, 1))
        alpha = tl.exp(m_t - m_t_new)
        p_t = tl.exp(s_t - m_t_new[:, None])
        l_t = l_t * alpha + tl.sum(p_t, 1)
        acc = acc * alpha + tl.sum(p_t * (s_t - s_s), 1)
        m_t = m_t_new

    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    row = pid_bh * n_q + offs_m
    keep = offs_m < n_q
    tl.store(lse_s_ptr + row, lse_s, mask=keep)
    tl.store(lse_t_ptr + row, lse_t, mask=keep)
    tl.store(kl_ptr + row, acc / l_t - lse_t + lse_s, mask=keep)


@triton.jit
def _ds_block(q_s, k_s, q_t, k_t, lse_s, lse_t, weight, vis, scale_s, scale_t,
              PREC_S: tl.constexpr, PREC_T: tl.constexpr):
    """(p_s - p_t) * row weight for one [BLOCK_M, BLOCK_N] tile, scores recomputed."""
    s_s = tl.where(vis, tl.dot(q_s, tl.trans(k_s), input_precision=PREC_S) * scale_s, NEG)
    s_t = tl.where(vis, tl.dot(q_t, tl.trans(k_t), input_precision=PREC_T) * scale_t, NEG)
    p_s = tl.exp(s_s - lse_s[:, None])
    p_t = tl.exp(s_t - lse_t[:, None])
    return (p_s - p_t) * weight[:, None]


@triton.jit
def _attn_kd_bwd_dq(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kpm_ptr, lse_s_ptr, lse_t_ptr, w_ptr, coef_ptr, dq_ptr,
    sqs_b, sqs_h, sqs_n, sqs_d, sks_b, sks_h, sks_n, sks_d,
    sqt_b, sqt_h, sqt_n, sqt_d, skt_b, skt_h, skt_n, skt_d, skpm_b,
    n_q, n_k, heads, d_s, d_t, scale_s, scale_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 batch/head offsets
    b, h = pid_bh // heads, pid_bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ds, offs_dt = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    q_s = _load_rows(qs_ptr + b * sqs_b + h * sqs_h, offs_m, offs_ds, n_q, d_s, sqs_n, sqs_d, UPCAST_S)
    q_t = _load_rows(qt_ptr + b * sqt_b + h * sqt_h, offs_m, offs_dt, n_q, d_t, sqt_n, sqt_d, UPCAST_T)
    ks_base, kt_base = ks_ptr + b * sks_b + h * sks_h, kt_ptr + b * skt_b + h * skt_h
    kpm_base = kpm_ptr + b * skpm_b
    keep = offs_m < n_q
    row = pid_bh * n_q + offs_m
    lse_s = tl.load(lse_s_ptr + row, mask=keep, other=0.0)
    lse_t = tl.load(lse_t_ptr + row, mask=keep, other=0.0)
    weight = tl.load(w_ptr + b * n_q + offs_m, mask=keep, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
    end = tl.minimum(n_k, (pid_m + 1) * BLOCK_M) if CAUSAL else n_k
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_s = _load_rows(ks_base, offs_n, offs_ds, n_k, d_s, sks_n, sks_d, UPCAST_S)
        k_t = _load_rows(kt_base, offs_n, offs_dt, n_k, d_t, skt_n, skt_d, UPCAST_T)
        vis = _visible(offs_m, offs_n, kpm_base, n_k, CAUSAL, HAS_KPM)
        ds = _ds_block(q_s, k_s, q_t, k_t, lse_s, lse_t, weight, vis, scale_s, scale_t, PREC_S, PREC_T)
        dq += tl.dot(ds.to(k_s.dtype), k_s, input_precision=PREC_S)

    dq = dq * tl.load(coef_ptr)
    mask = keep[:, None] & (offs_ds[None, :] < d_s)
    out = dq_ptr + pid_bh * n_q * d_s + offs_m[:, None] * d_s + offs_ds[None, :]
    tl.store(out, dq.to(dq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attn_kd_bwd_dk(
    qs_ptr, ks_ptr, qt_ptr, kt_ptr, kpm_ptr, lse_s_ptr, lse_t_ptr, w_ptr, coef_ptr, dk_ptr,
    sqs_b, sqs_h, sqs_n, sqs_d, sks_b, sks_h, sks_n, sks_d,
    sqt_b, sqt_h, sqt_n, sqt_d, skt_b, skt_h, skt_n, skt_d, skpm_b,
    n_q, n_k, heads, d_s, d_t, scale_s, scale_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64 batch/head offsets
    b, h = pid_bh // heads, pid_bh % heads
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_ds, offs_dt = tl.arange(0, BLOCK_DS), tl.arange(0, BLOCK_DT)
    k_s = _load_rows(ks_ptr + b * sks_b + h * sks_h, offs_n, offs_ds, n_k, d_s, sks_n, sks_d, UPCAST_S)
    k_t = _load_rows(kt_ptr + b * skt_b + h * skt_h, offs_n, offs_dt, n_k, d_t, skt_n, skt_d, UPCAST_T)
    qs_base, qt_base = qs_ptr + b * sqs_b + h * sqs_h, qt_ptr + b * sqt_b + h * sqt_h
    kpm_base = kpm_ptr + b * skpm_b

    dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
    # causal: rows i < pid_n * BLOCK_N see none of these keys
    start = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(start, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_s = _load_rows(qs_base, offs_m, offs_ds, n_q, d_s, sqs_n, sqs_d, UPCAST_S)
        q_t = _load_rows(qt_base, offs_m, offs_dt, n_q, d_t, sqt_n, sqt_d, UPCAST_T)
        keep = offs_m < n_q
        row = pid_bh * n_q + offs_m
        lse_s = tl.load(lse_s_ptr + row, mask=keep, other=0.0)
        lse_t = tl.load(lse_t_ptr + row, mask=keep, other=0.0)
        weight = tl.load(w_ptr + b * n_q + offs_m, mask=keep, other=0.0)
        vis = _visible(offs_m, offs_n, kpm_base, n_k, CAUSAL, HAS_KPM)
        ds = _ds_block(q_s, k_s, q_t, k_t, lse_s, lse_t, weight, vis, scale_s, scale_t, PREC_S, PREC_T)
        dk += tl.dot(tl.trans(ds.to(q_s.dtype)), q_s, input_precision=PREC_S)

    dk = dk * tl.load(coef_ptr)
    mask = (offs_n[:, None] < n_k) & (offs_ds[None, :] < d_s)
    out = dk_ptr + pid_bh * n_k * d_s + offs_n[:, None] * d_s + offs_ds[None, :]
    tl.store(out, dk.to(dk_ptr.dtype.element_ty), mask=mask)


def _on_device(device: torch.device):
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs >= 16; masked loads pad the rest


def _precision(dtype: torch.dtype) -> str:
    # fp32/fp64 inputs multiply in full precision (no TF32 rounding); fp16/bf16 keep the default
    return "tf32" if dtype in (torch.float16, torch.bfloat16) and not _upcast(dtype) else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    # The Triton interpreter keeps bf16 as raw uint16 bits and its tl.dot multiplies those bits;
    # there, bf16 tiles are converted to fp32 after the load. Compiled kernels use bf16 MMA.
    return dtype == torch.bfloat16 and interpreter_enabled()


def kernel_meta(block_m: int, block_n: int, d_s: int, d_t: int, dtype_s: torch.dtype, dtype_t: torch.dtype,
                causal: bool, has_kpm: bool) -> dict:
    """The compile-time arguments of all three kernels (and num_warps)."""
    bd_s, bd_t = _block_d(d_s), _block_d(d_t)
    return {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_DS": bd_s, "BLOCK_DT": bd_t,
        "CAUSAL": causal, "HAS_KPM": has_kpm, "PREC_S": _precision(dtype_s), "PREC_T": _precision(dtype_t),
        "UPCAST_S": _upcast(dtype_s), "UPCAST_T": _upcast(dtype_t),
        "num_warps": 4 if max(bd_s, bd_t) <= 64 else 8,
    }


# (BLOCK_M, BLOCK_N), largest first. Shared memory grows with the blocks, the padded head width and the
# element size: at head width 256 in fp32 the first ones need 256-330 KiB, above every GPU's limit
# (opt-in per block: A100 163 KiB, H100 227 KiB). benchmarks/results/attention_kd_shared_memory.json
# holds the compiled sizes for sm_80 and sm_90 (python -m dlip_ds.kernels.triton_targets).
BLOCKS = ((64, 64), (64, 32), (32, 32), (32, 16), (16, 16))


def choose_blocks(d_s: int, d_t: int, dtype_s: torch.dtype, dtype_t: torch.dtype, limit: int | None,
                  shared_of) -> tuple[int, int]:
    """The largest (BLOCK_M, BLOCK_N) of BLOCKS whose kernels fit `limit` bytes of shared memory.

    Heads wider than 64 (padded) start at 32-key blocks (register pressure). shared_of(block_m,
    block_n) -> bytes the three kernels need (the largest); limit None (the interpreter): the first.
    Raises ValueError naming the widths, dtypes and limit when even the smallest blocks do not fit.
    """
    wide = max(_block_d(d_s), _block_d(d_t)) > 64
    candidates = [(m, n) for m, n in BLOCKS if not wide or n <= 32]
    if limit is None:
        return candidates[0]
    need = {}
    for block_m, block_n in candidates:
        need[block_m, block_n] = shared_of(block_m, block_n)
        if need[block_m, block_n] <= limit:
            return block_m, block_n
    smallest = min(need.values())
    raise ValueError(
        f"attention_kd_loss (triton): relation-head widths {d_s} (student, {dtype_s}) and {d_t} (teacher, "
        f"{dtype_t}) need {smallest} bytes of shared memory even with {candidates[-1][0]}x{candidates[-1][1]} "
        f"blocks, above this GPU's limit of {limit} bytes; use more relation heads (narrower heads), "
        "fp16/bf16 inputs, or backend='torch'"
    )


_CHOSEN: dict = {}  # (device, widths, dtypes, causal, padding) -> blocks


def _blocks_for(args: tuple, common: tuple, d_s, d_t, dtype_s, dtype_t, causal, has_kpm) -> tuple[int, int]:
    """choose_blocks with the sizes the kernels compile to for this GPU (Triton caches the compilations)."""
    device = args[0].device
    if device.type != "cuda":
        return choose_blocks(d_s, d_t, dtype_s, dtype_t, None, None)
    key = (str(device), _block_d(d_s), _block_d(d_t), dtype_s, dtype_t, causal, has_kpm)
    if key not in _CHOSEN:
        limit = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
        q_s, lse = args[0], args[5]
        bwd_args = (*args[:7], lse, lse, q_s)  # dtypes as launched: row weights and coef are fp32, dq/dk as q_s

        def shared_of(block_m, block_n):
            meta = kernel_meta(block_m, block_n, d_s, d_t, dtype_s, dtype_t, causal, has_kpm)
            with _on_device(device):
                kernels = [(_attn_kd_fwd, args), (_attn_kd_bwd_dq, bwd_args), (_attn_kd_bwd_dk, bwd_args)]
                return max(k.warmup(*a, *common, grid=(1,), **meta).metadata.shared for k, a in kernels)

        _CHOSEN[key] = choose_blocks(d_s, d_t, dtype_s, dtype_t, limit, shared_of)
    return _CHOSEN[key]


class _AttentionKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, kpm, row_weight, rows, scale_s, scale_t, causal, block_m, block_n):
        b, r, n_q, d_s = q_s.shape
        n_k, d_t = k_s.shape[2], q_t.shape[3]
        lse_s = torch.empty(b, r, n_q, dtype=torch.float32, device=q_s.device)
        lse_t, kl = torch.empty_like(lse_s), torch.empty_like(lse_s)
        kpm_arg = kpm if kpm is not None else row_weight  # never read when HAS_KPM is False
        common = (
            *q_s.stride(), *k_s.stride(), *q_t.stride(), *k_t.stride(),
            kpm.stride(0) if kpm is not None else 0, n_q, n_k, r, d_s, d_t, scale_s, scale_t,
        )
        args = (q_s, k_s, q_t, k_t, kpm_arg, lse_s, lse_t, kl)
        if block_m is None or block_n is None:
            block_m, block_n = _blocks_for(args, common, d_s, d_t, q_s.dtype, q_t.dtype, causal, kpm is not None)
        meta = kernel_meta(block_m, block_n, d_s, d_t, q_s.dtype, q_t.dtype, causal, kpm is not None)
        grid = (triton.cdiv(n_q, block_m), b * r)
        with _on_device(q_s.device):
            _attn_kd_fwd[grid](*args, *common, **meta)
        ctx.save_for_backward(q_s, k_s, q_t, k_t, kpm_arg, row_weight, rows, lse_s, lse_t)
        ctx.common, ctx.meta = common, meta
        weighted = torch.where(row_weight[:, None, :] > 0, kl, 0.0)
        return weighted.sum() / rows

    @staticmethod
    def backward(ctx, grad_out):
        q_s, k_s, q_t, k_t, kpm_arg, row_weight, rows, lse_s, lse_t = ctx.saved_tensors
        b, r, n_q, d_s = q_s.shape
        n_k = k_s.shape[2]
        scale_s = ctx.common[-2]
        coef = (grad_out.float() * scale_s / rows).reshape(1)
        meta, block_m, block_n = ctx.meta, ctx.meta["BLOCK_M"], ctx.meta["BLOCK_N"]
        args = (q_s, k_s, q_t, k_t, kpm_arg, lse_s, lse_t, row_weight, coef)
        dq = dk = None
        with _on_device(q_s.device):
            if ctx.needs_input_grad[0]:
                dq = torch.empty(b, r, n_q, d_s, dtype=q_s.dtype, device=q_s.device)
                _attn_kd_bwd_dq[(triton.cdiv(n_q, block_m), b * r)](*args, dq, *ctx.common, **meta)
            if ctx.needs_input_grad[1]:
                dk = torch.empty(b, r, n_k, d_s, dtype=k_s.dtype, device=k_s.device)
                _attn_kd_bwd_dk[(triton.cdiv(n_k, block_n), b * r)](*args, dk, *ctx.common, **meta)
        return dq, dk, *([None] * 10)


def attention_kd_triton(x: RelationInputs, *, block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """The attention KD loss of `attention_kd.py` with the Triton kernels (CUDA, or the interpreter).

    Blocks default to the largest of BLOCKS that fit the GPU's shared memory (`choose_blocks`; under
    the interpreter, 64x64, or 64x32 when a side's head width pads to more than 64).
    """
    kpm = None if x.key_padding_mask is None else x.key_padding_mask.contiguous().view(torch.uint8)
    row_weight = x.row_valid.to(torch.float32).contiguous()
    rows = (row_weight.sum() * x.q_s.shape[1]).clamp(min=1)
    return _AttentionKD.apply(
        x.q_s, x.k_s, x.q_t, x.k_t, kpm, row_weight, rows, x.scale_s, x.scale_t, x.causal, block_m, block_n
    )
