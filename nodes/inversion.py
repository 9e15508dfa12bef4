"""NullTextInvert and LoadInversion: a reference image inverted once (methods.md §1.1), kept in a file.

The maths is ``guidance/inversion.py`` (DDIM inversion, null-text inversion, replay); this module runs it
inside the host's sampling machinery (``sampling.run_loop``), packages the result as an
:class:`Inversion` (custom type ``INVERSION``), saves it to and loads it from safetensors, and
fingerprints the model that made it so that a file is never used with another model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re

import torch
from comfy_api.latest import io, ui
from safetensors import safe_open

import comfy.samplers
import folder_paths

from ..guidance.inversion import ddim_invert, null_text_invert, replay
from . import host
from .files import Unreadable, first_line, read_metadata, save_atomic
from .sampling import grad_enabled, gradient_model, progress, readable_weights, run_loop, weights_cast_once

InversionType = io.Custom("PERSONALIZE_INVERSION")
CATEGORY = "personalize/inversion"
NULL_TEXT, DDIM = "null-text", "ddim"
POSITIVE = "positive"           # the source prompt's branch, as the core's ``cond`` argument (see _denoiser)
FOLDER = "inversions"           # under the host's output folder
FILE_FORMAT = "comfyui-personalize.inversion/1"
WEIGHT_SAMPLES = 16             # elements sampled per weight tensor for the fingerprint

# What each fingerprint field means, in the words a refusal uses.
FINGERPRINT_LABELS = {
    "model": "model type",
    "sampling": "noise schedule (model sampling)",
    "architecture": "UNet architecture",
    "weights": "base weights (another checkpoint or fine-tune; fp16 and fp32 copies of one checkpoint match, "
               "bf16 or fp8 ones do not)",
    "patches": "weight patches (LoRAs, merges)",
    "prompt": "source prompt",
    "resolution": "resolution",
}
REQUIRED_TENSORS = ("trajectory", "sigmas", "cond", "uncond")

log = logging.getLogger(__name__)


def _tensor():
    return dataclasses.field(repr=False)     # a repr shows the settings, not the tensors


@dataclasses.dataclass
class Inversion:
    """One reference inverted with one model (Mokady et al. 2023; plain DDIM inversion in ``ddim`` mode).

    Latents are in the model's σ-space (the LATENT scaled by the model's latent format, x = z·√(1+σ²);
    host notes §2.5), batch 1, float32; every tensor is on the CPU.
    """

    mode: str                                           # NULL_TEXT or DDIM
    # [n+1, 1, C, h, w] the DDIM-inversion pivots x*_T … x*_0, indexed like sigmas
    trajectory: torch.Tensor = _tensor()
    sigmas: torch.Tensor = _tensor()                    # [n+1] the generation schedule (decreasing, ending in 0)
    # [n, 1, T, D] ∅_t of step t (null-text mode); None: the empty prompt at every step (ddim mode)
    null_embeddings: torch.Tensor | None = _tensor()
    cond: torch.Tensor = _tensor()                      # [1, T, D] the source prompt's CLIP embedding
    cond_pooled: torch.Tensor | None = _tensor()
    uncond: torch.Tensor = _tensor()                    # the empty prompt's embedding (∅'s initial value)
    uncond_pooled: torch.Tensor | None = _tensor()
    losses: torch.Tensor | None = _tensor()             # [n] null-text inversion's last loss per step
    prompt: str
    cfg: float
    scheduler: str
    steps: int
    inner_steps: int
    lr: float
    early_stop: float
    error: float                                        # ‖reconstruction − input‖ / ‖input‖ in latent space
    fingerprint: dict[str, str]                         # model_fingerprint, plus the prompt and the resolution
    reference: str = ""                                 # input_digest of the inverted latent ("" in older files)

    @property
    def latent_T(self) -> torch.Tensor:
        """The inverted latent x*_T."""
        return self.trajectory[0]

    def null_schedule(self) -> torch.Tensor:
        """The unconditional embedding of every step, as ``replay`` takes it (the empty prompt's in ``ddim`` mode)."""
        if self.null_embeddings is not None:
            return self.null_embeddings
        return self.uncond.expand(len(self.sigmas) - 1, *self.uncond.shape)

    @property
    def positive(self) -> list:
        """The source prompt as CONDITIONING."""
        return conditioning(self.cond, self.cond_pooled)

    @property
    def negative(self) -> list:
        """The empty prompt as CONDITIONING."""
        return conditioning(self.uncond, self.uncond_pooled)


TENSOR_FIELDS = ("trajectory", "sigmas", "null_embeddings", "cond", "cond_pooled", "uncond", "uncond_pooled", "losses")
# the fields a file stores as its settings (the fingerprint is stored apart)
SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(Inversion) if f.name not in TENSOR_FIELDS and f.name != "fingerprint")


