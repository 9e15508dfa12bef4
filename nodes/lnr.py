"""Layout-and-Retouch (arXiv 2407.09779): StepBlendSampler (stage 1) and MultiSourceAttnSwap (stage 2)."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import latent_preview
import nodes as host_nodes
from comfy.ldm.modules.attention import optimized_attention

from ..attention.layers import RULE_HELP, select_layers
from ..attention.preview import mean_map
from ..attention.store import AttentionStore, Run
from ..attention.swap import LAYOUT, SwapState, blend_output_patch, self_attention_swap_patch
from ..attention.tokens import parse_words
from ..guidance.masks import adaptive_mask, attention_mask, require_same_aspect
from . import host
from .inversion import InversionType, require_same_model
from .sampling import check_interrupt, run_loop

CATEGORY = "personalize/layout-and-retouch"
PAPER_STEPS, PAPER_LAMBDA2, PAPER_BLEND_START = 50, 10, 31   # L&R App. B.1, steps counted from the start
PINNED, FREE = "pinned", "free-running"
PATH_HELP = ("pinned (default): at every step the path's latent is its stored DDIM-inversion latent, so it "
             "reconstructs its image exactly; only its attention is computed, from that latent (no extra pass). "
             "free-running: the path denoises itself from its inverted latent at this node's prompt and CFG, "
             "Algorithm 1 read literally — an empty-prompt inversion replayed at CFG 7.5 does not reconstruct its "
             "image, so the path drifts. L&R follows prior work for what it leaves open, and both pin the source "
             "path: MasaCtrl's real-image editing feeds the inversion's intermediate latents, DreamMatcher's "
             "use_inversion_latents does the same.")


class StepBlendSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StepBlendSampler",
            display_name="Step-Blend Sampler (Layout-and-Retouch stage 1)",
            category=CATEGORY,
            description="L&R §3.1: the first λ1 steps use the vanilla model with the prompt without the personal token "
                        "(a diverse layout), the rest the personalized model with the personal prompt. The two models "
                        "run one after the other (the host loads each once).",
            inputs=[
                io.Model.Input("vanilla", tooltip="The vanilla model (draws the layout)."),
                io.Model.Input("personalized", tooltip="The personalized model (LoRA, textual inversion, DreamBooth…)."),
                io.Conditioning.Input("vanilla_positive", tooltip="y_p⁻: the prompt with the class word (or without the "
                                                                  "personal token), e.g. 'a photo of a dog in the jungle'."),
                io.Conditioning.Input("vanilla_negative", tooltip="Negative prompt for the vanilla steps."),
                io.Conditioning.Input("personalized_positive", tooltip="y_p: the prompt with the personal token."),
                io.Conditioning.Input("personalized_negative", tooltip="Negative prompt for the personalized steps."),
                io.Latent.Input("latent", tooltip="The starting LATENT (e.g. Empty Latent Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Noise seed."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="L&R uses 50 DDIM steps."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim",
                               tooltip="The host's samplers; 'ddim' is the paper's."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform",
                               tooltip="'ddim_uniform' gives DDIM's timesteps."),
                io.Int.Input("lambda1", default=5, min=0, max=10000,
                             tooltip="λ1: steps taken by the vanilla model. 5 for ordinary prompts, 3 for challenging "
                                     "ones (L&R §4); 0 = personalized only, = steps: vanilla only."),
            ],
            outputs=[io.Latent.Output(display_name="layout", tooltip="The layout image's latent I_o.")],
        )

    @classmethod
    def execute(cls, vanilla, personalized, vanilla_positive, vanilla_negative, personalized_positive,
                personalized_negative, latent, seed, steps, cfg, sampler_name, scheduler, lambda1) -> io.NodeOutput:
        if not 0 <= lambda1 <= steps:
            raise ValueError(f"λ1 = {lambda1} is outside the {steps} steps: give 0 ≤ λ1 ≤ steps.")
        if "noise_mask" in latent:
            # the host's inpainting holds the unmasked region at the run's latent_image, which for the second run is
            # the first run's output at σ_λ1: that region would come out still noisy
            raise ValueError("'latent' carries a noise mask (Set Latent Noise Mask, VAE Encode (for Inpainting) or "
                             "InpaintModelConditioning): this node runs the host's sampler twice, and the second run "
                             "would keep the unmasked region at the first run's still-noisy latent instead of the "
                             "input. Layout-and-Retouch's stage 1 draws the layout from noise: sample it without the "
                             "mask (from an Empty Latent Image, or without Set Latent Noise Mask), or inpaint with a "
                             "stock sampler (KSampler).")
        for name, given in (("vanilla", vanilla), ("personalized", personalized)):
            host.refuse_pick_and_draw_model(given, f"'{name}'", "Step-Blend Sampler")
        if _family(vanilla) != _family(personalized):
            raise ValueError(f"the vanilla model is {_family(vanilla)} but the personalized model is "
                             f"{_family(personalized)}: one latent passes from the first to the second, so both must "
                             "be of one family (e.g. SD1.5 and a DreamBooth/LoRA of SD1.5).")
        # last_step None for the final segment: some schedulers give more sigmas than steps (ddim_uniform when the
        # steps do not divide the model's 1000), and cutting at `steps` would end the schedule early
        out = latent
        if lambda1 > 0:
            out = host_nodes.common_ksampler(vanilla, seed, steps, cfg, sampler_name, scheduler, vanilla_positive,
                                             vanilla_negative, out, start_step=0,
                                             last_step=lambda1 if lambda1 < steps else None)[0]
        if lambda1 < steps:
            # the second run's seed only drives an ancestral/SDE sampler's noise (its start noise is off): the same
            # seed would add the first run's noise draws again, step λ1 + j repeating step j's
            second_seed = (seed + 1) % 2**64 if lambda1 > 0 else seed
            out = host_nodes.common_ksampler(personalized, second_seed, steps, cfg, sampler_name, scheduler,
                                             personalized_positive, personalized_negative, out,
                                             disable_noise=lambda1 > 0, start_step=lambda1)[0]
        return io.NodeOutput(out)


def _family(model) -> str:
    """A model family as the host detects it (its config class, latent format and text-context width)."""
    base = model.model
    return (f"{type(base.model_config).__name__} ({type(base.latent_format).__name__} latents, "
            f"{base.model_config.unet_config.get('context_dim')}-wide text context)")


def _swap_layers(layers, rule):
    """'auto': the last 6/16 of the transformer blocks — MasaCtrl's layers 10–15 of SD1.5 (output blocks 6–11,
    the decoder at 1/2 and full latent resolution), and blocks 44–69 of SDXL's 70 (MasaCtrl's SDXL start layer)."""
    if not rule.strip():
        return []
    if rule.strip().lower() == "auto":
        total = max(l.ordinal for l in layers) + 1
        rule = f"#{round(total * 10 / 16)}-{total - 1}"
    return select_layers(layers, rule, kind="self")


# how a refusal names the conditioning extras ComfyUI's own nodes add; any other is named by its key
EXTRA_NAMES = {"control": "a ControlNet", "area": "an area (Conditioning Set Area)",
               "mask": "a mask (Conditioning Set Mask)", "hooks": "hooks (a LoRA or model hook)",
               "start_percent": "a timestep range", "end_percent": "a timestep range", "gligen": "GLIGEN boxes"}
PLAIN = (bool, int, float, str, type(None))


def _refuse_extra(holders: list[str], key: str):
    named = " and ".join(f"'{n}'" for n in holders)
    raise ValueError(f"{named} {'carry' if len(holders) > 1 else 'carries'} {EXTRA_NAMES.get(key, 'an extra')} "
                     f"(conditioning key \"{key}\"), which this node cannot honour: the reference, layout and target "
                     "paths run as one batch, so it would act on all three or on none. Wire the plain text encoding "
                     "here; what shapes the layout (ControlNet, areas) belongs to stage 1, the Step-Blend Sampler.")


def _plain_negative(negative):
    """``negative`` is every path's, so what it carries besides the prompt must be plain too (a ControlNet node
    puts its control on the negative as well)."""
    for _, extra in negative:
        for key, value in extra.items():
            if key in EXTRA_NAMES or (key != "pooled_output" and not isinstance(value, PLAIN)):
                _refuse_extra(["negative"], key)


def _stack(reference_positive, target_positive):
    """One CONDITIONING entry whose batch holds one prompt per path, [y_r, y_p, y_r] (host notes §2.7: per-item
    prompts), with SDXL's pooled prompts stacked the same way.

    The paths run as one batch, so whatever else an entry carries (a ControlNet, an area, hooks…) would act on
    all three paths: it is honoured only as a plain value equal in both inputs (CLIPTextEncodeSDXL's sizes),
    and refused otherwise, as is a second entry, rather than given to the wrong paths or dropped.
    """
    named = {"reference_positive": reference_positive, "target_positive": target_positive}
    for name, conditioning in named.items():
        if len(conditioning) != 1:
            raise ValueError(f"'{name}' holds {len(conditioning)} conditionings (Conditioning Combine, or a CLIP with "
                             "scheduled hooks): the three paths run as one batch with one prompt each, so only one "
                             "could be used. Wire a single text encoding (CLIPTextEncode) of the prompt.")
    (reference, ref_extra), (target, tgt_extra) = reference_positive[0], target_positive[0]
    if reference.shape[1:] != target.shape[1:]:
        raise ValueError("'reference_positive' and 'target_positive' encode to different token lengths (they run as "
                         "one batch): keep both prompts under 75 tokens.")
    pooled = [e.get("pooled_output") for e in (ref_extra, tgt_extra)]
    stacked = all(isinstance(p, torch.Tensor) for p in pooled)
    for key in sorted(ref_extra.keys() | tgt_extra.keys()):
        if key == "pooled_output" and stacked:
            continue
        values = [e[key] for e in (ref_extra, tgt_extra) if key in e]
        # a timestep range is plain numbers, but one entry per batch has no cond outside it: refused as an extra
        if key not in EXTRA_NAMES and all(isinstance(v, PLAIN) for v in values):
            if len(values) == 2 and values[0] == values[1]:
                continue
            raise ValueError(f"'reference_positive' and 'target_positive' differ in their \"{key}\" "
                             f"({' vs '.join(repr(e.get(key)) for e in (ref_extra, tgt_extra))}), which applies to "
                             "the whole batch of three paths: encode both prompts with the same kind of node and the "
                             "same settings (e.g. both CLIPTextEncodeSDXL with one width and height).")
        _refuse_extra([n for n, c in named.items() if key in c[0][1]], key)
    extra = dict(ref_extra)
    if stacked:
        extra["pooled_output"] = torch.cat([pooled[0], pooled[1], pooled[0]])
    return [[torch.cat([reference, target, reference]), extra]]


def _pinned(choice, name):
    if choice not in (PINNED, FREE):
        raise ValueError(f"'{name}' must be {PINNED!r} or {FREE!r}, got {choice!r}.")
    return choice == PINNED


def _paper_steps(lambda2, blend_start, steps):
    """-1 picks the paper's value (λ2 = 10, blend from step 31, of 50 steps) scaled to ``steps``."""
    if lambda2 < 0:
        lambda2 = round(PAPER_LAMBDA2 * steps / PAPER_STEPS)
    if blend_start < 0:
        blend_start = round((PAPER_BLEND_START - 1) * steps / PAPER_STEPS) + 1
    return lambda2, blend_start


class MultiSourceAttnSwap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MultiSourceAttnSwap",
            display_name="Multi-Source Attention Swap (Layout-and-Retouch stage 2)",
            category=CATEGORY,
            description="L&R Algorithm 1: from the DDIM-inverted reference and layout, three paths run as one batch. The "
                        "target copies the layout for λ2 steps, then takes self-attention keys/values from the reference "
                        "(identity), and from the blend start its self-attention output is blended with the layout's "
                        "through the adaptive mask. By default the reference and layout paths are pinned to their inversion "
                        "latents (as MasaCtrl and DreamMatcher pin the source path). Invert both images with Null-Text "
                        "Invert in 'ddim' mode, prompt ''.",
            inputs=[
                io.Model.Input("model", tooltip="The personalized model (the one that made the layout); not through "
                                                "Attention Capture (refused: this node records M^c itself)."),
                InversionType.Input("reference", tooltip="The reference image's DDIM inversion (empty prompt)."),
                InversionType.Input("layout", tooltip="The layout image's DDIM inversion (empty prompt, same steps/scheduler)."),
                io.Conditioning.Input("reference_positive", tooltip="y_r, the neutral prompt 'a photo of <token>': the "
                                                                    "reference and target paths. One plain text "
                                                                    "encoding: a ControlNet, area, mask, hooks or "
                                                                    "combined entries are refused (one batch)."),
                io.Conditioning.Input("target_positive", tooltip="y_p, the full prompt: the layout path. One plain text "
                                                                 "encoding, as reference_positive."),
                io.Conditioning.Input("negative", tooltip="Negative prompt of all paths."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="CFG of every path, each with its own cond/uncond halves (L&R does not state it; "
                                       "MasaCtrl samples at 7.5 and swaps per half)."),
                io.Int.Input("lambda2", default=-1, min=-1, max=10000,
                             tooltip="λ2: steps (counted from the start) in which the target copies the layout; the "
                                     "reference's K/V are used from step λ2+1. -1 = the paper's 10 of 50, scaled."),
                io.Int.Input("blend_start", default=-1, min=-1, max=10001,
                             tooltip="First step (counted from 1) of the mask blending. -1 = the paper's 31 of 50, scaled; "
                                     "more than the step count = never."),
                io.String.Input("swap_layers", default="auto",
                                tooltip="Self-attention layers that take the reference's K/V. 'auto' = MasaCtrl's layers "
                                        "10–15 of SD1.5 (the last 6/16 of the transformer blocks; blocks 44–69 on SDXL); "
                                        "empty = none. " + RULE_HELP),
                io.String.Input("blend_layers", default="auto",
                                tooltip="Self-attention layers whose output is blended (the paper does not say; 'auto' = "
                                        "the swap layers). " + RULE_HELP),
                io.Combo.Input("reference_path", options=[PINNED, FREE], default=PINNED,
                               tooltip="The reference path, source of the self-attention K/V (the identity). "
                                       + PATH_HELP),
                io.Combo.Input("layout_path", options=[PINNED, FREE], default=PINNED,
                               tooltip="The layout path, source of the target's first λ2 steps and of φ_o outside the "
                                       "mask (the background). Pinned, the target starts its own steps from the "
                                       "layout's inversion latent at step λ2 (it copies the layout up to there). "
                                       + PATH_HELP),
                io.Clip.Input("clip", optional=True, tooltip="With prompt and words: builds the cross-attention mask M^c."),
                io.String.Input("prompt", optional=True, multiline=True, default="",
                                tooltip="y_p as text (the layout path's prompt), to locate the object words."),
                io.String.Input("words", optional=True, default="",
                                tooltip="Object words: M^c is the layout path's decoder cross-attention of these words "
                                        "averaged over the steps before the blend start."),
                io.Mask.Input("mask", optional=True, tooltip="A mask of the object in the layout image (e.g. SAM): joins "
                                                             "M^c by OR (L&R's formula), or replaces it without words."),
                io.Float.Input("mask_threshold", default=0.1, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Threshold of M^c (MasaCtrl's auto-mask uses 0.1)." + " Untuned for L&R."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The retouched target."),
                io.Mask.Output(display_name="blend_mask", tooltip="The adaptive mask M used for blending (image size)."),
            ],
        )

    @classmethod
    def execute(cls, model, reference, layout, reference_positive, target_positive, negative, cfg, lambda2,
                blend_start, swap_layers, blend_layers, clip=None, prompt="", words="", mask=None,
                mask_threshold=0.1, reference_path=PINNED, layout_path=PINNED) -> io.NodeOutput:
        host.refuse_pick_and_draw_model(model, "'model'", "Multi-Source Attention Swap")
        if model.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, host.WRAPPER_KEY):
            raise ValueError("'model' comes through Attention Capture, which cannot record this node's sampling: every "
                             "pass batches the reference, layout and target paths, and its prompt check would see "
                             "y_r beside y_p. Wire the MODEL from before Attention Capture. This node records the "
                             "object's cross-attention itself: give 'words' (with 'clip' and 'prompt'); the mask it "
                             "builds is its blend_mask output.")
        positive = _stack(reference_positive, target_positive)
        _plain_negative(negative)
        all_layers = host.unet_layers(model)
        for inversion, name in ((reference, "the reference inversion"), (layout, "the layout inversion")):
            require_same_model(inversion, model, name)
        if not torch.equal(reference.sigmas, layout.sigmas):
            raise ValueError("'reference' and 'layout' were inverted with different steps or schedulers: invert both "
                             "with the same settings.")
        if reference.trajectory.shape[-2:] != layout.trajectory.shape[-2:]:
            raise ValueError(f"'reference' ({tuple(reference.trajectory.shape[-2:])} latent) and 'layout' "
                             f"({tuple(layout.trajectory.shape[-2:])}) differ in size: resize the reference image to "
                             "the layout's size before inverting it (they run as one batch).")
        sigmas = reference.sigmas
        steps = len(sigmas) - 1
        lambda2, blend_start = _paper_steps(lambda2, blend_start, steps)
        if not 0 <= lambda2 <= steps:
            raise ValueError(f"'lambda2' = {lambda2} is outside the inversions' {steps} steps: give 0 ≤ lambda2 ≤ {steps}, "
                             "or -1 for the paper's 10 of 50 scaled.")
        if blend_start < 1:
            raise ValueError(f"'blend_start' = {blend_start}: steps count from 1. Give 1 or more (more than {steps}: no "
                             "blending), or -1 for the paper's 31 of 50 scaled.")
        swap = _swap_layers(all_layers, swap_layers)
        blend = _swap_layers(all_layers, blend_layers)
        height, width = (host.PIXELS_PER_LATENT * n for n in layout.trajectory.shape[-2:])
        state = SwapState()
        patched, store = cls._patch(model, all_layers, swap, blend, state, clip, prompt, words, blend_start)
        if store is not None:
            host.require_encoded(clip, prompt, target_positive, "Multi-Source Attention Swap")
        if blend and blend_start <= steps and store is None and mask is None:
            raise ValueError("blending needs a mask: give 'words' (with 'clip' and 'prompt') and/or a 'mask', empty "
                             f"'blend_layers', or set 'blend_start' beyond the {steps} steps.")
        if mask is not None:
            require_same_aspect(mask, (height, width), "'mask'", "the layout", "give a mask of the layout image.")
            if mask.dim() == 3 and mask.shape[0] != 1:
                raise ValueError(f"'mask' holds a batch of {mask.shape[0]} masks, and the swap retouches one layout "
                                 "image: give that image's mask alone (MaskToImage → ImageFromBatch at its index → "
                                 "ImageToMask, or make the mask from that image only).")

        def blend_mask():
            soft = None
            if store is not None:
                snap = store.snapshot()
                # the layout path only: steps up to λ2 ran two paths, later ones three
                layout_only = Run(snap.sigmas, {k: v[LAYOUT:LAYOUT + 1] for k, v in snap.maps.items()})
                soft = mean_map(layout_only, store.layers, snap.steps, (height, width))
                soft = attention_mask(soft.amax(dim=1), mask_threshold)
            cross = soft if soft is not None else torch.zeros(1, height, width)
            layout_mask = None if mask is None else mask.reshape(1, *mask.shape[-2:]).float()
            return adaptive_mask(cross, layout_mask, size=(height, width))

        preview = latent_preview.prepare_callback(model, steps)

        pin_ref, pin_lay = _pinned(reference_path, "reference_path"), _pinned(layout_path, "layout_path")

        def stage2(loop, x, sigmas):
            """Algorithm 1; steps counted from 1. Steps ≤ λ2 run only [reference, layout]: the target equals the
            layout then (same start, all attention from the layout), so computing it would change nothing.

            A pinned path is set to its inversion latent x*_i before every step (methods.md §2.2 step 6); its own
            DDIM step is discarded. Steps ≤ λ2 with both paths pinned need no pass at all (nothing there is read)
            unless M^c is being recorded."""
            ref_traj, lay_traj = reference.trajectory.to(x), layout.trajectory.to(x)
            x_ref, x_lay, x_tgt, used = ref_traj[0], lay_traj[0], None, None
            for i in range(steps):
                check_interrupt()
                step = i + 1
                if step > lambda2 and x_tgt is None:
                    x_tgt = x_lay
                recording = store is not None and i < blend_start - 1
                # the mask is built before any skip: a blend start ≤ λ2 falls on a step that may need no pass
                if step == blend_start and blend:
                    used = blend_mask()
                    state.set_mask(used)
                if x_tgt is None and pin_ref and pin_lay and not recording:
                    x_ref, x_lay = ref_traj[i + 1], lay_traj[i + 1]
                    preview(i, lay_traj[-1], x_lay, steps)
                    continue
                state.swap = x_tgt is not None and bool(swap)
                x_in = torch.cat([x_ref, x_lay] + ([x_tgt] if x_tgt is not None else []))
                denoised = loop.cfg_denoise(x_in, sigmas[i])
                x_next = x_in + (x_in - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
                x_ref = ref_traj[i + 1] if pin_ref else x_next[:1]
                x_lay = lay_traj[i + 1] if pin_lay else x_next[1:2]
                x_tgt = x_next[2:] if x_tgt is not None else None
                preview(i, denoised[-1:], x_next[-1:], steps)
            return (x_lay if x_tgt is None else x_tgt), used

        out, used = run_loop(patched, positive, negative, torch.zeros_like(layout.trajectory[-1]), sigmas, stage2,
                             cfg=cfg)
        # a MASK goes where the host's nodes keep theirs (a mask input on the GPU leaves the blend mask there)
        used = (torch.zeros(1, height, width) if used is None else used).to(comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": out}, used, ui=ui.PreviewMask(used, cls=cls))

    @staticmethod
    def _patch(model, all_layers, swap, blend, state, clip, prompt, words, blend_start):
        """A clone with the swap and blend patches (chained onto existing ones) and, when words are given, a
        recording capture of the decoder cross-attention over the steps before the blend start."""
        store = None
        patched = model.clone()
        if words.strip():
            if clip is None or not prompt.strip():
                raise ValueError("'words' need the 'clip' and the 'prompt' (y_p as text) inputs to locate them.")
            queries = parse_words(words)
            positions, prompt_len = host.prompt_word_positions(clip, prompt, queries)
            decoder = select_layers(all_layers, "decoder", kind="cross")   # decoder maps align best (P&D §3.1)
            store = AttentionStore(queries, positions, prompt_len, decoder, lambda step, total: step < blend_start - 1)
            patched = host.install_capture(model, store, decoder, [])
        replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        for layer in swap:
            previous = replaces.get(layer.key) or replaces.get(layer.key[:2])
            patched.set_model_attn1_replace(self_attention_swap_patch(state, optimized_attention, previous), *layer.key)
        if blend:
            patched.set_model_attn1_output_patch(blend_output_patch({l.key for l in blend}, state))
        return patched, store


NODES = [StepBlendSampler, MultiSourceAttnSwap]
