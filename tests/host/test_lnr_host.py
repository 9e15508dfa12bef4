"""Layout-and-Retouch nodes in the real host on the tiny SD1 model."""
import copy
import types

import pytest
import torch

STEPS = 8
Y_R, Y_P = "a photo of a sks dog", "a photo of a sks dog in the jungle"


@pytest.fixture(scope="module")
def env(host, pack):
    import tiny_models
    model, clip, vae = tiny_models.tiny_sd1()
    personalized = model.clone()
    key = next(k for k in personalized.model_state_dict() if k.endswith("attn2.to_v.weight"))
    personalized.add_patches({key: (torch.randn_like(personalized.model_state_dict()[key]) * 0.5,)}, 1.0)
    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))
    e = types.SimpleNamespace(lnr=pack("nodes.lnr"), inv=pack("nodes.inversion"), sampling=pack("nodes.sampling"),
                              model=model, personalized=personalized, clip=clip, vae=vae, encode=encode, tiny=tiny_models)
    e.images = [tiny_models.smooth_images(torch.Generator().manual_seed(s), 1, 64, 64).movedim(1, -1) for s in (7, 8)]
    e.reference, e.layout = (invert(e, image)[0] for image in e.images)
    return e


def invert(env, image, model=None, steps=STEPS, reconstruct=False):
    with torch.inference_mode():
        return env.inv.NullTextInvert.execute(model or env.personalized, env.clip, "", "ddim", steps, "normal", 7.5, 10,
                                              1e-2, 1e-5, "", image=image, vae=env.vae, reconstruct=reconstruct).args


def test_inversion_without_reconstruction_has_the_same_trajectory(env):
    full, quick = invert(env, env.images[0], reconstruct=True), invert(env, env.images[0])
    assert torch.equal(full[0].trajectory, quick[0].trajectory)
    assert quick[3] != quick[3] and 0 < full[3] < 1, "error: NaN when not measured"
    with torch.inference_mode():
        encoded = env.vae.encode(env.images[0][:, :, :, :3])
    assert torch.allclose(quick[1]["samples"], encoded, atol=1e-5), "without reconstruction the output is the input"


def stage2(env, lambda2=-1, blend_start=-1, swap="auto", blend="auto", words="", mask=None, paths=("pinned", "pinned"),
           model=None, **kw):
    with torch.inference_mode():
        out, used = env.lnr.MultiSourceAttnSwap.execute(
            model or env.personalized, kw.get("reference", env.reference), kw.get("layout", env.layout), env.encode(Y_R),
            env.encode(Y_P), env.encode(""), 7.5, lambda2, blend_start, swap, blend, env.clip, Y_P, words, mask, 0.1,
            reference_path=paths[0], layout_path=paths[1]).args
    return out["samples"], used


FREE = ("free-running", "free-running")


def plain_from(env, x_T, prompt):
    """Plain CFG Euler denoising of one path from its inverted latent, alone in its batch."""
    def loop_fn(loop, x, sigmas):
        x = x_T.to(x)
        for i in range(len(sigmas) - 1):
            x = x + (x - loop.cfg_denoise(x, sigmas[i])) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x, None
    with torch.inference_mode():
        out, _ = env.sampling.run_loop(env.personalized, env.encode(prompt), env.encode(""), torch.zeros_like(x_T),
                                       env.reference.sigmas, loop_fn, cfg=7.5)
    return out


@pytest.mark.parametrize("steps", [STEPS, 6])
def test_step_blend_lambda1_extremes_equal_the_host_sampler(env, steps):
    """6 steps: the host's ddim_uniform gives 7 sigmas when the steps do not divide 1000; the node cut the last."""
    import nodes
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    pos_v, pos_p, neg = env.encode("a photo of a dog"), env.encode(Y_P), env.encode("")

    def blend(l1):
        with torch.inference_mode():
            return env.lnr.StepBlendSampler.execute(env.model, env.personalized, pos_v, neg, pos_p, neg, latent, 3, steps,
                                                    7.5, "ddim", "ddim_uniform", l1).args[0]["samples"]

    with torch.inference_mode():
        vanilla = nodes.common_ksampler(env.model, 3, steps, 7.5, "ddim", "ddim_uniform", pos_v, neg, latent)[0]["samples"]
        personal = nodes.common_ksampler(env.personalized, 3, steps, 7.5, "ddim", "ddim_uniform", pos_p, neg, latent)[0]["samples"]
    assert torch.equal(blend(0), personal) and torch.equal(blend(steps), vanilla)
    middle = blend(3)
    assert (middle - personal).abs().max() > 1e-3 and (middle - vanilla).abs().max() > 1e-3
    with pytest.raises(ValueError, match=f"λ1 = {steps + 1} is outside"):
        blend(steps + 1)