def conditioning(cond, pooled) -> list:
    """A CONDITIONING as CLIPTextEncode makes it."""
    return [[cond, {} if pooled is None else {"pooled_output": pooled}]]


# --- fingerprint -------------------------------------------------------------------------------


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """A few evenly spaced elements at fp16: the same weights stored in fp16 or fp32 give the same bytes."""
    flat = tensor.detach().reshape(-1)
    count = min(WEIGHT_SAMPLES, flat.numel())
    # integer spacing: a float32 linspace rounds the last index past the end above 2^24 elements
    index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
    return flat[index].to("cpu", torch.float16)


def _digest(h, obj) -> None:
    """Feed the identity of a patch (tensors sampled, strengths, adapter kinds) into the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        h.update(repr(tuple(obj.shape)).encode())
        h.update(_sample(obj).numpy().tobytes())
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _digest(h, item)
    elif isinstance(obj, torch.nn.Module):      # trainable weight wrappers
        h.update(type(obj).__qualname__.encode())
        for key, value in sorted(obj.state_dict().items()):
            h.update(key.encode())
            _digest(h, value)
    elif obj is None or isinstance(obj, (str, int, float, bool)):
        h.update(repr(obj).encode())
    elif hasattr(obj, "weights"):               # the host's weight adapters (LoRA, LoHa, LoKr, ...)
        h.update(type(obj).__qualname__.encode())
        _digest(h, obj.weights)
    else:                                       # functions (convert/patch functions): by name
        h.update(getattr(obj, "__qualname__", type(obj).__qualname__).encode())


def model_fingerprint(model) -> dict[str, str]:
    """What identifies a MODEL for an inversion: cheap (no weight is copied whole), readable when it differs.

    - model: the model class and latent format; sampling: the model-sampling classes and σ range
      (catches v-prediction / zero-SNR patches);
    - architecture: a hash of every state-dict key and shape;
    - weights: a hash of ``WEIGHT_SAMPLES`` evenly spaced elements of every ≥2-D weight, read at fp16
      from the *unpatched* weights (the host patches LoRAs into the shared weights in place and keeps
      the originals in ``backup``; ``get_key_patches`` returns those);
    - patches: a hash of every weight patch (key, strengths, offsets, adapter kind, its tensors sampled
      the same way) and of the weight wrappers; "none" without any.
    Attention patches, wrappers and callbacks in ``model_options`` are left out: they do not change
    the weights an inversion is valid for (e.g. an AttentionCapture clone).
    """
    base = model.model
    sampling = model.get_model_object("model_sampling")
    key_patches = model.get_key_patches()
    architecture, weights, patches = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    patched = 0
    for key in sorted(key_patches):
        original, *key_patch_list = key_patches[key]
        tensor = original[0]
        architecture.update(f"{key}:{tuple(tensor.shape)};".encode())
        if key.startswith("diffusion_model.") and tensor.ndim >= 2:
            weights.update(_sample(tensor).numpy().tobytes())
        if key_patch_list:
            patched += 1
            patches.update(key.encode())
            _digest(patches, key_patch_list)
    for key in sorted(model.weight_wrapper_patches):
        patched += 1
        patches.update(key.encode())
        _digest(patches, model.weight_wrapper_patches[key])
    bases = "+".join(b.__name__ for b in type(sampling).__bases__) or type(sampling).__name__
    return {
        "model": f"{type(base).__name__}, {type(base.latent_format).__name__} latents",
        "sampling": f"{bases}, σ {float(sampling.sigma_min):.5g} to {float(sampling.sigma_max):.5g}",
        "architecture": f"{len(key_patches)} tensors #{architecture.hexdigest()[:16]}",
        "weights": f"#{weights.hexdigest()[:16]}",
        "patches": f"{patched} weights patched #{patches.hexdigest()[:16]}" if patched else "none",
    }


def fingerprint_mismatches(stored: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per field both fingerprints have and that differs."""
    return [f"{FINGERPRINT_LABELS.get(k, k)}: the inversion has {stored[k]!r}, this one {current[k]!r}"
            for k in current if k in stored and stored[k] != current[k]]


