"""Pick-and-Draw nodes in the real host on the tiny SD1 model: the guided sampler, its terms, its errors."""
import copy
import types

import pytest
import torch

PROMPT, TEMPLATE, REF_PROMPT = "a photo of a sks dog in the water", "a photo of a dog in the water", "a photo of a sks dog"


@pytest.fixture(scope="module")
def env(host, pack):
    import tiny_models
    model, clip, vae = tiny_models.tiny_sd1()

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return types.SimpleNamespace(pack=pack, pnd=pack("nodes.pnd"), sampling=pack("nodes.sampling"),
                                 inversion=pack("nodes.inversion"),
                                 model=model, clip=clip, vae=vae,
                                 encode=encode, tiny=tiny_models)


def schedule(model, steps=10):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)


def noise_object(seed=0):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    return Noise_RandomNoise(seed)


def reference_image(env):
    return env.tiny.smooth_images(torch.Generator().manual_seed(5), 1, 128, 128).movedim(1, -1)  # IMAGE is [B, H, W, C]


def reference_inversion(env, steps, model=None):
    """The reference inverted by the pack's own NullTextInvert (plain DDIM mode: the palette reads only the pivots);
    made once per module, step count and model (nothing changes an inversion)."""
    made = vars(env).setdefault("inversions", {})
    if (steps, model) not in made:
        with torch.inference_mode():
            made[steps, model] = env.inversion.NullTextInvert.execute(
                model or env.model, env.clip, REF_PROMPT, "ddim", steps, "ddim_uniform", 7.5, 10, 1e-2, 1e-5, "",
                image=reference_image(env), vae=env.vae).args[0]
    return made[steps, model]


def terms(env, sigmas, latent):
    with torch.inference_mode():
        appearance = env.pnd.UREMDGuidance.execute(env.model, reference_inversion(env, len(sigmas) - 1), env.clip, "dog", 0.5,
                                                   "auto", 0.2, 0.4, 1.0).args[0]
        layout = env.pnd.LayoutGuidance.execute(env.model, env.clip, TEMPLATE, "dog", env.encode(TEMPLATE), env.encode(""),
                                                7.5, noise_object(), sigmas, {"samples": latent}, "cross", 0.0, 0.2, 1.0,
                                                3, 0.5).args[0]
    return appearance, layout


def sample_custom(model, sampler, sigmas, latent, env, seed=0):
    import comfy.sample
    with torch.inference_mode():
        noise = noise_object(seed).generate_noise({"samples": latent})
        return comfy.sample.sample_custom(model, noise, 7.5, sampler, sigmas, env.encode(PROMPT), env.encode(""), latent,
                                          seed=seed, disable_pbar=True)


def test_paper_windows_select_the_papers_steps(env):
    sigmas = schedule(env.model, 50).tolist()
    pick = lambda w: env.pnd._window_steps(sigmas, *env.pnd._sigma_window(env.model, *w), "x")
    assert pick((0.0, 0.2)) == list(range(10)) and pick((0.2, 0.4)) == list(range(10, 20))


def test_terms_are_built_on_the_right_steps_and_layers(env):
    sigmas, latent = schedule(env.model), torch.zeros(2, 4, 16, 16)
    appearance, layout = terms(env, sigmas, latent)
    assert appearance.sigmas == [float(s) for s in sigmas[2:4]] and layout.sigmas == [float(s) for s in sigmas[:2]]
    assert {k[0] for k in appearance.layers} == {"output"} and len(layout.layers) == 10
    assert all(v.shape[1] == 32 and 0 < v.shape[0] <= 64 for step in appearance.palette for v in step.values())
    assert all(m.shape[0] == 2 for step in layout.maps for m in step.values()), "one template per batch item"


def test_eta_zero_equals_the_host_euler_sampler_and_the_model_is_untouched(env):
    import comfy.samplers
    sigmas, latent = schedule(env.model), torch.zeros(2, 4, 16, 16)
    appearance, layout = terms(env, sigmas, latent)
    before = repr(copy.deepcopy(env.model.model_options)), dict(env.model.weight_wrapper_patches)
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.0, True,
                                                               appearance, layout).args
    guided = sample_custom(prepared, sampler, sigmas, latent, env)
    plain = sample_custom(env.model, comfy.samplers.sampler_object("euler"), sigmas, latent, env)
    assert torch.equal(guided, plain)
    assert (repr(copy.deepcopy(env.model.model_options)), dict(env.model.weight_wrapper_patches)) == before