def test_step_blend_with_an_ancestral_sampler_draws_no_noise_twice(env, monkeypatch):
    """The personalized run's ancestral noise is not the vanilla run's again (both were seeded with `seed`, so step
    λ1 + j added step j's noise a second time)."""
    import comfy.k_diffusion.sampling as k_sampling
    draws, original = [], k_sampling.default_noise_sampler

    def recording(x, seed=None):
        sample = original(x, seed)
        return lambda sigma, sigma_next: draws.append(sample(sigma, sigma_next)) or draws[-1]
    monkeypatch.setattr(k_sampling, "default_noise_sampler", recording)
    pos, neg = env.encode(Y_P), env.encode("")
    with torch.inference_mode():
        env.lnr.StepBlendSampler.execute(env.model, env.model, pos, neg, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)},
                                         7, 6, 7.5, "euler_ancestral", "normal", 3)
    assert len(draws) == 5            # the last step (to σ = 0) draws none
    assert not any(torch.equal(draws[i], draws[j]) for j in range(len(draws)) for i in range(j))


def test_lambda2_at_the_step_count_gives_the_layout_path_as_a_separate_pass_would(env):
    """Also the one-batch check: the layout path, batched with the reference, equals it run alone."""
    out, _ = stage2(env, lambda2=STEPS, blend_start=STEPS + 1, paths=FREE)
    alone = plain_from(env, env.layout.trajectory[0], Y_P)
    torch.testing.assert_close(out, alone, atol=1e-3, rtol=1e-3)
    assert (plain_from(env, env.reference.trajectory[0], Y_R) - alone).abs().max() > 1e-2, "the paths differ"


def test_no_swap_no_blend_from_the_start_is_plain_denoising_of_the_layout_with_y_r(env):
    ones = torch.ones(1, 64, 64)
    out, used = stage2(env, lambda2=0, blend_start=1, swap="", mask=ones)
    assert torch.equal(used, torch.ones(1, 64, 64)), "M = 1 everywhere"
    torch.testing.assert_close(out, plain_from(env, env.layout.trajectory[0], Y_R), atol=1e-3, rtol=1e-3)


def unskipped_reference(env, lambda2):
    """Algorithm 1 written out without the skip: three paths every step; up to λ2 the target's self- and cross-attention
    Q, K, V are the layout's (all layers); after it the target's self-attention K, V are the reference's (swap layers)."""
    from comfy.ldm.modules.attention import optimized_attention
    layers = env.lnr.host.unet_layers(env.personalized)
    swap_keys = {l.key for l in env.lnr._swap_layers(layers, "auto")}
    phase = {"copy": True}

    def make(kind, key):
        def patch(q, k, v, extra):
            chunks = len(extra["cond_or_uncond"])
            q, k, v = (t.reshape(chunks, 3, *t.shape[1:]).clone() for t in (q, k, v))
            if phase["copy"]:
                q[:, 2], k[:, 2], v[:, 2] = q[:, 1], k[:, 1], v[:, 1]
            elif kind == "self" and key in swap_keys:
                k[:, 2], v[:, 2] = k[:, 0], v[:, 0]
            flat = lambda t: t.reshape(-1, *t.shape[2:])
            return optimized_attention(flat(q), flat(k), flat(v), extra["n_heads"])
        return patch
    model = env.personalized.clone()
    for l in layers:
        (model.set_model_attn1_replace if l.kind == "self" else model.set_model_attn2_replace)(make(l.kind, l.key), *l.key)
    positive = env.lnr._stack(env.encode(Y_R), env.encode(Y_P))

    def loop_fn(loop, x, sigmas):
        x = torch.cat([env.reference.trajectory[0], env.layout.trajectory[0], env.layout.trajectory[0]]).to(x)
        for i in range(len(sigmas) - 1):
            phase["copy"] = i + 1 <= lambda2
            x = x + (x - loop.cfg_denoise(x, sigmas[i])) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x[2:], None
    with torch.inference_mode():
        out, _ = env.sampling.run_loop(model, positive, env.encode(""), torch.zeros(1, 4, 8, 8), env.reference.sigmas,
                                       loop_fn, cfg=7.5)
    return out


