"""Plain helpers shared by several test files: naive reference formulas (explicit loops, float64),
a probe of the largest tensor an op produces, a free TCP port, a BERT vocabulary on disk.

Imported as `from helpers import ...` (tests/ has no __init__.py: pytest puts it on sys.path, and
multiprocessing's spawned workers inherit that path). Fixtures live in conftest.py."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import torch

# --------------------------------------------------------------------------- naive formulas: pretraining losses


def naive_softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def naive_ce_rows(sim: torch.Tensor, targets: torch.Tensor) -> float:
    """mean over rows of -sum_j t_ij log softmax(s_i)_j, with explicit loops in float64."""
    total = 0.0
    for i in range(sim.shape[0]):
        row = [float(v) for v in sim[i]]
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        total += -sum(float(targets[i, j]) * (row[j] - log_z) for j in range(len(row)))
    return total / sim.shape[0]


def naive_lm(logits, labels, smoothing) -> float:
    """Mean over predicted tokens (label of the next position != -100) of the label-smoothed
    cross-entropy, token by token."""
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1] - 1):
            y = int(labels[i, j + 1])
            if y == -100:
                continue
            logp = [math.log(p) for p in naive_softmax([float(x) for x in logits[i, j]])]
            total += (1 - smoothing) * -logp[y] + smoothing * -sum(logp) / len(logp)
            count += 1
    return total / count


# --------------------------------------------------------------------------- naive formulas: distillation terms


@torch.no_grad()
def naive_repr(h_s, h_t, weights, biases, pad) -> float:
    """sum over pairs of mean over kept tokens and teacher channels of (h_s W^T + b - h_t)^2."""
    total = 0.0
    for hs, ht, w, b in zip(h_s, h_t, weights, biases):
        err, count = 0.0, 0
        for i in range(hs.shape[0]):
            for j in range(hs.shape[1]):
                if pad is not None and bool(pad[i, j]):
                    continue
                y = w.double() @ hs[i, j].double() + b.double()
                err += float(((y - ht[i, j].double()) ** 2).sum())
                count += 1
        total += err / (count * ht.shape[-1])
    return total


def _relation(x: torch.Tensor, r: int) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d).reshape(b, n, r, h * d // r).permute(0, 2, 1, 3)


def naive_attention_kl(q_s, k_s, q_t, k_t, *, key_pad=None, query_pad=None, causal=False, r=None, temperature=1.0):
    """mean over valid (batch, head, query row) of KL(softmax(q_t k_t / sqrt(d_t) T) || same for student)."""
    r = r or q_s.shape[1]
    q_s, k_s, q_t, k_t = (_relation(x.double(), r) for x in (q_s, k_s, q_t, k_t))
    total, rows = 0.0, 0
    for b in range(q_s.shape[0]):
        for h in range(r):
            for i in range(q_s.shape[2]):
                if query_pad is not None and bool(query_pad[b, i]):
                    continue
                keys = [j for j in range(k_s.shape[2])
                        if not (key_pad is not None and bool(key_pad[b, j])) and not (causal and j > i)]
                if not keys:
                    continue
                st = torch.stack([q_t[b, h, i] @ k_t[b, h, j] for j in keys]) / (math.sqrt(q_t.shape[3]) * temperature)
                ss = torch.stack([q_s[b, h, i] @ k_s[b, h, j] for j in keys]) / (math.sqrt(q_s.shape[3]) * temperature)
                pt, ps = torch.softmax(st, 0), torch.softmax(ss, 0)
                total += float((pt * (pt.log() - ps.log())).sum())
                rows += 1
    return total / rows


def naive_logit_kl(z_s, z_t, temperature=1.0, skip=None) -> float:
    """T^2 * mean over kept rows of KL(softmax(z_t / T) || softmax(z_s / T)), row by row."""
    z_s, z_t = z_s.reshape(-1, z_s.shape[-1]).double(), z_t.reshape(-1, z_t.shape[-1]).double()
    skip = None if skip is None else skip.reshape(-1)
    total, rows = 0.0, 0
    for i in range(z_s.shape[0]):
        if skip is not None and bool(skip[i]):
            continue
        pt, ps = torch.softmax(z_t[i] / temperature, 0), torch.softmax(z_s[i] / temperature, 0)
        total += float((pt * (pt.log() - ps.log())).sum())
        rows += 1
    return temperature**2 * total / rows


# --------------------------------------------------------------------------- probes and plumbing


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


def evenly(n_src: int, n_dst: int) -> list[int]:
    """`n_dst` evenly spaced indices of range(n_src), first and last included, in plain integers: the
    independent reference for weight selection (dlip_ds.models.select)."""
    return [round(i * (n_src - 1) / (n_dst - 1)) for i in range(n_dst)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(d: Path, words: list[str]) -> Path:
    """`d/vocab.txt`: BERT's five special tokens (ids 0-4), then `words` (ids 5, 6, ...). Returns `d`."""
    (d / "vocab.txt").write_text("\n".join([*BERT_SPECIALS, *words]) + "\n")
    return d


def salesforce_vision_key(key: str) -> str:
    """transformers' BLIP vision names -> Salesforce `visual_encoder` names (the official conversion, inverted)."""
    for hf, sf in (("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
                   ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
                   ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
                   ("vision_model.post_layernorm", "visual_encoder.norm"),
                   ("vision_model.encoder.layers", "visual_encoder.blocks"),
                   ("self_attn.projection", "attn.proj"), ("self_attn.qkv", "attn.qkv"),
                   ("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
        key = key.replace(hf, sf)
    return key


def make_engine_assets(root, *, train: int):
    """Synthetic shards (32 px) under root/synth, their tokenizer, and a tiny teacher in the export
    format under root/teacher: what the training-run tests start from."""
    import torch

    from dlip_ds.data import load_tokenizer
    from dlip_ds.data.synth import synth
    from dlip_ds.models.dlip_format import save_model
    from dlip_ds.models.load import load_model

    synth(root / "synth", train=train, test=8, image_size=32, shard_size=16)
    tokenizer = load_tokenizer(root / "synth" / "tokenizer")
    torch.manual_seed(0)
    save_model(load_model("test-tiny", text={"vocab_size": len(tokenizer)}), root / "teacher", tokenizer)
    return root


def perturbed(module, seed: int, scale: float = 0.1):
    """Random weights everywhere (LayerNorm gains and biases included), so nothing passes by symmetry."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()
