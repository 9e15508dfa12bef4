"""Loops this pack owns, run inside the host's own sampling machinery.

The host loads the model (also under --lowvram), processes conds (SDXL's pooled and size
embeddings, hooks, areas), applies LoRA/weight patches, scales latents and sets up and cleans up
patches only inside ``CFGGuider.sample``. :func:`run_loop` runs a function of ours in exactly that
context by handing the guider a KSAMPLER whose sampler function is ours; :class:`Loop` is what
that function can call while the model is loaded.

Gradient passes (P&D's guidance gradient, null-text inversion's null embedding, PALP's LoRA and
token) run inside :func:`grad_enabled` on a :func:`gradient_model` clone. Only what a node trains
gets gradients; the caller's weights are read where they lie:

- Weights: nodes run under ``torch.inference_mode()``, so a loaded model's weights are inference
  tensors, which autograd refuses to save for backward. For the span of each gradient pass the UNet's
  (and any ControlNet's) inference parameters are swapped for plain tensors over the same memory
  (:func:`readable_weights`): no copy, no ``requires_grad``, so nothing flows back to them and a pass
  without gradient runs the model untouched. A loop that loads no other model on its way (null-text
  inversion, the Pick-and-Draw sampler) holds the aliases for the whole loop instead; its passes without gradient then read the
  same memory through them, with the same result bit for bit.
- Precision: a gradient pass computes in fp32 whatever the weights' dtype (the host's manual cast,
  host notes §3.3): P&D's per-element gradients (~1e-5–1e-6) are subnormal or zero in fp16, and
  bf16 keeps 8 bits of the direction. A clone given an explicit ``compute_dtype`` computes every
  pass in it instead (NTI: fp32; PALP: its ``precision``); a model that already computes in it is left
  as it is (the host's forced per-layer cast would only cost time). Null-text inversion's loop casts
  half-precision weights once instead of at every layer of every pass (:func:`weights_cast_once`).
- Attention: a kernel without a backward (flash attention, SageAttention, xformers) is replaced by
  the host's PyTorch attention for gradient passes, through the host's
  ``optimized_attention_override``; a kernel that still returns a cut graph is refused by name.
- Other packs' patches (FreeU_V2, IPAdapter-style attention replaces …) run on copies of their
  inputs with what they save for backward copied, so their in-place writes cannot invalidate the
  graph ("modified by an inplace operation").
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch

import comfy.conds
import comfy.ldm.modules.attention as host_attention
import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

GRADIENT_PASS_KEY = "comfyui-personalize.gradient_pass"
# transformer_options entry of a gradient pass: block -> the context that block's recomputation runs in
RECOMPUTE_KEY = "comfyui-personalize.recompute_context"
HALF = (torch.float16, torch.bfloat16)
# the host's kernels that have a backward; any other is replaced by PyTorch's (SDPA) in gradient passes
_WITH_BACKWARD = {getattr(f, "__wrapped__", f) for f in (host_attention.attention_basic, host_attention.attention_sub_quad,
                                                         host_attention.attention_split, host_attention.attention_pytorch)}
NO_BACKWARD = ("Attention returned no gradient (another node's attention override, or a kernel without a backward), "
               "and this node differentiates through the UNet: start ComfyUI with --use-pytorch-cross-attention "
               "(not --use-sage-attention, --use-flash-attention or xformers), or remove the node that overrides "
               "attention from this model's chain.")


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor over ``tensor``'s memory: no copy, outside any graph (``requires_grad`` False), also
    when made inside inference mode."""
    with torch.inference_mode(False):
        return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
            tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _needs_alias(tensor) -> bool:
    # exact types only: a quantized subclass (GGUF, …) makes fresh tensors in its own cast path
    return type(tensor) in (torch.Tensor, torch.nn.Parameter) and (tensor.is_inference() or tensor.requires_grad)


_HELD = set()  # ids of the modules (submodules too) an enclosing readable_weights block holds: nested blocks skip them


