"""PALP's training loop (arXiv 2401.06105, §4.2-4.4) inside the host's sampling machinery.

The maths (Eq. 1, 2, 5, 6, 7 and the LoRA adapter) is ``guidance/palp.py``; this module holds the
trainables' state, the learned token's text towers and the loop that ``sampling.run_loop`` runs inside
``CFGGuider.sample``. The node is ``nodes/palp.py``; the files are ``nodes/palp_files.py``.

Trainables (never on the caller's MODEL or CLIP):
- LoRA adapters (Hu et al. 2022) on the self- and cross-attention projections, each a separate low-rank
  branch beside its projection (:class:`LoRAProjection`, in place only while the loop runs, :func:`beside`)
  on a ``gradient_model`` clone (the loaded weights, read in place, get no gradient); each has an on/off flag, so the frozen base
  branch of Eq. 6 is the same clone with the adapters off (two clones of one base cannot be resident
  together). The MODEL the node returns is the saved LoRA file loaded by the host's own LoRA loader;
- one token vector per placeholder and text tower, spliced into the tokenized prompt (the host's
  tokenizer accepts tensors in token lists) and reaching the UNet through a frozen text encoder whose
  weights are detached copies (``fresh_weights``).

Conditioning: every branch runs under its own prompt's encoding, per-token context and (SDXL) pooled
vector with the size embeddings alike: ε*(x_t, y_P) and G^β(x̂_t, y_P) under y_P's (the learned token's
encoding, so on SDXL the token also learns through clip_g's pooled output), G^α(x̂_t, y_c) under the target
prompt's, and the unconditional halves under ∅'s.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import re

import numpy as np
import torch
from PIL import Image, ImageDraw

import comfy.model_management
import comfy.sd1_clip
import comfy.utils

from ..guidance.palp import (LoRAAdapter, adapters_off, palp_loss, palp_residual, personalization_loss,
                             predicted_x0, renoise)
from .palp_files import Paths, lora_state_dict, write_checkpoint, write_results
from .sampling import check_interrupt, grad_enabled

# the projection matrices of self- (attn1) and cross-attention (attn2), PALP App. C
ATTENTION_PROJECTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
PREVIEW_EVERY = 10                 # steps between loss-curve previews on the progress bar

log = logging.getLogger(__name__)


def attention_projections(model) -> list[tuple[str, tuple]]:
    """``(module name, weight shape)`` of every attention projection of a MODEL's UNet, state-dict named."""
    found = [(name, tuple(module.weight.shape)) for name, module in model.model.named_modules()
             if ATTENTION_PROJECTION.search(name) and hasattr(module, "weight_function")]
    if not found:
        raise ValueError("this MODEL has no attention projections named attn1/attn2.to_q/to_k/to_v/to_out: "
                         "PALP trains LoRA on a Stable Diffusion UNet (SD1.x, SDXL).")
    return found


class LoRAProjection:
    """A projection's forward while training: h = W x + b + (alpha/rank)·up(down x), in fp32, rounded once.

    Merged into a bf16 weight (W + ΔW rounded to bf16), ΔW is lost wherever it is below half a rounding step
    of W, as it mostly is in the first steps (up ≈ steps·lr; on a bf16 projection with |W| ≈ 0.03 only 18%
    of the change reaches the output after one step at lr 5e-5, 94% after ten: issue 9). Here the output is
    computed in fp32 with the branch added and rounded once to the compute dtype; the exact output lies
    anywhere between bf16 values, so the rounding dithers and, averaged over the outputs, the change equals
    the branch from the first step (Eq. 1's loss moves in bf16 as in fp32). The base projection runs
    through the host op's own casting (weight patches and wrappers: other LoRAs, fp8 scales; the loaded
    weights read in place through ``sampling.gradient_model``'s aliases); in fp32 this is exactly the merged (W + ΔW) x. Costs fp32 matmuls in these projections.
    """

    def __init__(self, module: torch.nn.Module, adapter: LoRAAdapter):
        self.module, self.adapter = module, adapter

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the host op's own casting path (weight patches, wrappers, fp8 scales), at the fp32 input's dtype
        wide = x.float()
        out = self.module.forward_comfy_cast_weights(wide)
        if self.adapter.enabled:
            out = out + self.adapter.branch(wide)
        return out.to(x.dtype)


