"""PALPTrainer: prompt-aligned personalization (arXiv 2401.06105, methods.md §3) as one training node.

The node checks its inputs, prepares the subjects and the text encoders and hands over to the training
loop (``nodes/palp_train.py``, whose maths is ``guidance/palp.py``: Eq. 1, 2, 6, 7), which writes the
results; the files are ``nodes/palp_files.py``. The MODEL it returns is the written LoRA file loaded by
the host's own LoRA loader.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile

import torch
from comfy_api.latest import io, ui
from safetensors.torch import save_file

import comfy.model_management
import comfy.sd
import comfy.utils

from ..guidance.palp import LoRAAdapter
from . import host
from .checkpointing import with_gradient_checkpointing
from .inversion import conditioning
from .palp_files import Paths, read_checkpoint, read_curves, run_inputs, stale
from .palp_train import (PRECISIONS, Settings, State, Subject, Trainer, _marker_value, attention_projections,
                         class_word_vector, image_tensor, loss_plot, splice, square, towers,
                         with_embedding_dirs)
from .sampling import fresh_weights, gradient_model, math_attention, run_loop

CATEGORY = "personalize/palp"

log = logging.getLogger(__name__)


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
                                tooltip="The text standing for the subject in the personalization prompt, found "
                                        "as a whole word (V is not found in 'Vienna'). After training write "
                                        "embedding:<save_name> in its place."),
                io.String.Input("class_word", default="dog",
                                tooltip="The subject's class (e.g. 'cat'): the learned token starts at its embedding."),
                io.String.Input("personalization_prompt", default="a photo of [V]",
                                tooltip="y_P, paired with the subject images; must contain the placeholder "
                                        "(paper: 'a photo of [V]')."),
                io.String.Input("target_prompt", multiline=True, default="a sketch of a dog in Paris",
                                tooltip="y_c, the clean target prompt with the class word instead of the placeholder "
                                        "(paper: 'a sketch of a cat'); the model is aligned to it, so it must not be "
                                        "empty. Later, prompt with the same text and embedding:<save_name> for the "
                                        "class word."),
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
                                       "compositions, 15 otherwise; above β, which aligned better). α ≤ β still "
                                       "trains, with a warning. 15 / 7.5 kept more identity than 7.5 / 1 at equal "
                                       "context." + host.TOY_TUNED),
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
                                       "bf16 halves activation memory; the LoRA'd attention projections still "
                                       "compute in fp32 with the LoRA as a separate branch, so its first small "
                                       "updates reach the forward."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute each UNet block's activations during backward instead of keeping "
                                         "them: much less memory for a slower step (bench/RESULTS.md). Same result."),
                # not named "seed": the frontend gives an INT of that name a randomize-after-run control, and a
                # new seed each Run would train again (or be refused as a changed run)
                io.Int.Input("training_seed", default=0, min=0, max=0xFFFF_FFFF,
                             tooltip="Seeds the LoRA init and every draw of image, timestep and noise."),
                io.String.Input("save_name", default="palp_subject",
                                tooltip="Name of loras/<name>.safetensors, embeddings/<name>.safetensors (prompt "
                                        "word embedding:<name>; the second subject's is <name>_2) and "
                                        "output/palp/<name>.checkpoint.safetensors."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Files of this name from a run with other settings or inputs: on, train "
                                         "again and replace them; off, refuse and say what differs. Files from "
                                         "this very run (a re-queue) are always reused without training; files "
                                         "PALP did not write are never replaced."),
                io.Boolean.Input("resume", default=False,
                                 tooltip="Continue an unfinished (cancelled or stopped) run from "
                                         "output/palp/<save_name>.checkpoint.safetensors at its step. Its settings "
                                         "and inputs must be this run's, except a larger steps; a finished run "
                                         "leaves no checkpoint."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000,
                             tooltip="Save a checkpoint every this many steps (0: only on Cancel)."),
                io.Image.Input("images_2", optional=True,
                               tooltip="Second subject's images (PALP App. E, e.g. a painting to take the style of); "
                                       "each step trains on one subject, drawn at random."),
                io.String.Input("placeholder_2", default="", optional=True,
                                tooltip="Only with images_2 (leave empty otherwise): the second subject's "
                                        "placeholder, e.g. [V2]; write embedding:<save_name>_2 later."),
                io.String.Input("class_word_2", default="", optional=True,
                                tooltip="Only with images_2 (leave empty otherwise): the second subject's class "
                                        "word, e.g. painting (its token's starting value)."),
                io.String.Input("personalization_prompt_2", default="", optional=True,
                                tooltip="Only with images_2 (leave empty otherwise): the second subject's y_P "
                                        "(paper App. E: 'an oil painting of [V2]')."),
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
                rescale, timestep_min, timestep_max, resolution, precision, gradient_checkpointing, training_seed,
                save_name, overwrite, resume, checkpoint_every, images_2=None, placeholder_2="", class_word_2="",
                personalization_prompt_2="") -> io.NodeOutput:
        # the host's set_inpaint gives the model these extra UNet inputs; training never supplies them (the host
        # failed deep in its conds, 'NoneType' object has no attribute 'shape')
        if "masked_image" in model.get_model_object("concat_keys"):
            raise ValueError("'model' is an inpainting model (its UNet also takes a mask and a masked image), and PALP "
                             "trains on whole images: train on the base model it was made from and load the LoRA "
                             "into the inpainting one.")
        specs = [(images, placeholder, class_word, personalization_prompt)]
        second = (placeholder_2, class_word_2, personalization_prompt_2)
        if images_2 is not None:
            specs.append((images_2, *second))
        elif any(text.strip() for text in second):
            log.warning("PALP: second-subject texts are set but images_2 is not connected: they are ignored "
                        "(single-subject training).")
        settings = Settings([s[1] for s in specs], [s[2] for s in specs], [s[3] for s in specs], target_prompt, steps,
                            learning_rate, batch_size, gradient_accumulation, rank, alpha, beta, alignment_weight,
                            same_noise, rescale, timestep_min, timestep_max, resolution, precision, training_seed)
        _check(settings, specs)
        host.require_clip_for(model, clip, "PALP Trainer")
        paths = Paths.of(save_name, len(specs))
        inputs = run_inputs(model, clip, vae, [spec[0] for spec in specs])
        if any(os.path.exists(p) for p in paths.results):
            differences = stale(paths, settings.record(), inputs)
            if not differences:         # a re-queue: the files are this run's result, as the host's cache would be
                log.info("PALP: %s holds this run's result (same settings and inputs): reused, not retrained",
                         paths.lora)
                return _outputs(cls, model, clip, paths, read_curves(paths.lora), alignment_weight)
            if not overwrite:
                raise ValueError(f"output {paths.name!r} exists from a run with different {', '.join(differences)}"
                                 " (the file's vs this run's): choose another save_name, or turn overwrite on to "
                                 "train again and replace it.")
        elif os.path.exists(paths.checkpoint) and not (resume or overwrite):
            raise ValueError(f"{paths.checkpoint} is left from an unfinished run: turn resume on to continue it, "
                             "overwrite on to start again, or choose another save_name.")
        if resume and not os.path.exists(paths.checkpoint):
            raise ValueError(f"resume is on but there is no checkpoint {paths.checkpoint} (a finished run removes its "
                             "own): turn resume off to start.")

        towers_ = towers(clip)
        with torch.inference_mode(False):
            # checked before anything is allocated (a refused resume costs nothing), read as tensors training updates
            saved = read_checkpoint(paths.checkpoint, settings.record(), inputs) if resume else None
            gen = torch.Generator().manual_seed(training_seed)
            adapters = {name: LoRAAdapter.create(shape, rank, gen, model.load_device)
                        for name, shape in attention_projections(model)}
            vectors = [{t.embedding_key: torch.nn.Parameter(class_word_vector(clip, t, spec[2])) for t in towers_}
                       for spec in specs]
            state = State(adapters, vectors, learning_rate)
            if saved is not None:
                state.restore(*saved)
                log.info("PALP: resuming %s at step %d of %d", paths.checkpoint, state.step, steps)

        worker = gradient_model(model, PRECISIONS[precision])
        if gradient_checkpointing:
            worker = with_gradient_checkpointing(worker)
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
                tokens = marker_clip.tokenize(_placeholder(ph).sub(f" embedding:{marker} ", prompt))
                if s not in splice(tokens, vectors, towers_)[1]:
                    raise ValueError(f"the placeholder {ph!r} did not reach the tokenizer from {prompt!r}: keep it "
                                     "outside weights like (…:1.2) and within the first 75 tokens.")
                latents = latent_format.process_in(vae.encode(square(subject_images, resolution)).float())
                if not torch.isfinite(latents).all():
                    raise ValueError("the VAE encoded the subject images to NaN/Inf latents: run the VAE in fp32 "
                                     "(the host's --fp32-vae) or use another VAE; nothing was trained or saved.")
                subjects.append(Subject(latents, prompt, tokens))
        with torch.inference_mode():
            # as the executor encodes: outside inference mode (grad on) a GPU's text encoder fails
            # ("Inference tensors do not track version counter")
            encoded = [host.encode_text(clip, text) for text in (target_prompt, "")]
        with torch.inference_mode(False):
            # normal tensors: autograd refuses to save inference tensors for backward
            subjects = [dataclasses.replace(s, latents=s.latents.clone()) for s in subjects]
            positive, negative = (conditioning(*(_clone(t) for t in pair)) for pair in encoded)

        def encode(tokens):
            """y_P's (context, pooled vector) with the learned tokens spliced in, differentiable in them."""
            spliced, _ = splice(tokens, vectors, towers_)
            # the host's CLIP layers add residuals in place (x += …) after a layer norm has saved x, which
            # autograd refuses; saving copies makes the text encoder differentiable without touching it
            with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved), math_attention():
                out = text_worker.encode_from_tokens(spliced, return_dict=True)
            return out["cond"], out["pooled_output"]

        def sigma_of(fraction):
            sigma = sampling.percent_to_sigma(1.0 - fraction)
            return min(max(sigma, float(sampling.sigma_min)), float(sampling.sigma_max))

        trainer = Trainer(settings, state, subjects, encode, sigma_of, paths, checkpoint_every, inputs)
        first = subjects[0].latents[:batch_size]
        try:
            run_loop(worker, positive, negative, latent_format.process_out(first), torch.tensor([1.0, 0.0]), trainer)
        except comfy.model_management.OOM_EXCEPTION as e:
            lighter = [] if gradient_checkpointing else ["turn gradient_checkpointing on (not a setting of the run: "
                                                         "resume continues its checkpoint with it)"]
            lighter += [] if precision == "bf16" else ["use precision bf16"]
            raise ValueError(f"out of memory while training at {resolution}px, batch {batch_size}, rank {rank}: "
                             + "; ".join(lighter + ["lower batch_size (raise gradient_accumulation to keep the "
                                                    "effective batch), resolution or rank"]) + ".") from e
        return _outputs(cls, model, clip, paths, state.curves, alignment_weight)