@contextlib.contextmanager
def readable_weights(modules):
    """Inside, the modules' inference (or grad-requiring) parameters and buffers are aliases: plain
    tensors over the same memory that autograd may save, and that never receive a gradient.

    Held for one pass (the host may move weights between passes, e.g. when a text encoder is loaded), or
    around a whole loop that loads no other model on its way (null-text inversion, the P&D sampler): the
    gradient passes inside then skip their own swap (two walks over every parameter per pass, Python time
    that showed on a small UNet), and so do the blocks that gradient checkpointing recomputes in backward;
    the passes without gradient read the same memory, with the same result bit for bit. A graph built
    inside keeps the aliases, so its backward may run after the block.
    """
    modules = [m for m in modules if id(m) not in _HELD]
    swapped, held = [], set()
    try:
        for module in modules:
            for sub in module.modules():
                if id(sub) in _HELD or id(sub) in held:
                    continue
                held.add(id(sub))
                for table in (sub._parameters, sub._buffers):
                    for name, tensor in list(table.items()):
                        if tensor is not None and _needs_alias(tensor):
                            table[name] = _alias(tensor)
                            swapped.append((table, name, tensor))
        _HELD.update(held)
        yield
    finally:
        for table, name, tensor in reversed(swapped):
            table[name] = tensor
        _HELD.difference_update(held)


# the host's layers whose cast path is ``cast_bias_weight`` of the stored weight and bias and nothing else (not fp8's)
_PLAIN_CASTS = {getattr(comfy.ops.disable_weight_init, name).forward_comfy_cast_weights
                for name in ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm")}


def _fits(size: int, device) -> bool:
    return comfy.model_management.get_free_memory(device) >= size


@contextlib.contextmanager
def weights_cast_once(patcher, device):
    """Inside, the UNet's layers that the host's manual cast casts at every pass (weights stored in another
    dtype than the model computes in: null-text inversion's fp32 passes on fp16 weights) store that cast,
    made once, so the host's per-layer cast finds the dtype it wants and copies nothing.

    For a loop of gradient passes that loads no other model, inside its ``readable_weights``. The host's own
    cast path still runs, so an input of another dtype still gets its cast, from a value that converts back
    exactly: every pass gives the same result bit for bit. What it saves per layer and pass is two kernel
    launches and two allocations, which a fast GPU's short passes do not hide. Memory: a gradient pass of
    the per-layer path keeps nearly every layer's cast for its backward anyway, so the peak barely moves;
    the casts are only held between passes. Skipped when the copies do not fit in free memory, and when
    hooks (``comfy.hooks``) patch weights during sampling. Left to the host: layers it streams from another
    device (--lowvram), patches at each forward (weight functions), or computes otherwise (fp8 and other ops).
    """
    base_model = patcher.model
    dtype = base_model.manual_cast_dtype
    # the passes switch every cast layer's cast path on (gradient_model), so each layer stored in another dtype
    # is cast at every pass
    layers = [] if dtype is None or getattr(patcher, "hook_patches", None) else [
        m for m in base_model.diffusion_model.modules()
        if getattr(type(m), "forward_comfy_cast_weights", None) in _PLAIN_CASTS
        and not m.weight_function and not m.bias_function
        and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device == device
                for t in m._parameters.values() if t is not None)
        and any(t.dtype != dtype for t in m._parameters.values() if t is not None)]
    size = sum(t.numel() * dtype.itemsize for m in layers for t in m._parameters.values() if t is not None)
    if layers and not _fits(size, device):
        layers = []
    saved = [(m, dict(m._parameters)) for m in layers]
    try:
        with torch.inference_mode(False), torch.no_grad():
            for m in layers:
                for name, tensor in m._parameters.items():
                    if tensor is not None:
                        m._parameters[name] = (_alias(tensor) if tensor.is_inference() else tensor).to(dtype)
        yield
    finally:
        for m, parameters in saved:
            m._parameters.update(parameters)


class _ReadableInference(torch.overrides.TorchFunctionMode):
    """Every inference tensor an op receives becomes an alias (for code we do not own, e.g. a patch's
    own weights or masks made at node time); per-op Python cost, so only around small calls."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args = tuple(_alias(a) if _needs_alias(a) and a.is_inference() else a for a in args)
        return func(*args, **(kwargs or {}))


class _MathAttention(torch.overrides.TorchFunctionMode):
    """PyTorch's attention (SDPA) with a mask runs its math kernel: no fused kernel's layout constraints."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and not kwargs.get("dropout_p"):
            return torch.ops.aten._scaled_dot_product_attention_math(*args, **kwargs)[0]
        return func(*args, **kwargs)