@contextlib.contextmanager
def beside(model: torch.nn.Module, adapters: dict[str, LoRAAdapter]):
    """Each adapter as a :class:`LoRAProjection` beside its projection while a training loop runs.

    ``model`` is the loaded BaseModel (``Loop.base_model``), whose modules every clone of the MODEL shares:
    the projection's ``forward`` is replaced on the module only inside the loop, where nothing else runs,
    and put back on exit, so no trace remains (an object patch would leave the bound method behind).
    """
    modules = dict(model.named_modules())
    previous = {}
    try:
        for name, adapter in adapters.items():
            module = modules[name]
            previous[name] = vars(module).get("forward")
            module.forward = LoRAProjection(module, adapter)
        yield
    finally:
        for name, forward in previous.items():
            if forward is None:
                del modules[name].forward
            else:
                modules[name].forward = forward


# --- text towers and the learned token ---------------------------------------------------------


@dataclasses.dataclass
class Tower:
    """One text encoder of a CLIP: its key in token dicts ("l", "g") and in embedding files ("clip_l")."""

    token_key: str
    embedding_key: str
    tokenizer: comfy.sd1_clip.SDTokenizer
    width: int


def towers(clip) -> list[Tower]:
    """The text towers a learned token enters: those the CLIP both tokenizes for and encodes with (the SDXL
    refiner's tokenizer also makes clip_l tokens, which its text model, clip_g only, never reads)."""
    found = [Tower(t.embedding_key.removeprefix("clip_"), t.embedding_key, t, t.embedding_size)
             for t in vars(clip.tokenizer).values() if isinstance(t, comfy.sd1_clip.SDTokenizer)
             and hasattr(clip.cond_stage_model, t.embedding_key)]
    if not found:
        raise ValueError("this CLIP has no CLIP-style tokenizer (SD1.x / SDXL): PALP's learned token needs one.")
    return found


def class_word_vector(clip, tower: Tower, word: str) -> torch.Tensor:
    """The mean input embedding of the class word's tokens: the learned token's starting value (as TI)."""
    ids = tower.tokenizer.tokenizer(word)["input_ids"][1:-1]
    if not ids:
        raise ValueError(f"the class word {word!r} has no tokens: give a word such as 'dog'.")
    table = getattr(clip.cond_stage_model, tower.embedding_key).transformer.get_input_embeddings().weight
    return table[ids].detach().float().mean(0, keepdim=True).cpu().clone()


def with_embedding_dirs(clip, extra: list[str]):
    """A CLIP clone whose tokenizers also look for ``embedding:<name>`` files in ``extra`` (first)."""
    out = clip.clone()
    out.tokenizer = copy.copy(clip.tokenizer)
    for attr, tokenizer in vars(clip.tokenizer).items():
        if isinstance(tokenizer, comfy.sd1_clip.SDTokenizer):
            tokenizer = copy.copy(tokenizer)
            current = tokenizer.embedding_directory
            current = [current] if isinstance(current, str) else list(current or [])
            tokenizer.embedding_directory = extra + [d for d in current if d not in extra]
            setattr(out.tokenizer, attr, tokenizer)
    return out


def _marker_value(subject: int) -> float:
    # the placeholder is tokenized as an embedding file filled with this value, then swapped for the
    # trainable vector; no real embedding row is constant at these values
    return 1.0e4 + subject


def splice(tokens: dict, vectors: list[dict[str, torch.Tensor]], towers_: list[Tower]) -> dict:
    """The token lists with every marker row replaced by subject s's trainable vector (``process_tokens`` splices it)."""
    out, found = {}, set()
    for tower in towers_:
        chunks = []
        for chunk in tokens[tower.token_key]:
            row = []
            for token, *rest in chunk:
                if torch.is_tensor(token):
                    for s in range(len(vectors)):
                        if torch.all(token == _marker_value(s)):
                            token = vectors[s][tower.embedding_key][0]
                            found.add(s)
                row.append((token, *rest))
            chunks.append(row)
        out[tower.token_key] = chunks
    return out, found