def _outputs(node, model, clip, paths: Paths, curves: dict[str, list[float]], alignment_weight: float) -> io.NodeOutput:
    """The personalized MODEL (the written LoRA file, loaded as LoraLoaderModelOnly loads it), CLIP and curves."""
    # the host's own LoRA path on a clone, from the file itself: the MODEL is the file's on every weight format
    # (merged as a weight wrapper into a scaled-fp8 weight, ΔW came out multiplied by the layer's scale_weight)
    lora = comfy.utils.load_torch_file(paths.lora, safe_load=True)
    personalized, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    out_clip = with_embedding_dirs(clip, [os.path.dirname(paths.embeddings[0])])
    image = image_tensor(loss_plot(curves, alignment_weight))
    return io.NodeOutput(personalized, out_clip, image, ui=ui.PreviewImage(image, cls=node))


def _clone(tensor):
    # the training graph must not hold the executor's inference tensors
    return None if tensor is None else tensor.clone()


def _placeholder(placeholder: str) -> re.Pattern:
    """The placeholder as a whole word: not touching a letter, digit or '_' (so V is not found in 'Vienna')."""
    return re.compile(rf"(?<!\w){re.escape(placeholder)}(?!\w)")


def _check(settings: Settings, specs) -> None:
    """Refuse settings the run cannot use, saying what to change (α ≤ β only warns)."""
    if not settings.target_prompt.strip():
        raise ValueError("the target prompt is empty: y_c is the prompt PALP aligns the model to, so write the one "
                         "you will generate with, the class word in the subject's place (e.g. 'a sketch of a cat in "
                         "Paris').")
    for images, placeholder, class_word, prompt in specs:
        if not (placeholder.strip() and class_word.strip() and prompt.strip()):
            raise ValueError("a subject has an empty placeholder, class word or personalization prompt: give all "
                             "three (with images_2 connected also placeholder_2, class_word_2 and "
                             "personalization_prompt_2, e.g. [V2], painting, 'an oil painting of [V2]').")
        if images is None or images.shape[0] == 0:
            raise ValueError("no subject images: connect a batch of one or more images of the subject.")
        if not torch.isfinite(images).all():
            bad = sorted({int(i) for i in (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten()})
            raise ValueError(f"subject image(s) {bad} of the batch (0-based) contain NaN or Inf values: check the "
                             "node that made them; nothing was trained or saved.")
        if not _placeholder(placeholder).search(prompt):
            raise ValueError(f"the personalization prompt {prompt!r} does not contain the placeholder {placeholder!r} "
                             f"as a word of its own: write it where the subject goes, e.g. 'a photo of {placeholder}'.")
        if _placeholder(placeholder).search(settings.target_prompt):
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
