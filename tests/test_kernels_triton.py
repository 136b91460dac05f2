"""The Triton attention-KD kernels against the PyTorch reference, under the Triton interpreter on
CPU (tests/conftest.py sets TRITON_INTERPRET=1): forward and gradients, fp32 max abs diff <= 1e-4.
On a GPU host, `DLIP_TEST_DEVICE=cuda TRITON_INTERPRET=0` runs the same cases compiled for real
(benchmarks/gpu_check.sh does)."""

import os

import pytest
import torch
from helpers import LargestTensor

from dlip_ds.kernels import attention_kd_loss
from dlip_ds.kernels.reference import attention_kd_reference
from dlip_ds.kernels.relation import prepare_inputs

pytest.importorskip("triton")
from dlip_ds.kernels.attention_kd_triton import attention_kd_triton

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = torch.device(os.environ.get("DLIP_TEST_DEVICE", "cpu"))  # conftest.py: tiny tensors, one thread is faster

# (B, N_q, N_k, student (H, d), teacher (H, d), relation heads, causal, key padding, query padding, T)
CASES = [
    (2, 33, 33, (2, 8), (2, 16), None, False, True, False, 1.0),  # self-attention, padding
    (2, 40, 40, (2, 12), (3, 8), 2, True, True, False, 0.5),  # causal decoder, H/d differ, d not 2^k
    (1, 17, 38, (2, 16), (4, 16), 4, False, True, True, 2.0),  # cross-attention N_q < N_k, query mask
    (2, 38, 21, (3, 6), (2, 9), 3, True, False, False, 1.0),  # N_q > N_k, causal, odd head widths
    (2, 24, 24, (2, 8), (2, 8), None, True, True, True, 1.3),  # left padding: rows with no visible key
]


