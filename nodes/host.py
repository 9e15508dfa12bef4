"""Adapters between the host's objects (MODEL, CLIP, sampler wrappers) and the plain-torch core."""
from __future__ import annotations

import torch

import comfy.patcher_extension
from comfy.ldm.modules.attention import optimized_attention

from ..attention.capture import cross_attention_patch, feature_patch
from ..attention.layers import AttnLayer, enumerate_layers
from ..attention.store import AttentionStore
from ..attention.tokens import Token, embedding_names, word_positions

WRAPPER_KEY = "comfyui_personalize"
PIXELS_PER_LATENT = 8   # the SD1.x / SD2.x / SDXL VAEs
UNTUNED = " Untuned starting point: no paper gives a value."
TOY_TUNED = " Tuned on the toy world (bench/FIDELITY.md); an untested starting point on real models."


def unet_layers(model) -> list[AttnLayer]:
    """Every attention layer of a MODEL's UNet (a DiT is refused with a message)."""
    return enumerate_layers(model.get_model_object("diffusion_model"))


def encode_text(clip, text: str):
    """``(cond, pooled)`` of ``text`` as CLIPTextEncode computes them (pooled is None where a CLIP has none)."""
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    return out["cond"], out.get("pooled_output")


def _encoder_tokens(chunks, inv_vocab, names) -> list[Token]:
    tokens, vectors = [], {}
    for chunk in chunks:
        for token, _weight, segment in chunk:
            if segment == 0:
                tokens.append(Token(None, 0))
            elif isinstance(token, int):
                tokens.append(Token(inv_vocab[token], segment))
            else:  # an embedding vector spliced in by the tokenizer
                vectors.setdefault(segment, next(names, "?"))
                tokens.append(Token(f"embedding:{vectors[segment]}", segment))
    return tokens


def prompt_word_positions(clip, prompt: str, words: list[str]) -> tuple[list[tuple[int, ...]], int]:
    """Token positions of ``words`` in ``prompt`` as the host's CLIP lays it out, and the prompt length.

    SDXL tokenizes with two encoders whose outputs are concatenated per token; both must put the words
    at the same positions (they share CLIP's BPE), which is checked rather than assumed.
    """
    tokenized = clip.tokenize(prompt, return_word_ids=True)
    found = {}
    for key, chunks in tokenized.items():
        tokenizer = getattr(clip.tokenizer, f"clip_{key}")
        tokens = _encoder_tokens(chunks, tokenizer.inv_vocab, iter(embedding_names(prompt)))
        found[key] = (word_positions(tokens, words), len(tokens))
    results = list(found.values())
    if any(r != results[0] for r in results):
        raise ValueError(f"the text encoders ({', '.join(found)}) place the words at different tokens; "
                         "simplify the prompt around the watched words.")
    return results[0]


def _run_wrapper(store: AttentionStore):
    """OUTER_SAMPLE wrapper: one recorded run per sampling call, discarded if the call fails or is cancelled."""
    def wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        store.begin_run(sigmas)
        try:
            output = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        except BaseException:
            store.abort_run()
            raise
        store.end_run(output)
        return output
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
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _run_wrapper(store))
    return patched


def offload_device(model) -> torch.device:
    return torch.device(model.offload_device)
