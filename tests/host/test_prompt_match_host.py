"""A prompt string typed beside a CONDITIONING must be the text that was encoded (issue 9 §2).

AttentionCapture, the Pick-and-Draw nodes and MultiSourceAttnSwap locate words by tokenizing a string;
when the sampler's positive conditioning encodes another text the words sit at other tokens and the
maps, templates and masks silently watch the wrong ones. Each case below ran without a word before.
"""

import pytest
import torch

PROMPT = "a photo of a sks dog on the beach"
SAME_LENGTH = "a photo of a sks cat on the beach"          # one token differs: the same 77-token layout
LONG = PROMPT + ", " + ", ".join(["a sunny day with waves and sand and blue sky"] * 8)   # > 75 tokens: 154
REFUSED = "the prompt typed here is not the text of the positive CONDITIONING"


@pytest.fixture(scope="module")
def env(sd1_nodes):
    return sd1_nodes


def sample(env, model, positive, sampler=None, steps=2):
    import comfy.sample
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    latent = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, torch.randn(latent.shape, generator=torch.Generator().manual_seed(0)),
                                          7.5, sampler or comfy.samplers.sampler_object("euler"), sigmas, positive,
                                          env.encode(""), latent, disable_pbar=True)


def capture(env, prompt):
    with torch.inference_mode():
        return env.cap.AttentionCapture.execute(env.model, env.clip, prompt, "dog", "cross", "all", "").args


def test_capture_samples_with_its_own_prompt_and_refuses_another(env):
    captured, store = capture(env, PROMPT)
    out = sample(env, captured, env.encode(PROMPT))
    assert store.run_for(out).steps == [0, 1]
    for other, reason in ((SAME_LENGTH, "the same number of tokens, but another text"),
                          (LONG, "this text encodes to 77 tokens of width 64, the conditioning holds 154")):
        with pytest.raises(ValueError, match=f"Attention Capture: {REFUSED} \\({reason}"):
            sample(env, captured, env.encode(other))
    assert len(store.runs) == 1 and store._run is None, "a refused run records nothing"


def test_long_prompts_match_when_they_are_the_same_text(env):
    captured, store = capture(env, LONG)
    out = sample(env, captured, env.encode(LONG))
    assert store.run_for(out).steps == [0, 1]


def test_pick_and_draw_sampler_and_layout_guidance_refuse_another_text(env):
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    sigmas = comfy.samplers.calculate_sigmas(env.model.get_model_object("model_sampling"), "normal", 4)

    def layout(positive):
        with torch.inference_mode():
            return env.pnd.LayoutGuidance.execute(env.model, env.clip, PROMPT, "dog", positive, env.encode(""), 7.5,
                                                  Noise_RandomNoise(0), sigmas, {"samples": torch.zeros(1, 4, 16, 16)},
                                                  "cross", 0.0, 0.5, 1.0, 3, 0.5).args[0]

    term = layout(env.encode(PROMPT))
    with pytest.raises(ValueError, match=f"Layout Guidance: {REFUSED}"):
        layout(env.encode(SAME_LENGTH))
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.5, True, None,
                                                               term).args
    assert torch.isfinite(sample(env, prepared, env.encode(PROMPT), sampler, steps=4)).all()
    with pytest.raises(ValueError, match=f"Pick-and-Draw Sampler: {REFUSED}"):
        sample(env, prepared, env.encode(SAME_LENGTH), sampler, steps=4)


def test_multi_source_swap_refuses_object_words_of_another_text(env):
    def invert(seed):
        image = env.tiny.smooth_images(torch.Generator().manual_seed(seed), 1, 64, 64).movedim(1, -1)
        with torch.inference_mode():
            return env.inv.NullTextInvert.execute(env.model, env.clip, "", "ddim", 4, "normal", 7.5, 10, 1e-2, 1e-5, "",
                                                  image=image, vae=env.vae, reconstruct=False).args[0]

    reference, layout = invert(7), invert(8)

    def swap(target_text):
        with torch.inference_mode():
            return env.lnr.MultiSourceAttnSwap.execute(env.model, reference, layout, env.encode("a photo of a sks dog"),
                                                       env.encode(target_text), env.encode(""), 7.5, 1, 3, "auto", "auto",
                                                       env.clip, PROMPT, "dog", None, 0.1).args

    assert swap(PROMPT)[1].amax() > 0
    with pytest.raises(ValueError, match=f"Multi-Source Attention Swap: {REFUSED}"):
        swap(SAME_LENGTH)