# --- training ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Subject:
    """One subject: its latents in the model's space, personalization prompt y_P (tokens with a marker)."""

    latents: torch.Tensor
    prompt: str
    tokens: dict


@dataclasses.dataclass
class Settings:
    """What a run was trained with (the maths; not how memory was saved), stored in every file's metadata."""

    placeholders: list[str]
    class_words: list[str]
    personalization_prompts: list[str]
    target_prompt: str
    steps: int
    learning_rate: float
    batch_size: int
    gradient_accumulation: int
    rank: int
    alpha: float
    beta: float
    alignment_weight: float
    same_noise: bool
    rescale: bool
    timestep_min: float
    timestep_max: float
    resolution: int
    precision: str
    # the node's training_seed, recorded under the name files written before that rename hold
    seed: int

    def record(self) -> dict:
        """The settings as the files' metadata holds them (JSON-normal)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def metadata(self, step: int, inputs: dict) -> dict[str, str]:
        """Every file's metadata: the settings, the step and the fingerprints of the run's inputs."""
        return {"palp_settings": json.dumps(self.record()), "palp_step": str(step), "palp_inputs": json.dumps(inputs)}


class State:
    """The trainables, their optimizer and the loss curves; saved to and restored from a checkpoint."""

    def __init__(self, adapters: dict[str, LoRAAdapter], vectors: list[dict[str, torch.Tensor]], lr: float):
        self.adapters, self.vectors = adapters, vectors
        self.params = [p for a in adapters.values() for p in (a.down, a.up)] + \
                      [v for subject in vectors for _, v in sorted(subject.items())]
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.step = 0
        self.curves = {"personalization": [], "alignment": []}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = lora_state_dict(self.adapters)
        for s, subject in enumerate(self.vectors):
            for key, vector in subject.items():
                out[f"token.{s}.{key}"] = vector
        for i, p in enumerate(self.params):
            for name, value in self.optimizer.state.get(p, {}).items():
                out[f"optimizer.{i}.{name}"] = torch.as_tensor(value)
        for name, values in self.curves.items():
            out[f"curve.{name}"] = torch.tensor(values, dtype=torch.float32)
        return out

    def restore(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        with torch.no_grad():
            for key, value in self.tensors().items():
                if key.startswith(("optimizer.", "curve.")) or key.endswith(".alpha"):
                    continue
                if key not in tensors or tensors[key].shape != value.shape:
                    raise ValueError(f"the checkpoint has no tensor {key!r} of shape {tuple(value.shape)}: it was "
                                     "made with another model, rank or subject count; turn resume off (and "
                                     "overwrite on) to start again.")
                value.copy_(tensors[key])
        for i, p in enumerate(self.params):
            state = {name: tensors[f"optimizer.{i}.{name}"].to(p.device if name != "step" else "cpu")
                     for name in ("step", "exp_avg", "exp_avg_sq") if f"optimizer.{i}.{name}" in tensors}
            if state:
                self.optimizer.state[p] = state
        self.curves = {name: tensors[f"curve.{name}"].tolist() for name in self.curves}
        self.step = step


def _generator(seed: int, step: int, micro: int) -> torch.Generator:
    # one stream per (seed, step, micro-step): a resumed run draws exactly what an uninterrupted one would
    return torch.Generator().manual_seed(hash((seed, step, micro)) & 0xFFFF_FFFF_FFFF)


def _eps(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """ε from the host's x0 prediction in σ-space (x = x0 + σ ε)."""
    return ((x - denoised) / sigma).float()