def test_guidance_changes_the_image_deterministically(env):
    sigmas, latent = schedule(env.model), torch.zeros(2, 4, 16, 16)
    appearance, layout = terms(env, sigmas, latent)
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.5, True,
                                                               appearance, layout).args
    a, b = sample_custom(prepared, sampler, sigmas, latent, env), sample_custom(prepared, sampler, sigmas, latent, env)
    plain = sample_custom(env.model, env.pnd.comfy.samplers.sampler_object("euler"), sigmas, latent, env)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert (a - plain).abs().max() > 1e-2


def test_each_loss_decreases_at_every_guided_step(env):
    """ℓ(x − step) < ℓ(x) for each term at each of its steps, with the sampler's own update and loss code."""
    from comfyui_personalize.guidance.pnd import guided_update
    sigmas, latent = schedule(env.model), torch.zeros(2, 4, 16, 16)
    appearance, layout = terms(env, sigmas, latent)
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.05, True,
                                                               appearance, layout).args
    # this probe drives the P&D MODEL with its own loop, which the MODEL's check would refuse as a foreign sampler
    prepared = prepared.clone()
    prepared.remove_wrappers_with_key(env.pnd.comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, env.pnd.MARK)
    store = sampler.extra_options["store"]
    checked = []

    def probe(loop, x, sigmas):
        for i in range(len(sigmas) - 1):
            s = float(sigmas[i])
            for term in (appearance, layout):
                if not term.active(s):
                    continue
                def loss(z, live):
                    loop.denoise(z, sigmas[i], "positive")
                    return term.loss(s, live)
                with env.sampling.grad_enabled():
                    z = x.detach().clone().requires_grad_(True)
                    with store.live() as live:      # backward too: checkpointing recomputes with live capture
                        before = loss(z, live)
                        grad, = torch.autograd.grad(before.sum(), z)
                    with store.live() as live:
                        after = loss(guided_update(x, grad, s, 0.05)[0], live)
                checked.append((type(term).__name__, i, before.detach(), after.detach()))
            x = x + (x - loop.cfg_denoise(x, sigmas[i])) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x, None

    with torch.inference_mode():
        noise = noise_object().generate_noise({"samples": latent})
        env.sampling.run_loop(prepared, env.encode(PROMPT), env.encode(""), latent, sigmas, probe, noise=noise, cfg=7.5)
    assert [(n, i) for n, i, _, _ in checked] == [("LayoutTerm", 0), ("LayoutTerm", 1), ("AppearanceTerm", 2),
                                                   ("AppearanceTerm", 3)]
    for name, i, before, after in checked:
        assert (after < before).all(), (name, i, before, after)


def test_bad_inputs_are_refused_with_messages(env):
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    appearance, layout = terms(env, sigmas, torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="'cat' is not a word of the prompt"):
        env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "cat", 0.1, True, appearance, layout)
    with pytest.raises(ValueError, match="window holds no step"):
        env.pnd.LayoutGuidance.execute(env.model, env.clip, TEMPLATE, "dog", env.encode(TEMPLATE), env.encode(""), 7.5,
                                       noise_object(), sigmas, {"samples": latent}, "cross", 0.95, 0.96, 1.0, 3, 0.5)
    # a schedule after the window: denoise below 1 (its tail), or ddim_uniform at 3 steps (it starts at σ 2.9)
    for after in (sigmas[5:], schedule(env.model, 3)):
        with pytest.raises(ValueError, match="window holds no step.*starts after the window's end .*Raise denoise.*"
                                             "ddim_uniform below about 5.*more steps.*end the window later"):
            env.pnd.LayoutGuidance.execute(env.model, env.clip, TEMPLATE, "dog", env.encode(TEMPLATE), env.encode(""),
                                           7.5, noise_object(), after, {"samples": latent}, "cross", 0.0, 0.2, 1.0, 3,
                                           0.5)
    # the API takes an even kernel (the widget's step is the UI's): refused before the template run, by this node
    with pytest.raises(ValueError, match="kernel_size must be odd .*got 4"):
        env.pnd.LayoutGuidance.execute(env.model, env.clip, TEMPLATE, "dog", env.encode(TEMPLATE), env.encode(""), 7.5,
                                       noise_object(), sigmas, {"samples": latent}, "cross", 0.0, 0.2, 1.0, 4, 0.5)
    with pytest.raises(ValueError, match="connect an appearance"):
        env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.1, True)
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.1, True,
                                                               appearance, layout).args
    with pytest.raises(ValueError, match="made for another σ schedule"):
        sample_custom(prepared, sampler, schedule(env.model, 12), latent, env)
    with pytest.raises(ValueError, match="needs the MODEL from the same Pick-and-Draw Sampler"):
        sample_custom(env.model, sampler, sigmas, latent, env)


