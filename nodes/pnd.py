"""Pick-and-Draw (arXiv 2401.16762): UREMDGuidance, LayoutGuidance and the guided sampler."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

import comfy.patcher_extension
import comfy.sample
import comfy.samplers

from ..attention.layers import RULE_HELP, select_layers
from ..attention.store import AttentionStore
from ..guidance.losses import masked_vectors
from ..guidance.pnd import APPEARANCE_WINDOW, LAYOUT_WINDOW, AppearanceTerm, LayoutTerm, sample_guided
from . import host
from .checkpointing import STOP_AFTER_KEY, block_order, may_stop_early, with_gradient_checkpointing
from .inversion import InversionType, require_same_model
from .sampling import Loop, grad_enabled, gradient_model, progress, readable_weights, run_loop

CATEGORY = "personalize/pick-and-draw"
Appearance = io.Custom("PERSONALIZE_PND_APPEARANCE")
Layout = io.Custom("PERSONALIZE_PND_LAYOUT")
# gradient checkpointing keeps the smallest blocks whole within this share of the largest block's activations
# (nodes/checkpointing.py). bench/bench_checkpointing.py, SD1.5 size, 256², CPU, one gradient pass: time against
# every block checkpointed / peak against a plain CFG pass: 0 → 1 / 0.84×, 0.5 → 0.96 / 0.93×, 1 → 0.91 / 1.05×,
# 2 → 0.86 / 1.29×, none checkpointed → 0.80 / 3.48×
KEEP_WHOLE = 1.0
MARK = host.SAMPLER_CHECK_KEY   # without_capture drops the sampler check for the pack's own loops


def _window_inputs(default):
    return [
        io.Float.Input("start", default=default[0], min=0.0, max=1.0, step=0.01,
                       tooltip="Window start, in the host's percent of the schedule (0 = first step). P&D Fig. 8: "
                               "layout [0, 0.2), appearance [0.2, 0.4) — steps [0, 10) and [10, 20) of 50 DDIM steps."),
        io.Float.Input("end", default=default[1], min=0.0, max=1.0, step=0.01,
                       tooltip="Window end (exclusive), same units. Percent units keep the window's meaning for any "
                               "step count, scheduler or denoise."),
    ]


def _sigma_window(model, start, end):
    if not 0 <= start < end <= 1:
        raise ValueError(f"the window [{start}, {end}) is empty or outside [0, 1]: give 0 ≤ start < end ≤ 1.")
    sampling = model.get_model_object("model_sampling")
    return sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)


def _window_steps(schedule: list[float], sigma_start: float, sigma_end: float, what: str) -> list[int]:
    steps = [i for i, s in enumerate(schedule[:-1]) if sigma_end < s <= sigma_start]
    if not steps:
        late = schedule[0] <= sigma_end     # the whole schedule comes after the window
        raise ValueError(f"the {what} window holds no step of this schedule ({len(schedule) - 1} steps, "
                         f"σ {schedule[0]:.3g} → {schedule[-2]:.3g}): " + (
                             f"the schedule starts after the window's end (σ {sigma_end:.3g}). Made with denoise "
                             "below 1? Raise denoise. A scheduler that starts low at few steps (ddim_uniform below "
                             "about 5)? Use more steps. Or end the window later." if late else
                             "widen the window or use more steps."))
    return steps


def _appearance_layers(layers, rule):
    """'auto': decoder cross-attention one level coarser than the finest attention level.

    That is P&D's 32×32 decoder layers on SD1.x at 512² (latent 1/2) and 1/4 of the latent on SDXL,
    whose finest attention level is 1/2 — the same 32×32 grid at 1024².
    """
    if rule.strip().lower() == "auto":
        finest = min(l.scale for l in layers if l.kind == "cross")
        rule = f"decoder cross 1/{finest * 2}"
    return select_layers(layers, rule, kind="cross")


class UREMDGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="UREMDGuidance",
            display_name="UREMD Appearance Guidance (Pick-and-Draw)",
            category=CATEGORY,
            description="Builds P&D's appearance palette (§3.2): features of the personalized model at the reference's "
                        "inverted pivots, masked where the subject word's cross-attention is ≥ τ. Feed it to the "
                        "Pick-and-Draw Sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The personalized model (the one you sample with)."),
                InversionType.Input("inversion", tooltip="The reference image's inversion (NullTextInvert / LoadInversion)."),
                io.Clip.Input("clip", tooltip="Locates the subject word in the inversion's source prompt."),
                io.String.Input("subject", default="dog",
                                tooltip="The subject word in the reference's source prompt (e.g. 'dog'). Use the word the sampler "
                                        "watches in the generation prompt: a multi-token word's map is the sum of its "
                                        "tokens', so τ means something else for 'sks dog' than for 'dog' (the "
                                        "sampler warns when the token counts differ)."),
                io.Float.Input("tau", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="τ: feature positions whose normalised subject attention Â ≥ τ form the palette "
                                       "and the generated set (P&D Eq. 3; the paper gives no value). 0.3 and 0.5 "
                                       "measured alike, 0.7 moved identity less." + host.TOY_TUNED),
                io.String.Input("layers", default="auto",
                                tooltip="Layers whose features are matched. 'auto' = decoder cross-attention at 1/2 of the "
                                        "latent on SD1.x (P&D's 32×32 at 512², Table 2), 1/4 on SDXL. " + RULE_HELP),
                *_window_inputs(APPEARANCE_WINDOW),
                io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="α of Eq. 9. With the sampler's 'normalise' on, it scales this term's guided step: each step moves "
                                       "the latent by η·α in RMS (2 doubles it). Off: ℓ = α·ℓ_app + β·ℓ_lay "
                                       "exactly." + host.UNTUNED),
            ],
            outputs=[Appearance.Output(display_name="appearance")],
        )

    @classmethod
    def execute(cls, model, inversion, clip, subject, tau, layers, start, end, weight) -> io.NodeOutput:
        chosen = _appearance_layers(host.unet_layers(model), layers)
        positions, prompt_len = host.prompt_word_positions(clip, inversion.prompt, [subject])
        sigma_start, sigma_end = _sigma_window(model, start, end)
        schedule = [float(s) for s in inversion.sigmas]
        steps = _window_steps(schedule, sigma_start, sigma_end, "appearance")
        require_same_model(inversion, model, "the inversion")
        store = AttentionStore([subject], positions, prompt_len, chosen)
        patched = host.install_capture(host.without_capture(model), store, chosen, chosen, record=False)

        def palette_pass(loop: Loop, x, sigmas):
            palette, on_step = [], progress(len(steps))
            for done, i in enumerate(steps, 1):
                with store.live() as live:
                    loop.denoise(inversion.trajectory[i].to(x), schedule[i], "positive")
                palette.append({l.key: masked_vectors(live.features[l.key][0].flatten(0, 1),
                                                      live.maps[l.key][0, 0] >= tau).detach().float().cpu()
                                for l in chosen})
                on_step(done)
            return x, palette

        latent = inversion.trajectory[-1][:1]
        _, palette = run_loop(patched, inversion.positive, inversion.negative, latent, inversion.sigmas[:2], palette_pass)
        empty = [(i, key) for i, step in zip(steps, palette) for key, vectors in step.items() if vectors.shape[0] == 0]
        if empty:
            raise ValueError(
                f"the palette is empty at {len(empty)} of {len(steps) * len(chosen)} (step, layer) pairs (e.g. step "
                f"{empty[0][0]}, layer {'.'.join(map(str, empty[0][1]))}): no position's attention to {subject!r} "
                f"reaches τ = {tau} there, so the appearance term would compare against nothing. The subject is not "
                "attended in the reference (check the word and the source prompt), or lower τ.")
        term = AppearanceTerm(sigma_start, sigma_end, weight, [schedule[i] for i in steps], [l.key for l in chosen],
                              palette, tau, subject, len(positions[0]))
        return io.NodeOutput(term)


class LayoutGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LayoutGuidance",
            display_name="Layout Guidance (Pick-and-Draw)",
            category=CATEGORY,
            description="Samples P&D's layout template (§3.3): the vanilla model with the class-word prompt, from the same "
                        "noise and σ schedule as the generation, recording the class word's cross-attention maps over "
                        "the layout window. Feed it to the Pick-and-Draw Sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The vanilla (non-personalized) model that draws the layout."),
                io.Clip.Input("clip", tooltip="Locates the class word in the template prompt."),
                io.String.Input("prompt", multiline=True, default="a dog swimming in the water",
                                tooltip="The template prompt: the generation prompt with the class word instead of the "
                                        "personal token. Encode the same text for 'positive'."),
                io.String.Input("word", default="dog", tooltip="The class word whose maps are the template."),
                io.Conditioning.Input("positive", tooltip="The template prompt, encoded."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG of the template run."),
                io.Noise.Input("noise", tooltip="The generation's NOISE: the template starts from the same noise (P&D "
                                                "leaves this open; the same noise gives the same layout per seed)."),
                io.Sigmas.Input("sigmas", tooltip="The generation's SIGMAS: the template's steps must be the generation's."),
                io.Latent.Input("latent", tooltip="The generation's input LATENT (its size and batch)."),
                io.String.Input("layers", default="cross",
                                tooltip="Layers whose maps are matched; P&D uses every cross-attention layer, each "
                                        "separately. " + RULE_HELP),
                *_window_inputs(LAYOUT_WINDOW),
                io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="β of Eq. 9. With the sampler's 'normalise' on, it scales this term's guided step: each step moves "
                                       "the latent by η·β in RMS (2 doubles it). Off: ℓ = α·ℓ_app + β·ℓ_lay "
                                       "exactly." + host.UNTUNED),
                io.Int.Input("kernel_size", default=3, min=1, max=15, step=2,
                             tooltip="Gaussian smoothing G of the maps (Attend-and-Excite's default; P&D gives none)."),
                io.Float.Input("smooth_sigma", default=0.5, min=0.05, max=10.0, step=0.05,
                               tooltip="σ of the smoothing kernel (Attend-and-Excite's default)."),
            ],
            outputs=[Layout.Output(display_name="layout")],
        )

    @classmethod
    def execute(cls, model, clip, prompt, word, positive, negative, cfg, noise, sigmas, latent, layers, start, end,
                weight, kernel_size, smooth_sigma) -> io.NodeOutput:
        if kernel_size % 2 == 0:    # the host does not enforce the widget's step of 2 in the API
            raise ValueError(f"kernel_size must be odd (the kernel centred on each cell), got {kernel_size}.")
        chosen = select_layers(host.unet_layers(model), layers, kind="cross")
        positions, prompt_len = host.prompt_word_positions(clip, prompt, [word])
        sigma_start, sigma_end = _sigma_window(model, start, end)
        schedule = [float(s) for s in sigmas]
        steps = _window_steps(schedule, sigma_start, sigma_end, "layout")
        store = AttentionStore([word], positions, prompt_len, chosen, offload_device=host.offload_device(model))
        # the prompt is checked on the entries the template records (host.prompt_entries), as in the sampler
        checked = host.check_sampler_prompt(host.without_capture(model), clip, prompt, "Layout Guidance")
        guider = comfy.samplers.CFGGuider(host.install_capture(checked, store, chosen, []))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        on_step = progress(steps[-1] + 1)
        # the generation's own noise mask (inpainting): the template is what the vanilla model draws there
        guider.sample(noise.generate_noise({**latent, "samples": samples}), samples,
                      comfy.samplers.sampler_object("euler"), sigmas[:steps[-1] + 2], seed=noise.seed,
                      denoise_mask=latent.get("noise_mask"), callback=lambda step, x0, x, total: on_step(step + 1))
        run = store.runs[-1]
        missing = [i for i in steps if any((i, l.key, 0) not in run.maps for l in chosen)]
        if missing:
            raise ValueError(NO_ENTRY.format(f"the template's step {missing[0]} (σ {schedule[missing[0]]:.4g})",
                                             "'positive'"))
        maps = [{l.key: run.maps[(i, l.key, 0)][:, 0] for l in chosen} for i in steps]
        term = LayoutTerm(sigma_start, sigma_end, weight, [schedule[i] for i in steps], [l.key for l in chosen], maps,
                          kernel_size, smooth_sigma, (samples.shape[0], *samples.shape[-2:]), word, len(positions[0]))
        return io.NodeOutput(term)


NO_ENTRY = ("{} has no pass of the prompt over the whole latent: no entry of the {} conditioning runs there. An "
            "area or a mask's bounds (Conditioning Set Area / Set Mask) runs on a crop of the latent, and a timestep "
            "range (ConditioningSetTimestepRange) may leave the step out; P&D compares whole-image attention maps at "
            "every step of its windows: give the prompt an entry without an area, active over the windows.")
NO_SAMPLER = ("the Pick-and-Draw Sampler's MODEL was sampled without its SAMPLER ({}) over steps of a guidance "
              "window: the appearance and layout terms would be ignored there and the image would be plain "
              "sampling. Wire both outputs of the Pick-and-Draw Sampler node into SamplerCustom or "
              "SamplerCustomAdvanced (MODEL → model, SAMPLER → sampler), not into KSampler.")


class _Runs:
    """How many runs the P&D SAMPLER has driven, shared with its MODEL's check (also through a deep copy of the
    sampler's options by another pack)."""
    count = 0

    def __deepcopy__(self, memo):
        return self