def make_case(b, n_q, n_k, student, teacher, kpm_on, qpm_on, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    (h_s, d_s), (h_t, d_t) = student, teacher
    # student taps as the model returns them: [B, N, H, d] memory viewed as [B, H, N, d]
    q_s = torch.randn(b, n_q, h_s, d_s, generator=g).to(DEVICE, dtype).transpose(1, 2).requires_grad_(True)
    k_s = torch.randn(b, n_k, h_s, d_s, generator=g).to(DEVICE, dtype).transpose(1, 2).requires_grad_(True)
    q_t = (2 * torch.randn(b, h_t, n_q, d_t, generator=g)).to(DEVICE, dtype)
    k_t = torch.randn(b, h_t, n_k, d_t, generator=g).to(DEVICE, dtype)
    kpm = qpm = None
    if kpm_on:
        kpm = (torch.rand(b, n_k, generator=g) < 0.25).to(DEVICE)
        kpm[0, :5] = True  # left padding: with causal, the first rows see no key
        if b > 1:
            kpm[1] = True  # a fully padded sequence
    if qpm_on:
        qpm = (torch.rand(b, n_q, generator=g) < 0.3).to(DEVICE)
    return q_s, k_s, q_t, k_t, kpm, qpm


def loss_and_grads(fn, x):
    loss = fn(x)
    return (loss, *torch.autograd.grad(2.5 * loss, (x.q_s, x.k_s)))


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_fp32(case):
    b, n_q, n_k, student, teacher, r, causal, kpm_on, qpm_on, temperature = case
    q_s, k_s, q_t, k_t, kpm, qpm = make_case(b, n_q, n_k, student, teacher, kpm_on, qpm_on)
    x = prepare_inputs(
        q_s, k_s, q_t, k_t, key_padding_mask=kpm, query_padding_mask=qpm, causal=causal,
        relation_heads=r, temperature=temperature,
    )
    got = loss_and_grads(lambda x: attention_kd_triton(x, block_m=16, block_n=16), x)
    want = loss_and_grads(attention_kd_reference, x)
    for a, w in zip(got, want):
        assert torch.isfinite(a).all()
        assert (a - w).abs().max() <= 1e-4, (a - w).abs().max()
        torch.testing.assert_close(a, w, rtol=1e-3, atol=1e-7)  # also relative: gradients are small
    assert want[0] > 0 and want[1].abs().max() > 0  # the case is not degenerate


def test_public_triton_backend_default_blocks():
    # teacher head width 72 pads to 128: the kernels then use 32-key blocks and 8 warps
    q_s, k_s, q_t, k_t, kpm, _ = make_case(2, 70, 70, (4, 8), (2, 72), True, False, seed=3)
    kw = {"key_padding_mask": kpm, "causal": True, "relation_heads": 2}
    got = attention_kd_loss(q_s, k_s, q_t, k_t, backend="triton", **kw)
    want = attention_kd_loss(q_s, k_s, q_t, k_t, backend="torch", **kw)
    assert got.dtype == torch.float32 and (got - want).abs() <= 1e-4
    g_got, g_want = torch.autograd.grad(got, q_s), torch.autograd.grad(want, q_s)
    assert (g_got[0] - g_want[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("student_dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_triton_half_precision_inputs(student_dtype, tol):
    """bf16 teacher (as the frozen teacher runs); the student in fp32, fp16 or bf16."""
    q_s, k_s, _, _, kpm, _ = make_case(2, 29, 29, (2, 16), (2, 16), True, False, seed=5, dtype=student_dtype)
    _, _, q_t, k_t, _, _ = make_case(2, 29, 29, (2, 16), (4, 8), False, False, seed=6, dtype=torch.bfloat16)
    x = prepare_inputs(q_s, k_s, q_t, k_t, key_padding_mask=kpm, relation_heads=2, temperature=1.5)
    got = loss_and_grads(lambda x: attention_kd_triton(x, block_m=16, block_n=16), x)
    want = loss_and_grads(attention_kd_reference, x)
    assert got[0].dtype == torch.float32 and got[1].dtype == student_dtype
    for a, w in zip(got, want):
        scale = w.detach().float().abs().max()
        assert (a.float() - w.float()).abs().max() <= tol * max(1.0, float(scale))


COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dlip_ds.kernels import attention_kd_triton as m

PTR = {"qs_ptr": "S", "ks_ptr": "S", "dq_ptr": "S", "dk_ptr": "S", "qt_ptr": "T", "kt_ptr": "T", "kpm_ptr": "*u8"}
done = []
for s, t, causal, kpm in [("bf16", "bf16", True, True), ("fp32", "fp16", False, False)]:
    for fn in (m._attn_kd_fwd, m._attn_kd_bwd_dq, m._attn_kd_bwd_dk):
        sig = {}
        for name, p in zip(fn.arg_names, fn.params):
            if p.is_constexpr:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = {"S": "*" + s, "T": "*" + t}.get(PTR.get(name), PTR.get(name, "*fp32"))
            else:
                sig[name] = "fp32" if name.startswith("scale") else "i32"
        const = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_DS": 64, "BLOCK_DT": 32, "CAUSAL": causal, "HAS_KPM": kpm,
                 "PREC_S": "ieee" if s == "fp32" else "tf32", "PREC_T": "tf32", "UPCAST_S": False, "UPCAST_T": False}
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32))
        done.append((fn.__name__, s, t, len(k.asm["cubin"])))
print(json.dumps(done))
"""


def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter runs Python, not the compiler: lower the kernels to an sm_90 cubin (no GPU needed)."""
    import json
    import os
    import subprocess
    import sys

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-c", COMPILE_SCRIPT]
    out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    done = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(done) == 6 and all(size > 0 for *_, size in done)


def test_triton_never_holds_attention_maps():
    q_s, k_s, q_t, k_t, kpm, _ = make_case(2, 40, 36, (2, 8), (2, 8), True, False, seed=11)
    largest = {}
    for backend in ("triton", "torch"):
        with LargestTensor() as mode:
            loss = attention_kd_loss(q_s, k_s, q_t, k_t, key_padding_mask=kpm, backend=backend)
            torch.autograd.grad(loss, (q_s, k_s))
        largest[backend] = mode.nbytes
    assert largest["torch"] >= 2 * 2 * 40 * 36 * 4  # the reference materialises [B, H, N_q, N_k] fp32
    # the Triton path allocates nothing bigger than q (the interpreter copies the inputs; tiles stay in the kernel)
    assert largest["triton"] <= q_s.numel() * 4