def test_palette_and_template_show_progress_and_honour_cancel(env, monkeypatch):
    """Both loops report each step to the host's progress bar and stop at a Cancel (they ran to the end unseen)."""
    import comfy.model_management
    import comfy.utils
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: seen.append((value, total)))
    reference_inversion(env, 10)
    seen.clear()
    terms(env, sigmas, latent)
    assert seen == [(1, 2), (2, 2)] * 2, seen       # the palette's 2 steps, then the template's (to its window's end)
    for make in (lambda: env.pnd.UREMDGuidance.execute(env.model, reference_inversion(env, 10), env.clip, "dog", 0.5,
                                                       "auto", 0.2, 0.4, 1.0),
                 lambda: env.pnd.LayoutGuidance.execute(env.model, env.clip, TEMPLATE, "dog", env.encode(TEMPLATE),
                                                        env.encode(""), 7.5, noise_object(), sigmas, {"samples": latent},
                                                        "cross", 0.0, 0.2, 1.0, 3, 0.5)):
        seen.clear()
        comfy.model_management.interrupt_current_processing(True)
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
                make()
        finally:
            comfy.model_management.interrupt_current_processing(False)
        assert seen == [], "stopped at the first step"


def layout_term(env, positive, sigmas, latent):
    with torch.inference_mode():
        return env.pnd.LayoutGuidance.execute(env.model, env.clip, TEMPLATE, "dog", positive, env.encode(""), 7.5,
                                              noise_object(), sigmas, latent, "cross", 0.0, 0.2, 1.0, 3, 0.5).args[0]


def test_an_area_or_a_timestep_range_that_leaves_a_window_step_out_is_refused(env):
    """An area prompt's pass runs on a crop of the latent (its maps cannot be compared with the whole image's: the
    sampler crashed on a size mismatch, or ignored the area); a timestep range leaving out a window step gives that
    step no pass of the prompt (the sampler and the template failed with a bare KeyError). A negative's area (the
    host copies it into the positive, with the negative's text) and an area over the whole latent are not refused
    (the sampler and the capture's prompt check refused them, blaming the positive prompt)."""
    import nodes
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    area = lambda text, side: nodes.ConditioningSetArea().append(env.encode(text), side, side, 0, 0, 1.0)[0]
    late = lambda text: nodes.ConditioningSetTimestepRange().set_range(env.encode(text), 0.15, 1.0)[0]
    for positive in (area(TEMPLATE, 64), late(TEMPLATE)):
        with pytest.raises(ValueError, match="template's step 0 .* has no pass of the prompt over the whole latent"):
            layout_term(env, positive, sigmas, {"samples": latent})
    appearance, layout = terms(env, sigmas, latent)
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.3, True,
                                                               appearance, layout).args
        noise = noise_object().generate_noise({"samples": latent})
    for positive, said in ((area(PROMPT, 64), "this run has no pass of the prompt over the whole latent"),
                           (late(PROMPT), "guided step at σ .* has no pass of the prompt over the whole latent")):
        with pytest.raises(ValueError, match=said), torch.inference_mode():
            comfy_sample(prepared, noise, sampler, sigmas, positive, env.encode(""), latent)
    with torch.inference_mode():
        plain = comfy_sample(prepared, noise, sampler, sigmas, env.encode(PROMPT), env.encode(""), latent)
        whole = comfy_sample(prepared, noise, sampler, sigmas, area(PROMPT, 128), env.encode(""), latent)
        negative_area = comfy_sample(prepared, noise, sampler, sigmas, env.encode(PROMPT), area("", 64), latent)
    assert torch.equal(whole, plain)
    assert torch.isfinite(negative_area).all() and (negative_area - plain).abs().max() > 1e-3


