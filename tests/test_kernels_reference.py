"""The PyTorch references of dlip_ds.kernels against naive re-computations (loops, explicit
softmax/log), gradcheck in fp64, and the chunked linear KD against the whole-logits formula."""

import math

import pytest
import torch
from helpers import LargestTensor

from dlip_ds.kernels import attention_kd_loss, linear_kd_loss, repr_kd_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, one thread is faster


def naive_attention_kd(q_s, k_s, q_t, k_t, kpm=None, qpm=None, causal=False, relation_heads=None, temperature=1.0):
    """Row by row, with explicit exp/log and Python loops over batch, head and query."""
    b, _, n_q, _ = q_s.shape
    n_k = k_s.shape[2]
    r = relation_heads or q_s.shape[1]
    if qpm is None and n_q == n_k:
        qpm = kpm

    def heads(x):  # concatenate channels, cut into r heads
        cat = torch.cat([x[:, h] for h in range(x.shape[1])], dim=-1)  # [B, N, H*d]
        w = cat.shape[-1] // r
        return [cat[..., i * w : (i + 1) * w] for i in range(r)]

    hs_q, hs_k, ht_q, ht_k = heads(q_s), heads(k_s), heads(q_t.detach()), heads(k_t.detach())
    total, rows = 0.0, 0
    for bi in range(b):
        for h in range(r):
            for i in range(n_q):
                if qpm is not None and qpm[bi, i]:
                    continue
                keys = [j for j in range(n_k) if not (kpm is not None and kpm[bi, j]) and not (causal and j > i)]
                if not keys:
                    continue
                rows += 1

                dists = []
                for q, k in ((hs_q[h], hs_k[h]), (ht_q[h], ht_k[h])):
                    s = torch.stack([q[bi, i] @ k[bi, j] for j in keys]) / (math.sqrt(q.shape[-1]) * temperature)
                    e = torch.exp(s - s.max())
                    dists.append(e / e.sum())
                p_s, p_t = dists
                total = total + (p_t * (torch.log(p_t) - torch.log(p_s))).sum()
    return torch.as_tensor(total / max(rows, 1), dtype=q_s.dtype)