def test_skipping_the_redundant_target_path_changes_nothing(env):
    """Free-running paths, Algorithm 1 read literally: there the skip is a claim to prove (pinned, the target's
    first λ2 steps are the layout's trajectory by definition)."""
    ours, _ = stage2(env, lambda2=3, blend_start=STEPS + 1, paths=FREE)
    reference = unskipped_reference(env, 3)
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=1e-3)
    assert (ours - plain_from(env, env.layout.trajectory[0], Y_R)).abs().max() > 1e-3, "the swap does something"


def recorded_paths(env):
    """A copy of the personalized model that records, at every UNet call, σ and each path's σ-space input latent
    (one row per path; cond and uncond chunks hold the same latents)."""
    calls = []

    def wrapper(apply_model, args):
        x, chunks = args["input"], len(args["cond_or_uncond"])
        per_chunk = x.shape[0] // chunks
        calls.append((float(args["timestep"][0]), x[:per_chunk].clone()))
        assert all(torch.equal(x[:per_chunk], x[c * per_chunk:(c + 1) * per_chunk]) for c in range(chunks))
        return apply_model(args["input"], args["timestep"], **args["c"])
    model = env.personalized.clone()
    model.set_model_unet_function_wrapper(wrapper)
    return model, calls


def path_drift(calls, trajectory, sigmas, row):
    """max over the recorded steps of ‖x_path − x*_i‖ / ‖x*_i‖, and the step indices recorded."""
    index = {round(float(s), 4): i for i, s in enumerate(sigmas[:-1])}
    steps = [index[round(s, 4)] for s, _ in calls]
    drift = max(((x[row] - trajectory[i][0]).norm() / trajectory[i][0].norm()).item() for (_, x), i in zip(calls, steps))
    return drift, steps


def test_pinned_paths_follow_their_inversion_trajectories_and_free_ones_drift(env):
    """Issue 10: pinned, the reference path's latent at every computed step is its inversion latent (exactly), and
    the layout's too; free-running (Algorithm 1 literally) they drift. Steps ≤ λ2 with both pinned need no pass."""
    sigmas = env.reference.sigmas
    model, calls = recorded_paths(env)
    stage2(env, lambda2=3, blend_start=STEPS + 1, model=model)
    drift_ref, steps = path_drift(calls, env.reference.trajectory, sigmas, 0)
    drift_lay, _ = path_drift(calls, env.layout.trajectory, sigmas, 1)
    assert steps == list(range(3, STEPS)), "steps 1…λ2 need no pass when both paths are pinned"
    assert drift_ref == 0 and drift_lay == 0
    model, calls = recorded_paths(env)
    stage2(env, lambda2=3, blend_start=STEPS + 1, model=model, paths=FREE)
    free_ref, steps = path_drift(calls, env.reference.trajectory, sigmas, 0)
    free_lay, _ = path_drift(calls, env.layout.trajectory, sigmas, 1)
    assert steps == list(range(STEPS))
    print(f"\nL&R path drift on the tiny SD1 ({STEPS} steps, CFG 7.5): max relative latent distance to the "
          f"trajectory, reference {free_ref:.4f} free-running vs {drift_ref:.4f} pinned, layout {free_lay:.4f} "
          f"free-running vs {drift_lay:.4f} pinned")
    assert free_ref > 1e-2 and free_lay > 1e-2, "an empty-prompt inversion replayed at CFG 7.5 drifts"


def test_a_blend_start_at_or_before_lambda2_still_builds_the_mask_with_pinned_paths(env):
    """With both paths pinned, steps ≤ λ2 need no pass; the blend start's step must still build M (it was
    skipped, leaving an all-zero mask and no blend, silently, on default settings)."""
    for paths in (("pinned", "pinned"), FREE):
        _, used = stage2(env, lambda2=4, blend_start=3, words="dog", paths=paths)
        assert used.max() >= 0.5, f"{paths}: the mask was never built (max {used.max():.3f})"


