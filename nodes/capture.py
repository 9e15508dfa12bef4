"""AttentionCapture (P&D §3.1, L&R's cross-attention mask) and AttentionMaps, the node that reads it."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

import comfy.model_management

from ..attention.layers import RULE_HELP, parse_rule, select_layers
from ..attention.preview import attention_mask, map_grid, mean_map
from ..attention.store import AttentionStore, Run, parse_steps
from ..attention.tokens import parse_words
from . import host

AttnStore = io.Custom("PERSONALIZE_ATTN_STORE")
log = logging.getLogger(__name__)
CATEGORY = "personalize/attention"


class AttentionCapture(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttentionCapture",
            display_name="Attention Capture",
            category=CATEGORY,
            description="Records the cross-attention maps of chosen prompt words while the sampler runs "
                        "(Pick-and-Draw §3.1). Wire its MODEL into the sampler and its store, with the sampler's "
                        "LATENT, into Attention Maps. The image is unchanged by capturing.",
            inputs=[
                io.Model.Input("model", tooltip="The model to watch; a patched copy is returned, this one is not changed."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the positive prompt (it locates the words' tokens)."),
                io.String.Input("prompt", multiline=True, default="a photo of a dog",
                                tooltip="The positive prompt exactly as encoded for the sampler (checked when sampling "
                                        "starts: another text is refused, as its words would be at other tokens)."),
                io.String.Input("words", default="dog",
                                tooltip="Words of the prompt to watch, comma-separated; a phrase ('teddy bear') or "
                                        "'embedding:name' counts as one word. Multi-token words sum their tokens."),
                io.String.Input("layers", default="cross",
                                tooltip="Which cross-attention layers to record. " + RULE_HELP),
                io.String.Input("steps", default="all",
                                tooltip="Which sampling steps to record: 'all', 'every 5', or 0-based indices '0-9, 20' "
                                        "of the sampler's schedule (with denoise < 1, of the shortened schedule)."),
                io.String.Input("features", default="", optional=True,
                                tooltip="Optional layer rule for the dense features Ψ (the normalised hidden state "
                                        "entering cross-attention); empty records none. Example: 'decoder 1/2'."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with capture patches; use it to sample."),
                AttnStore.Output(display_name="store", tooltip="Filled while the sampler runs; read it with Attention Maps."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompt, words, layers, steps, features="") -> io.NodeOutput:
        all_layers = host.unet_layers(model)
        chosen = select_layers(all_layers, layers, kind="cross")
        feature_layers = select_layers(all_layers, features, kind="cross") if features.strip() else []
        queries = parse_words(words)
        positions, prompt_len = host.prompt_word_positions(clip, prompt, queries)
        store = AttentionStore(queries, positions, prompt_len, chosen, parse_steps(steps),
                               offload_device=host.offload_device(model))
        patched = host.install_capture(model, store, chosen, feature_layers)
        return io.NodeOutput(host.check_sampler_prompt(patched, clip, prompt, "Attention Capture"), store)


class AttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeAttentionMaps",
            display_name="Attention Maps",
            category=CATEGORY,
            description="Shows the maps an Attention Capture recorded during the sampling run that made this LATENT "
                        "(rows: layers grouped by encoder/middle/decoder and resolution; columns: steps), and "
                        "averages chosen layers into a MASK (Layout-and-Retouch's cross-attention mask M^c).",
            inputs=[
                AttnStore.Input("store", tooltip="From Attention Capture."),
                io.Latent.Input("latent", tooltip="The sampler's output LATENT: it picks that run's maps and makes this "
                                                  "node run after sampling."),
                io.Combo.Input("branch", options=["cond", "uncond"], default="cond",
                               tooltip="Maps of the conditional (positive) or unconditional pass."),
                io.String.Input("mask_layers", default="decoder",
                                tooltip="Layers averaged into the mask (decoder maps align best, P&D §3.1). " + RULE_HELP),
                io.Float.Input("mask_threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Threshold on the averaged, re-normalised map; 0 gives the soft map. "
                                       "Untuned starting point (no paper fixes it; MasaCtrl uses 0.1 on 16×16 maps)."),
                io.Int.Input("cell", default=64, min=8, max=256, tooltip="Pixel size of one map in the grid."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="One grid per item and word."),
                io.Mask.Output(display_name="mask", tooltip="Union over the words, at image resolution."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, store, latent, branch, mask_layers, mask_threshold, cell) -> io.NodeOutput:
        samples = latent["samples"]
        host.require_finite(samples, "the LATENT", "the sampling run diverged, so its attention maps mean nothing: "
                            "fix the run (CFG, steps, model dtype) first.")
        found = store.run_for(samples)
        # a picture and a mask, made on the CPU: a store kept on the GPU (--highvram) is read from it once
        run = Run(found.sigmas, {k: v.cpu() for k, v in found.maps.items()})
        which = 0 if branch == "cond" else 1
        _require_recorded(run, which)
        layers = _recorded_layers(store, mask_layers)
        grids = [map_grid(run, store.layers, run.steps, w, b, which, cell)
                 for b in range(samples.shape[0]) for w in range(len(store.words))]
        size = (samples.shape[-2] * host.PIXELS_PER_LATENT, samples.shape[-1] * host.PIXELS_PER_LATENT)
        mask = attention_mask(mean_map(run, layers, run.steps, size, which), mask_threshold)
        if not mask.any():
            log.warning("Attention Maps: the mask is empty: no cell of the averaged map of %s reaches mask_threshold "
                        "%g; lower the threshold (0 gives the soft map).", ", ".join(store.words), mask_threshold)
        # IMAGE and MASK go where the host's nodes keep theirs
        grid, mask = (t.to(comfy.model_management.intermediate_device()) for t in (torch.stack(grids), mask))
        return io.NodeOutput(grid, mask, ui=ui.PreviewImage(grid, cls=cls))


def _require_recorded(run, branch: int) -> None:
    """Refuse, with the reason, a run that holds no maps of ``branch`` (or NaN maps)."""
    if not run.maps:
        raise ValueError(f"the capture recorded no step of this {len(run.sigmas) - 1}-step run: its step rule "
                         "(0-based indices of the sampler's schedule) picks none of them.")
    if not any(key[2] == branch for key in run.maps):
        raise ValueError("no 'uncond' maps were recorded: the sampler ran at CFG 1, which skips the unconditional "
                         "pass. Pick branch 'cond', or sample with a CFG other than 1." if branch == 1 else
                         "no 'cond' maps were recorded in this run.")
    for key, maps in run.maps.items():
        host.require_finite(maps, f"the recorded maps of step {key[0]}, layer {'.'.join(map(str, key[1]))}",
                            "the sampling run went NaN/Inf; fix it first.")


def _recorded_layers(store, rule: str):
    """The captured layers ``rule`` selects; a rule that selects only layers the capture did not record says so."""
    match = parse_rule(rule)
    chosen = [l for l in store.layers if match(l)]
    if not chosen:
        recorded = ", ".join(f"{l.block}.{l.number}.{l.index} 1/{l.scale}" for l in store.layers)
        raise ValueError(f"mask_layers '{rule}' selects none of the layers this capture recorded ({recorded}): "
                         "widen Attention Capture's layer rule, or choose among those.")
    return chosen


NODES = [AttentionCapture, AttentionMaps]