def require_same_model(inversion: Inversion, model, source: str) -> None:
    """Refuse an inversion made with another model, saying what differs."""
    differences = fingerprint_mismatches(inversion.fingerprint, model_fingerprint(model))
    if differences:
        raise ValueError(f"{source} was made with a different model: " + "; ".join(differences)
                         + ". An inversion is only valid for the model (and LoRAs) it was made with: "
                           "invert the reference again with this model.")


# --- file --------------------------------------------------------------------------------------


def inversion_dir() -> str:
    return os.path.join(folder_paths.get_output_directory(), FOLDER)


def inversion_files() -> list[str]:
    folder = inversion_dir()
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


def inversion_path(save_name: str) -> str:
    """``output/inversions/<name>.safetensors`` for a plain file name (no folders)."""
    name = save_name.strip().removesuffix(".safetensors")
    if not re.fullmatch(r"[\w\-][\w\-. ]*", name):
        raise ValueError(f"save_name {save_name!r} is not a plain file name: use letters, digits, '-', '_', '.' "
                         "and spaces, without folders (the file goes to output/inversions/).")
    return os.path.join(inversion_dir(), name + ".safetensors")


def input_digest(samples: torch.Tensor) -> str:
    """What identifies the reference an inversion was made from: a hash of its latent's values (fp32, CPU)."""
    values = samples.detach().to("cpu", torch.float32).contiguous()
    return f"{tuple(values.shape)} #{hashlib.sha256(values.numpy().tobytes()).hexdigest()[:16]}"


def _settings(inversion: Inversion) -> dict:
    return {name: getattr(inversion, name) for name in SETTING_FIELDS}


def save_inversion(inversion: Inversion, path: str) -> None:
    """Write atomically (temp file + ``os.replace``): a reader never sees half a file, a failure leaves none.

    An inversion holding NaN/Inf is refused, so no file that a later run would trust is written.
    """
    tensors = {k: getattr(inversion, k) for k in TENSOR_FIELDS if getattr(inversion, k) is not None}
    for name, tensor in tensors.items():
        host.require_finite(tensor, f"the inversion's {name}", f"it is not saved to {path}. Invert again (in "
                            "null-text mode with a lower lr, or in ddim mode).")
    save_atomic(tensors, path, {"format": FILE_FORMAT, "settings": json.dumps(_settings(inversion)),
                                "fingerprint": json.dumps(inversion.fingerprint)})


def _remake(path: str, why: str) -> ValueError:
    return ValueError(f"the inversion file {path} {why}: make it again with Null-Text Invert (its save_name).")


