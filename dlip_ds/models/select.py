"""Weight selection: a narrower student initialised from a wider teacher's tensors (Xu et al., 2024,
"Initializing Models with Larger Ones"). Each student tensor takes an evenly spaced subset of the
teacher's along every dimension that is smaller; whole attention heads are taken where the head size
matches, so every student head starts as one of the teacher's.

The subset of a dimension depends only on the two sizes, so a dimension of one meaning (the residual
width, the image width the cross-attention reads) is cut the same way in every tensor that has it:
the residual stream of the student is a sub-stream of the teacher's.
"""

from __future__ import annotations

import re

import torch

from dlip_ds.config import ConfigError

# (key pattern, dimension holding attention heads, how many equal blocks it stacks: 3 for a fused qkv)
_HEAD_DIMS = (
    (re.compile(r"attn\.qkv\.(weight|bias)$"), 0, 3),
    (re.compile(r"attn\.proj\.weight$"), 1, 1),
    (re.compile(r"(self_attn|cross_attn)(\.\d+)?\.(query|key|value)\.(weight|bias)$"), 0, 1),
    (re.compile(r"^(\d+\.)?(query|key|value)\.(weight|bias)$"), 0, 1),  # a decoder self-attention module
    (re.compile(r"(self_attn|cross_attn)(\.\d+)?\.out\.weight$"), 1, 1),
    (re.compile(r"^(\d+\.)?out\.weight$"), 1, 1),
)


def even(n_src: int, n_dst: int) -> torch.Tensor:
    """`n_dst` evenly spaced indices of `range(n_src)`, first and last included."""
    if n_dst > n_src:
        raise ConfigError(f"weight selection: cannot take {n_dst} of {n_src}")
    return torch.linspace(0, n_src - 1, n_dst).round().long()


def _head_index(n_src: int, n_dst: int, heads_src: int, heads_dst: int, blocks: int) -> torch.Tensor | None:
    """Whole heads, evenly spaced, in each of `blocks` stacked blocks; None when head sizes differ."""
    size_src, size_dst = n_src // (blocks * heads_src), n_dst // (blocks * heads_dst)
    if size_src != size_dst or n_src != blocks * heads_src * size_src or n_dst != blocks * heads_dst * size_dst:
        return None
    heads = even(heads_src, heads_dst)
    one = (heads[:, None] * size_src + torch.arange(size_src)).flatten()
    return torch.cat([one + b * heads_src * size_src for b in range(blocks)])


def select(key: str, src: torch.Tensor, shape: torch.Size, heads: tuple[int, int] | None = None) -> torch.Tensor:
    """`src` cut to `shape` (every dimension no larger); `heads` = (teacher heads, student heads) of the
    module the key belongs to, for whole-head selection."""
    if src.shape == shape:
        return src.clone()
    if src.dim() != len(shape) or any(d > s for d, s in zip(shape, src.shape)):
        raise ConfigError(f"weight selection: {key}: cannot cut {tuple(src.shape)} to {tuple(shape)}")
    out = src
    for dim, (n_src, n_dst) in enumerate(zip(src.shape, shape)):
        if n_src == n_dst:
            continue
        index = None
        if heads is not None:
            for pattern, head_dim, blocks in _HEAD_DIMS:
                if dim == head_dim and pattern.search(key):
                    index = _head_index(n_src, n_dst, *heads, blocks)
                    break
        out = out.index_select(dim, even(n_src, n_dst) if index is None else index)
    return out.contiguous()


def select_state(state: dict, own: dict, heads: tuple[int, int] | None = None) -> dict:
    """Every key of `own` (a student module's state dict) present in `state`, cut to the student's shape."""
    return {k: select(k, state[k], own[k].shape, heads) for k in own if k in state}
