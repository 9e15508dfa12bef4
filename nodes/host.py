"""Adapters between the host's objects (MODEL, CLIP, sampler wrappers) and the plain-torch core."""
from __future__ import annotations

import logging
import weakref

import torch

import comfy.patcher_extension
from comfy.ldm.modules.attention import optimized_attention

from ..attention.capture import cross_attention_patch, feature_patch
from ..attention.layers import AttnLayer, enumerate_layers
from ..attention.store import AttentionStore
from ..attention.tokens import Token, embedding_names, word_positions

WRAPPER_KEY = "comfyui_personalize"
BRANCHES = {"positive": 0, "negative": 1}   # the guider's conds a capture records: branch 0 cond, 1 uncond
SAMPLER_CHECK_KEY = f"{WRAPPER_KEY}_pnd"   # the Pick-and-Draw MODEL's check for its SAMPLER (nodes/pnd.py)
PIXELS_PER_LATENT = 8   # the SD1.x / SD2.x / SDXL VAEs
UNTUNED = " Untuned starting point: no paper gives a value."
TOY_TUNED = " Tuned on the toy world (bench/FIDELITY.md); an untested starting point on real models."
log = logging.getLogger(__name__)


def unet_layers(model) -> list[AttnLayer]:
    """Every attention layer of a MODEL's UNet (a DiT is refused with a message)."""
    return enumerate_layers(model.get_model_object("diffusion_model"))


def encode_text(clip, text: str):
    """``(cond, pooled)`` of ``text`` as CLIPTextEncode computes them (pooled is None where a CLIP has none)."""
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    return out["cond"], out.get("pooled_output")


def require_clip_for(model, clip, where: str) -> None:
    """Refuse a CLIP whose text embedding the model's cross-attention cannot read (an SD1.x CLIP with an SDXL
    model, or the reverse), before a long loop fails on it deep inside the UNet with a shape error."""
    width = model.model.model_config.unet_config.get("context_dim")
    encoded = encode_text(clip, "")[0].shape[-1]
    if width is not None and encoded != width:
        raise ValueError(f"{where}: the CLIP encodes text {encoded} wide but this model's cross-attention reads "
                         f"{width}-wide text: the CLIP and the MODEL come from different families (e.g. SD1.5's CLIP "
                         "with an SDXL model). Wire the CLIP of the model's own checkpoint.")


def require_finite(tensor: torch.Tensor | None, what: str, todo: str) -> None:
    """Refuse NaN/Inf values: a node never passes them on, or saves them, without a word."""
    if tensor is not None and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what} holds {bad} NaN/Inf value{'s' if bad > 1 else ''} (of {tensor.numel()}): {todo}")


def _mismatch(expected: torch.Tensor, encoded: torch.Tensor) -> str | None:
    """Why the text embedding ``encoded`` [B, T, D] is not ``expected`` [1, T, D], or None when it is."""
    # both to the CPU in fp32: the CONDITIONING may come from another device or dtype than the fresh encoding
    expected, encoded = expected.detach().to("cpu", torch.float32), encoded.detach().to("cpu", torch.float32)
    if expected.shape[1:] != encoded.shape[1:]:
        return (f"this text encodes to {expected.shape[1]} tokens of width {expected.shape[2]}, the conditioning "
                f"holds {encoded.shape[1]} of width {encoded.shape[2]}")
    scale = expected.abs().amax().clamp(min=1e-6)
    if not ((encoded - expected).abs().amax() <= 1e-3 * scale):
        return "the same number of tokens, but another text (or the same text through another CLIP)"
    return None


# why an entry over the whole image is checked, for a user who meant a regional prompt
REGIONAL = ("; a prompt for a region of the image is not checked when it runs on a crop: Conditioning Set Area, or "
            "Conditioning Set Mask with set_cond_area 'mask bounds' ('default' runs it over the whole image)")


def _refusal(where: str, reason: str) -> ValueError:
    return ValueError(
        f"{where}: the prompt typed here is not the text of the positive CONDITIONING ({reason}). The words are "
        "located in this text, so they would watch the wrong tokens: give the same text (and the same CLIP) "
        "as the CLIPTextEncode of the positive prompt, e.g. through one primitive/text node wired to both. With "
        "CLIPTextEncodeSDXL, give text_g and text_l both this text.")


def scheduled_encodings(clip, text: str) -> list:
    """The text embeddings ``text`` may be encoded to with ``clip``: one, or one per keyframe of a CLIP whose hooks
    are scheduled (SetClipHooks' schedule_clip: CLIPTextEncode gives an entry per keyframe)."""
    return [cond for cond, _ in clip.encode_from_tokens_scheduled(clip.tokenize(text), show_pbar=False)]