class Trainer:
    """The training loop of PALP (§4.2-4.4), run by ``run_loop`` inside ``CFGGuider.sample``; it writes the run's
    results once every step is trained, and a checkpoint of an unfinished run on Cancel.

    Branches: "positive" is the target prompt y_c (the base model's CFG branch), "negative" the empty
    prompt ∅; the personalized prompt y_P replaces the positive branch's context and pooled vector
    (``Loop.denoise`` re-encodes the entry through the host's ``extra_conds``).
    """

    def __init__(self, settings: Settings, state: State, subjects: list[Subject], encode, sigma_of, paths: Paths,
                 checkpoint_every: int, inputs: dict):
        self.s, self.state, self.subjects, self.encode = settings, state, subjects, encode
        self.sigma_of, self.paths, self.checkpoint_every, self.inputs = sigma_of, paths, checkpoint_every, inputs
        # the step of the checkpoint this run resumed from or wrote: the only one a message may point to
        self.saved = state.step if state.step else None

    def checkpoint(self) -> None:
        # the parameters are checked finite after every optimizer step, so a checkpoint never holds NaN; its
        # settings and inputs are what a resume is checked against
        write_checkpoint(self.paths.checkpoint, self.state.tensors(), self.s.metadata(self.state.step, self.inputs))
        self.saved = self.state.step

    def finish(self) -> None:
        """The complete run's LoRA and embeddings (``write_results`` then removes its checkpoint)."""
        state = self.state
        write_results(self.paths, state.adapters, state.vectors, self.s.metadata(state.step, self.inputs), state.curves)
        log.info("PALP: saved %s and %s after %d steps", self.paths.lora, ", ".join(self.paths.embeddings), state.step)

    def stop(self, what: str):
        """End a diverged run with what happened and what is on disk (never a checkpoint that was not written)."""
        if self.saved is not None:
            kept = (f"the checkpoint of step {self.saved} ({self.paths.checkpoint}) is kept: turn resume on to "
                    "continue from it")
        else:
            kept = "nothing was saved (no checkpoint was due yet)"
        raise ValueError(f"{what} at step {self.state.step + 1}: training stopped and {kept}. Lower the learning "
                         "rate or the alignment weight, or train in fp32.")

    def micro_step(self, loop, step: int, micro: int) -> tuple[torch.Tensor, float, float]:
        """One image batch, one σ, one shared ε: the step of ``guidance/palp.py``'s docstring."""
        s, gen = self.s, _generator(self.s.seed, step, micro)
        subject = self.subjects[int(torch.randint(len(self.subjects), (), generator=gen))]
        x0 = subject.latents[torch.randint(len(subject.latents), (s.batch_size,), generator=gen)]
        sigma = self.sigma_of(s.timestep_min + (s.timestep_max - s.timestep_min) * torch.rand((), generator=gen).item())
        eps = torch.randn(x0.shape, generator=gen).to(x0)
        x_t = renoise(x0, eps, sigma)
        context, pooled = self.encode(subject.tokens)               # y_P with the learned token, with grad
        eps_pred = _eps(x_t, loop.denoise(x_t, sigma, "positive", context=context, pooled=pooled), sigma)
        personalization = personalization_loss(eps_pred, eps.float())
        if s.alignment_weight == 0:
            return personalization, personalization.item(), 0.0
        x0_hat = predicted_x0(x_t.float(), eps_pred, sigma)
        noise = eps if s.same_noise else torch.randn(x0.shape, generator=gen).to(x0)
        x_hat_t = renoise(x0_hat.detach(), noise.float(), sigma).to(x0.dtype)
        with torch.no_grad():
            with adapters_off(self.state.adapters.values()):
                base_cond = _eps(x_hat_t, loop.denoise(x_hat_t, sigma, "positive"), sigma)
                base_uncond = _eps(x_hat_t, loop.denoise(x_hat_t, sigma, "negative"), sigma)
            pers_cond = _eps(x_hat_t, loop.denoise(x_hat_t, sigma, "positive", context=context, pooled=pooled), sigma)
            # at β = 1 Eq. 5's unconditional term has weight 0: skip its UNet pass
            pers_uncond = pers_cond if s.beta == 1 else _eps(x_hat_t, loop.denoise(x_hat_t, sigma, "negative"), sigma)
        residual = palp_residual(base_cond, base_uncond, pers_cond, pers_uncond, s.alpha, s.beta)
        loss = palp_loss(eps_pred, eps.float(), x0_hat, residual, sigma, s.alignment_weight, s.rescale)
        return loss, personalization.item(), residual.pow(2).mean().item()

    def __call__(self, loop, x, sigmas):
        s, state = self.s, self.state
        bar = comfy.utils.ProgressBar(s.steps)
        bar.update_absolute(state.step, s.steps)
        self.subjects = [dataclasses.replace(subject, latents=subject.latents.to(x)) for subject in self.subjects]
        try:
            with grad_enabled(), beside(loop.base_model, state.adapters):
                while state.step < s.steps:
                    state.optimizer.zero_grad(set_to_none=True)
                    personalization = alignment = 0.0
                    for micro in range(s.gradient_accumulation):
                        check_interrupt()       # Cancel stops within one micro-step
                        loss, p, a = self.micro_step(loop, state.step, micro)
                        if not math.isfinite(loss.item()):
                            self.stop(f"the loss became {loss.item()}")
                        (loss / s.gradient_accumulation).backward()
                        personalization += p / s.gradient_accumulation
                        alignment += a / s.gradient_accumulation
                    state.optimizer.step()
                    # one device sync for all parameters, not one each
                    if not torch.stack([torch.isfinite(p).all() for p in state.params]).all():
                        self.stop("the LoRA or the token became NaN/Inf")
                    state.step += 1
                    state.curves["personalization"].append(personalization)
                    state.curves["alignment"].append(alignment)
                    if self.checkpoint_every and state.step % self.checkpoint_every == 0:
                        self.checkpoint()
                    preview = None
                    if state.step % PREVIEW_EVERY == 0 or state.step == s.steps:
                        preview = ("PNG", loss_plot(state.curves, s.alignment_weight), 512)
                        log.info("PALP step %d/%d: personalization %.5g, alignment residual %.5g",
                                 state.step, s.steps, personalization, alignment)
                    bar.update_absolute(state.step, s.steps, preview)
        except comfy.model_management.InterruptProcessingException:
            if state.step < s.steps:
                # keep what the completed steps learned; the half-accumulated step is dropped
                self.checkpoint()
            else:
                # honoured at the last step's progress update (the server's hook raises it there): the training
                # is complete, so it is saved as a finished run's; a checkpoint would hold it unwritten
                self.finish()
            raise
        self.finish()
        return x, None