def test_regional_prompts_take_part_in_cfg_and_the_terms_read_the_prompt_over_the_whole_image(env):
    """A prompt for a region (an area, also one the host clamps from an offset, or a mask's bounds) runs on a crop: it
    takes part in CFG, unchecked, in the template and the sampler (Layout Guidance refused it as the wrong prompt;
    an offset area as wide as the latent was taken as whole, refused or crashing in the loss). An area larger than
    the latent runs whole (it was refused). The prompt twice (Conditioning Combine), or masked over the whole image,
    guides as the prompt once (batch 2 maps crashed; the guided step doubled). A negative's area over the whole
    latent, which the host copies into the positive, is not taken for the prompt; a mask without 'mask bounds'
    with another text is refused, the message naming 'mask bounds'."""
    import nodes
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    area = lambda text, side, x=0: nodes.ConditioningSetArea().append(env.encode(text), side, side, x, 0, 1.0)[0]
    right = torch.zeros(1, 128, 128)
    right[:, :, 64:] = 1.0
    masked = lambda text, how: nodes.ConditioningSetMask().append(env.encode(text), right, how, 1.0)[0]
    template = layout_term(env, env.encode(TEMPLATE), sigmas, {"samples": latent})
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.3, False, None,
                                                               template).args
        noise = noise_object().generate_noise({"samples": latent})
    run = lambda positive, negative=None: comfy_sample(prepared, noise, sampler, sigmas, positive,
                                                       negative or env.encode(""), latent)
    with torch.inference_mode():
        plain = run(env.encode(PROMPT))
        for region in (area("a red ball", 64, 64), area("a red ball", 128, 64), masked("a red ball", "mask bounds")):
            regional = layout_term(env, env.encode(TEMPLATE) + region, sigmas, {"samples": latent})
            assert all(torch.isfinite(m).all() for maps in regional.maps for m in maps.values())
            out = run(env.encode(PROMPT) + region)
            assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3
        assert torch.equal(run(area(PROMPT, 256)), plain)
        oversized = layout_term(env, area(TEMPLATE, 256), sigmas, {"samples": latent})
        assert all(torch.equal(a[k], b[k]) for a, b in zip(oversized.maps, template.maps) for k in a)
        for twice in (env.encode(PROMPT) + env.encode(PROMPT), env.encode(PROMPT) + masked(PROMPT, "default")):
            torch.testing.assert_close(run(twice), plain, atol=1e-3, rtol=0)
        assert torch.isfinite(run(env.encode(PROMPT), area("", 128))).all()
        with pytest.raises(ValueError, match="not the text of the positive CONDITIONING.*'mask bounds'"):
            run(env.encode(PROMPT) + masked("a red ball", "default"))