def _unmatched(expected: list, encoded: torch.Tensor) -> str | None:
    """Why ``encoded`` is none of the ``expected`` encodings (the first's reason), or None when it is one."""
    reasons = [_mismatch(candidate, encoded) for candidate in expected]
    return None if not all(reasons) else reasons[0]


def require_encoded(clip, prompt: str, conditioning, where: str) -> None:
    """Refuse when ``conditioning`` is not ``prompt`` encoded by ``clip`` (every entry, every batch item).

    The nodes locate words by tokenizing a prompt string typed separately from the CONDITIONING; a
    fresh encoding of the string, compared with the conditioning's tensors, tells whether the two are
    the same text (issue 9 §2).
    """
    expected = scheduled_encodings(clip, prompt)
    for entry in conditioning:
        if reason := _unmatched(expected, entry[0]):
            raise _refusal(where, reason)


def crops(entry: dict, size) -> bool:
    """Whether the host runs a processed cond entry on a crop of a latent of ``size`` (B, C, *spatial): as
    ``get_area_and_mult`` narrows it, an offset or a size (clamped to the latent) short of the latent's. An area
    covering the latent, or larger than it, runs on the whole latent."""
    area = entry.get("area")
    if area is None:
        return False
    spatial, n = tuple(size[2:]), len(area) // 2
    sizes, offsets = list(area[:n]), list(area[n:])
    sizes[:0], offsets[:0] = [2 ** 31] * (len(spatial) - n), [0] * (len(spatial) - n)  # the host's add_area_dims
    return any(off != 0 or min(dim - off, extent) < dim for dim, extent, off in zip(spatial, sizes, offsets))


def prompt_entries(guider, size) -> list:
    """A guider's processed positive entries that run the prompt over the whole latent of ``size``: not those run on a
    crop (:func:`crops`: Conditioning Set Area, a mask's bounds), nor the copy of a negative's area entry the host
    adds to the positive (``create_cond_with_same_area_if_none``: its cross_attn is the negative's text, a tensor of
    no positive CONDITIONING the guider was given; the positive's own area entry has its copy in the negative too).
    Not excluded from the template: AttentionCapture records such a copy's whole-latent pass (a negative's area
    covering the latent) with the positive's."""
    own = {id(entry.get("cross_attn")) for entry in getattr(guider, "original_conds", {}).get("positive", [])}
    return [entry for entry in getattr(guider, "conds", {}).get("positive", []) if not crops(entry, size)
            and not (own and "area" in entry and id(entry.get("cross_attn")) not in own)]


def check_sampler_prompt(model, clip, prompt: str, where: str):
    """A clone of ``model`` whose sampler's CFG prediction refuses a positive conditioning other than ``prompt``.

    For nodes that have the prompt but not the CONDITIONING (AttentionCapture, the Pick-and-Draw nodes): a
    PREDICT_NOISE wrapper sees the guider and its positive conds. It checks at the sampler's
    predictions — the passes that are recorded or guided — so this pack's own loops that only call
    ``calc_cond_batch`` with their own prompt (an inversion given this MODEL) are not refused. Only the
    :func:`prompt_entries` are checked: a regional prompt (an area, a mask's bounds) runs on a crop, neither
    recorded nor guided.
    """
    expected = scheduled_encodings(clip, prompt)
    verified = []            # weak references to the positive cond tensors of the run in progress, once they passed

    def wrapper(executor, x, *args, **kwargs):
        conds = [c["cross_attn"] for c in prompt_entries(executor.class_obj, x.shape) if "cross_attn" in c]
        if len(conds) != len(verified) or any(ref() is not c for ref, c in zip(verified, conds)):
            several = len(getattr(executor.class_obj, "conds", {}).get("positive", [])) > 1
            for cond in conds:
                if reason := _unmatched(expected, cond):
                    raise _refusal(where, reason + (REGIONAL if several else ""))
            verified[:] = [weakref.ref(c) for c in conds]
        return executor(x, *args, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, f"{WRAPPER_KEY}_prompt", wrapper)
    return patched