def read_header(path: str) -> tuple[dict, dict]:
    """``(settings, fingerprint)`` of an inversion file without reading its tensors; refuses a foreign or
    broken file with its name."""
    try:
        metadata = read_metadata(path)
    except Unreadable as e:
        raise _remake(path, f"cannot be read ({e}; the file is empty, cut short or not a safetensors file)") from None
    if metadata.get("format") != FILE_FORMAT:
        raise _remake(path, f"is not an inversion file of this pack's format {FILE_FORMAT!r} (it says "
                            f"{metadata.get('format')!r}; an older version of the pack or another tool wrote it)")
    try:
        settings, fingerprint = json.loads(metadata["settings"]), json.loads(metadata["fingerprint"])
    except (KeyError, json.JSONDecodeError):
        raise _remake(path, "has a damaged header (its settings or model fingerprint cannot be read)") from None
    return settings, fingerprint


def load_inversion(path: str) -> Inversion:
    """Read and check an inversion file: a damaged, cut-short, older-format or NaN-holding file is refused
    with its name (never a deep safetensors or torch error)."""
    settings, fingerprint = read_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise _remake(path, f"cannot be read ({first_line(e)})") from None
    missing = [k for k in REQUIRED_TENSORS if k not in tensors]
    if missing:
        raise _remake(path, f"lacks the tensors {', '.join(missing)}")
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise _remake(path, f"holds NaN/Inf values in its {name}")
    try:
        inversion = Inversion(**settings, fingerprint=fingerprint, **{k: tensors.get(k) for k in TENSOR_FIELDS})
    except TypeError:
        raise _remake(path, f"has the settings {sorted(settings)} where this version writes {sorted(SETTING_FIELDS)}") from None
    n = len(inversion.sigmas) - 1
    if inversion.trajectory.shape[0] != n + 1 or (inversion.null_embeddings is not None
                                                  and inversion.null_embeddings.shape[0] != n):
        raise _remake(path, f"has a trajectory of {inversion.trajectory.shape[0]} latents for {n} steps")
    return inversion


def replaced_differences(path: str, inversion: Inversion) -> list[str] | None:
    """What differs between the file at ``path`` and ``inversion`` about to replace it: None when there is no
    file, [] when a re-queued graph writes the same inversion again (same settings, model and reference)."""
    if not os.path.exists(path):
        return None
    try:
        settings, fingerprint = read_header(path)
    except ValueError as e:
        return [str(e)]
    new = _settings(inversion)
    differences = [f"{k} {settings.get(k)!r} -> {new[k]!r}" for k in new if k != "error" and settings.get(k) != new[k]]
    return differences + [f"{FINGERPRINT_LABELS.get(k, k)} {fingerprint.get(k)!r} -> {v!r}"
                          for k, v in inversion.fingerprint.items() if fingerprint.get(k) != v]


# --- running -----------------------------------------------------------------------------------


def _denoiser(loop):
    """The core's ``denoise(x, σ, c)``: ``c = POSITIVE`` is the source prompt's branch; a tensor is a
    null embedding, used in the empty prompt's branch (so SDXL keeps the empty prompt's pooled vector)."""
    def denoise(x, sigma, context):
        if isinstance(context, torch.Tensor):
            return loop.denoise(x, sigma, "negative", context=context)
        return loop.denoise(x, sigma, context)
    return denoise