def math_attention():
    """Inside, every SDPA call computes with the math kernel. For a text encoder differentiated for a learned
    token (PALP): CUDA's memory-efficient kernel, which the host picks for CLIP's 77×77 causal mask, refuses
    that mask in backward (its stride must be a multiple of 4), and the host sets its own kernel priority
    around each call, so ``torch.nn.attention.sdpa_kernel`` cannot choose; 77 tokens cost the math kernel
    nothing."""
    return _MathAttention()


def _autograd_safe(patch):
    """``patch`` on copies of its tensor inputs, with what it saves for backward copied too: an in-place
    write (FreeU_V2's ``h[:, :n] = …``) then touches nothing autograd holds.

    This pack's own patches (``attention/capture.py``) write nothing in place and say so with a
    ``with_chained(wrap)`` method, which returns the patch with only the patches it chains wrapped: their
    saved tensors are not copied, so a checkpointed block drops them and recomputes them in backward.
    """
    if not callable(patch):
        return patch
    if hasattr(patch, "with_chained"):
        return patch.with_chained(_autograd_safe)

    def run(*args, **kwargs):
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        with _ReadableInference(), torch.autograd.graph.saved_tensors_hooks(torch.clone, _unpack):
            out = patch(*args, **kwargs)
        if _requires_grad(args) and not _requires_grad(out if isinstance(out, (tuple, list)) else (out,)):
            raise ValueError(f"another node's model patch ({getattr(patch, '__qualname__', type(patch).__name__)}) "
                             "returned no gradient, and this node differentiates through the UNet: remove that node "
                             "from this model's chain (if it computes attention, starting ComfyUI with "
                             "--use-pytorch-cross-attention may be enough).")
        return out
    return run


def _requires_grad(values) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _unpack(saved):
    return saved


def _safe_entry(entry):
    # forward_timestep_embed_patch entries are (module class, handler) pairs
    if isinstance(entry, tuple):
        return tuple(_autograd_safe(e) for e in entry)
    return _autograd_safe(entry)


def _attention_with_backward(previous):
    """The host's ``optimized_attention_override`` for gradient passes (host attention.py ``wrap_attn``)."""
    def override(func, *args, **kwargs):
        if func not in _WITH_BACKWARD:
            func = host_attention.attention_pytorch.__wrapped__
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        if not out.requires_grad and _requires_grad(args[:3]):
            raise ValueError(NO_BACKWARD)
        return out
    return override


def _fresh_activation(h, transformer_options):
    return h.clone()


def _gradient_options(model_options: dict, controlled: bool) -> dict:
    """``model_options`` for one gradient pass: attention with a backward, other packs' patches autograd-safe.

    ``controlled`` (a ControlNet in the conds): the host adds ControlNet residuals to the skip connections in
    place (``apply_control``: ``h += ctrl``) after the next block has saved them for backward; the blocks
    then read a copy (an ``input_block_patch_after_skip``), and the in-place add touches only the skip.
    """
    options = dict(model_options.get("transformer_options", {}))
    options["patches"] = {name: [_safe_entry(p) for p in entries] for name, entries in options.get("patches", {}).items()}
    if controlled:
        after_skip = options["patches"].get("input_block_patch_after_skip", [])
        options["patches"]["input_block_patch_after_skip"] = after_skip + [_fresh_activation]
    options["patches_replace"] = {name: {key: _autograd_safe(p) for key, p in replaces.items()}
                                  for name, replaces in options.get("patches_replace", {}).items()}
    options["optimized_attention_override"] = _attention_with_backward(options.get("optimized_attention_override"))
    return {**model_options, "transformer_options": options}


_CAST_LAYERS = weakref.WeakKeyDictionary()


def _cast_layers(module) -> list:
    """The host's cast layers in ``module``, found once per module (a gradient pass and each checkpointed block's
    recomputation ask again)."""
    if module not in _CAST_LAYERS:
        _CAST_LAYERS[module] = [m for m in module.modules() if isinstance(m, comfy.ops.CastWeightBiasOp)]
    return _CAST_LAYERS[module]


@contextlib.contextmanager
def _computing_in(base_model, dtype, module=None):
    """The UNet (or one ``module`` of it) computes in ``dtype`` (the host's manual cast: weights cast per
    layer) for one pass."""
    layers = _cast_layers(module or base_model.diffusion_model)
    saved = base_model.manual_cast_dtype, [m.comfy_cast_weights for m in layers]
    base_model.manual_cast_dtype = dtype
    for m in layers:
        m.comfy_cast_weights = True
    try:
        yield
    finally:
        base_model.manual_cast_dtype = saved[0]
        for m, flag in zip(layers, saved[1]):
            m.comfy_cast_weights = flag


