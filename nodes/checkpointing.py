"""Gradient checkpointing (Chen et al. 2016, "Training deep nets with sublinear memory cost") of the
host's SD1.x / SDXL UNet, installed on one ModelPatcher clone.

Why not the host's own flags: ``UNetModel``'s ResBlocks take ``use_checkpoint``, but it is an attribute
of modules every clone shares, its ``CheckpointFunction`` differentiates only w.r.t.
``module.parameters()`` (so a LoRA reaching the forward through weight wrappers would get no
gradient), and transformer blocks have no checkpointing at all.

What this does instead: a DIFFUSION_MODEL wrapper (the host's hook for replacing the diffusion
model's forward on one patcher) runs ``UNetModel._forward``'s block sequence itself and passes each
block through ``torch.utils.checkpoint`` (non-reentrant, which differentiates w.r.t. whatever the
recomputation reads, wrapped weights included). Only block inputs and outputs are kept for backward;
everything inside a block is recomputed. Each block still runs through the host's
``forward_timestep_embed``, with the host's emb/block patches and ControlNet residuals applied between
blocks where ``_forward`` applies them, so outputs are bit-identical to the unwrapped forward.

Patches inside a block (attention replaces, weight wrappers) run twice under gradient: once forward,
once in backward's recomputation. The recomputation may run after the gradient pass has ended, so each
block re-enters the pass's own context for it (``sampling.RECOMPUTE_KEY``: the loaded weights read
through ``sampling.readable_weights``, no copy, no gradient; fp32 compute on a half-precision model),
and the recomputed block computes exactly what the first run did.

Checkpointing every block costs one more forward of each block per backward. A pass may keep some blocks
whole (``keep``): on its first run at an input size every block is checkpointed and the activations each
block makes are counted (the outputs of its leaf modules, bytes); from then on the smallest blocks are kept
whole while their sum stays within ``keep`` times the largest block's. A checkpointed pass holds one
block's recomputed activations at its peak anyway (at least the largest one's while that block's backward
runs), so the peak grows by at most that fraction of it, and the small blocks kept whole are those at the
coarse levels, where the compute per activation byte is highest (1280 channels on SD1.5 and SDXL).

A pass that needs only what some layers record (P&D's guidance gradient reads maps and features, never
the UNet's output) may name the last block it needs (``STOP_AFTER_KEY``): the forward ends there and
returns zeros as the (unused) output.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.utils.checkpoint

import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules import openaimodel

from .host import WRAPPER_KEY
from .sampling import RECOMPUTE_KEY, readable_weights

KEY = "comfyui-personalize.gradient_checkpointing"
# the prefixes of the wrapper keys this pack installs (host.py's capture and sampler checks use the second)
PACK_KEYS = ("comfyui-personalize.", WRAPPER_KEY)
# transformer_options entry: ("input" | "middle" | "output", index) of the last block a pass needs
STOP_AFTER_KEY = "comfyui-personalize.stop_after_block"

log = logging.getLogger(__name__)


def _block_function(block, options: dict, block_id: tuple, transformer_index: int, output_shape):
    def run(h, emb, context):
        # a private copy of the options, so backward's recomputation sees the block and transformer
        # index of the first run (forward_timestep_embed advances the index in place)
        private = {**options, "block": block_id, "transformer_index": transformer_index}
        return openaimodel.forward_timestep_embed(block, h, emb, context, private, output_shape)
    return run


class _EachEntry:
    """A context manager made anew by ``make()`` at every entry: backward recomputes a block once per
    ``autograd.grad`` call (P&D differentiates each active term separately), and the checkpoint keeps
    the one object ``context_fn`` returned for all of them."""

    def __init__(self, make):
        self._make, self._open = make, []

    def __enter__(self):
        self._open.append(self._make())
        return self._open[-1].__enter__()

    def __exit__(self, *exc):
        return self._open.pop().__exit__(*exc)


def _recompute_context(options: dict, block):
    """``context_fn`` of ``torch.utils.checkpoint``: the first run is inside the pass already; each
    recomputation re-enters the pass's context for this block (a pass that gave none: weights readable)."""
    recompute = options.get(RECOMPUTE_KEY) or (lambda module: readable_weights([module]))
    return contextlib.nullcontext(), _EachEntry(lambda: recompute(block))


def _reproducible(unet, kwargs, options) -> bool:
    """Whether the wrapper reproduces this call: an image UNet (SD1.x/SDXL), no video inputs, and no other
    DIFFUSION_MODEL wrapper (one inside this one would be skipped, one outside would see a stopped pass's zeros)."""
    others = [key for key in options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})
              if key != KEY]
    return (isinstance(unet, openaimodel.UNetModel) and not kwargs and not unet.use_temporal_resblocks
            and not unet.predict_codebook_ids and not others)


@functools.cache
def _warn_unsupported(model_name: str) -> None:
    log.warning("the block-wise UNet forward (gradient checkpointing, P&D's early end) runs on SD1.x/SDXL image UNets "
                "with no other pack's DIFFUSION_MODEL wrapper; %s runs its own forward whole (more memory)", model_name)


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for t in output if isinstance(t, torch.Tensor)] if isinstance(output, (tuple, list)) else []


