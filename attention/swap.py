"""Layout-and-Retouch's multi-source self-attention swap (Algorithm 1) as patch callables.

The paths run as one batch ``[reference, layout, target]`` per CFG chunk (the host stacks a
chunk per cond/uncond: ``cond_or_uncond``). From step λ2+1 the target's self-attention keeps its
own queries and takes keys and values from the reference path of the same chunk (MasaCtrl-style);
from the blend start its self-attention output φ_t is blended with the layout's φ_o through the
adaptive mask: φ* = M ⊙ φ_t + (1 − M) ⊙ φ_o. As in ``capture.py``, the host's attention function
and any patch already on the layer are passed in, so other packs keep working.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..guidance.masks import blend_self_attention, tokens_from_mask

REFERENCE, LAYOUT, TARGET = 0, 1, 2
PATHS = 3


@dataclass
class SwapState:
    """What the patches do in the current forward; set by the stage-2 loop, never deep-copied."""
    swap: bool = False                 # target takes the reference's self-attention K, V
    mask: torch.Tensor | None = None   # [1, H, W] blend mask M at latent resolution; None: no blend
    _tokens: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        return self

    def set_mask(self, mask):
        self.mask, self._tokens = mask, {}

    def mask_tokens(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """M resized to one layer's feature map, as token rows ``[1, h·w, 1]`` on ``like``'s device and dtype.

        Cached per size, device and dtype: a copy from the CPU to the GPU at every call would wait for the
        GPU's queue (one stall per blend layer and pass).
        """
        key = (height, width, like.device, like.dtype)
        if key not in self._tokens:
            with torch.inference_mode(False):   # a normal tensor, whichever mode the first pass ran in
                self._tokens[key] = tokens_from_mask(self.mask, (height, width)).to(like, copy=True)
        return self._tokens[key]


def _paths(t: torch.Tensor, chunks: int) -> torch.Tensor | None:
    """``[chunks·3·b, N, C] -> [chunks, 3, b, N, C]``; None when this batch has no target path."""
    per_chunk = t.shape[0] // chunks
    if per_chunk % PATHS:
        return None
    return t.reshape(chunks, PATHS, per_chunk // PATHS, *t.shape[1:])


def reference_kv(k: torch.Tensor, v: torch.Tensor, chunks: int):
    """Algorithm 1, steps > λ2: the target's K^s, V^s replaced by the reference's, chunk by chunk."""
    kp, vp = _paths(k, chunks), _paths(v, chunks)
    if kp is None:
        return k, v
    kp, vp = kp.clone(), vp.clone()
    kp[:, TARGET], vp[:, TARGET] = kp[:, REFERENCE], vp[:, REFERENCE]
    return kp.reshape(k.shape), vp.reshape(v.shape)


def self_attention_swap_patch(state: SwapState, attention, previous=None):
    """attn1 *replace* ``(q, k, v, extra_options) -> out`` on a swap layer."""
    def patch(q, k, v, extra_options):
        if state.swap:
            k, v = reference_kv(k, v, len(extra_options["cond_or_uncond"]))
        if previous is not None:
            return previous(q, k, v, extra_options)
        return attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                         transformer_options=extra_options)
    return patch


def blend_output_patch(keys: set, state: SwapState):
    """attn1 *output patch* ``(out, extra_options) -> out``: φ* = M ⊙ φ_t + (1 − M) ⊙ φ_o (L&R §2.3)."""
    def patch(out, extra_options):
        block = extra_options.get("block")
        if state.mask is None or block is None or (block[0], block[1], extra_options.get("block_index", 0)) not in keys:
            return out
        paths = _paths(out, len(extra_options["cond_or_uncond"]))
        if paths is None:
            return out
        height, width = extra_options["activations_shape"][-2:]
        blended = paths.clone()
        blended[:, TARGET] = blend_self_attention(paths[:, TARGET], paths[:, LAYOUT],
                                                  state.mask_tokens(height, width, out))
        return blended.reshape(out.shape)
    return patch
