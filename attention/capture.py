"""Patch callables that capture maps (P&D §3.1) and features Ψ (P&D §3.2) into an AttentionStore.

Each is one closure per layer, in the shape the host calls (host notes §1.2), and holds no host
import: the host's own attention function and any patch that was already on the layer are passed
in, so the image is produced exactly as without capture (the probabilities are computed beside the
host's kernel, not instead of it) and other packs' patches keep working (chained, never clobbered).
"""
from __future__ import annotations

from .layers import AttnLayer
from .maps import attend, attention_probs, minmax_normalise, to_grid, word_maps
from .store import AttentionStore


def cross_attention_patch(layer: AttnLayer, store: AttentionStore, attention, previous=None):
    """attn2 *replace* ``(q, k, v, extra_options) -> out`` that records Â of the watched words.

    ``attention(q, k, v, heads, attn_precision=..., transformer_options=...)`` is the host's kernel;
    ``previous`` an attn2 replace that was on this layer before (its output is used unchanged). When
    a gradient flows (a live pass, or a guidance pass through a recording capture) and there is no
    previous patch, the output is A·V from the same fp32 probabilities, so it is differentiable
    whatever kernel the host picked (flash attention has no backward).
    """
    def output(q, k, v, extra_options, probs=None):
        if previous is not None:
            return previous(q, k, v, extra_options)
        if probs is not None:
            return attend(probs, v)
        return attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                         transformer_options=extra_options)

    def patch(q, k, v, extra_options):
        if not store.active(extra_options):
            return output(q, k, v, extra_options)
        probs = attention_probs(q, k, extra_options["n_heads"])
        height, width = extra_options["activations_shape"][-2:]
        maps = minmax_normalise(word_maps(probs, store.columns(k.shape[1], k.device)))
        store.put("maps", layer.key, to_grid(maps, height, width), extra_options)
        return output(q, k, v, extra_options, probs if store.is_live or q.requires_grad else None)

    # gradient passes wrap other packs' patches against in-place writes (nodes/sampling.py); this one writes
    # nothing in place, so only the patch it chains is wrapped, and what it saves for backward stays recomputable
    patch.with_chained = lambda wrap: cross_attention_patch(layer, store, attention,
                                                            None if previous is None else wrap(previous))
    return patch


def feature_patch(layers: list[AttnLayer], store: AttentionStore):
    """attn2 *patch* ``(n, context, value, extra_options)`` recording Ψ_l, returning its inputs unchanged.

    Ψ_l is taken as the normalised hidden state entering layer l's cross-attention — the tensor its
    queries are projected from (the paper's "dense features"; methods.md §1.3 leaves the exact point
    open). Shape ``[B, h, w, C]``.
    """
    keys = {l.key for l in layers}

    def patch(n, context, value, extra_options):
        block = extra_options.get("block")
        if block is not None and (block[0], block[1], extra_options.get("block_index", 0)) in keys \
                and store.active(extra_options):
            height, width = extra_options["activations_shape"][-2:]
            store.put("features", (block[0], block[1], extra_options.get("block_index", 0)),
                      n.reshape(n.shape[0], height, width, n.shape[-1]), extra_options)
        return n, context, value

    patch.with_chained = lambda wrap: patch     # chains nothing, writes nothing in place
    return patch
