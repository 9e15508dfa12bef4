"""Loops this pack owns, run inside the host's own sampling machinery.

The host loads the model (also under --lowvram), processes conds (SDXL's pooled and size
embeddings, hooks, areas), applies LoRA/weight patches, scales latents and sets up and cleans up
patches only inside ``CFGGuider.sample``. :func:`run_loop` runs a function of ours in exactly that
context by handing the guider a KSAMPLER whose sampler function is ours; :class:`Loop` is what
that function can call while the model is loaded.

Gradients: nodes run under ``torch.inference_mode()``, and a loaded model's weights are inference
tensors, which autograd refuses to save for backward. :func:`fresh_weights` returns a clone whose
every weight and bias reaches the forward as a fresh copy (the host's weight-wrapper path, host
notes §3.2–3.3), so passes inside :func:`grad_enabled` can differentiate through the UNet.
"""
from __future__ import annotations

import contextlib

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils


def _fresh(tensor):
    # the host copies a weight before calling its wrappers; the copy is made outside inference
    # mode during a gradient pass, which is all that is needed
    return tensor


def fresh_weights(model, compute_dtype=None):
    """A clone whose weights are copied on every forward, so gradients can pass through them.

    ``compute_dtype`` (e.g. fp32 for null-text inversion) also makes the UNet compute in that dtype.
    """
    patched = model.clone()
    for name, module in patched.model.named_modules():
        if hasattr(module, "weight_function"):
            for param in ("weight", "bias"):
                if getattr(module, param, None) is not None:
                    patched.add_weight_wrapper(f"{name}.{param}", _fresh)
    if compute_dtype is not None:
        patched.set_model_compute_dtype(compute_dtype)
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
    entry = {**cond, "cross_attn": context}
    if pooled is not None:
        entry["pooled_output"] = pooled
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

    def denoise(self, x, sigma, branch="positive", context=None, model_options=None, pooled=None):
        """One branch's x0 prediction; ``context`` (and ``pooled``) replace its prompt's embeddings."""
        conds = self.guider.conds[branch]
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
    return out, holder["result"]