def _control_models(conds) -> list:
    found = []
    for entries in conds:
        for entry in entries or []:
            control = entry.get("control")
            if control is not None:
                found += [patcher.model for patcher in control.get_models()]
    return found


@contextlib.contextmanager
def _pass_context(base_model, dtype, readable, cast=None):
    """A gradient pass's context: the ``readable`` modules' weights read in place, and ``cast`` (default: the
    whole UNet) computing in ``dtype`` (None: as stored). Also one UNet block's, for its recomputation in
    backward (gradient checkpointing, ``checkpointing.py``)."""
    precision = _computing_in(base_model, dtype, cast) if dtype is not None else contextlib.nullcontext()
    with readable_weights(readable), precision:
        yield


def _gradient_pass(executor, model, conds, x_in, timestep, model_options, upcast=True, compute_dtype=None):
    """CALC_COND_BATCH wrapper: every pass computes in ``compute_dtype`` if given; under grad, the pass reads the
    loaded weights (UNet and ControlNets) without copying them, in fp32 if they are half precision (``upcast``),
    with attention and patches that back-propagate."""
    if not torch.is_grad_enabled():
        if compute_dtype is None:
            return executor(model, conds, x_in, timestep, model_options)
        with _computing_in(model, compute_dtype):
            return executor(model, conds, x_in, timestep, model_options)
    dtype = compute_dtype or (torch.float32 if upcast and (model.manual_cast_dtype or model.get_dtype()) in HALF
                              else None)
    controls = _control_models(conds)
    options = _gradient_options(model_options, bool(controls))
    options["transformer_options"][RECOMPUTE_KEY] = lambda block: _pass_context(model, dtype, [block], block)
    with _pass_context(model, dtype, [model.diffusion_model, *controls]):
        return executor(model, conds, x_in, timestep, options)


def gradient_model(model, compute_dtype=None):
    """A clone of a MODEL ready for gradient passes (this module's docstring); passes without gradient read
    the model's own weights with no copy (bit for bit the model's own result unless ``compute_dtype`` is given).

    ``compute_dtype`` makes every pass compute in that dtype (e.g. fp32 for null-text inversion, whose small
    optimisation steps vanish in fp16); without it only gradient passes compute in fp32, and only when
    the model computes in half precision.
    """
    patched = model.clone()
    upcast = compute_dtype is None
    if compute_dtype is not None and _computes_in(model, compute_dtype):
        compute_dtype = None
    if compute_dtype is not None:
        # The dtype as an object patch (the host's memory estimate and input casts read it) and the host's cast
        # path switched on per pass (``_gradient_pass``): the host's set_model_compute_dtype forces that path at
        # load and leaves its flags on the modules every clone shares, and a later partial (--lowvram) load of the
        # model then skips those modules, LoRA patches and all.
        patched.add_object_patch("manual_cast_dtype", compute_dtype)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, GRADIENT_PASS_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, GRADIENT_PASS_KEY,
                                 functools.partial(_gradient_pass, upcast=upcast, compute_dtype=compute_dtype))
    return patched


def _computes_in(model, dtype) -> bool:
    """The model already computes in ``dtype`` without a manual cast: weights stored in it, none cast.

    Forcing the host's cast path on every layer would then only cost time (``cast_bias_weight`` per forward, a
    no-op cast here), with the same result bit for bit.
    """
    return model.get_model_object("manual_cast_dtype") is None and model.model_dtype() == dtype


def _detached(weight):
    # the host hands wrappers a fresh copy of the weight (cast_to(copy=True)); detached, no gradient
    # reaches the stored weight
    return weight.detach()


def fresh_weights(patcher):
    """A clone whose every weight reaches the forward as a detached copy (the host's weight-wrapper path).

    For a text encoder differentiated for a learned token (PALP): it is small next to the UNet, and
    wrappers act at each forward, so the host may load or move it between encodes.
    """
    patched = patcher.clone()
    for name, module in patched.model.named_modules():
        if hasattr(module, "weight_function"):
            for param in ("weight", "bias"):
                if getattr(module, param, None) is not None:
                    patched.add_weight_wrapper(f"{name}.{param}", _detached)
    return patched