def random_case(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b = 2
    n_q = int(torch.randint(3, 9, (1,), generator=g))
    n_k = n_q if seed % 2 else int(torch.randint(3, 9, (1,), generator=g))
    (h_s, d_s), (h_t, d_t) = [(2, 6), (4, 4)][seed % 2], [(3, 8), (2, 6)][seed % 2]
    q_s = torch.randn(b, h_s, n_q, d_s, generator=g, dtype=dtype, requires_grad=True)
    k_s = torch.randn(b, h_s, n_k, d_s, generator=g, dtype=dtype, requires_grad=True)
    q_t = 2 * torch.randn(b, h_t, n_q, d_t, generator=g, dtype=dtype)
    k_t = torch.randn(b, h_t, n_k, d_t, generator=g, dtype=dtype)
    kpm = torch.rand(b, n_k, generator=g) < 0.3
    kpm[0] = seed % 2 == 0  # a fully padded sequence: its rows must contribute nothing
    kpm[1, 0] = True  # with causal, row 0 of sequence 1 sees no key
    return q_s, k_s, q_t, k_t, kpm


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("causal", [False, True])
def test_attention_reference_matches_naive(seed, causal):
    q_s, k_s, q_t, k_t, kpm = random_case(seed)
    r = 4 if seed % 2 else 2  # student 2x6 / teacher 3x8 (r=2), student 4x4 / teacher 2x6 (r=4)
    kw = {"causal": causal, "relation_heads": r, "temperature": 1.7}
    got = attention_kd_loss(q_s, k_s, q_t, k_t, key_padding_mask=kpm, backend="torch", **kw)
    want = naive_attention_kd(q_s, k_s, q_t, k_t, kpm=kpm, **kw)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, (q_s, k_s))
    g_want = torch.autograd.grad(want, (q_s, k_s))
    for a, b in zip(g_got, g_want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_attention_reference_query_mask_and_default_heads():
    g = torch.Generator().manual_seed(7)
    q_s, k_s = (torch.randn(2, 3, n, 5, generator=g, dtype=torch.float64) for n in (6, 9))
    q_t, k_t = (torch.randn(2, 3, n, 7, generator=g, dtype=torch.float64) for n in (6, 9))
    kpm, qpm = torch.rand(2, 9, generator=g) < 0.4, torch.rand(2, 6, generator=g) < 0.4
    got = attention_kd_loss(q_s, k_s, q_t, k_t, key_padding_mask=kpm, query_padding_mask=qpm, backend="torch")
    torch.testing.assert_close(got, naive_attention_kd(q_s, k_s, q_t, k_t, kpm=kpm, qpm=qpm))
    # identical maps give zero loss; a fully padded batch gives an exact 0 (not NaN)
    assert attention_kd_loss(q_s, k_s, q_s, k_s).abs() < 1e-12
    assert attention_kd_loss(q_s, k_s, q_t, k_t, key_padding_mask=torch.ones(2, 9, dtype=torch.bool)) == 0


def test_attention_reference_gradcheck():
    g = torch.Generator().manual_seed(12)
    q_s = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k_s = torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    q_t, k_t = (torch.randn(2, 3, n, 2, generator=g, dtype=torch.float64) for n in (5, 6))
    kpm = torch.tensor([[True, False, False, True, False, False], [True] * 6])
    fn = lambda q, k: attention_kd_loss(
        q, k, q_t, k_t, key_padding_mask=kpm, causal=True, relation_heads=3, temperature=0.8, backend="torch"
    )
    assert torch.autograd.gradcheck(fn, (q_s, k_s))


def test_attention_teacher_is_detached():
    q_s, k_s, q_t, k_t, _ = random_case(2)
    q_t.requires_grad_(True)
    attention_kd_loss(q_s, k_s, q_t, k_t, relation_heads=2, backend="torch").backward()
    assert q_t.grad is None and q_s.grad is not None


def test_attention_errors():
    q = torch.randn(1, 2, 4, 8)
    t = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="relation_heads"):
        attention_kd_loss(q, q, t, t)
    with pytest.raises(ValueError, match="must divide"):
        attention_kd_loss(q, q, t, t, relation_heads=5)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention_kd_loss(q, q, q, q, key_padding_mask=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="backend"):
        attention_kd_loss(q, q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="query and key lengths"):
        attention_kd_loss(q, q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention_kd_loss(q, q, q, q, backend="triton")


def naive_linear_kd(h_s, w_s, b_s, h_t, w_t, b_t, mask, temperature):
    """Token by token, explicit softmax and log."""
    hs, ht = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    keep = range(hs.shape[0]) if mask is None else [i for i in range(hs.shape[0]) if not mask.reshape(-1)[i]]
    total = 0.0
    for i in keep:
        zs, zt = (w_s @ hs[i] + b_s) / temperature, (w_t @ ht[i].detach() + b_t) / temperature
        p_s, p_t = torch.exp(zs) / torch.exp(zs).sum(), torch.exp(zt) / torch.exp(zt).sum()
        total = total + (p_t * torch.log(p_t / p_s)).sum()
    return temperature**2 * total / max(len(keep), 1)


def linear_case(seed, dtype=torch.float64, vocab=37):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(2, 7, 6, generator=g, dtype=dtype, requires_grad=True)
    w_s = torch.randn(vocab, 6, generator=g, dtype=dtype, requires_grad=True)
    b_s = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True)
    h_t, w_t, b_t = torch.randn(2, 7, 10, generator=g, dtype=dtype), torch.randn(vocab, 10, generator=g, dtype=dtype), torch.randn(vocab, generator=g, dtype=dtype)
    mask = torch.rand(2, 7, generator=g) < 0.4
    return h_s, w_s, b_s, h_t, w_t, b_t, mask


@pytest.mark.parametrize("backend,chunk", [("torch", 1024), ("chunked", 1), ("chunked", 3), ("chunked", 1024)])
@pytest.mark.parametrize("use_mask", [False, True])
def test_linear_kd_matches_naive(backend, chunk, use_mask):
    h_s, w_s, b_s, h_t, w_t, b_t, mask = linear_case(3)
    mask = mask if use_mask else None
    got = linear_kd_loss(h_s, w_s, h_t, w_t, b_s=b_s, b_t=b_t, mask=mask, temperature=2.5, chunk_size=chunk, backend=backend)
    want = naive_linear_kd(h_s, w_s, b_s, h_t, w_t, b_t, mask, 2.5)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got * 3, (h_s, w_s, b_s)), torch.autograd.grad(want * 3, (h_s, w_s, b_s))):
        torch.testing.assert_close(a, b)


def test_linear_kd_chunked_fp32_and_gradcheck():
    h_s, w_s, b_s, h_t, w_t, b_t, mask = linear_case(4, dtype=torch.float32, vocab=301)
    out = {}
    for backend in ("chunked", "torch"):
        loss = linear_kd_loss(h_s, w_s, h_t, w_t, b_s=b_s, b_t=b_t, mask=mask, temperature=0.7, chunk_size=4, backend=backend)
        out[backend] = (loss, *torch.autograd.grad(loss, (h_s, w_s, b_s)))
    for a, b in zip(out["chunked"], out["torch"]):
        assert (a - b).abs().max() <= 1e-4
    h_s, w_s, b_s, h_t, w_t, b_t, mask = linear_case(5, vocab=9)
    fn = lambda h, w, b: linear_kd_loss(h, w, h_t, w_t, b_s=b, b_t=b_t, mask=mask, chunk_size=4, backend="chunked")
    assert torch.autograd.gradcheck(fn, (h_s, w_s, b_s))