def _needs_own_sampler(terms, runs: _Runs):
    """OUTER_SAMPLE wrapper of the P&D MODEL: a run that holds a step of a term's window must be driven by the P&D
    SAMPLER (a run without one, e.g. a hires pass at low denoise or SplitSigmas' tail, ignores nothing).

    A stock sampler (KSampler, KSamplerSelect) is refused before it starts; any other sampler (another pack's
    wrapper around ours, say) is checked after the run, by whether ours ran (it counts its runs in ``runs``).
    """
    def wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        schedule = sigmas.tolist()[:-1]
        if not any(t.active(s) for t in terms for s in schedule):
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        if isinstance(sampler, comfy.samplers.KSAMPLER) and sampler.sampler_function is not sample_pick_and_draw and \
                not any(isinstance(v, comfy.samplers.Sampler) for v in sampler.extra_options.values()):
            raise ValueError(NO_SAMPLER.format(f"a stock sampler, {getattr(sampler.sampler_function, '__name__', '?')}"))
        before = runs.count
        output = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        if runs.count == before:
            raise ValueError(NO_SAMPLER.format(f"the sampler was {type(sampler).__name__}"))
        return output
    return wrapper


def sample_pick_and_draw(model, x, sigmas, extra_args=None, callback=None, disable=None, store=None, terms=(),
                         eta=0.1, normalise=True, subject="", runs=None):
    """The SAMPLER's function: P&D guided Euler sampling (``guidance.pnd.sample_guided``) in the host's loop.

    Inside a window each active term's gradient comes from one extra cond-only pass with live maps and
    features (weighted after per-term normalisation, ``guided_update``); every other call is the host's own CFG prediction, so CFG, conditioning, noise masks and
    other patches stay the user's.
    """
    loop = Loop(model, extra_args, callback)
    if loop.guider.model_options.get("transformer_options", {}).get(MARK) is not store:
        raise ValueError("the Pick-and-Draw SAMPLER needs the MODEL from the same Pick-and-Draw Sampler node: wire that "
                         "node's MODEL output into the sampler node too.")
    runs.count += 1
    # the guidance pass runs the entries over the whole latent (the sampler's CFG pass runs them all)
    whole = host.prompt_entries(loop.guider, x.shape)
    if not whole:
        raise ValueError(NO_ENTRY.format("this run", "sampler's positive"))
    schedule = [float(s) for s in sigmas]
    for term in terms:
        if not any(term.active(s) for s in schedule[:-1]):
            raise ValueError(
                f"the {type(term).__name__}'s window (σ {term.sigma_start:.4g} → {term.sigma_end:.4g}) holds no step of "
                f"this run (σ {schedule[0]:.4g} → {schedule[-2]:.4g}; e.g. a denoise below 1 starts after it), so it "
                "would do nothing and the image would be plain Euler sampling. Move or widen its window, raise denoise, "
                "or disconnect the term.")
        if isinstance(term, LayoutTerm) and term.latent_shape is not None and \
                term.latent_shape != (x.shape[0], *x.shape[-2:]):
            raise ValueError(
                "the layout template was sampled for a latent of batch {} and size {}×{}, this generation is batch {} "
                "and {}×{}: wire the generation's own LATENT (and NOISE, SIGMAS) into Layout Guidance.".format(
                    term.latent_shape[0], term.latent_shape[2], term.latent_shape[1], x.shape[0], x.shape[-1],
                    x.shape[-2]))
        if missing := term.missing(schedule):
            raise ValueError(
                f"the {type(term).__name__} was made for another σ schedule: it has no data for σ "
                f"{', '.join(f'{s:.4g}' for s in missing[:4])} of this run. Use the same steps/scheduler (and, for the "
                "layout template, the same SIGMAS) as the generation, or re-invert the reference with them.")

    # the maps and features are all the guidance pass is for: the UNet stops after the last block holding an
    # active term's layer, unless another pack's wrapper would see the stopped pass's output
    stop_early = may_stop_early(loop.extra_args["model_options"])

    def guidance_grad(x, sigma):
        """Each active term's gradient ∇_x ℓ_k from one pass (one backward per term: ``guided_update``
        normalises each before weighting) and the weights α, β."""
        s = float(sigma)
        active = [t for t in terms if t.active(s)]
        if not active:
            return None
        empty = []
        options = loop.extra_args["model_options"]
        if stop_early:
            last = max((key[:2] for t in active for key in t.layers), key=block_order)
            options = {**options, "transformer_options": {**options.get("transformer_options", {}), STOP_AFTER_KEY: last}}
        with grad_enabled(), store.live() as live:   # backward too: checkpointing recomputes with live capture
            xg = x.detach().clone().requires_grad_(True)
            loop.denoise(xg, sigma, "positive", model_options=options, entries=whole)
            if any(key not in live.maps for t in active for key in t.layers):
                raise ValueError(NO_ENTRY.format(f"the guided step at σ {s:.4g}", "sampler's positive"))
            losses = [t.loss(s, live, lambda key, b: empty.append((key, b))) if isinstance(t, AppearanceTerm)
                      else t.loss(s, live) for t in active]
            grads = [torch.autograd.grad(loss.sum(), xg, retain_graph=k < len(losses) - 1)[0] if loss.requires_grad
                     else torch.zeros_like(xg) for k, loss in enumerate(losses)]
        if empty:
            logging.warning("Pick-and-Draw: at σ %.4g the generated image's attention to %r reaches τ nowhere in %d "
                        "(layer, item) pairs (items %s): the appearance term compares nothing there (those layers add "
                        "0). Lower τ or check the subject word.", s, subject, len(empty),
                        sorted({b for _, b in empty}))
        return grads, [t.weight for t in active]

    def on_skip(i, skipped):
        logging.warning(f"Pick-and-Draw: step {i}: the guidance gradient was not finite for batch items "
                        f"{skipped.nonzero().flatten().tolist()}; their guidance step was skipped.")

    # the loop loads no other model: the UNet's weights are made readable once, not per gradient pass
    with readable_weights([loop.base_model.diffusion_model]):
        return sample_guided(loop.cfg_denoise, x, sigmas, guidance_grad, eta, normalise, callback, on_skip,
                             getattr(loop.base_model.model_sampling, "sigma_data", 1.0))


class PickAndDrawSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizePickAndDrawSampler",
            display_name="Pick-and-Draw Sampler",
            category=CATEGORY,
            description="P&D guided sampling (Eq. 9–10): inside each guidance window the latent moves down the gradient "
                        "of α·ℓ_app + β·ℓ_lay before every Euler (= DDIM) step. Wire BOTH outputs into SamplerCustom / "
                        "SamplerCustomAdvanced (the MODEL carries the attention patches the gradient needs).",
            inputs=[
                io.Model.Input("model", tooltip="The personalized model (checkpoint, LoRA…) — or vanilla SD itself."),
                io.Clip.Input("clip", tooltip="Locates the subject word in the generation prompt."),
                io.String.Input("prompt", multiline=True, default="a photo of a sks dog swimming in the water",
                                tooltip="The generation prompt, as encoded for the sampler's positive conditioning."),
                io.String.Input("subject", default="dog",
                                tooltip="The subject word in the generation prompt (its maps are matched). Use the palette's and "
                                        "the template's word (same token count; a warning says when not)."),
                io.Float.Input("eta", default=0.3, min=0.0, max=10.0, step=0.01,
                               tooltip="η_g. With 'normalise' on, how far (RMS, in the unit-variance latent) each term's guided "
                                       "step moves every image, times the term's weight; 0 = plain Euler/DDIM sampling. "
                                       "0.3: the largest step that kept the prompt's context (0.1 barely moved identity, "
                                       "1.0 lost the context)." + host.TOY_TUNED),
                io.Boolean.Input("normalise", default=True,
                                 tooltip="On: scale-free steps, each term's gradient normalised then weighted, "
                                         "η·Σ w·∇ℓ/RMS(∇ℓ). Off: the paper's literal z ← z − η∇(αℓ_app + βℓ_lay) "
                                         "(η then carries the loss scale)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="On: the guidance pass keeps only each UNet block's input and recomputes the "
                                         "block during backward (all but the smallest blocks, kept whole while their "
                                         "activations sum to at most the largest's), so a guided step needs about the memory of a "
                                         "plain step (the pass computes in fp32 on fp16/bf16 models; a ControlNet's "
                                         "own activations are still kept). Off: faster guided steps, but the pass's "
                                         "activations are kept (SD1.5 at 256²: 3.3-3.5x a plain step's memory, more "
                                         "at larger sizes). Same image either way."),
                Appearance.Input("appearance", optional=True, tooltip="From UREMD Appearance Guidance."),
                Layout.Input("layout", optional=True, tooltip="From Layout Guidance."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="Wire into the sampler node together with the SAMPLER."),
                io.Sampler.Output(display_name="SAMPLER"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompt, subject, eta, normalise, appearance=None, layout=None,
                gradient_checkpointing=True) -> io.NodeOutput:
        terms = [t for t in (appearance, layout) if t is not None]
        if not terms:
            raise ValueError("connect an appearance (UREMD Appearance Guidance) and/or a layout (Layout Guidance) term.")
        keys = {k for t in terms for k in t.layers}
        all_layers = host.unet_layers(model)
        layers = [l for l in all_layers if l.kind == "cross" and l.key in keys]
        if len(layers) != len(keys):
            raise ValueError("a guidance term names layers this model does not have: build the terms with this model's "
                             "architecture (SD1.x terms cannot drive an SDXL model).")
        features = [l for l in layers if appearance is not None and l.key in appearance.layers]
        positions, prompt_len = host.prompt_word_positions(clip, prompt, [subject])
        for term in terms:
            if term.tokens != len(positions[0]):
                logging.warning("Pick-and-Draw: the generation's subject %r is %d token(s) but the %s's word %r is %d: a "
                            "multi-token word's map is the sum of its tokens', so τ and the layout distance compare "
                            "differently normalised maps. Use the same word (e.g. the class word) in both.",
                            subject, len(positions[0]), type(term).__name__, term.subject, term.tokens)
        store = AttentionStore([subject], positions, prompt_len, layers)
        prepared = host.install_capture(with_gradient_checkpointing(gradient_model(model), gradient_checkpointing,
                                                                    keep=KEEP_WHOLE),
                                        store, layers, features, record=False)
        prepared.model_options.setdefault("transformer_options", {})[MARK] = store
        runs = _Runs()
        prepared.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, MARK,
                                      _needs_own_sampler(terms, runs))
        sampler = comfy.samplers.KSAMPLER(sample_pick_and_draw,
                                          extra_options={"store": store, "terms": terms, "eta": eta, "normalise": normalise,
                                                         "subject": subject, "runs": runs})
        return io.NodeOutput(host.check_sampler_prompt(prepared, clip, prompt, "Pick-and-Draw Sampler"), sampler)


NODES = [UREMDGuidance, LayoutGuidance, PickAndDrawSampler]
