"""NullTextInvert / LoadInversion in the real host, on the tiny SD1 model (methods.md §1.1)."""
import copy
import dataclasses
import os
import types

import numpy as np
import pytest
import torch

PROMPT = "a photo of a dog"
STEPS = 10
# The tiny CLIP's embeddings move the UNet little (its cross-attention outputs are scaled ×0.1), so
# the paper's lr 1e-2 barely moves the null embedding in 10 iterations (error 0.17 against plain
# DDIM's 0.25 at 10 steps); 1e-1 shows what the method does.
TINY_LR = 0.1


@pytest.fixture(scope="module")
def mod(pack):
    return pack("nodes.inversion")


@pytest.fixture(scope="module")
def sd1(host):
    import tiny_models
    return tiny_models.tiny_sd1()


@pytest.fixture(scope="module")
def reference(host):
    """A smooth image-like reference, 128² pixels (a 16×16 latent), [1, H, W, 3]."""
    import tiny_models
    return tiny_models.smooth_images(torch.Generator().manual_seed(7), n=1, height=128, width=128).movedim(1, -1)


def invert(mod, model, clip, vae=None, image=None, latent=None, mode="null-text", steps=STEPS, inner_steps=10,
           lr=TINY_LR, save_name=""):
    with torch.inference_mode():
        return mod.NullTextInvert.execute(model, clip, PROMPT, mode, steps, "ddim_uniform", 7.5, inner_steps, lr, 1e-5,
                                          save_name, image=image, vae=vae, latent=latent).args


def snapshot(model):
    return repr((model.model_options, model.patches, model.object_patches, model.weight_wrapper_patches,
                 model.patches_uuid, model.wrappers, model.callbacks))


def host_sample(model, pos, neg):
    import comfy.sample
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 3, 7.5, "euler", "normal", pos, neg, torch.zeros_like(noise),
                                   disable_pbar=True)


@pytest.fixture(scope="module")
def runs(mod, sd1, reference):
    """Both modes on the same reference; the model's state and a host sampling run around them."""
    model, clip, vae = sd1
    probe = [[clip.encode_from_tokens(clip.tokenize(PROMPT)), {}]], [[clip.encode_from_tokens(clip.tokenize("")), {}]]
    before, sampled_before = snapshot(model), host_sample(model, *probe)
    nti = invert(mod, model, clip, vae, image=reference)
    after, sampled_after = snapshot(model), host_sample(model, *probe)
    ddim = invert(mod, model, clip, vae, image=reference, mode="ddim")
    return types.SimpleNamespace(nti=nti, ddim=ddim, before=before, after=after,
                                 sampled_before=sampled_before, sampled_after=sampled_after)


def relative_error(model, latent, x0):
    z = model.model.process_latent_in(latent["samples"])
    return ((z - x0).norm() / x0.norm()).item()


def test_null_text_inversion_reconstructs_far_better_than_ddim_inversion(runs, sd1, reference):
    model, _, vae = sd1
    with torch.inference_mode():
        x0 = model.model.process_latent_in(vae.encode(reference))       # the input, in the model's space
    (nti, nti_rec, nti_image, nti_err), (ddim, ddim_rec, _, ddim_err) = runs.nti, runs.ddim
    print(f"\nreconstruction error at CFG 7.5, {STEPS} steps, 16x16 latent: "
          f"null-text {nti_err:.4f}, plain DDIM {ddim_err:.4f} (ratio {ddim_err / nti_err:.1f}x)")
    assert torch.equal(nti.trajectory[-1], x0) and torch.equal(ddim.trajectory, nti.trajectory)
    assert nti.trajectory.shape == (STEPS + 1, 1, 4, 16, 16) and nti.null_embeddings.shape == (STEPS, 1, 77, 64)
    assert nti_err == pytest.approx(relative_error(model, nti_rec, x0), rel=1e-4)
    assert ddim_err == pytest.approx(relative_error(model, ddim_rec, x0), rel=1e-4)
    assert ddim_err > 0.2                        # CFG 7.5 from a guidance-1 inversion misses the image
    assert nti_err < ddim_err / 5
    assert nti_image.shape == (1, 128, 128, 3) and nti.null_embeddings is not None and ddim.null_embeddings is None