def test_the_guided_step_uses_the_models_data_sigma(env, monkeypatch):
    """On an EDM model with σ_d 0.5 (Playground v2.5's; ModelSamplingContinuousEDM 'edm') the guided step scales
    by √(σ_d²+σ²), the model's own input scale (guided_update's core tests check the formula)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM
    guidance = env.pack("guidance.pnd")
    seen, original = [], guidance.guided_update

    def recording(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs.get("sigma_data"))
        return original(*args, **kwargs)
    monkeypatch.setattr(guidance, "guided_update", recording)
    with torch.inference_mode():
        edm = ModelSamplingContinuousEDM().patch(env.model, "edm", 80.0, 0.002)[0]
    sigmas, latent = schedule(edm), torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        layout = env.pnd.LayoutGuidance.execute(edm, env.clip, TEMPLATE, "dog", env.encode(TEMPLATE), env.encode(""),
                                                7.5, noise_object(), sigmas, {"samples": latent}, "cross", 0.0, 0.2,
                                                1.0, 3, 0.5).args[0]
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(edm, env.clip, PROMPT, "dog", 0.3, True, None,
                                                               layout).args
        out = comfy_sample(prepared, noise_object().generate_noise({"samples": latent}), sampler, sigmas,
                           env.encode(PROMPT), env.encode(""), latent)
    assert seen and set(seen) == {0.5} and torch.isfinite(out).all()


def comfy_sample(model, noise, sampler, sigmas, positive, negative, latent):
    import comfy.sample
    return comfy.sample.sample_custom(model, noise, 7.5, sampler, sigmas, positive, negative, latent, seed=0,
                                      disable_pbar=True)


def test_the_template_keeps_the_generations_noise_mask(env):
    """Inpainting: the template is the vanilla model's run under the latent's noise mask, as the host samples it (it
    was the whole-image run, bit for bit)."""
    import comfy.samplers
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1.0
    masked = layout_term(env, env.encode(TEMPLATE), sigmas, {"samples": latent, "noise_mask": mask})
    whole = layout_term(env, env.encode(TEMPLATE), sigmas, {"samples": latent})
    with torch.inference_mode():
        captured, store = env.pack("nodes.capture").AttentionCapture.execute(env.model, env.clip, TEMPLATE, "dog",
                                                                           "cross", "all").args
        guider = comfy.samplers.CFGGuider(captured)
        guider.set_conds(env.encode(TEMPLATE), env.encode(""))
        guider.set_cfg(7.5)
        guider.sample(noise_object().generate_noise({"samples": latent}), latent, comfy.samplers.sampler_object("euler"),
                      sigmas[:3], denoise_mask=mask, seed=0)
    host = store.runs[-1]
    for step, maps in enumerate(masked.maps):
        for key, template in maps.items():
            assert torch.equal(template, host.maps[(step, key, 0)][:, 0])
    assert any(not torch.equal(a[k], b[k]) for a, b in zip(masked.maps, whole.maps) for k in a)


def test_the_pick_and_draw_model_without_its_sampler_is_refused(env):
    """Its MODEL with a stock sampler would sample plainly, the terms ignored: refused before the run; a sampler
    of another pack that drives ours runs; one that does not is refused after its run."""
    import comfy.sample
    import comfy.samplers
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    appearance, layout = terms(env, sigmas, latent)
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.5, True,
                                                               appearance, layout).args
    steps = []
    with pytest.raises(ValueError, match="sampled without its SAMPLER .*stock sampler.*not into KSampler"):
        with torch.inference_mode():        # the KSampler node's path
            comfy.sample.sample(prepared, noise_object().generate_noise({"samples": latent}), 10, 7.5, "euler",
                                "normal", env.encode(PROMPT), env.encode(""), latent,
                                callback=lambda *a: steps.append(a), disable_pbar=True)
    assert steps == [], "refused before the first step"

    def driving(model, x, sigmas, inner=None, **kwargs):       # another pack's wrapper around a SAMPLER input
        return inner.sampler_function(model, x, sigmas, **kwargs, **inner.extra_options)
    wrapped = comfy.samplers.KSAMPLER(driving, extra_options={"inner": sampler})
    assert torch.equal(sample_custom(prepared, wrapped, sigmas, latent, env),
                       sample_custom(prepared, sampler, sigmas, latent, env))

    class Plain(comfy.samplers.Sampler):                        # a sampler that never calls ours
        def sample(self, *args, **kwargs):
            return comfy.samplers.sampler_object("euler").sample(*args, **kwargs)
    with pytest.raises(ValueError, match="sampled without its SAMPLER .*the sampler was Plain"):
        sample_custom(prepared, Plain(), sigmas, latent, env)
    sample_custom(prepared, sampler, sigmas, latent, env)       # and the node's own pair still samples after that
    # the pack's own loops given this MODEL are not sampling runs of it (here: an inversion over the same steps)
    with torch.inference_mode():
        env.inversion.NullTextInvert.execute(prepared, env.clip, REF_PROMPT, "ddim", 10, "ddim_uniform", 7.5, 10, 1e-2,
                                             1e-5, "", latent={"samples": latent})
    # the swap and the step-blend sampler sample a MODEL themselves: refused there, naming the node and the input
    lnr = env.pack("nodes.lnr")
    with pytest.raises(ValueError, match="Step-Blend Sampler: 'personalized' is the Pick-and-Draw Sampler's MODEL"):
        lnr.StepBlendSampler.execute(env.model, prepared, env.encode(""), env.encode(""), env.encode(PROMPT),
                                     env.encode(""), {"samples": latent}, 0, 10, 7.5, "ddim", "ddim_uniform", 5)
    inversion = reference_inversion(env, 10)
    with pytest.raises(ValueError, match="Multi-Source Attention Swap: 'model' is the Pick-and-Draw Sampler's MODEL"):
        lnr.MultiSourceAttnSwap.execute(prepared, inversion, inversion, env.encode(REF_PROMPT), env.encode(PROMPT),
                                        env.encode(""), 7.5, 1, 3, "auto", "auto")
    # a run outside every window (SplitSigmas' tail, a hires pass at low denoise) ignores nothing: any sampler
    tail = sigmas[5:]
    assert torch.equal(sample_custom(prepared, comfy.samplers.sampler_object("euler"), tail, latent, env),
                       sample_custom(env.model, comfy.samplers.sampler_object("euler"), tail, latent, env))


def test_null_text_and_ddim_inversions_give_the_identical_palette(env):
    """Issue 10: the palette is a cond-only pass at the DDIM pivots, which the null embeddings never enter."""
    with torch.inference_mode():
        nti = env.inversion.NullTextInvert.execute(env.model, env.clip, REF_PROMPT, "null-text", 10, "ddim_uniform", 7.5, 2,
                                                   1e-2, 0.0, "", image=reference_image(env), vae=env.vae).args[0]
        palettes = [env.pnd.UREMDGuidance.execute(env.model, inversion, env.clip, "dog", 0.5, "auto", 0.2, 0.4,
                                                  1.0).args[0].palette for inversion in (nti, reference_inversion(env, 10))]
    assert (nti.null_embeddings - nti.uncond).abs().max() > 1e-4, "null-text mode did optimise the null embeddings"
    assert [p.keys() for p in palettes[0]] == [p.keys() for p in palettes[1]]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*palettes) for k in a), "bit-identical palettes"


def guided_steps(env, appearance_weight, eta=0.5, layout_weight=None):
    """The latent after the guided update at every step (the sampler's callback), for the given weights."""
    import dataclasses
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    appearance, layout = terms(env, sigmas, latent)
    appearance = dataclasses.replace(appearance, weight=appearance_weight)
    chosen = [appearance] if layout_weight is None else [appearance, dataclasses.replace(layout, weight=layout_weight)]
    seen = []
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", eta, True, *chosen).args
        noise = noise_object().generate_noise({"samples": latent})
        env.pnd.comfy.sample.sample_custom(prepared, noise, 7.5, sampler, sigmas, env.encode(PROMPT), env.encode(""),
                                           latent, callback=lambda i, x0, x, total: seen.append(x.clone()),
                                           disable_pbar=True)
    return seen


def test_doubling_a_terms_weight_doubles_its_guided_step(env):
    """Issue 10: α and β did nothing under normalisation (the per-item RMS cancelled a lone term's weight). Now the
    appearance step at its first window step (step 2 of 10) is exactly twice as long with α = 2 as with α = 1."""
    plain, single, double = (guided_steps(env, w, eta) for w, eta in ((1.0, 0.0), (1.0, 0.5), (2.0, 0.5)))
    assert torch.equal(single[1], plain[1]) and torch.equal(double[1], plain[1]), "no guidance before the window"
    step_1, step_2 = single[2] - plain[2], double[2] - plain[2]
    assert step_1.abs().max() > 1e-3
    torch.testing.assert_close(step_2, 2 * step_1, rtol=1e-4, atol=1e-5)


def test_a_term_active_on_no_step_is_refused(env):
    """Issue 9 §3: appearance only at denoise 0.5 was bit-identical to plain Euler without a word."""
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    appearance, _ = terms(env, sigmas, latent)
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.5, True, appearance).args
    with pytest.raises(ValueError, match="AppearanceTerm's window .* holds no step of this run"):
        sample_custom(prepared, sampler, sigmas[5:], latent, env)


