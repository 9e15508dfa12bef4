"""Cross-attention maps of chosen words (Pick-and-Draw §3.1): softmax(QKᵀ/√d) columns, head-averaged,
min-max normalised per layer.

Patches receive q and k already projected, heads not split: ``[B, N, heads * dim_head]``.
"""
from __future__ import annotations

import torch


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """A = softmax(Q Kᵀ / √d) per head, in fp32: ``[B, heads, Nq, Nk]`` (P&D §3.1, the attention map)."""
    qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)
    return torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, dim=-1)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention output A V, heads merged back: ``[B, Nq, heads * dim_head]``."""
    out = probs @ split_heads(v.float(), probs.shape[1])
    return out.transpose(1, 2).flatten(2).to(v.dtype)


def expand_positions(positions: tuple[int, ...], context_len: int, prompt_len: int) -> list[int]:
    """Token columns of a word in a context of ``context_len`` tokens.

    The host repeats a shorter context to the lcm length when it batches conds of different lengths
    (host notes §2.7), so a word's columns recur every ``prompt_len`` tokens; its attention mass is
    then split across the copies and is summed back here.
    """
    if context_len % prompt_len or max(positions) >= context_len:
        raise ValueError(
            f"the sampler's conditioning has {context_len} tokens, which does not fit the prompt given to "
            f"the capture ({prompt_len} tokens): give the capture node the same prompt text as the "
            "positive conditioning."
        )
    return [p + r * prompt_len for r in range(context_len // prompt_len) for p in positions]


def word_maps(probs: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
    """Each word's attention (sum over its token columns, index tensors on ``probs``' device), averaged over
    heads: ``[B, W, Nq]``."""
    per_word = [probs.index_select(-1, cols).sum(-1) for cols in columns]
    return torch.stack(per_word, dim=1).mean(dim=2)


def minmax_normalise(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Â = (A − min) / (max − min) over the spatial (last) dimension, per map (P&D §3.1)."""
    lo = maps.amin(dim=-1, keepdim=True)
    hi = maps.amax(dim=-1, keepdim=True)
    return (maps - lo) / (hi - lo + eps)


def to_grid(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Row-major tokens back to the feature map: ``[..., H*W] -> [..., H, W]`` (host notes §1.3)."""
    return maps.reshape(*maps.shape[:-1], height, width)