def test_ddim_reconstruction_is_the_hosts_own_sampler_from_the_inverted_latent(runs, sd1):
    """Independent reference: the host's Euler (= DDIM, η = 0) sampler at CFG 7.5 from x*_T."""
    import comfy.sample
    import comfy.samplers
    model = sd1[0]
    ddim, ddim_rec = runs.ddim[:2]
    start = model.model.process_latent_out(ddim.latent_T)
    with torch.inference_mode():
        ours = comfy.sample.sample_custom(model, torch.zeros_like(start), 7.5, comfy.samplers.sampler_object("euler"),
                                          ddim.sigmas, ddim.positive, ddim.negative, start, disable_pbar=True)
    torch.testing.assert_close(ours, ddim_rec["samples"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["nti", "ddim"])
def test_replaying_the_stored_inversion_reproduces_its_reconstruction_exactly(runs, sd1, pack, which):
    """The stored x*_T, schedule, conds and null embeddings are all a replay needs (CPU fp32: bit-identical
    with the same UNet batching)."""
    replay = pack("guidance.inversion").replay
    sampling = pack("nodes.sampling")
    model = sd1[0]
    inversion, reconstruction = getattr(runs, which)[:2]

    def fn(loop, x, sigmas):
        def denoise(z, sigma, context):
            if isinstance(context, torch.Tensor):
                return loop.denoise(z, sigma, "negative", context=context)
            return loop.denoise(z, sigma, "positive")
        return replay(denoise, inversion.latent_T, inversion.sigmas, "cond", inversion.null_schedule(), inversion.cfg)[-1], None

    with torch.inference_mode():
        out, _ = sampling.run_loop(model, inversion.positive, inversion.negative,
                                   torch.zeros_like(reconstruction["samples"]), inversion.sigmas, fn)
    if which == "nti":
        assert torch.equal(out, reconstruction["samples"])
    else:   # ddim mode batches both branches into one UNet call: the same up to fp32 rounding (one step
        # differs by ~1e-6 relative; CFG 7.5 amplifies it over the 10 steps to ~1e-4)
        torch.testing.assert_close(out, reconstruction["samples"], rtol=1e-4, atol=5e-4)


def test_the_callers_model_is_untouched(runs):
    assert runs.after == runs.before
    assert torch.equal(runs.sampled_after, runs.sampled_before)


def test_save_load_round_trip_and_refusals(host, mod, runs, sd1):
    import comfy.model_patcher
    import tiny_models
    from safetensors.torch import save_file
    model = sd1[0]
    inversion = runs.nti[0]
    mod.save_inversion(inversion, mod.inversion_path("round trip"))
    folder = host.output_dir / "inversions"
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]
    assert "round trip.safetensors" in mod.LoadInversion.INPUT_TYPES()["required"]["name"][1]["options"]
    with torch.inference_mode():
        loaded, = mod.LoadInversion.execute("round trip.safetensors", model).args
    for field in dataclasses.fields(inversion):
        a, b = getattr(inversion, field.name), getattr(loaded, field.name)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), field.name

    def load_with(other):
        with torch.inference_mode():
            return mod.LoadInversion.execute("round trip.safetensors", other).args[0]

    # attention patches (e.g. an AttentionCapture) and fp16 storage of the same weights are the same model
    watched = model.clone()
    watched.set_model_attn2_patch(lambda n, context, value, extra: (n, context, value))
    load_with(watched)
    with torch.inference_mode():
        half_model = copy.deepcopy(model.model)
        half_model.diffusion_model.half()          # as a loader stores a UNet in fp16 (the schedule stays fp32)
        half = comfy.model_patcher.ModelPatcher(half_model, model.load_device, model.offload_device)
    load_with(half)

    lora = model.clone()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    lora.add_patches({key: (torch.full_like(model.model.state_dict()[key], 0.01),)})
    with pytest.raises(ValueError, match=r"round trip.safetensors was made with a different model: weight patches "
                                         r"\(LoRAs, merges\): the inversion has 'none', this one '1 weights patched"):
        load_with(lora)
    stronger = model.clone()
    stronger.add_patches({key: (torch.full_like(model.model.state_dict()[key], 0.01),)}, strength_patch=0.5)
    assert mod.model_fingerprint(stronger)["patches"] != mod.model_fingerprint(lora)["patches"]
    with pytest.raises(ValueError, match=r"made with a different model: base weights") as refused:
        load_with(tiny_models.tiny_sd1(seed=1)[0])
    print("\n" + str(refused.value))
    assert "architecture" not in str(refused.value)
    with pytest.raises(ValueError, match=r"model type: the inversion has 'BaseModel, SD15 latents', this one "
                                         r"'SDXL, SDXL latents'.*UNet architecture.*invert the reference again"):
        load_with(tiny_models.tiny_sdxl()[0])

    # the resolution and prompt are part of what made an inversion, for the nodes that use one
    other = invert(mod, model, sd1[1], latent={"samples": torch.zeros(1, 4, 24, 24) + 0.1}, mode="ddim", steps=2)[0]
    assert mod.fingerprint_mismatches(inversion.fingerprint, other.fingerprint) == [
        "resolution: the inversion has '16x16 latent', this one '24x24 latent'"]

    save_file({"x": torch.zeros(1)}, str(folder / "stray.safetensors"))
    with pytest.raises(ValueError, match="not an inversion file of this pack's format"):
        mod.LoadInversion.execute("stray.safetensors", model)
    with pytest.raises(ValueError, match="no inversion file 'missing.safetensors'"):
        mod.LoadInversion.execute("missing.safetensors", model)