def test_a_template_for_another_latent_is_refused(env):
    sigmas = schedule(env.model)
    _, layout = terms(env, sigmas, torch.zeros(2, 4, 16, 16))
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.5, True, None, layout).args
    for latent, said in ((torch.zeros(1, 4, 16, 16), "batch 2 and size 16×16, this generation is batch 1 and 16×16"),
                         (torch.zeros(2, 4, 16, 8), "this generation is batch 2 and 8×16")):
        with pytest.raises(ValueError, match=f"layout template was sampled for a latent of .*{said}"):
            sample_custom(prepared, sampler, sigmas, latent, env)


def test_an_empty_palette_is_refused_and_an_empty_generated_set_warns(env, caplog):
    """Issue 9 §3: τ = 1 keeps no position (Â = d/(d + ε) < 1 at the maximum), which silently gave a zero loss."""
    import dataclasses
    inversion = reference_inversion(env, 10)
    with pytest.raises(ValueError, match="the palette is empty at 4 of 4 .* attention to 'dog' reaches τ = 1.0"):
        with torch.inference_mode():
            env.pnd.UREMDGuidance.execute(env.model, inversion, env.clip, "dog", 1.0, "auto", 0.2, 0.4, 1.0)
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    appearance = dataclasses.replace(terms(env, sigmas, latent)[0], tau=1.0)
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.5, True, appearance).args
    with caplog.at_level("WARNING"):
        out = sample_custom(prepared, sampler, sigmas, latent, env)
    said = [r.getMessage() for r in caplog.records if "reaches τ nowhere" in r.getMessage()]
    assert len(said) == 2 and "attention to 'dog'" in said[0] and "items [0]" in said[0], said
    assert torch.isfinite(out).all()