def loss_plot(curves: dict[str, list[float]], alignment_weight: float, width=512, height=256) -> Image.Image:
    """Personalization MSE, alignment residual mean(r²) and total = MSE + weight·mean(r²), one line each.

    The Eq. 6 surrogate's value means nothing (only its gradient does), so the alignment curve is the
    residual's energy: how far the personalized prediction at x̂_t is from the base model's y_c guidance.
    """
    p = np.asarray(curves["personalization"], dtype=np.float64)
    a = np.asarray(curves["alignment"], dtype=np.float64)
    lines = {"personalization": (p, (31, 119, 180)), "alignment": (a, (214, 39, 40)),
             "total": (p + alignment_weight * a, (40, 40, 40))}
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 40, 10, width - 10, height - 40
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    values = np.concatenate([v for v, _ in lines.values()]) if len(p) else np.zeros(1)
    values = values[np.isfinite(values)]
    high = float(values.max()) if values.size and values.max() > 0 else 1.0
    draw.text((2, top), f"{high:.3g}", fill=(0, 0, 0))
    draw.text((2, bottom - 10), "0", fill=(0, 0, 0))
    for i, (name, (v, colour)) in enumerate(lines.items()):
        if len(v) > 1:
            xs = left + (right - left) * np.arange(len(v)) / (len(v) - 1)
            ys = bottom - (bottom - top) * np.clip(v / high, 0, 1)
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
        draw.text((left + 150 * i, bottom + 14), f"{name} {v[-1]:.4g}" if len(v) else name, fill=colour)
    return image


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as the host's IMAGE, [1, H, W, 3] in 0..1."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def square(images: torch.Tensor, side: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] scaled to cover side × side and centre-cropped (the host's ``common_upscale``)."""
    if images.shape[1:3] == (side, side):
        return images[..., :3]
    return comfy.utils.common_upscale(images[..., :3].movedim(-1, 1), side, side, "bilinear", "center").movedim(1, -1)