def test_pinned_layout_with_lambda2_at_the_step_count_returns_the_layout_image(env):
    out, _ = stage2(env, lambda2=STEPS, blend_start=STEPS + 1)
    free, _ = stage2(env, lambda2=STEPS, blend_start=STEPS + 1, paths=FREE)
    with torch.inference_mode():
        layout_image = env.vae.encode(env.images[1][:, :, :, :3])
    torch.testing.assert_close(out, layout_image, atol=1e-5, rtol=1e-5)
    distance = ((free - layout_image).norm() / layout_image.norm()).item()
    print(f"\nL&R layout output at λ2 = T: relative latent distance to the layout image {distance:.4f} free-running, "
          f"{((out - layout_image).norm() / layout_image.norm()).item():.2e} pinned")
    assert distance > 1e-2


def test_auto_mask_same_input_same_image_and_the_model_is_untouched(env):
    before = repr(copy.deepcopy(env.personalized.model_options)), repr(env.personalized.patches.keys())
    a, mask_a = stage2(env, lambda2=2, blend_start=5, words="dog")
    b, mask_b = stage2(env, lambda2=2, blend_start=5, words="dog")
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert mask_a.shape == (1, 64, 64) and 0 <= mask_a.min() and mask_a.max() <= 1 and mask_a.max() > 0
    no_blend, _ = stage2(env, lambda2=2, blend_start=STEPS + 1)
    assert (a - no_blend).abs().max() > 1e-4, "blending from step 5 changes the target"
    assert (repr(copy.deepcopy(env.personalized.model_options)), repr(env.personalized.patches.keys())) == before


def test_bad_inputs_are_refused_naming_real_inputs(env):
    """Every refusal says what to change, and each input it names in quotes is one the node has (issue 9 §3: the
    blend-start message named inputs the node does not have)."""
    import re
    schema = env.lnr.MultiSourceAttnSwap.define_schema()
    inputs = {i.id for i in schema.inputs}
    cases = [
        (dict(lambda2=STEPS + 1), "'lambda2' = 9 is outside the inversions' 8 steps"),
        (dict(lambda2=2, blend_start=0), "'blend_start' = 0: steps count from 1"),
        (dict(words=""), "blending needs a mask"),
        (dict(words="dog", mask=torch.ones(1, 64, 32)), "give a mask of the layout image"),
        (dict(words="dog", mask=torch.ones(2, 64, 64)), "'mask' holds a batch of 2 masks"),
        (dict(words="dog", reference=invert(env, env.images[0][:, :32])[0]), "differ in size"),
        (dict(words="dog", reference=invert(env, env.images[0], steps=STEPS + 2)[0]), "different steps or schedulers"),
        (dict(words="dog", paths=("pinned", "pinnned")), "'layout_path' must be 'pinned' or 'free-running'"),
    ]
    for kwargs, said in cases:
        with pytest.raises(ValueError, match=said) as refused:
            stage2(env, **kwargs)
        named = set(re.findall(r"'([a-z_0-9]+)'", str(refused.value))) - {"pinned", "pinnned", "free-running"}
        assert named and named <= inputs, (str(refused.value), named - inputs)
    with pytest.raises(ValueError, match="'words' need the 'clip' and the 'prompt'"):
        with torch.inference_mode():
            env.lnr.MultiSourceAttnSwap.execute(env.personalized, env.reference, env.layout, env.encode(Y_R),
                                                env.encode(Y_P), env.encode(""), 7.5, 2, 5, "auto", "auto", None, "",
                                                "dog", None, 0.1)
    with pytest.raises(ValueError, match="'cat' is not a word of the prompt"):
        stage2(env, words="cat")
    with pytest.raises(ValueError, match="different model"):
        stage2(env, words="dog", reference=invert(env, env.images[0], model=env.model)[0])


def test_step_blend_refuses_models_of_different_families(env):
    """Issue 9 §3: an SD1 vanilla and an SDXL personalized model (one latent passes from one to the other)."""
    sdxl, sdxl_clip, _ = env.tiny.tiny_sdxl()
    encode_xl = lambda text: sdxl_clip.encode_from_tokens_scheduled(sdxl_clip.tokenize(text))
    pos, neg = env.encode("a photo of a dog"), env.encode("")
    with pytest.raises(ValueError, match=r"the vanilla model is \w*SD15 \(SD15 latents, 64-wide text context\) but the "
                                         r"personalized model is \w*SDXL \(SDXL latents, \d+-wide text context\)"):
        with torch.inference_mode():
            env.lnr.StepBlendSampler.execute(env.model, sdxl, pos, neg, encode_xl(Y_P), encode_xl(""),
                                             {"samples": torch.zeros(1, 4, 8, 8)}, 0, STEPS, 7.5, "ddim", "ddim_uniform",
                                             3)


