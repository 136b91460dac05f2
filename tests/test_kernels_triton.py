"""The Triton attention-KD kernels against the PyTorch reference, under the Triton interpreter on
CPU (tests/conftest.py sets TRITON_INTERPRET=1): forward and gradients, fp32 max abs diff <= 1e-4."""

import pytest
import torch

from dlip_ds.kernels import attention_kd_loss
from dlip_ds.kernels.attention_kd import prepare_inputs
from dlip_ds.kernels.reference import attention_kd_reference

pytest.importorskip("triton")
from dlip_ds.kernels.attention_kd_triton import attention_kd_triton

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
    q_s = torch.randn(b, n_q, h_s, d_s, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)
    k_s = torch.randn(b, n_k, h_s, d_s, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)
    q_t = (2 * torch.randn(b, h_t, n_q, d_t, generator=g)).to(dtype)
    k_t = torch.randn(b, h_t, n_k, d_t, generator=g).to(dtype)
    kpm = qpm = None
    if kpm_on:
        kpm = torch.rand(b, n_k, generator=g) < 0.25
        kpm[0, :5] = True  # left padding: with causal, the first rows see no key
        if b > 1:
            kpm[1] = True  # a fully padded sequence
    if qpm_on:
        qpm = torch.rand(b, n_q, generator=g) < 0.3
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
    q_s, k_s, q_t, k_t, kpm, _ = make_case(2, 70, 70, (4, 8), (2, 8), True, False, seed=3)
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