@contextlib.contextmanager
def _counting_activations(sizes: dict, block_id: tuple):
    """Adds to ``sizes[block_id]`` the bytes of every leaf module's output while the block runs (a proxy, in
    proportion across blocks, for what its forward keeps for backward)."""
    def count(module, args, output):
        if next(module.children(), None) is None:
            sizes[block_id] = sizes.get(block_id, 0) + sum(t.numel() * t.element_size() for t in _tensors(output))
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()


def kept_whole(sizes: dict, keep: float) -> set:
    """The blocks a checkpointed pass keeps whole: the smallest, while their sum stays ≤ ``keep`` × the largest."""
    budget, total, kept = keep * max(sizes.values(), default=0), 0, set()
    for block_id, size in sorted(sizes.items(), key=lambda item: item[1]):
        if total + size > budget:
            break
        total += size
        kept.add(block_id)
    return kept


def blockwise_unet(executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                   checkpoint=True, keep=0.0, plans=None, **kwargs):
    """The DIFFUSION_MODEL wrapper: ``UNetModel._forward`` block by block under grad, each block
    checkpointed (``checkpoint``) but those ``kept_whole`` by ``keep`` (``plans``: per input size, the blocks
    kept whole; the first pass at a size checkpoints all and counts), ending after the block
    ``STOP_AFTER_KEY`` names, if any."""
    unet = executor.class_obj
    if not torch.is_grad_enabled():
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    if not _reproducible(unet, kwargs, transformer_options):
        _warn_unsupported(type(unet).__name__)
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    options = transformer_options
    stop = options.get(STOP_AFTER_KEY)
    plan_key = (tuple(x.shape), x.dtype, None if context is None else tuple(context.shape), stop)
    sizes = {} if checkpoint and keep > 0 and plan_key not in plans else None   # this pass counts
    whole = plans.get(plan_key, set()) if checkpoint and keep > 0 else set()
    options["original_shape"] = list(x.shape)
    options["transformer_index"] = 0
    patches = options.get("patches", {})
    emb = unet.time_embed(openaimodel.timestep_embedding(timesteps, unet.model_channels).to(x.dtype))
    for patch in patches.get("emb_patch", []):
        emb = patch(emb, unet.model_channels, options)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)

    def block(module, block_id, h, output_shape=None):
        options["block"] = block_id
        run = _block_function(module, options, block_id, options["transformer_index"], output_shape)
        if checkpoint and block_id not in whole:
            with _counting_activations(sizes, block_id) if sizes is not None else contextlib.nullcontext():
                h = torch.utils.checkpoint.checkpoint(run, h, emb, context, use_reentrant=False,
                                                      context_fn=functools.partial(_recompute_context, options, module))
        else:
            h = run(h, emb, context)
        options["transformer_index"] += sum(isinstance(layer, SpatialTransformer) for layer in module)
        if block_id == stop:
            raise _Stopped
        return h

    try:
        h, skips = x, []
        for i, module in enumerate(unet.input_blocks):
            h = openaimodel.apply_control(block(module, ("input", i), h), control, "input")
            for patch in patches.get("input_block_patch", []):
                h = patch(h, options)
            skips.append(h)
            for patch in patches.get("input_block_patch_after_skip", []):
                h = patch(h, options)
        if unet.middle_block is not None:
            h = block(unet.middle_block, ("middle", 0), h)
        h = openaimodel.apply_control(h, control, "middle")
        for i, module in enumerate(unet.output_blocks):
            options["block"] = ("output", i)
            skip = openaimodel.apply_control(skips.pop(), control, "output")
            for patch in patches.get("output_block_patch", []):
                h, skip = patch(h, skip, options)
            h = block(module, ("output", i), torch.cat([h, skip], dim=1), skips[-1].shape if skips else None)
        out = unet.out(h.type(x.dtype))
    except _Stopped:
        out = x.new_zeros(x.shape[0], unet.out_channels, *x.shape[2:])
    if sizes is not None:
        plans[plan_key] = kept_whole(sizes, keep)
    return out


class _Stopped(Exception):
    """The block a pass needs last has run (``STOP_AFTER_KEY``)."""


def with_gradient_checkpointing(model, checkpoint: bool = True, keep: float = 0.0):
    """A clone of ``model`` whose UNet forward runs block by block whenever grad is enabled: each block
    checkpointed (``checkpoint``) but the smallest, kept whole within ``keep`` × the largest block's
    activations, and ending early for a pass that names its last block (``STOP_AFTER_KEY``)."""
    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY,
                                 functools.partial(blockwise_unet, checkpoint=checkpoint, keep=keep, plans={}))
    return patched


def block_order(block_id: tuple) -> tuple:
    """Sort key of a UNet block id in forward order: input blocks, the middle block, output blocks."""
    return ("input", "middle", "output").index(block_id[0]), block_id[1]


def may_stop_early(model_options: dict) -> bool:
    """Whether a pass whose output is unused may end early: no other pack's wrapper that would see its zeros as a
    prediction (a model_function_wrapper, an APPLY_MODEL / CALC_COND_BATCH / DIFFUSION_MODEL wrapper not this pack's)."""
    if model_options.get("model_function_wrapper") is not None:
        return False
    wrappers = model_options.get("transformer_options", {}).get("wrappers", {})
    kinds = (comfy.patcher_extension.WrappersMP.APPLY_MODEL, comfy.patcher_extension.WrappersMP.CALC_COND_BATCH,
             comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL)
    return all(key.startswith(PACK_KEYS) for kind in kinds for key in wrappers.get(kind, {}))