def test_linear_kd_bf16_teacher_and_no_grad():
    h_s, w_s, _, h_t, w_t, _, mask = linear_case(6, dtype=torch.float32)
    h_t, w_t = h_t.bfloat16(), w_t.bfloat16()
    a = linear_kd_loss(h_s, w_s, h_t, w_t, mask=mask, chunk_size=5, backend="chunked")
    b = linear_kd_loss(h_s, w_s, h_t, w_t, mask=mask, backend="torch")
    assert a.dtype == torch.float32 and (a - b).abs() <= 1e-5
    with torch.no_grad():
        assert linear_kd_loss(h_s, w_s, h_t, w_t, mask=mask, backend="chunked").requires_grad is False
    with pytest.raises(ValueError, match="mask"):
        linear_kd_loss(h_s, w_s, h_t, w_t, mask=mask.float())
    with pytest.raises(ValueError, match="teacher weight"):
        linear_kd_loss(h_s, w_s, h_t, w_s)


def naive_repr(h_s, h_t, ws, bs, mask):
    total = 0.0
    for hs, ht, w, b in zip(h_s, h_t, ws, bs):
        err, n = 0.0, 0
        for bi in range(hs.shape[0]):
            for i in range(hs.shape[1]):
                if mask is None or not mask[bi, i]:
                    y = w @ hs[bi, i] + (0 if b is None else b)
                    err, n = err + ((y - ht[bi, i]) ** 2).sum(), n + 1
        total = total + err / (n * ht.shape[-1])
    return total


@pytest.mark.parametrize("backend", ["fused", "torch", "auto"])
@pytest.mark.parametrize("use_mask,bias,same_shapes", [(True, True, True), (False, False, True), (True, True, False)])
def test_repr_kd_matches_naive(backend, use_mask, bias, same_shapes):
    g = torch.Generator().manual_seed(8)
    dims = [(6, 10), (6, 10), (4 if not same_shapes else 6, 10)]
    h_s = [torch.randn(2, 5, ds, generator=g, dtype=torch.float64, requires_grad=True) for ds, _ in dims]
    h_t = [torch.randn(2, 5, dt, generator=g, dtype=torch.float64) for _, dt in dims]
    ws = [torch.randn(dt, ds, generator=g, dtype=torch.float64, requires_grad=True) for ds, dt in dims]
    bs = [torch.randn(dt, generator=g, dtype=torch.float64, requires_grad=True) if bias else None for _, dt in dims]
    mask = torch.rand(2, 5, generator=g) < 0.4 if use_mask else None
    got = repr_kd_loss(h_s, h_t, ws, bs, mask=mask, backend=backend)
    want = naive_repr(h_s, h_t, ws, bs, mask)
    torch.testing.assert_close(got, want)
    params = h_s + ws + [b for b in bs if b is not None]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b)


def test_repr_kd_gradcheck_and_errors():
    g = torch.Generator().manual_seed(9)
    h_s = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    h_t = [torch.randn(2, 3, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    bs = [torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    mask = torch.tensor([[False, True, False], [False, False, True]])
    for backend in ("fused", "torch"):
        fn = lambda *p: repr_kd_loss(list(p[:2]), h_t, list(p[2:4]), list(p[4:]), mask=mask, backend=backend)  # noqa: B023
        assert torch.autograd.gradcheck(fn, (*h_s, *ws, *bs))
    with pytest.raises(ValueError, match="pair 1"):
        repr_kd_loss(h_s, h_t, [ws[0], ws[1].t()], bs)
    with pytest.raises(ValueError, match="as many"):
        repr_kd_loss(h_s, h_t[:1], ws, bs)


def test_linear_kd_chunked_never_holds_whole_logits():
    h_s, w_s, b_s, h_t, w_t, b_t, _ = linear_case(10, dtype=torch.float32, vocab=997)
    tokens, vocab = h_s.shape[0] * h_s.shape[1], w_s.shape[0]
    largest = {}
    for backend in ("chunked", "torch"):
        with LargestTensor() as mode:
            loss = linear_kd_loss(h_s, w_s, h_t, w_t, b_s=b_s, b_t=b_t, chunk_size=4, backend=backend)
            torch.autograd.grad(loss, (h_s, w_s, b_s))
        largest[backend] = mode.nbytes
    assert largest["torch"] >= tokens * vocab * 4  # the reference does hold them: the probe can see it
    assert largest["chunked"] <= max(4 * vocab * 4, w_t.numel() * 4)  # a chunk's logits, or a weight


def test_backend_dispatch():
    from dlip_ds.kernels.dispatch import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("op", "auto", cuda, ("triton", "torch")) == "triton"  # triton is a dev dependency
    assert resolve_backend("op", "auto", cpu, ("triton", "torch")) == "torch"
    assert resolve_backend("op", "auto", cpu, ("chunked", "torch"), cpu_auto="chunked") == "chunked"
    assert resolve_backend("op", "torch", cuda, ("triton", "torch")) == "torch"
    assert resolve_backend("op", "triton", cpu, ("triton", "torch")) == "triton"  # conftest: TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="linear_kd_loss: backend"):
        linear_kd_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 3), torch.randn(5, 3), backend="triton")