@contextlib.contextmanager
def grad_enabled():
    """Leave the executor's inference mode for a gradient pass."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def check_interrupt():
    comfy.model_management.throw_exception_if_processing_interrupted()


def progress(total: int):
    """``on_step(done, total)`` for the core's loops: a progress bar that also honours Cancel."""
    bar = comfy.utils.ProgressBar(total)

    def on_step(done, _total=None):
        check_interrupt()
        bar.update_absolute(done, total)

    return on_step


def _with_context(model, cond: dict, x: torch.Tensor, branch: str, context: torch.Tensor, pooled=None) -> dict:
    """A processed cond entry re-encoded for another prompt: ``context`` and, where given, its ``pooled`` vector.

    The host's own ``extra_conds`` rebuilds the prompt's model inputs from them, as ``process_conds`` did
    for the entry: ``c_crossattn`` and, on SDXL, ``y`` with this prompt's pooled vector beside the entry's
    size embeddings (width, height, crop), so a prompt never runs under another prompt's global embedding
    (PALP's y_P branches). Every other input (e.g. an inpainting model's concat) stays as processed.
    Without ``pooled`` the entry's own pooled vector stays (null-text inversion optimises only the context).
    """
    if pooled is None:      # only the context changes (null-text inversion, every inner step): no re-encoding
        return {**cond, "model_conds": {**cond["model_conds"], "c_crossattn": comfy.conds.CONDCrossAttn(context)}}
    entry = {**cond, "cross_attn": context, "pooled_output": pooled}
    encoded = comfy.samplers.encode_model_conds(model.extra_conds, [entry], x, x.device, branch)[0]["model_conds"]
    prompt_inputs = {k: encoded[k] for k in ("c_crossattn", "y") if k in encoded}
    return {**cond, "model_conds": {**cond["model_conds"], **prompt_inputs}}


class Loop:
    """Calls into the loaded model from inside a sampler function (the guider's processed conds)."""

    def __init__(self, model_k, extra_args, callback):
        self.model_k = model_k
        self.guider = model_k.inner_model
        self.extra_args = extra_args
        self.callback = callback

    @property
    def base_model(self):
        return self.guider.inner_model

    def context(self, branch: str = "positive") -> torch.Tensor:
        """The cross-attention context of a branch's first cond entry (e.g. the empty prompt's)."""
        return self.guider.conds[branch][0]["model_conds"]["c_crossattn"].cond

    def cfg_denoise(self, x, sigma):
        """The CFG-combined x0 prediction, exactly as the host's samplers call the model."""
        return self.model_k(x, sigma * x.new_ones([x.shape[0]]), **self.extra_args)

    def denoise(self, x, sigma, branch="positive", context=None, model_options=None, pooled=None, entries=None):
        """One branch's x0 prediction (of its processed ``entries``, default all); ``context`` (and ``pooled``)
        replace its prompt's embeddings."""
        conds = self.guider.conds[branch] if entries is None else entries
        if context is not None:
            conds = [_with_context(self.base_model, c, x, branch, context, pooled) for c in conds]
        sigma_vec = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(1).expand(x.shape[0])
        return comfy.samplers.calc_cond_batch(self.base_model, [conds], x, sigma_vec,
                                              model_options or self.extra_args["model_options"])[0]


def run_loop(model, positive, negative, latent, sigmas, fn, noise=None, cfg=1.0, seed=0):
    """Run ``fn(loop, x, sigmas) -> (x_out, result)`` inside ``CFGGuider.sample``; returns ``(latent_out, result)``.

    ``latent`` is a LATENT's samples (unscaled); ``fn`` sees it scaled into the model's space plus
    ``noise`` at ``sigmas[0]`` (zero noise: the clean latent, as an inversion needs).
    """
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    holder = {}

    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        x_out, holder["result"] = fn(Loop(model_k, extra_args, callback), x, sigmas)
        return x_out

    sampler = comfy.samplers.KSAMPLER(sampler_function)
    noise = torch.zeros_like(latent) if noise is None else noise
    out = guider.sample(noise, latent, sampler, sigmas, seed=seed, disable_pbar=True)
    # where the host's samplers return a LATENT (comfy.sample.sample*), so it meets other nodes' tensors there
    return out.to(comfy.model_management.intermediate_device()), holder["result"]