def test_subject_words_of_different_token_counts_warn(env, caplog):
    """Issue 10: 'sks dog' (two tokens, maps summed) for the palette and 'dog' for the generation compare differently
    normalised maps under one τ."""
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    _, layout = terms(env, sigmas, latent)
    with torch.inference_mode():
        two_tokens = env.pnd.UREMDGuidance.execute(env.model, reference_inversion(env, 10), env.clip, "sks dog", 0.5,
                                                   "auto", 0.2, 0.4, 1.0).args[0]
    with caplog.at_level("WARNING"):
        env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.5, True, two_tokens, layout)
    said = [r.getMessage() for r in caplog.records if "token(s)" in r.getMessage()]
    assert len(said) == 1 and "'dog' is 1 token(s) but the AppearanceTerm's word 'sks dog' is 2" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "sks dog", 0.5, True, two_tokens, layout)
    said = [r.getMessage() for r in caplog.records if "token(s)" in r.getMessage()]
    assert len(said) == 1 and "LayoutTerm's word 'dog' is 1" in said[0]


def test_an_inversion_from_another_model_is_refused(env):
    other = env.model.clone()
    key = next(k for k in other.model_state_dict() if k.endswith("attn2.to_k.weight"))
    other.add_patches({key: (torch.ones_like(other.model_state_dict()[key]) * 0.01,)}, 1.0)   # a LoRA-like merge
    inversion = reference_inversion(env, 10)
    with pytest.raises(ValueError, match="made with a different model: .*weight patches"):
        env.pnd.UREMDGuidance.execute(other, inversion, env.clip, "sks dog", 0.5, "auto", 0.2, 0.4, 1.0)


@pytest.mark.parametrize("name", ["pick_and_draw_personalized.json", "pick_and_draw_vanilla_sd.json"])
def test_shipped_pick_and_draw_workflows_run_in_the_host_executor(host, env, name):
    import json
    import pathlib
    import harness
    from PIL import Image
    Image.fromarray((reference_image(env)[0].numpy() * 255).astype("uint8")).save(host.input_dir / "reference_dog.png")
    workflow = json.loads((pathlib.Path(__file__).parents[2] / "workflows" / name).read_text())
    for node in workflow["nodes"]:       # test-only: fewer steps on the tiny CPU models (the file keeps 50)
        if node["type"] == "NullTextInvert":
            node["widgets_values"][2] = 10
        if node["type"] == "BasicScheduler":
            node["widgets_values"][1] = 10
    out = harness.run_workflow(workflow, latent_side=128)
    by_type = {n["type"]: str(n["id"]) for n in workflow["nodes"]}
    image = out[by_type["VAEDecode"]][0]
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all()
    inversion, _, _, error = out[by_type["NullTextInvert"]]
    assert inversion.mode == "ddim" and error != error, "ddim mode, no reconstruction: the palette reads only the pivots"
    appearance, = out[by_type["UREMDGuidance"]]
    assert (appearance.subject, appearance.tokens) == ("dog", 1), "the palette watches the sampler's word"
    grid, mask = out[by_type["PersonalizeAttentionMaps"]]
    assert grid.shape[0] == 1 and mask.shape == (1, 128, 128)