def _encoder_tokens(chunks, inv_vocab, candidates: list[tuple[str, torch.Tensor]]) -> list[Token]:
    """The tokenizer's chunks as Tokens. Spliced embeddings are named by aligning them, in prompt order, with the
    candidates (``_embedding_vectors``) whose vectors they are: a candidate the host dropped is skipped, a
    segment no candidate matches is "?" (the host parses names its own way)."""
    spliced = {}        # segment -> its vectors, in order of appearance (one embedding may span two chunks)
    for chunk in chunks:
        for token, _weight, segment in chunk:
            if segment and not isinstance(token, int):
                spliced.setdefault(segment, []).append(token)
    names, next_candidate = {}, 0
    for segment, vectors in spliced.items():
        vectors = torch.stack(vectors)
        match = next((i for i in range(next_candidate, len(candidates))
                      if candidates[i][1].shape == vectors.shape and torch.equal(candidates[i][1].to(vectors), vectors)),
                     None)
        names[segment] = "?" if match is None else candidates[match][0]
        next_candidate = next_candidate if match is None else match + 1
    tokens = []
    for chunk in chunks:
        for token, _weight, segment in chunk:
            if segment == 0:
                tokens.append(Token(None, 0))
            elif isinstance(token, int):
                tokens.append(Token(inv_vocab[token], segment))
            else:
                tokens.append(Token(f"embedding:{names[segment]}", segment))
    return tokens


def _embedding_vectors(tokenizer, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """``(name, vectors [n, width])`` of each of a prompt's ``embedding:`` ``names`` whose file the tokenizer can
    load (its own lookup), in prompt order, repeats kept; none without an embeddings folder."""
    if tokenizer.embedding_directory is None:
        return []
    loaded = [(name, tokenizer._try_get_embedding(name)[0]) for name in names]
    return [(name, e.reshape(-1, e.shape[-1])) for name, e in loaded if e is not None]


def prompt_word_positions(clip, prompt: str, words: list[str]) -> tuple[list[tuple[int, ...]], int]:
    """Token positions of ``words`` in ``prompt`` as the host's CLIP lays it out, and the prompt length.

    SDXL tokenizes with two encoders whose outputs are concatenated per token; both must put the words
    at the same positions (they share CLIP's BPE), which is checked rather than assumed. An ``embedding:``
    the tokenizer dropped (no such file, or punctuation glued to its name: the host then logs "does not
    exist, ignoring") is refused by name when watched.
    """
    tokenized = clip.tokenize(prompt, return_word_ids=True)
    named = embedding_names(prompt)
    found = {}
    for key, chunks in tokenized.items():
        tokenizer = getattr(clip.tokenizer, f"clip_{key}")
        tokens = _encoder_tokens(chunks, tokenizer.inv_vocab, _embedding_vectors(tokenizer, named))
        spliced = {t.piece for t in tokens if t.piece and t.piece.startswith("embedding:")}
        for word in words:
            name = word.strip().removeprefix("embedding:")
            if name in named and f"embedding:{name}" not in spliced:
                raise ValueError(
                    f"'{word}': the prompt names embedding:{name}, but the host left it out of the prompt (its log "
                    f"says 'embedding:… does not exist, ignoring'): there is no such file in the embeddings folder "
                    "(models/embeddings), or punctuation is glued to the name (write a space after it). Put the "
                    "file there (e.g. the one PALP Trainer wrote), fix the name, or watch another word.")
        found[key] = (word_positions(tokens, words), len(tokens))
    results = list(found.values())
    if any(r != results[0] for r in results):
        raise ValueError(f"the text encoders ({', '.join(found)}) place the words at different tokens: an "
                         "embedding file holding different vector counts for them (use one made for this model, "
                         "e.g. PALP Trainer's), or a prompt they split differently (simplify it around the "
                         "watched words).")
    return results[0]


def _run_wrapper(store: AttentionStore):
    """OUTER_SAMPLE wrapper: one recorded run per sampling call, discarded if the call fails or is cancelled."""
    def wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        store.begin_run(sigmas, latent_image.shape[-2:])
        try:
            output = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        except BaseException:
            store.abort_run()
            raise
        if missed := store.end_run(output):
            log.warning("Attention capture: the sampler evaluated the model at its own σ's, not the schedule's (an "
                        "adaptive sampler such as dpm_adaptive or dpm_fast), so %d of the steps asked for have no maps "
                        "(steps %s). Use a fixed-step sampler (euler, dpmpp_2m, ...) to record every step.",
                        len(missed), ", ".join(map(str, missed[:8])) + (", ..." if len(missed) > 8 else ""))
        return output
    return wrapper


def _sampler_pass_wrapper(store: AttentionStore, guider: dict):
    """PREDICT_NOISE wrapper: marks the sampler's own cond/uncond passes, the only ones recorded.

    The sampler's CFG prediction first computes every cond's prediction (``calc_cond_batch``, or a
    ``sampler_calc_cond_batch_function`` in its place, however it splits the batch), then runs the
    pre-CFG functions, the CFG function and the post-CFG functions. SAG and PAG call the UNet again
    from their post-CFG functions (at another x, or with perturbed attention), and a guider without
    pre-CFG functions (DualCFG) still runs the post-CFG ones: so the mark is set on entry and cleared
    by a function placed *first* in both lists of this call's options. Calls outside the prediction
    (a guidance gradient pass through ``calc_cond_batch``) are never marked. ``guider["conds"]`` keeps the
    predicting guider's conds, by name, for ``_branches_wrapper``.
    """
    def end_pre(args):
        store.sampler_pass = False
        return args["conds_out"]

    def end_post(args):
        store.sampler_pass = False
        return args["denoised"]

    def wrapper(executor, x, timestep, model_options={}, seed=None):
        options = {**model_options,
                   "sampler_pre_cfg_function": [end_pre, *model_options.get("sampler_pre_cfg_function", [])],
                   "sampler_post_cfg_function": [end_post, *model_options.get("sampler_post_cfg_function", [])]}
        guider["conds"] = getattr(executor.class_obj, "conds", None) or {}
        store.begin_pass()
        try:
            return executor(x, timestep, options, seed)
        finally:
            store.sampler_pass, store.branches = False, None
            guider.clear()          # the run's conds (tensors, ControlNets) are not kept past the pass
    return wrapper


def _branches_wrapper(store: AttentionStore, guider: dict):
    """CALC_COND_BATCH wrapper: which recorded branch each cond of the sampler's own pass is, by the guider's names
    for its conds (set by ``_sampler_pass_wrapper``). Attention patches see a cond's index in the list the guider
    passes, and only CFG's list is [positive, negative]: DualCFG passes [negative, middle, positive]."""
    def wrapper(executor, model, conds, x_in, timestep, model_options):
        if store.sampler_pass:
            names = {id(c): name for name, c in guider.get("conds", {}).items()}
            if any(id(c) in names for c in conds if c is not None):
                store.branches = {i: BRANCHES.get(names.get(id(c))) for i, c in enumerate(conds)}
        return executor(model, conds, x_in, timestep, model_options)
    return wrapper


def install_capture(model, store: AttentionStore, layers: list[AttnLayer], feature_layers: list[AttnLayer],
                    record: bool = True):
    """Patch a **clone** of ``model`` so sampling fills ``store``; existing attn2 replaces are chained.

    ``record=False`` installs only the patches, for passes made inside ``store.live()``.
    """
    patched = model.clone()
    replaces = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer in layers:
        previous = replaces.get(layer.key) or replaces.get(layer.key[:2])
        patched.set_model_attn2_replace(cross_attention_patch(layer, store, optimized_attention, previous), *layer.key)
    if feature_layers:
        patched.set_model_attn2_patch(feature_patch(feature_layers, store))
    if record:
        guider = {}
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _run_wrapper(store))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY,
                                     _sampler_pass_wrapper(store, guider))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                     _branches_wrapper(store, guider))
    return patched


