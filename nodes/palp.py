"""PALPTrainer: prompt-aligned personalization (arXiv 2401.06105, methods.md §3) as one training node.

The maths is ``guidance/palp.py``; this module runs it inside the host's sampling machinery
(``sampling.run_loop``) and owns the trainables, the files and the training UX.

Trainables (never on the caller's MODEL or CLIP):
- LoRA adapters (Hu et al. 2022) on the self- and cross-attention projections, installed as the host's
  weight wrappers (``add_weight_wrapper``) on a clone whose other weights are fresh copies
  (``fresh_weights``); each has an on/off flag, so the frozen base branch of Eq. 6 is the same clone with
  the adapters off (two clones of one base cannot be resident together);
- one token vector per placeholder and text tower, spliced into the tokenized prompt (the host's
  tokenizer accepts tensors in token lists) and reaching the UNet through a frozen text encoder whose
  weights are fresh copies too.

SDXL: the personalized prompt's per-token context carries the learned token; the pooled vector (SDXL's
``adm`` input) stays the target prompt's, so the token gets no gradient through clip_g's pooled output.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import re
import tempfile

import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file

import comfy.model_management
import comfy.sd1_clip
import comfy.utils
import folder_paths

from ..guidance.palp import palp_loss, palp_residual, personalization_loss, predicted_x0, renoise
from . import host
from .checkpointing import with_gradient_checkpointing
from .files import save_atomic
from .inversion import conditioning
from .sampling import check_interrupt, fresh_weights, grad_enabled, run_loop

CATEGORY = "personalize/palp"
FOLDER = "palp"                    # checkpoints, under the host's output folder
LORA_FORMAT = "comfyui-personalize.palp-lora/1"
CHECKPOINT_FORMAT = "comfyui-personalize.palp-checkpoint/1"
# the projection matrices of self- (attn1) and cross-attention (attn2), PALP App. C
ATTENTION_PROJECTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
PREVIEW_EVERY = 10                 # steps between loss-curve previews on the progress bar

log = logging.getLogger(__name__)


# --- trainables ---------------------------------------------------------------------------------


class LoRAAdapter(torch.nn.Module):
    """A host weight wrapper W ↦ W + (alpha/rank)·up@down (LoRA, PALP §4.1), switchable off.

    Off, it returns W unchanged: the frozen pre-trained model G_θ of Eq. 6. The update is computed in
    fp32 and cast to the weight's dtype, as the host's own LoRA patching does, so a saved file loaded
    by the host's LoRA loader gives the same weights.
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float):
        super().__init__()
        self.down = torch.nn.Parameter(down)
        self.up = torch.nn.Parameter(up)
        self.alpha = alpha
        self.enabled = True

    @classmethod
    def create(cls, weight_shape, rank: int, gen: torch.Generator, device) -> "LoRAAdapter":
        """down ~ U(±1/√fan_in) (PyTorch's Linear init), up = 0: training starts at the base model."""
        out_features, in_features = weight_shape[0], math.prod(weight_shape[1:])
        bound = 1 / math.sqrt(in_features)
        down = (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound
        return cls(down.to(device), torch.zeros(out_features, rank, device=device), float(rank))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def frozen(self) -> "LoRAAdapter":
        adapter = LoRAAdapter(self.down.detach().clone(), self.up.detach().clone(), self.alpha)
        adapter.requires_grad_(False)
        return adapter

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        delta = (self.up.to(weight.device) @ self.down.to(weight.device)) * (self.alpha / self.rank)
        return weight + delta.reshape(weight.shape).to(weight.dtype)


@contextlib.contextmanager
def adapters_off(adapters):
    """The frozen base model of Eq. 6 (G_θ with no LoRA), on the same clone."""
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def attention_projections(model) -> list[tuple[str, tuple]]:
    """``(module name, weight shape)`` of every attention projection of a MODEL's UNet, state-dict named."""
    found = [(name, tuple(module.weight.shape)) for name, module in model.model.named_modules()
             if ATTENTION_PROJECTION.search(name) and hasattr(module, "weight_function")]
    if not found:
        raise ValueError("this MODEL has no attention projections named attn1/attn2.to_q/to_k/to_v/to_out: "
                         "PALP trains LoRA on a Stable Diffusion UNet (SD1.x, SDXL).")
    return found


# --- text towers and the learned token ---------------------------------------------------------


@dataclasses.dataclass
class Tower:
    """One text encoder of a CLIP: its key in token dicts ("l", "g") and in embedding files ("clip_l")."""

    token_key: str
    embedding_key: str
    tokenizer: comfy.sd1_clip.SDTokenizer
    width: int


def towers(clip) -> list[Tower]:
    found = [Tower(t.embedding_key.removeprefix("clip_"), t.embedding_key, t, t.embedding_size)
             for t in vars(clip.tokenizer).values() if isinstance(t, comfy.sd1_clip.SDTokenizer)]
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


# --- files ---------------------------------------------------------------------------------------


def _plain_name(save_name: str) -> str:
    name = save_name.strip().removesuffix(".safetensors")
    if not re.fullmatch(r"[\w\-][\w\-.]*", name):
        raise ValueError(f"save_name {save_name!r} is not a plain name: use letters, digits, '-', '_' and '.', "
                         "no spaces or folders (it is also the prompt word embedding:<name>).")
    return name


@dataclasses.dataclass
class Paths:
    lora: str
    embeddings: list[str]
    checkpoint: str

    @classmethod
    def of(cls, save_name: str, subjects: int) -> "Paths":
        name = _plain_name(save_name)
        names = [name] + [f"{name}_{i + 1}" for i in range(1, subjects)]
        return cls(os.path.join(folder_paths.get_folder_paths("loras")[0], name + ".safetensors"),
                   [os.path.join(folder_paths.get_folder_paths("embeddings")[0], n + ".safetensors") for n in names],
                   os.path.join(folder_paths.get_output_directory(), FOLDER, name + ".checkpoint.safetensors"))

    @property
    def results(self) -> list[str]:
        return [self.lora, *self.embeddings]


def lora_state_dict(adapters: dict[str, LoRAAdapter]) -> dict[str, torch.Tensor]:
    """The host's generic LoRA keys (``comfy.lora.model_lora_keys_unet``): ``<module>.lora_up/down.weight``, ``.alpha``."""
    out = {}
    for module, adapter in adapters.items():
        out[f"{module}.lora_up.weight"] = adapter.up
        out[f"{module}.lora_down.weight"] = adapter.down
        out[f"{module}.alpha"] = torch.tensor(adapter.alpha)
    return out


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
    seed: int

    def metadata(self, step: int) -> dict[str, str]:
        return {"palp_settings": json.dumps(dataclasses.asdict(self)), "palp_step": str(step)}


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
    """The training loop of PALP (§4.2-4.4), run by ``run_loop`` inside ``CFGGuider.sample``.

    Branches: "positive" is the target prompt y_c (the base model's CFG branch), "negative" the empty
    prompt ∅; the personalized prompt y_P replaces the positive branch's context.
    """

    def __init__(self, settings: Settings, state: State, subjects: list[Subject], encode, sigma_of, paths: Paths,
                 checkpoint_every: int):
        self.s, self.state, self.subjects, self.encode = settings, state, subjects, encode
        self.sigma_of, self.paths, self.checkpoint_every = sigma_of, paths, checkpoint_every

    def checkpoint(self) -> None:
        save_atomic(self.state.tensors(), self.paths.checkpoint,
                    {"format": CHECKPOINT_FORMAT, **self.s.metadata(self.state.step)})

    def micro_step(self, loop, step: int, micro: int) -> tuple[torch.Tensor, float, float]:
        """One image batch, one σ, one shared ε: the step of ``guidance/palp.py``'s docstring."""
        s, gen = self.s, _generator(self.s.seed, step, micro)
        subject = self.subjects[int(torch.randint(len(self.subjects), (), generator=gen))]
        x0 = subject.latents[torch.randint(len(subject.latents), (s.batch_size,), generator=gen)]
        sigma = self.sigma_of(s.timestep_min + (s.timestep_max - s.timestep_min) * torch.rand((), generator=gen).item())
        eps = torch.randn(x0.shape, generator=gen).to(x0)
        x_t = renoise(x0, eps, sigma)
        context = self.encode(subject.tokens)                       # y_P with the learned token, with grad
        eps_pred = _eps(x_t, loop.denoise(x_t, sigma, "positive", context=context), sigma)
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
            pers_cond = _eps(x_hat_t, loop.denoise(x_hat_t, sigma, "positive", context=context.detach()), sigma)
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
            with grad_enabled():
                while state.step < s.steps:
                    state.optimizer.zero_grad(set_to_none=True)
                    personalization = alignment = 0.0
                    for micro in range(s.gradient_accumulation):
                        check_interrupt()       # Cancel stops within one micro-step
                        loss, p, a = self.micro_step(loop, state.step, micro)
                        if not math.isfinite(loss.item()):
                            raise ValueError(
                                f"the loss became {loss.item()} at step {state.step + 1}: training stopped and the "
                                f"last checkpoint ({self.paths.checkpoint}) was kept. Lower the learning rate or "
                                "the alignment weight, or train in fp32.")
                        (loss / s.gradient_accumulation).backward()
                        personalization += p / s.gradient_accumulation
                        alignment += a / s.gradient_accumulation
                    state.optimizer.step()
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
            # keep what the completed steps learned; the half-accumulated step is dropped
            self.checkpoint()
            raise
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


# --- the node ------------------------------------------------------------------------------------


class PALPTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PALPTrainer",
            display_name="PALP Trainer",
            category=CATEGORY,
            description="Prompt-aligned personalization (PALP, Arar et al. 2024): trains LoRA on the attention "
                        "projections and a new token [V] on subject images (the personalization loss, Eq. 1) while "
                        "keeping the model aligned with one target prompt (the score-sampling term, Eq. 6-7). "
                        "Outputs the personalized MODEL and CLIP (write embedding:<save_name> where the placeholder "
                        "was) and the loss curves; saves loras/<save_name>.safetensors and "
                        "embeddings/<save_name>.safetensors.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.x or SDXL). It is not changed."),
                io.Clip.Input("clip", tooltip="The base model's CLIP; its weights stay frozen, only the new token "
                                              "vector is learned. It is not changed."),
                io.Vae.Input("vae", tooltip="Encodes the subject images."),
                io.Image.Input("images", tooltip="Subject images (a batch; a single image works). Scaled to cover "
                                                 "resolution × resolution and centre-cropped."),
                io.String.Input("placeholder", default="[V]",
                                tooltip="The text standing for the subject in the personalization prompt. After "
                                        "training write embedding:<save_name> in its place."),
                io.String.Input("class_word", default="dog",
                                tooltip="The subject's class (e.g. 'cat'): the learned token starts at its embedding."),
                io.String.Input("personalization_prompt", default="a photo of [V]",
                                tooltip="y_P, paired with the subject images; must contain the placeholder "
                                        "(paper: 'a photo of [V]')."),
                io.String.Input("target_prompt", multiline=True, default="a sketch of a dog in Paris",
                                tooltip="y_c, the clean target prompt with the class word instead of the placeholder "
                                        "(paper: 'a sketch of a cat'); the model is aligned to it. Later, prompt "
                                        "with the same text and embedding:<save_name> for the class word."),
                io.Int.Input("steps", default=500, min=1, max=100000,
                             tooltip="Optimizer steps (paper: 500)."),
                io.Float.Input("learning_rate", default=5e-5, min=0.0, max=1.0, step=1e-6, round=False,
                               tooltip="Adam learning rate for LoRA and the token (paper: 5e-5 at batch 32)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Images per forward pass (sharing one timestep)."),
                io.Int.Input("gradient_accumulation", default=32, min=1, max=1024,
                             tooltip="Forward passes per optimizer step; batch_size × this is the effective batch "
                                     "(paper: 32, which its learning rate assumes). Lower it to train faster."),
                io.Int.Input("rank", default=32, min=1, max=256, tooltip="LoRA rank (paper: 32)."),
                io.Float.Input("alpha", default=15.0, min=0.0, max=50.0, step=0.1,
                               tooltip="α, CFG scale of the frozen base model on the target prompt (paper: 7.5 for "
                                       "compositions, 15 otherwise). Must exceed β. 15 / 7.5 kept more identity than "
                                       "7.5 / 1 at equal context." + host.TOY_TUNED),
                io.Float.Input("beta", default=7.5, min=0.0, max=50.0, step=0.1,
                               tooltip="β, CFG scale of the personalized model on y_P (paper: 1.0 for compositions, "
                                       "7.5 otherwise). At 1.0 one UNet pass per step is saved." + host.TOY_TUNED),
                io.Float.Input("alignment_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of the prompt-alignment term against the personalization MSE; 0 "
                                       "trains plain LoRA + token (no paper gives a value; 0.3 and 1 measured "
                                       "alike)." + host.TOY_TUNED),
                io.Boolean.Input("same_noise", default=True,
                                 tooltip="Re-noise x̂_0 with the ε that made x_t (paper §4.4: aligns better than "
                                         "fresh noise)."),
                io.Boolean.Input("rescale", default=True,
                                 tooltip="Multiply the alignment gradient by √ᾱ/√(1−ᾱ) so every timestep updates "
                                         "alike (paper §4.4)."),
                io.Float.Input("timestep_min", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Lowest training timestep as a fraction of the schedule (0 = least noise)."
                                       + host.UNTUNED),
                io.Float.Input("timestep_max", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Highest training timestep as a fraction of the schedule (1 = most noise)."
                                       + host.UNTUNED),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training side in pixels (SD1.x: 512, SDXL: 1024)."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="fp32",
                               tooltip="UNet compute dtype while training; LoRA, token and optimizer stay fp32. "
                                       "bf16 halves activation memory."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute each UNet block's activations during backward instead of keeping "
                                         "them: much less memory for a slower step (bench/RESULTS.md). Same result."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFF_FFFF,
                             tooltip="Seeds the LoRA init and every draw of image, timestep and noise."),
                io.String.Input("save_name", default="palp_subject",
                                tooltip="Name of loras/<name>.safetensors, embeddings/<name>.safetensors (prompt "
                                        "word embedding:<name>; the second subject's is <name>_2) and "
                                        "output/palp/<name>.checkpoint.safetensors."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace existing files of this name; off: refuse."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue from output/palp/<save_name>.checkpoint.safetensors at its step."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000,
                             tooltip="Save a checkpoint every this many steps (0: only on Cancel)."),
                io.Image.Input("images_2", optional=True,
                               tooltip="Second subject's images (PALP App. E, e.g. a painting to take the style of); "
                                       "each step trains on one subject, drawn at random."),
                io.String.Input("placeholder_2", default="[V2]", optional=True,
                                tooltip="The second subject's placeholder; write embedding:<save_name>_2 later."),
                io.String.Input("class_word_2", default="painting", optional=True,
                                tooltip="The second subject's class word (its token's starting value)."),
                io.String.Input("personalization_prompt_2", default="an oil painting of [V2]", optional=True,
                                tooltip="The second subject's y_P (paper App. E: 'an oil painting of [V2]')."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The base model with the trained LoRA."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP, knowing embedding:<save_name>."),
                io.Image.Output(display_name="loss_curves", tooltip="Personalization MSE, alignment residual "
                                                                    "mean(r²) and their weighted total per step."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, images, placeholder, class_word, personalization_prompt, target_prompt, steps,
                learning_rate, batch_size, gradient_accumulation, rank, alpha, beta, alignment_weight, same_noise,
                rescale, timestep_min, timestep_max, resolution, precision, gradient_checkpointing, seed, save_name,
                overwrite, resume, checkpoint_every, images_2=None, placeholder_2="[V2]", class_word_2="painting",
                personalization_prompt_2="an oil painting of [V2]") -> io.NodeOutput:
        specs = [(images, placeholder, class_word, personalization_prompt)]
        if images_2 is not None:
            specs.append((images_2, placeholder_2, class_word_2, personalization_prompt_2))
        settings = Settings([s[1] for s in specs], [s[2] for s in specs], [s[3] for s in specs], target_prompt, steps,
                            learning_rate, batch_size, gradient_accumulation, rank, alpha, beta, alignment_weight,
                            same_noise, rescale, timestep_min, timestep_max, resolution, precision, seed)
        _check(settings, specs)
        paths = Paths.of(save_name, len(specs))
        existing = [p for p in paths.results + ([] if resume else [paths.checkpoint]) if os.path.exists(p)]
        if existing and not overwrite:
            raise ValueError(f"{', '.join(existing)} already exist: choose another save_name, turn overwrite on, "
                             "or turn resume on to continue a checkpoint.")
        if resume and not os.path.exists(paths.checkpoint):
            raise ValueError(f"resume is on but there is no checkpoint {paths.checkpoint}: turn resume off to start.")

        towers_ = towers(clip)
        with torch.inference_mode(False):
            gen = torch.Generator().manual_seed(seed)
            adapters = {name: LoRAAdapter.create(shape, rank, gen, model.load_device)
                        for name, shape in attention_projections(model)}
            vectors = [{t.embedding_key: torch.nn.Parameter(class_word_vector(clip, t, spec[2])) for t in towers_}
                       for spec in specs]
            state = State(adapters, vectors, learning_rate)
            if resume:
                with safe_open(paths.checkpoint, framework="pt") as f:
                    metadata = f.metadata() or {}
                    if metadata.get("format") != CHECKPOINT_FORMAT:
                        raise ValueError(f"{paths.checkpoint} is not a PALP checkpoint: turn resume off.")
                    state.restore({k: f.get_tensor(k) for k in f.keys()}, int(metadata["palp_step"]))
                log.info("PALP: resuming %s at step %d of %d", paths.checkpoint, state.step, steps)

        worker = fresh_weights(model, PRECISIONS[precision])
        if gradient_checkpointing:
            worker = with_gradient_checkpointing(worker)
        for name, adapter in adapters.items():
            worker.add_weight_wrapper(f"{name}.weight", adapter)
        text_worker = clip.clone()
        text_worker.patcher = fresh_weights(clip.patcher)
        latent_format = model.get_model_object("latent_format")
        sampling = model.get_model_object("model_sampling")
        with tempfile.TemporaryDirectory() as markers:
            marker_clip = with_embedding_dirs(clip, [markers])
            subjects = []
            for s, (subject_images, ph, _, prompt) in enumerate(specs):
                marker = f"palp-marker-{s}"
                save_file({t.embedding_key: torch.full((1, t.width), _marker_value(s)) for t in towers_},
                          os.path.join(markers, marker + ".safetensors"))
                tokens = marker_clip.tokenize(prompt.replace(ph, f" embedding:{marker} "))
                if s not in splice(tokens, vectors, towers_)[1]:
                    raise ValueError(f"the placeholder {ph!r} did not reach the tokenizer from {prompt!r}: keep it "
                                     "outside weights like (…:1.2) and within the first 75 tokens.")
                latents = latent_format.process_in(vae.encode(square(subject_images, resolution)).float())
                subjects.append(Subject(latents, prompt, tokens))
        with torch.inference_mode(False):
            # normal tensors: autograd refuses to save inference tensors for backward
            subjects = [dataclasses.replace(s, latents=s.latents.clone()) for s in subjects]
            positive = conditioning(*(_clone(t) for t in host.encode_text(clip, target_prompt)))
            negative = conditioning(*(_clone(t) for t in host.encode_text(clip, "")))

        def encode(tokens):
            spliced, _ = splice(tokens, vectors, towers_)
            # the host's CLIP layers add residuals in place (x += …) after a layer norm has saved x, which
            # autograd refuses; saving copies makes the text encoder differentiable without touching it
            with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
                return text_worker.encode_from_tokens(spliced, return_dict=True)["cond"]

        def sigma_of(fraction):
            sigma = sampling.percent_to_sigma(1.0 - fraction)
            return min(max(sigma, float(sampling.sigma_min)), float(sampling.sigma_max))

        trainer = Trainer(settings, state, subjects, encode, sigma_of, paths, checkpoint_every)
        first = subjects[0].latents[:batch_size]
        try:
            run_loop(worker, positive, negative, latent_format.process_out(first), torch.tensor([1.0, 0.0]), trainer)
        except comfy.model_management.OOM_EXCEPTION as e:
            lighter = [] if gradient_checkpointing else ["turn gradient_checkpointing on"]
            lighter += [] if precision == "bf16" else ["use precision bf16"]
            raise ValueError(f"out of memory while training at {resolution}px, batch {batch_size}, rank {rank}: "
                             + "; ".join(lighter + ["lower batch_size (raise gradient_accumulation to keep the "
                                                    "effective batch), resolution or rank"]) + ".") from e

        metadata = settings.metadata(state.step)
        save_atomic(lora_state_dict(adapters), paths.lora, {"format": LORA_FORMAT, **metadata})
        for s, path in enumerate(paths.embeddings):
            save_atomic(vectors[s], path, metadata)
        log.info("PALP: saved %s and %s after %d steps", paths.lora, ", ".join(paths.embeddings), state.step)

        personalized = model.clone()
        with torch.inference_mode(False):
            for name, adapter in adapters.items():
                personalized.add_weight_wrapper(f"{name}.weight", adapter.frozen())
        out_clip = with_embedding_dirs(clip, [os.path.dirname(paths.embeddings[0])])
        curves = image_tensor(loss_plot(state.curves, alignment_weight))
        return io.NodeOutput(personalized, out_clip, curves, ui=ui.PreviewImage(curves, cls=cls))