def _invert_fn(mode, cfg, inner_steps, lr, early_stop, reconstruct):
    """``run_loop``'s function: inversion, then the reconstruction at ``cfg`` (methods.md §1.1).

    Plain DDIM mode's reconstruction is a whole CFG sampling run (DDIM steps on the host's CFG prediction,
    one batch-2 UNet call per step); without ``reconstruct`` it is skipped (the "reconstruction" is then
    the input itself and the error NaN).
    """
    def fn(loop, x, sigmas):
        n = len(sigmas) - 1
        bar = progress(n * (1 + (inner_steps if mode == NULL_TEXT else int(reconstruct))))
        denoise = _denoiser(loop)
        # the whole loop loads no other model: the UNet's weights are made readable once, not per gradient pass,
        # and for null-text's gradient passes on half-precision weights cast to fp32 once
        cast = weights_cast_once(loop.guider.model_patcher, x.device) if mode == NULL_TEXT else contextlib.nullcontext()
        with grad_enabled(), readable_weights([loop.base_model.diffusion_model]), cast:
            # the schedule is an inference tensor, which autograd refuses to save for backward
            sigmas = sigmas.detach().clone()
            sigma_data = getattr(loop.base_model.model_sampling, "sigma_data", 1.0)   # EDM models may set it
            trajectory = ddim_invert(denoise, x, sigmas, POSITIVE, on_step=lambda done, _: bar(done),
                                     sigma_data=sigma_data)
            if mode == NULL_TEXT:
                nti = null_text_invert(denoise, trajectory, sigmas, POSITIVE, loop.context("negative"), cfg,
                                       inner_steps, lr, early_stop, on_step=lambda done, _: bar(n + done),
                                       sigma_data=sigma_data)
                latent, nulls, losses = nti.latent, nti.null_embeddings, nti.losses
            elif reconstruct:
                nulls = losses = None
                # the host's own CFG prediction at the guider's ``cfg``: both branches in one batched UNet call
                latent = replay(lambda z, sigma, _: loop.cfg_denoise(z, sigma), trajectory[0], sigmas, None, None,
                                cfg, on_step=lambda done, _: bar(n + done))[-1]
            else:
                nulls = losses = None
                latent = trajectory[-1]
        error = ((latent - trajectory[-1]).norm() / trajectory[-1].norm()).item() if mode == NULL_TEXT or reconstruct \
            else float("nan")
        cpu = [None if t is None else t.cpu() for t in (trajectory, sigmas, nulls, losses)]
        return latent, (*cpu, error)
    return fn


class NullTextInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NullTextInvert",
            display_name="Null-Text Invert",
            category=CATEGORY,
            description="Inverts a reference image once (Pick-and-Draw §3.2's palette source, Layout-and-Retouch's "
                        "DDIM inversion): DDIM inversion with the source prompt, then, in null-text mode, per-step "
                        "null embeddings (Mokady et al. 2023) so that sampling at the given CFG from the inverted "
                        "latent reproduces the image. Outputs the inversion, its reconstruction and the "
                        "reconstruction error, and optionally saves it to output/inversions/.",
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with; the inversion is only valid for this model "
                                                "and its LoRAs. It is not changed."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the source prompt and the empty prompt (the "
                                              "null embedding's initial value)."),
                io.String.Input("prompt", multiline=True, default="a photo of a dog",
                                tooltip="Source prompt describing the reference (its subject word is located in it "
                                        "later). Layout-and-Retouch inverts with the empty prompt."),
                io.Combo.Input("mode", options=[NULL_TEXT, DDIM], default=NULL_TEXT,
                               tooltip="null-text: DDIM inversion plus per-step null embeddings (Mokady et al.), so that "
                                       "CFG sampling at the scale below from the inverted latent reconstructs the image "
                                       "faithfully — for inspecting the inversion or for editing; up to inner_steps "
                                       "forward+backward passes per step. It does not change Pick-and-Draw's palette, "
                                       "which is read at the DDIM pivots both modes share. ddim: deterministic DDIM "
                                       "inversion only, no optimisation — all Pick-and-Draw's palette and "
                                       "Layout-and-Retouch need."),
                io.Int.Input("steps", default=50, min=2, max=1000,
                             tooltip="Inversion steps; sample later with the same steps and scheduler (the papers: "
                                     "50 DDIM steps)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="σ schedule. ddim_uniform gives the reference implementation's DDIM timesteps "
                                       "(981, 961, …, 1 at 50 steps); sample later with the same scheduler. "
                                       "Odd step counts can give one step more (the host's ddim_uniform)."),
                io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="Guidance scale the reconstruction (and later sampling) uses; null-text "
                                       "inversion tunes the null embeddings for exactly this scale (paper: 7.5)."),
                io.Int.Input("inner_steps", default=10, min=1, max=100,
                             tooltip="Adam iterations per step for the null embedding (paper: 10). Null-text mode only."),
                io.Float.Input("lr", default=1e-2, min=0.0, max=10.0, step=1e-3, round=False,
                               tooltip="Adam learning rate of the null embedding at the first step; step i uses "
                                       "lr·(1 − i/100), as the reference code (paper and reference: 1e-2). "
                                       "Null-text mode only."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, round=False,
                               tooltip="Step i stops optimising once its loss is below this + i·2e-5, as the "
                                       "reference code (paper: 1e-5). Null-text mode only."),
                io.String.Input("save_name", default="",
                                tooltip="File name to save the inversion as, in output/inversions/ (load it with "
                                        "Load Inversion); empty: don't save. An existing file is replaced."),
                io.Image.Input("image", optional=True, tooltip="The reference image (needs the VAE); or give a LATENT."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the IMAGE and decodes the reconstruction."),
                io.Latent.Input("latent", optional=True, tooltip="The reference as a LATENT, instead of an IMAGE."),
                io.Boolean.Input("reconstruct", default=True, optional=True,
                                 tooltip="ddim mode: also sample the inverted latent back at this CFG to measure the "
                                         "reconstruction (one more sampling run). Off: the outputs are the input and "
                                         "error NaN — enough when only the inverted latent is needed "
                                         "(Layout-and-Retouch). Null-text mode always reconstructs (free)."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip="Inverted latent, pivot trajectory, null "
                                                                       "embeddings, schedule, prompt and fingerprint."),
                io.Latent.Output(display_name="reconstruction", tooltip="Sampling from the inverted latent at this CFG "
                                                                       "with the null embeddings (a noise mask of the "
                                                                       "input LATENT rides along; the inversion itself "
                                                                       "covers the whole image)."),
                io.Image.Output(display_name="reconstruction_image", tooltip="The reconstruction decoded (None "
                                                                            "without a VAE)."),
                io.Float.Output(display_name="error", tooltip="‖reconstruction − input‖ / ‖input‖ in latent space "
                                                              "(NaN when reconstruct is off)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, prompt, mode, steps, scheduler, cfg, inner_steps, lr, early_stop, save_name,
                image=None, vae=None, latent=None, reconstruct=True) -> io.NodeOutput:
        host.unet_layers(model)        # refuses a DiT with a message: the inversion drives a UNet's cross-attention
        host.require_clip_for(model, clip, "Null-Text Invert")
        if (image is None) == (latent is None):
            raise ValueError("give the reference either as an IMAGE (with a VAE) or as a LATENT: "
                             f"{'both are' if image is not None else 'neither is'} connected.")
        if image is not None and vae is None:
            raise ValueError("the reference IMAGE needs a VAE to encode it: connect the model's VAE.")
        if steps < 2:
            raise ValueError(f"steps must be at least 2, got {steps}.")
        path = inversion_path(save_name) if save_name.strip() else None
        source = "IMAGE" if image is not None else "LATENT"
        host.require_finite(image if image is not None else latent["samples"], f"the reference {source}",
                            "fix the node that made it (e.g. a VAE overflowing in fp16) before inverting.")
        if image is not None:
            samples = vae.encode(image[:, :, :, :3])
            host.require_finite(samples, "the VAE's encoding of the reference IMAGE", "the VAE overflowed (run it in "
                                "fp32, e.g. --fp32-vae) before inverting.")
        else:
            samples = latent["samples"]
        if samples.shape[0] != 1:
            raise ValueError(f"invert one image at a time: the {source} holds a batch of {samples.shape[0]} (pick "
                             "one with LatentFromBatch / ImageFromBatch).")
        cond, cond_pooled = host.encode_text(clip, prompt)
        uncond, uncond_pooled = host.encode_text(clip, "")
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
        # fp32 whatever the model's dtype (the optimisation's small steps vanish in fp16); passes read the loaded
        # weights in place (sampling.gradient_model), or on half-precision weights their fp32 casts, made once
        # for the loop (sampling.weights_cast_once)
        worker = gradient_model(host.without_capture(model), torch.float32)
        reconstruction, (trajectory, sigmas, nulls, losses, error) = run_loop(
            worker, conditioning(cond, cond_pooled), conditioning(uncond, uncond_pooled), samples, sigmas,
            _invert_fn(mode, cfg, inner_steps, lr, early_stop, reconstruct), cfg=cfg)
        inversion = Inversion(
            mode=mode, trajectory=trajectory, sigmas=sigmas, null_embeddings=nulls, cond=cond, cond_pooled=cond_pooled,
            uncond=uncond, uncond_pooled=uncond_pooled, losses=losses, prompt=prompt, cfg=cfg, scheduler=scheduler,
            steps=steps, inner_steps=inner_steps, lr=lr, early_stop=early_stop, error=error,
            fingerprint={**model_fingerprint(model), "prompt": prompt,
                         "resolution": "{}x{} latent".format(*trajectory.shape[-2:])},
            reference=input_digest(samples))
        log.info("%s inversion of %r (%d steps, CFG %g): reconstruction error %.4g (relative, latent space)",
                 mode, prompt, len(sigmas) - 1, cfg, error)
        for name, tensor in (("reconstruction", reconstruction), ("trajectory", trajectory), ("null embeddings", nulls)):
            host.require_finite(tensor, f"the inversion's {name}", "it diverged, and nothing was saved. In null-text "
                                "mode lower lr (the paper's is 1e-2) or the CFG; check the model in ddim mode.")
        if path is not None:
            differences = replaced_differences(path, inversion)
            save_inversion(inversion, path)
            if differences:
                log.warning("Null-Text Invert replaced %s, which held an inversion made differently: %s", path,
                            "; ".join(differences))
            else:
                log.info("saved the inversion to %s%s", path, "" if differences is None else
                         " (the same settings, model and reference as the file it replaces)")
        # as the host's samplers return a LATENT: the input's other keys (an inpainting noise_mask) carried over
        latent_out = {**(latent or {}), "samples": reconstruction}
        if vae is None:
            return io.NodeOutput(inversion, latent_out, None, error)
        decoded = vae.decode(reconstruction)
        return io.NodeOutput(inversion, latent_out, decoded, error, ui=ui.PreviewImage(decoded, cls=cls))


class LoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeLoadInversion",
            display_name="Load Inversion",
            category=CATEGORY,
            description="Loads an inversion saved by Null-Text Invert from output/inversions/, refusing it when the "
                        "MODEL is not the one it was made with (checkpoint, LoRAs, noise schedule).",
            inputs=[
                io.Combo.Input("name", options=inversion_files(),
                               tooltip="A file in output/inversions/ (refresh the page after saving a new one)."),
                io.Model.Input("model", tooltip="The model the inversion will be used with; it must be the one that "
                                                "made it (same weights and LoRAs)."),
            ],
            outputs=[InversionType.Output(display_name="inversion")],
        )

    @classmethod
    def fingerprint_inputs(cls, name, model):
        # a file saved again under the same name must be read again
        path = os.path.join(inversion_dir(), name)
        return os.path.getmtime(path) if os.path.exists(path) else None

    @classmethod
    def execute(cls, name, model) -> io.NodeOutput:
        path = os.path.join(inversion_dir(), name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            raise ValueError(f"no inversion file {name!r} in {inversion_dir()}: save one with Null-Text Invert's "
                             "save_name.")
        inversion = load_inversion(path)
        require_same_model(inversion, model, f"{FOLDER}/{name}")
        return io.NodeOutput(inversion)


NODES = [NullTextInvert, LoadInversion]