def test_step_blend_refuses_a_latent_with_a_noise_mask_before_sampling(env, monkeypatch):
    """The second run's latent_image is the first run's noisy output, and the host's inpainting pinned the unmasked
    region to it: that region came out noisy (35 off one KSampler run at vanilla = personalized, latent std 6.2)."""
    import re
    import nodes
    sampled = []
    monkeypatch.setattr(nodes, "common_ksampler", lambda *args, **kw: sampled.append(args) or (args[8],))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    latent = nodes.SetLatentNoiseMask().set_mask({"samples": torch.zeros(1, 4, 8, 8)}, mask)[0]
    pos, neg = env.encode(Y_P), env.encode("")
    with pytest.raises(ValueError, match="'latent' carries a noise mask") as refused:
        with torch.inference_mode():
            env.lnr.StepBlendSampler.execute(env.model, env.personalized, pos, neg, pos, neg, latent, 0, STEPS, 7.5,
                                             "ddim", "ddim_uniform", 3)
    inputs = {i.id for i in env.lnr.StepBlendSampler.define_schema().inputs}
    assert set(re.findall(r"'([a-z_0-9]+)'", str(refused.value))) == {"latent"} <= inputs
    assert not sampled


def test_shipped_layout_and_retouch_workflow_runs_in_the_host_executor(host, env):
    """Stage 1 → decode → SAM → both inversions → stage 2, with a textual-inversion embedding as the personal concept."""
    import json
    import os
    import pathlib
    import folder_paths
    import harness
    from PIL import Image
    from safetensors.torch import save_file
    from test_masks_host import tiny_sam
    save_file({"clip_l": torch.randn(2, 64, generator=torch.Generator().manual_seed(9))},
              str(host.embeddings_dir / "sks_dog.safetensors"))
    Image.fromarray((env.images[0][0].numpy() * 255).astype("uint8")).save(host.input_dir / "reference_dog.png")
    sams = os.path.join(folder_paths.models_dir, "sams")
    os.makedirs(sams, exist_ok=True)
    torch.save(tiny_sam().state_dict(), os.path.join(sams, "sam_vit_b_01ec64.pth"))
    workflow = json.loads((pathlib.Path(__file__).parents[2] / "workflows" / "layout_and_retouch.json").read_text())
    for node in workflow["nodes"]:       # test-only: fewer steps on the tiny CPU models (the file keeps 50)
        if node["type"] in ("StepBlendSampler", "NullTextInvert"):
            node["widgets_values"][2] = STEPS
    out = harness.run_workflow(workflow, latent_side=64)
    by_type = {n["type"]: str(n["id"]) for n in workflow["nodes"]}
    latent, mask = out[by_type["MultiSourceAttnSwap"]]
    assert latent["samples"].shape == (1, 4, 8, 8) and torch.isfinite(latent["samples"]).all()
    assert mask.shape == (1, 64, 64) and 0 <= mask.min() and mask.max() <= 1 and mask.max() >= 0.5
    assert len(out.ui[by_type["SaveImage"]]["images"]) == 1, "the retouched image was saved"
    sam_mask = out[by_type["PersonalizeSAMSegment"]][0]
    assert sam_mask.shape == (1, 64, 64) and set(sam_mask.unique().tolist()) <= {0.0, 1.0}


def test_layout_and_retouch_on_sdxl(env):
    """Stage 2 on the tiny SDXL: pooled prompts stacked per path, 'auto' swap layers from SDXL's block count."""
    model, clip, vae = env.tiny.tiny_sdxl()
    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))
    with torch.inference_mode():
        ref, lay = (env.inv.NullTextInvert.execute(model, clip, "", "ddim", STEPS, "normal", 7.5, 10, 1e-2, 1e-5, "",
                                                   image=image, vae=vae).args[0] for image in env.images)
        out, used = env.lnr.MultiSourceAttnSwap.execute(model, ref, lay, encode(Y_R), encode(Y_P), encode(""), 7.5, 2, 5,
                                                        "auto", "auto", clip, Y_P, "dog", None, 0.1).args
        swap = env.lnr._swap_layers(env.lnr.host.unet_layers(model), "auto")
    total = max(l.ordinal for l in env.lnr.host.unet_layers(model)) + 1
    assert [l.ordinal for l in swap] == list(range(round(total * 10 / 16), total))
    assert torch.isfinite(out["samples"]).all() and used.shape == (1, 64, 64) and used.max() > 0