def test_pick_and_draw_on_sdxl(env):
    """The whole chain on the tiny SDXL (pooled/size conditioning, depth-2 blocks, 'auto' layers at 1/4)."""
    import comfy.sample
    import comfy.samplers
    model, clip, vae = env.tiny.tiny_sdxl()
    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))
    sigmas, latent = schedule(model), torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        inversion = env.inversion.NullTextInvert.execute(model, clip, REF_PROMPT, "ddim", 10, "ddim_uniform", 7.5, 10, 1e-2,
                                                         1e-5, "", image=reference_image(env), vae=vae).args[0]
        appearance = env.pnd.UREMDGuidance.execute(model, inversion, clip, "dog", 0.5, "auto", 0.2, 0.4, 1.0).args[0]
        layout = env.pnd.LayoutGuidance.execute(model, clip, TEMPLATE, "dog", encode(TEMPLATE), encode(""), 7.5, noise_object(),
                                                sigmas, {"samples": latent}, "cross", 0.0, 0.2, 1.0, 3, 0.5).args[0]
        assert {k[:2] for k in appearance.layers} == {("output", 0), ("output", 1)} and {k[2] for k in appearance.layers} == {0, 1}
        outs = []
        for eta, checkpointing in ((0.0, True), (0.5, True), (0.5, False)):
            prepared, sampler = env.pnd.PickAndDrawSampler.execute(model, clip, PROMPT, "dog", eta, True, appearance, layout,
                                                                   gradient_checkpointing=checkpointing).args
            noise = noise_object().generate_noise({"samples": latent})
            outs.append(comfy.sample.sample_custom(prepared, noise, 7.5, sampler, sigmas, encode(PROMPT), encode(""), latent,
                                                   disable_pbar=True))
        plain = comfy.sample.sample_custom(model, noise, 7.5, comfy.samplers.sampler_object("euler"), sigmas, encode(PROMPT),
                                           encode(""), latent, disable_pbar=True)
    assert torch.equal(outs[0], plain)
    assert torch.isfinite(outs[1]).all() and (outs[1] - plain).abs().max() > 1e-2
    # the checkpointed blocks (SDXL's depth-2 transformers, label embedding) recompute what they computed
    assert torch.allclose(outs[1], outs[2], rtol=0, atol=1e-5), (outs[1] - outs[2]).abs().max()


def test_pick_and_draw_drives_a_lora_patched_model(env):
    """A LoRA-personalized MODEL (weight patches): the guided passes see the patched weights, η = 0 still equals Euler."""
    import comfy.samplers
    lora = env.model.clone()
    for key in [k for k in lora.model_state_dict() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]:
        lora.add_patches({key: (torch.randn(lora.model_state_dict()[key].shape, generator=torch.Generator().manual_seed(2)) * 0.3,)}, 1.0)
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        inversion = env.inversion.NullTextInvert.execute(lora, env.clip, REF_PROMPT, "ddim", 10, "ddim_uniform", 7.5, 10,
                                                         1e-2, 1e-5, "", image=reference_image(env), vae=env.vae,
                                                         reconstruct=False).args[0]
        appearance = env.pnd.UREMDGuidance.execute(lora, inversion, env.clip, "sks dog", 0.5, "auto", 0.2, 0.4, 1.0).args[0]
        outs = [sample_custom(m, s, sigmas, latent, env) for m, s in
                [env.pnd.PickAndDrawSampler.execute(lora, env.clip, PROMPT, "dog", eta, True, appearance).args
                 for eta in (0.0, 0.5)]]
    plain_lora = sample_custom(lora, comfy.samplers.sampler_object("euler"), sigmas, latent, env)
    plain_base = sample_custom(env.model, comfy.samplers.sampler_object("euler"), sigmas, latent, env)
    assert torch.equal(outs[0], plain_lora) and (plain_lora - plain_base).abs().max() > 1e-3
    assert torch.isfinite(outs[1]).all() and (outs[1] - plain_lora).abs().max() > 1e-3