def refuse_pick_and_draw_model(model, what: str, where: str) -> None:
    """Refuse the Pick-and-Draw Sampler's MODEL where a node samples it itself: only that node's SAMPLER may
    sample it over a window's steps, and its refusal there would name a sampler node the user never wired."""
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, SAMPLER_CHECK_KEY):
        raise ValueError(f"{where}: {what} is the Pick-and-Draw Sampler's MODEL, which only that node's SAMPLER "
                         "samples: wire the MODEL from before the Pick-and-Draw Sampler.")


def without_capture(model):
    """A clone of ``model`` without this pack's checks of a sampling run: no Attention Capture records from it or
    checks prompts on it, and a Pick-and-Draw MODEL does not ask for its SAMPLER. The pack's own loops given such
    a MODEL (an inversion, a palette pass, a layout template) are not sampling runs of it, and run with their
    own prompts."""
    patched = model.clone()
    for kind, key in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY),
                      (comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY),
                      (comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY),
                      (comfy.patcher_extension.WrappersMP.PREDICT_NOISE, f"{WRAPPER_KEY}_prompt"),
                      (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, SAMPLER_CHECK_KEY)):
        patched.remove_wrappers_with_key(kind, key)
    return patched


def offload_device(model) -> torch.device:
    return torch.device(model.offload_device)