def test_a_captured_model_still_inverts_a_reference_with_its_own_prompt(env):
    """The check guards the sampler's predictions: an inversion's own passes with its source prompt are not refused."""
    captured, store = capture(env, PROMPT)
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        inversion = env.inv.NullTextInvert.execute(captured, env.clip, "a photo of a cat", "null-text", 3, "ddim_uniform",
                                                   7.5, 2, 1e-2, 1e-5, "", latent=latent).args[0]
    assert torch.isfinite(inversion.null_embeddings).all()


def test_an_sdxl_encoding_with_another_text_l_is_refused_saying_so(env):
    """CLIPTextEncodeSDXL with text_g the prompt and another text_l encodes another text: the refusal says to give
    both the same text (it spoke only of CLIPTextEncode); with text_g = text_l the capture samples."""
    from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL
    model, clip, _ = env.tiny.tiny_sdxl()

    def encode(text_g, text_l):
        with torch.inference_mode():
            return CLIPTextEncodeSDXL.execute(clip, 1024, 1024, 0, 0, 1024, 1024, text_g, text_l).args[0]
    with torch.inference_mode():
        captured, store = env.cap.AttentionCapture.execute(model, clip, PROMPT, "dog", "cross", "all", "").args

    def sample_xl(positive):
        import comfy.sample
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            return comfy.sample.sample(captured, noise, 2, 7.5, "euler", "normal", positive, encode("", ""),
                                       torch.zeros_like(noise), disable_pbar=True)
    assert store.run_for(sample_xl(encode(PROMPT, PROMPT))).steps == [0, 1]
    with pytest.raises(ValueError, match=f"{REFUSED} .*With CLIPTextEncodeSDXL, give text_g and text_l both this text"):
        sample_xl(encode(PROMPT, "a photo"))


def test_a_clip_with_scheduled_hooks_is_its_prompt_at_every_keyframe(env, pack):
    """SetClipHooks with schedule_clip encodes the prompt once per hook keyframe (a CLIP LoRA fading out): every
    entry is the prompt, accepted by the capture's check and MultiSourceAttnSwap's (the second keyframe's entry
    was refused as another text); another text through the same CLIP is still refused."""
    import comfy.hooks
    from comfy_extras.nodes_hooks import CreateHookKeyframe, SetClipHooks, SetHookKeyframes
    _, other_clip, _ = env.tiny.tiny_sd1(seed=1)
    hooks = comfy.hooks.create_hook_model_as_lora(None, comfy.hooks.get_patch_weights_from_model(other_clip.patcher),
                                                  0.0, 1.0)
    fading = CreateHookKeyframe().create_hook_keyframe(1.0, 0.0)[0]
    fading = CreateHookKeyframe().create_hook_keyframe(0.0, 0.5, fading)[0]
    hooks = SetHookKeyframes().set_hook_keyframes(hooks, fading)[0]
    clip = SetClipHooks().apply_hooks(env.clip, schedule_clip=True, apply_to_conds=False, hooks=hooks)[0]
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        captured, store = env.cap.AttentionCapture.execute(env.model, clip, PROMPT, "dog", "cross", "all", "").args
    assert len(positive) == 2 and not torch.equal(positive[0][0], positive[1][0])
    out = sample(env, captured, positive)
    assert store.run_for(out).steps == [0, 1]
    pack("nodes.host").require_encoded(clip, PROMPT, positive, "Multi-Source Attention Swap")
    with pytest.raises(ValueError, match=REFUSED), torch.inference_mode():
        sample(env, captured, clip.encode_from_tokens_scheduled(clip.tokenize(SAME_LENGTH)))