def test_cancel_stops_the_run_and_leaves_no_file(host, mod, sd1, reference):
    import comfy.model_management
    import comfy.utils
    model, clip, vae = sd1
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if value == 6:                          # inside the null-text optimisation (DDIM inversion: 1-4)
            comfy.model_management.interrupt_current_processing(True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            invert(mod, model, clip, vae, image=reference, steps=4, inner_steps=5, save_name="cancelled")
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    assert seen[-1] == (6, 4 * (1 + 5))
    folder = host.output_dir / "inversions"
    leftovers = [f for f in os.listdir(folder) if "cancelled" in f] if folder.exists() else []
    assert not leftovers


def test_ddim_inversion_holds_for_an_edm_model_with_another_sigma_data(mod, sd1, reference):
    """ModelSamplingContinuousEDM 'edm' (σ_d = 0.5, Playground v2.5's) beside its σ_d = 1 'v_prediction': the
    round trip (DDIM inversion, then DDIM sampling at CFG 1) is about as close. With the SD scaling of x between
    σ's (σ_d = 1 assumed) the σ_d = 0.5 error was three times the control's (0.344 against 0.114)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM
    model, clip, vae = sd1
    errors = {}
    for sampling in ("edm", "v_prediction"):
        with torch.inference_mode():
            patched = ModelSamplingContinuousEDM().patch(model, sampling, 80.0, 0.002)[0]
            errors[sampling] = mod.NullTextInvert.execute(patched, clip, PROMPT, "ddim", STEPS, "ddim_uniform", 1.0,
                                                          10, 1e-2, 1e-5, "", image=reference, vae=vae).args[3]
    print(f"\nDDIM round trip at CFG 1: edm (σ_d 0.5) {errors['edm']:.4f}, v_prediction (σ_d 1) "
          f"{errors['v_prediction']:.4f}")
    assert errors["edm"] < 1.5 * errors["v_prediction"]


def test_the_reconstruction_latent_keeps_the_inputs_noise_mask(mod, sd1, reference):
    """As the host's samplers return a LATENT: an inpainting latent's noise_mask rides on the reconstruction (it was
    dropped, and a sampler downstream repainted the whole image)."""
    model, clip, vae = sd1
    with torch.inference_mode():
        samples = vae.encode(reference)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1.0
    out = invert(mod, model, clip, latent={"samples": samples, "noise_mask": mask}, mode="ddim", steps=4)[1]
    assert out["noise_mask"] is mask and out["samples"].shape == samples.shape


def test_sdxl_inverts_too(host, mod, reference):
    """SDXL (two text towers, pooled and size conditioning) goes through the same path."""
    import tiny_models
    model, clip, vae = tiny_models.tiny_sdxl()
    inversion, _, image, error = invert(mod, model, clip, vae, image=reference, steps=3, inner_steps=2)
    assert inversion.null_embeddings.shape == (3, 1, 77, 96) and inversion.cond_pooled.shape == (1, 64)
    assert inversion.fingerprint["model"] == "SDXL, SDXL latents" and image.shape == (1, 128, 128, 3)
    assert 0 < error < 1


def test_bad_inputs_give_messages(mod, sd1, reference):
    model, clip, vae = sd1
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with pytest.raises(ValueError, match="either as an IMAGE .* or as a LATENT: both are connected"):
        invert(mod, model, clip, vae, image=reference, latent=latent)
    with pytest.raises(ValueError, match="neither is connected"):
        invert(mod, model, clip, vae)
    with pytest.raises(ValueError, match="the reference IMAGE needs a VAE"):
        invert(mod, model, clip, image=reference)
    with pytest.raises(ValueError, match="steps must be at least 2, got 1"):
        invert(mod, model, clip, latent=latent, steps=1)
    with pytest.raises(ValueError, match="invert one image at a time: the IMAGE holds a batch of 2 .pick one with LatentFromBatch"):
        invert(mod, model, clip, vae, image=reference.repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="save_name '../x' is not a plain file name"):
        invert(mod, model, clip, latent=latent, save_name="../x")
    dit = model.clone()
    dit.add_object_patch("diffusion_model", torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="DiT"):
        invert(mod, dit, clip, latent=latent)
    import tiny_models
    sdxl, sdxl_clip, _ = tiny_models.tiny_sdxl()
    for unet, text in ((model, sdxl_clip), (sdxl, clip)):      # before the loop, not a shape error deep inside it
        with pytest.raises(ValueError, match="Null-Text Invert: the CLIP encodes text (96|64) wide but this model's "
                                             "cross-attention reads (64|96)-wide text"):
            invert(mod, unet, text, latent=latent)


def test_runs_in_the_host_executor(host, mod, reference):
    import harness
    from PIL import Image
    Image.fromarray((reference[0].numpy() * 255).round().astype(np.uint8)).save(host.input_dir / "nti_reference.png")
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd1"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "nti_reference.png"}},
        "3": {"class_type": "NullTextInvert", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT, "mode": "null-text", "steps": 3,
            "scheduler": "ddim_uniform", "cfg": 7.5, "inner_steps": 2, "lr": 0.01, "early_stop": 1e-5,
            "save_name": "from executor", "image": ["2", 0], "vae": ["1", 2]}},
    }
    out = harness.run_prompt(prompt)
    inversion, reconstruction, image, error = out["3"]
    assert out.ui["3"]["images"], "the node previews its reconstruction"
    saved = mod.load_inversion(str(host.output_dir / "inversions" / "from executor.safetensors"))
    assert torch.equal(saved.trajectory, inversion.trajectory) and torch.equal(saved.null_embeddings, inversion.null_embeddings)
    assert saved.prompt == PROMPT and saved.sigmas.shape == (4,) and saved.fingerprint["resolution"] == "16x16 latent"
    assert reconstruction["samples"].shape == (1, 4, 16, 16) and image.shape == (1, 128, 128, 3)
    assert 0 < error < 1


def test_fingerprint_samples_span_every_weight_even_past_float32_integers(mod):
    """SD1.5's largest convs hold ~29.5M elements, past float32's exact integers (2^24)."""
    exact = mod._sample(torch.arange(1000, dtype=torch.float32))
    assert exact[0].item() == 0 and exact[-1].item() == 999 and len(exact) == mod.WEIGHT_SAMPLES
    huge = torch.arange(2.0).repeat_interleave(torch.tensor([29491199, 1]))    # the last element alone is 1
    sampled = mod._sample(huge)
    assert len(sampled) == mod.WEIGHT_SAMPLES and sampled[-1].item() == 1 and sampled[:-1].sum().item() == 0


def test_requeueing_the_same_graph_rewrites_the_same_file_and_a_change_is_named(host, mod, reference, caplog):
    """Pressing Run again (a fresh executor: nothing cached) gives the same inversion and file, without an error;
    a re-run with another setting or another reference replaces the file and says what differs."""
    import logging

    import harness
    from PIL import Image
    Image.fromarray((reference[0].numpy() * 255).round().astype(np.uint8)).save(host.input_dir / "requeue.png")
    Image.fromarray((reference[0].flip(0).numpy() * 255).round().astype(np.uint8)).save(host.input_dir / "other.png")

    def graph(cfg=7.5, image="requeue.png"):
        return {
            "1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd1"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": image}},
            "3": {"class_type": "NullTextInvert", "inputs": {
                "model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT, "mode": "null-text", "steps": 3,
                "scheduler": "ddim_uniform", "cfg": cfg, "inner_steps": 2, "lr": 0.01, "early_stop": 1e-5,
                "save_name": "requeued", "image": ["2", 0], "vae": ["1", 2]}},
        }

    path = host.output_dir / "inversions" / "requeued.safetensors"
    first = harness.run_prompt(graph())["3"]
    first_file = mod.load_inversion(str(path))
    with caplog.at_level(logging.INFO):
        second = harness.run_prompt(graph())["3"]
    assert "the same settings, model and reference as the file it replaces" in caplog.text
    second_file = mod.load_inversion(str(path))
    for field in dataclasses.fields(first_file):
        a, b = getattr(first_file, field.name), getattr(second_file, field.name)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), field.name
    assert torch.equal(first[0].null_embeddings, second[0].null_embeddings)
    assert torch.equal(first[1]["samples"], second[1]["samples"]) and first[3] == second[3]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        harness.run_prompt(graph(cfg=5.0))
    assert f"Null-Text Invert replaced {path}, which held an inversion made differently: cfg 7.5 -> 5.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        harness.run_prompt(graph(cfg=5.0, image="other.png"))
    assert "made differently: reference '(1, 4, 16, 16) #" in caplog.text
    assert not [f for f in os.listdir(path.parent) if f.endswith(".tmp")]


def test_ddim_reconstruction_makes_one_batched_cfg_call_per_step(mod, sd1, runs):
    """Issue 11 item 4: the replay's two branches go to the UNet as one batch of 2, as the host's CFG does;
    the inversion itself is one cond-only (batch 1) call per step. Same reconstruction within fp32 rounding."""
    model, clip, vae = sd1
    batches = []

    def count(apply_model, args):
        batches.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted = model.clone()
    counted.set_model_unet_function_wrapper(count)
    latent = {"samples": model.model.process_latent_out(runs.ddim[0].trajectory[-1])}
    _, reconstruction, _, error = invert(mod, counted, clip, latent=latent, mode="ddim")
    assert batches == [1] * STEPS + [2] * STEPS
    assert torch.equal(reconstruction["samples"], runs.ddim[1]["samples"]) and error == runs.ddim[3]