def _clone(tensor):
    # the training graph must not hold the executor's inference tensors
    return None if tensor is None else tensor.clone()


def _check(settings: Settings, specs) -> None:
    """Refuse settings the run cannot use, saying what to change (α ≤ β only warns)."""
    for images, placeholder, _, prompt in specs:
        if images is None or images.shape[0] == 0:
            raise ValueError("no subject images: connect a batch of one or more images of the subject.")
        if not placeholder.strip():
            raise ValueError("the placeholder is empty: give the text that stands for the subject, e.g. [V].")
        if placeholder not in prompt:
            raise ValueError(f"the personalization prompt {prompt!r} does not contain the placeholder {placeholder!r}: "
                             f"write it where the subject goes, e.g. 'a photo of {placeholder}'.")
        if placeholder in settings.target_prompt:
            raise ValueError(f"the target prompt contains the placeholder {placeholder!r}: y_c is the clean prompt, "
                             "with the class word instead (e.g. 'a sketch of a cat in Paris').")
    if len({s[1] for s in specs}) < len(specs):
        raise ValueError("both subjects use the same placeholder: give each its own, e.g. [V1] and [V2].")
    if not 0 <= settings.timestep_min < settings.timestep_max <= 1:
        raise ValueError(f"the timestep range [{settings.timestep_min}, {settings.timestep_max}] is empty: give "
                         "0 ≤ timestep_min < timestep_max ≤ 1.")
    if settings.alpha <= settings.beta:
        log.warning("PALP: α = %g ≤ β = %g; the paper found α > β aligns better (e.g. 7.5 and 1.0).",
                    settings.alpha, settings.beta)


NODES = [PALPTrainer]
