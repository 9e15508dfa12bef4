"""PALPTrainer in the real host, on the tiny SD1 model (methods.md §3)."""
import json
import os
import pathlib
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

SIDE = 64                     # pixels: an 8×8 latent
# The tiny model's text conditioning moves its predictions little, so the paper's lr 5e-5 barely
# changes anything in a few steps; 1e-2 shows what training does.
TINY = dict(steps=8, learning_rate=1e-2, batch_size=2, gradient_accumulation=2, rank=4, resolution=SIDE,
            checkpoint_every=4)


def settings(**overrides):
    base = dict(placeholder="[V]", class_word="dog", personalization_prompt="a photo of [V]",
                target_prompt="a sketch of a dog in Paris", steps=500, learning_rate=5e-5, batch_size=1,
                gradient_accumulation=32, rank=32, alpha=7.5, beta=1.0, alignment_weight=1.0, same_noise=True,
                rescale=True, timestep_min=0.0, timestep_max=1.0, resolution=512, precision="fp32",
                gradient_checkpointing=False, training_seed=0,
                save_name="palp_subject", overwrite=False, resume=False, checkpoint_every=100)
    return {**base, **TINY, **overrides}


def train(mod, sd1, images, **overrides):
    model, clip, vae = sd1
    with torch.inference_mode():
        return mod.PALPTrainer.execute(model, clip, vae, images, **settings(**overrides)).args


@pytest.fixture(scope="module")
def mod(pack):
    return pack("nodes.palp")


@pytest.fixture(scope="module")
def sd1(host):
    import tiny_models
    return tiny_models.tiny_sd1()


@pytest.fixture(scope="module")
def subject(host):
    """Three smooth image-like subject images, [3, 64, 64, 3]."""
    import tiny_models
    return tiny_models.smooth_images(torch.Generator().manual_seed(3), n=3, height=SIDE, width=SIDE).movedim(1, -1)


def snapshot(model):
    return repr((model.model_options, model.patches, model.object_patches, model.weight_wrapper_patches,
                 model.patches_uuid))


def eps_losses(pack, model, clip, prompt, latents, pairs):
    """Mean ‖ε_θ(x0 + σε, prompt) − ε‖² over fixed (σ, ε) pairs, through the host's own conds and model."""
    sampling = pack("nodes.sampling")
    encode = lambda text: [[clip.encode_from_tokens(clip.tokenize(text)), {}]]

    def fn(loop, x, sigmas):
        total = 0.0
        for sigma, eps in pairs:
            x_t = x + sigma * eps
            total += (((x_t - loop.denoise(x_t, sigma)) / sigma - eps) ** 2).mean().item()
        return x, total / len(pairs)

    with torch.inference_mode():
        return sampling.run_loop(model, encode(prompt), encode(""), latents, torch.tensor([1.0, 0.0]), fn)[1]


@pytest.fixture(scope="module")
def trained(host, mod, sd1, subject):
    model, clip, vae = sd1
    before = snapshot(model)
    out_model, out_clip, curves = train(mod, sd1, subject, save_name="dog", steps=30)
    return types.SimpleNamespace(model=out_model, clip=out_clip, curves=curves, before=before,
                                 lora=host.base_dir / "models" / "loras" / "dog.safetensors",
                                 embedding=host.embeddings_dir / "dog.safetensors")


def test_training_lowers_the_personalization_loss_on_fixed_noise(pack, sd1, subject, trained):
    model, clip, vae = sd1
    with torch.inference_mode():
        latents = vae.encode(subject)
    gen = torch.Generator().manual_seed(11)
    scaled = latents * 0.18215   # SD1 latent scale: the pairs' σ are in the model's space
    pairs = [(s, torch.randn(scaled.shape, generator=gen)) for s in (0.3, 1.0, 3.0, 8.0)]
    # the untrained start: LoRA up = 0 and the token = the class word's embedding
    before = eps_losses(pack, model, clip, "a photo of dog", latents, pairs)
    after = eps_losses(pack, trained.model, trained.clip, "a photo of embedding:dog", latents, pairs)
    print(f"\npersonalization loss on 4 fixed (σ, ε): before {before:.5f}, after 30 steps {after:.5f}")
    assert after < before * 0.97


def test_the_saved_lora_through_the_hosts_loader_reproduces_the_trained_model(pack, sd1, trained):
    import comfy.lora
    import nodes
    model, clip, _ = sd1
    keys = list(load_file(trained.lora))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert all(k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] in key_map for k in keys)
    # (up, down, alpha) × (q, k, v, out) × (attn1, attn2) × 10 transformer blocks (3 in, 1 middle, 6 out)
    assert len(keys) == 3 * 4 * 2 * 10
    with safe_open(str(trained.lora), framework="pt") as f:
        assert '"alignment_weight": 1.0' in f.metadata()["palp_settings"]
    with torch.inference_mode():
        loaded, = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "dog.safetensors", 1.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    pairs = [(1.0, torch.randn(latents.shape, generator=torch.Generator().manual_seed(6)))]
    ours = eps_losses(pack, trained.model, clip, "a photo of a dog", latents, pairs)
    hosts = eps_losses(pack, loaded, clip, "a photo of a dog", latents, pairs)
    base = eps_losses(pack, model, clip, "a photo of a dog", latents, pairs)
    print(f"\nfixed-noise loss: trained MODEL {ours:.7f}, host-loaded LoRA {hosts:.7f}, base {base:.7f}")
    assert ours == pytest.approx(hosts, rel=1e-5)
    assert abs(ours - base) > 1e3 * abs(ours - hosts)


def scaled_fp8(model):
    """The tiny SD1's MODEL as the host loads an ``*_fp8_scaled`` UNet (``comfy.ops.scaled_fp8_ops``, fp32 compute):
    every Linear weight stored in fp8 e4m3 as W / scale_weight, its own scale max|W| / 448 (e4m3's largest)."""
    import comfy.model_base
    import comfy.model_patcher
    import tiny_models
    linears = {name for name, module in model.model.named_modules() if isinstance(module, torch.nn.Linear)}
    with torch.inference_mode():
        state = {}
        for key, tensor in model.model.state_dict().items():
            module = key.rsplit(".", 1)[0]
            if module in linears and key.endswith(".weight"):
                scale = tensor.abs().max().float() / 448
                state[key], state[f"{module}.scale_weight"] = (tensor / scale).to(torch.float8_e4m3fn), scale
            else:
                state[key] = tensor
        config = tiny_models.TinySD15(dict(tiny_models.SD1_UNET))
        config.set_inference_dtype(torch.float32, None)
        config.scaled_fp8 = torch.float8_e4m3fn
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
        missing, unexpected = base.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    return comfy.model_patcher.ModelPatcher(base, load_device=model.load_device, offload_device=model.offload_device)


def prediction(pack, model, clip):
    """The model's x0 prediction at σ = 1 of fixed latents and noise under "a photo of a dog" (the host's conds)."""
    sampling = pack("nodes.sampling")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        cond = [[clip.encode_from_tokens(clip.tokenize("a photo of a dog")), {}]]
        return sampling.run_loop(model, cond, cond, latents, torch.tensor([1.0, 0.0]),
                                 lambda loop, x, sigmas: (x, loop.denoise(x + noise, 1.0)))[1]


@pytest.mark.parametrize("weights", ["fp32", "scaled fp8"])
def test_the_output_model_is_its_saved_lora_through_the_hosts_loader_on_every_weight_format(
        host, pack, mod, sd1, subject, weights):
    """The MODEL output predicts as the base MODEL with the written LoRA loaded by LoraLoaderModelOnly, and so does
    a re-queue's (the files reused). On a scaled-fp8 UNet the LoRA used to be merged as weight wrappers into the
    stored fp8 weight, which the op then multiplies by its scale_weight (≈ 1e-3 here): the MODEL was the base."""
    import nodes
    model, clip, vae = sd1
    if weights == "scaled fp8":
        model = scaled_fp8(model)
    before = snapshot(model)
    name = "output_" + weights.replace(" ", "_")
    kw = dict(save_name=name, steps=3, checkpoint_every=0)
    out_model = train(mod, (model, clip, vae), subject, **kw)[0]
    assert snapshot(model) == before                # the output is a clone
    requeued = train(mod, (model, clip, vae), subject, **kw)[0]
    with torch.inference_mode():
        loaded, = nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"{name}.safetensors", 1.0)
    ours, again, hosts, base = (prediction(pack, m, clip) for m in (out_model, requeued, loaded, model))
    off, lora = (ours - hosts).abs().max().item(), (hosts - base).abs().max().item()
    print(f"\n{weights}: output MODEL vs base + its LoRA file through LoraLoaderModelOnly: max difference {off:.2e}, "
          f"the LoRA's effect {lora:.2e}")
    assert lora > 1e-3
    assert off <= 1e-4 * lora
    assert torch.equal(again, ours)


def test_the_saved_embedding_loads_through_embedding_name(host, sd1, trained):
    _, clip, _ = sd1
    vector = load_file(trained.embedding)["clip_l"]
    assert vector.shape == (1, 64)
    with torch.inference_mode():
        tokens = clip.tokenize("a photo of embedding:dog")
        spliced = [t for t, _ in tokens["l"][0] if torch.is_tensor(t)]
        by_name = clip.encode_from_tokens(tokens)
        via_output = trained.clip.encode_from_tokens(trained.clip.tokenize("a photo of embedding:dog"))
        class_word = clip.encode_from_tokens(clip.tokenize("a photo of dog"))
    assert len(spliced) == 1 and torch.equal(spliced[0], vector[0])
    assert torch.equal(by_name, via_output)
    assert (by_name - class_word).abs().max().item() > 1e-4


def test_the_callers_model_is_untouched_and_the_curves_are_drawn(sd1, trained):
    import comfy.model_management
    assert snapshot(sd1[0]) == trained.before
    comfy.model_management.unload_all_models()      # the training clone is unpatched: nothing of it stays
    assert not [name for name, module in sd1[0].model.named_modules() if "forward" in vars(module)]
    assert trained.curves.shape == (1, 256, 512, 3)
    assert 0.0 <= trained.curves.min().item() and trained.curves.max().item() <= 1.0


def cancelled(mod, sd1, subject, step, **kw):
    """Train, pressing Cancel during step ``step``: the progress hook honours it at that step's update, as the
    server's hook does (the run stops there; unfinished, it keeps its checkpoint)."""
    import comfy.model_management
    import comfy.utils
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        if value == step:
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            train(mod, sd1, subject, **kw)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


def test_cancel_keeps_a_valid_checkpoint_and_resume_continues_from_its_step(host, mod, sd1, subject):
    model = sd1[0]
    before = snapshot(model)
    train(mod, sd1, subject, save_name="whole", steps=6, checkpoint_every=0)
    whole = load_file(host.base_dir / "models" / "loras" / "whole.safetensors")

    cancelled(mod, sd1, subject, 3, save_name="cut", steps=6, checkpoint_every=0)
    checkpoint = host.output_dir / "palp" / "cut.checkpoint.safetensors"
    with safe_open(str(checkpoint), framework="pt") as f:
        assert f.metadata()["palp_step"] == "3"
        assert f.get_tensor("curve.personalization").shape == (3,)
    assert not (host.base_dir / "models" / "loras" / "cut.safetensors").exists()
    assert not [p for p in os.listdir(checkpoint.parent) if p.endswith(".tmp")]
    assert snapshot(model) == before

    train(mod, sd1, subject, save_name="cut", steps=6, checkpoint_every=0, resume=True)
    resumed = load_file(host.base_dir / "models" / "loras" / "cut.safetensors")
    drift = max((resumed[k] - whole[k]).abs().max().item() for k in whole)
    print(f"\nresumed at step 3 of 6 vs uninterrupted: max LoRA difference {drift:.2e}")
    assert drift < 1e-6
    assert max(whole[k].abs().max().item() for k in whole if "lora_up" in k) > 1e-4


def test_a_cancel_at_the_last_step_keeps_the_finished_training(host, mod, sd1, subject, caplog):
    """A Cancel during the last step, honoured at its progress update once every step is trained, still writes the
    results, as an uninterrupted run does (no checkpoint left), and a re-queue reuses them. The run used to save a
    checkpoint at step == steps instead and no LoRA, and resume refused that checkpoint: the training was lost."""
    kw = dict(steps=4, gradient_accumulation=2, checkpoint_every=0)
    train(mod, sd1, subject, save_name="last_whole", **kw)
    cancelled(mod, sd1, subject, 4, save_name="last_cut", **kw)
    assert not (host.output_dir / "palp" / "last_cut.checkpoint.safetensors").exists()
    with caplog.at_level("INFO"):
        train(mod, sd1, subject, save_name="last_cut", resume=True, **kw)
    assert any("reused, not retrained" in r.getMessage() for r in caplog.records)
    for folder in (host.base_dir / "models" / "loras", host.embeddings_dir):
        whole, cut = (load_file(folder / f"{name}.safetensors") for name in ("last_whole", "last_cut"))
        assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_resume_of_a_checkpoint_at_exactly_steps_writes_its_results_without_training(host, mod, sd1, subject, caplog):
    """A checkpoint at step == steps (the previous version saved a Cancel at the last step so) holds a complete
    training: resuming it writes its LoRA and embedding, trains nothing and removes it. It used to be refused."""
    cancelled(mod, sd1, subject, 2, save_name="at_steps", steps=4, checkpoint_every=0)
    checkpoint = host.output_dir / "palp" / "at_steps.checkpoint.safetensors"
    saved = load_file(checkpoint)
    with caplog.at_level("INFO"):
        train(mod, sd1, subject, save_name="at_steps", steps=2, checkpoint_every=0, resume=True)
    assert not any("PALP step" in r.getMessage() for r in caplog.records)
    lora = load_file(host.base_dir / "models" / "loras" / "at_steps.safetensors")
    assert lora.keys() == {k for k in saved if k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))}
    assert all(torch.equal(lora[k], saved[k]) for k in lora)
    assert torch.equal(load_file(host.embeddings_dir / "at_steps.safetensors")["clip_l"], saved["token.0.clip_l"])
    assert not checkpoint.exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(personalization_prompt="a photo of a dog"), "does not contain the placeholder"),
    (dict(target_prompt="a sketch of [V]"), "clean prompt"),
    (dict(target_prompt=" \n"), "the target prompt is empty"),
    (dict(save_name="dog"), r"output 'dog' exists from a run with different steps \(30 vs 8\)"),
    (dict(save_name="nothing", resume=True), "no checkpoint"),
    (dict(timestep_min=0.5, timestep_max=0.5), "is empty"),
])
def test_refusals(mod, sd1, subject, trained, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(mod, sd1, subject, **overrides)


def test_same_settings_on_other_images_is_refused_naming_the_images(mod, sd1, subject, trained):
    with pytest.raises(ValueError, match=r"exists from a run with different subject images \(the file's") as error:
        train(mod, sd1, subject.flip(1), save_name="dog", steps=30)
    # a changed run is trained again, never resumed from another run's checkpoint
    assert "overwrite on to train again" in str(error.value) and "resume" not in str(error.value)


def test_a_finished_run_leaves_no_checkpoint_that_a_changed_run_could_resume(host, mod, sd1, subject):
    """A finished run used to leave its last checkpoint (here step 4 of 4); a changed run with overwrite and resume
    on then trained nothing and saved the old LoRA labelled with the new settings."""
    lora = host.base_dir / "models" / "loras" / "finished.safetensors"
    train(mod, sd1, subject, save_name="finished", steps=4, checkpoint_every=2)
    assert lora.exists()
    assert not (host.output_dir / "palp" / "finished.checkpoint.safetensors").exists()
    written = lora.read_bytes()
    with pytest.raises(ValueError, match="resume is on but there is no checkpoint"):
        train(mod, sd1, subject.flip(1), save_name="finished", steps=4, learning_rate=5e-3, overwrite=True,
              resume=True)
    assert lora.read_bytes() == written


def test_resume_takes_only_its_own_runs_checkpoint_with_steps_left(host, mod, sd1, subject, caplog):
    """A checkpoint records its run's settings and inputs: a resume with others is refused naming them, one past
    the requested steps is refused, and a larger steps continues it (then the finished run removes it)."""
    cancelled(mod, sd1, subject, 3, save_name="own_run", steps=6, checkpoint_every=0)
    checkpoint = host.output_dir / "palp" / "own_run.checkpoint.safetensors"
    for images, overrides, message in (
            (subject, dict(learning_rate=5e-3), r"different learning_rate \(0\.01 vs 0\.005\) \(the checkpoint's"),
            (subject.flip(1), {}, "different subject images"),
            (subject, dict(steps=2), "is at step 3, past this run's 2 steps")):
        with pytest.raises(ValueError, match=message):
            train(mod, sd1, images, save_name="own_run", resume=True, **{"steps": 6, **overrides})
    assert checkpoint.exists()
    # a checkpoint of the previous version (no input fingerprints) is refused as such, not as "other images"
    from safetensors.torch import save_file
    with safe_open(str(checkpoint), framework="pt") as f:
        older = {k: v for k, v in f.metadata().items() if k != "palp_inputs"}
    save_file(load_file(str(checkpoint)), str(checkpoint.with_name("older.checkpoint.safetensors")), older)
    with pytest.raises(ValueError, match="written by an older version of this pack"):
        train(mod, sd1, subject, save_name="older", resume=True, steps=6)
    with caplog.at_level("INFO"):
        train(mod, sd1, subject, save_name="own_run", steps=7, checkpoint_every=0, resume=True)
    assert any("at step 3 of 7" in r.getMessage() for r in caplog.records)
    with safe_open(str(host.base_dir / "models" / "loras" / "own_run.safetensors"), framework="pt") as f:
        assert f.metadata()["palp_step"] == "7"
        assert len(json.loads(f.metadata()["palp_curves"])["personalization"]) == 7
    assert not checkpoint.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_of_the_name_that_palp_did_not_write_is_refused_and_kept(host, mod, sd1, subject, overwrite):
    """A textual-inversion embedding already called <save_name> is the user's: named, never compared or replaced."""
    from safetensors.torch import save_file
    theirs = host.embeddings_dir / "their_embedding.safetensors"
    save_file({"clip_l": torch.randn(2, 64)}, str(theirs))
    written = theirs.read_bytes()
    with pytest.raises(ValueError, match="was not made by PALP") as error:
        train(mod, sd1, subject, save_name="their_embedding", overwrite=overwrite)
    assert str(theirs) in str(error.value) and "choose another save_name" in str(error.value)
    assert theirs.read_bytes() == written
    assert not (host.base_dir / "models" / "loras" / "their_embedding.safetensors").exists()


def test_an_unreadable_file_of_the_name_is_refused_by_name_even_with_overwrite_on(host, mod, sd1, subject):
    broken = host.base_dir / "models" / "loras" / "broken.safetensors"
    broken.write_bytes(b"")
    with pytest.raises(ValueError, match="is not a readable safetensors file") as error:
        train(mod, sd1, subject, save_name="broken", overwrite=True)
    assert str(broken) in str(error.value) and "choose another save_name" in str(error.value)
    assert broken.read_bytes() == b""


def test_the_placeholder_is_a_whole_word_in_both_prompts(mod, sd1, subject):
    """Placeholder V: "Vienna" in y_c is no placeholder, and in y_P only the word V becomes the learned token."""
    model, clip, vae = sd1
    contexts = []

    def watch(apply_model, args):
        contexts.append(args["c"]["c_crossattn"].detach().clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched = model.clone()
    watched.set_model_unet_function_wrapper(watch)
    # lr 0 and no alignment term: one UNet pass, under y_P with the token at its start, the class word's embedding
    train(mod, (watched, clip, vae), subject, placeholder="V", personalization_prompt="a photo of V in Vienna",
          target_prompt="a sketch of a dog in Vienna", save_name="whole_word", steps=1, batch_size=1,
          gradient_accumulation=1, learning_rate=0.0, alignment_weight=0.0, checkpoint_every=0)
    with torch.inference_mode():
        expected = clip.encode_from_tokens(clip.tokenize("a photo of dog in Vienna"))
    assert len(contexts) == 1
    assert torch.allclose(contexts[0], expected, atol=1e-5)


def test_the_training_seed_gets_no_randomize_control_from_the_frontend(host):
    """The frontend adds a randomize-after-run control to an INT named seed: every Run would then train again."""
    import nodes
    import ui_to_api
    names = ui_to_api.widget_names(nodes.NODE_CLASS_MAPPINGS["PALPTrainer"])
    assert "training_seed" in names and None not in names


@pytest.mark.parametrize("model_kind, clip_kind", [("tiny_sdxl", "tiny_sd1"), ("tiny_sd1", "tiny_sdxl")])
def test_a_clip_of_another_family_is_refused_before_training(host, mod, subject, model_kind, clip_kind):
    import tiny_models
    model, _, vae = getattr(tiny_models, model_kind)()
    clip = getattr(tiny_models, clip_kind)()[1]
    with pytest.raises(ValueError, match="PALP Trainer: the CLIP encodes text .* different families"):
        train(mod, (model, clip, vae), subject, save_name="mixed_families")


def tiny_inpaint_sd1():
    """The tiny SD1 UNet with 9 input channels (latent + mask + masked image), made an inpainting model as the host's
    supported_models do for in_channels > 4."""
    import comfy.model_base
    import tiny_models
    with torch.inference_mode():
        config = tiny_models.TinySD15({**tiny_models.SD1_UNET, "in_channels": 9})
        model = tiny_models._unet(comfy.model_base.BaseModel, config, torch.Generator().manual_seed(0))
        model.model.set_inpaint()
    return model


def test_an_inpainting_model_is_refused_before_anything_is_written(host, mod, sd1, subject):
    """It needs a mask and a masked image PALP never gives: the host failed inside its conds ('NoneType' object has
    no attribute 'shape')."""
    import re
    _, clip, vae = sd1
    with pytest.raises(ValueError, match=r"'model' is an inpainting model .* train on the base model") as refused:
        train(mod, (tiny_inpaint_sd1(), clip, vae), subject, save_name="inpainting", checkpoint_every=1)
    inputs = {i.id for i in mod.PALPTrainer.define_schema().inputs}
    assert set(re.findall(r"'([a-z_0-9]+)'", str(refused.value))) == {"model"} <= inputs
    assert not (host.base_dir / "models" / "loras" / "inpainting.safetensors").exists()
    assert not (host.embeddings_dir / "inpainting.safetensors").exists()
    assert not (host.output_dir / "palp" / "inpainting.checkpoint.safetensors").exists()


def test_alpha_not_above_beta_warns_and_still_trains(host, mod, sd1, subject, caplog):
    with caplog.at_level("WARNING"):
        train(mod, sd1, subject, save_name="low_alpha", steps=1, gradient_accumulation=1, alpha=1.0, beta=1.0)
    assert any("α = 1 ≤ β = 1" in r.getMessage() for r in caplog.records)
    assert (host.base_dir / "models" / "loras" / "low_alpha.safetensors").exists()


def test_no_images_is_refused(mod, sd1, subject):
    with pytest.raises(ValueError, match="no subject images"):
        train(mod, sd1, subject[:0])


def test_a_nan_loss_stops_and_keeps_the_last_checkpoint(host, mod, sd1, subject):
    with pytest.raises(ValueError, match="became (nan|NaN)") as error:
        train(mod, sd1, subject, save_name="nan", learning_rate=1e30, steps=20, checkpoint_every=1)
    with safe_open(str(host.output_dir / "palp" / "nan.checkpoint.safetensors"), framework="pt") as f:
        step = int(f.metadata()["palp_step"])
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    assert step >= 1 and f"the checkpoint of step {step} (" in str(error.value)
    assert not (host.base_dir / "models" / "loras" / "nan.safetensors").exists()


def test_a_nan_loss_before_any_checkpoint_claims_none(host, mod, sd1, subject):
    """Issue 9 §3: the message must not point to a checkpoint that was never written."""
    with pytest.raises(ValueError, match="became (nan|NaN)") as error:
        train(mod, sd1, subject, save_name="nan_early", learning_rate=1e30, steps=20, checkpoint_every=0)
    assert "nothing was saved" in str(error.value) and "checkpoint of step" not in str(error.value)
    assert not (host.output_dir / "palp" / "nan_early.checkpoint.safetensors").exists()
    assert not (host.base_dir / "models" / "loras" / "nan_early.safetensors").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_images_are_refused_before_training(host, mod, sd1, subject, bad):
    images = subject.clone()
    images[1, 5, 7, 0] = bad
    with pytest.raises(ValueError, match=r"subject image\(s\) \[1\] .* contain NaN or Inf"):
        train(mod, sd1, images, save_name="nan_images", checkpoint_every=1)
    assert not (host.base_dir / "models" / "loras" / "nan_images.safetensors").exists()
    assert not (host.embeddings_dir / "nan_images.safetensors").exists()
    assert not (host.output_dir / "palp" / "nan_images.checkpoint.safetensors").exists()


def first_losses(host, name):
    """The loss curves a finished run stored with its LoRA (its checkpoint is removed)."""
    with safe_open(str(host.base_dir / "models" / "loras" / f"{name}.safetensors"), framework="pt") as f:
        curves = json.loads(f.metadata()["palp_curves"])
    return torch.tensor(curves["personalization"]), torch.tensor(curves["alignment"])


def test_gradient_checkpointing_trains_the_same_lora(host, mod, sd1, subject):
    train(mod, sd1, subject, save_name="gc_off", steps=3)
    checkpointed = train(mod, sd1, subject, save_name="gc_on", steps=3, gradient_checkpointing=True)
    loras = [load_file(host.base_dir / "models" / "loras" / f"{n}.safetensors") for n in ("gc_off", "gc_on")]
    drift = max((loras[0][k] - loras[1][k]).abs().max().item() for k in loras[0])
    print(f"\nLoRA after 3 steps, checkpointed vs not: max difference {drift:.2e}")
    assert drift < 1e-5
    for a, b in zip(first_losses(host, "gc_off"), first_losses(host, "gc_on")):
        assert torch.allclose(a, b, rtol=1e-5)
    assert "gradient_checkpointing" not in str(checkpointed[0].wrappers)    # training only, not generation


def test_bf16_trains_with_finite_losses_close_to_fp32(host, mod, sd1, subject):
    train(mod, sd1, subject, save_name="fp32", steps=2)
    train(mod, sd1, subject, save_name="bf16", steps=2, precision="bf16")
    fp32, bf16 = first_losses(host, "fp32"), first_losses(host, "bf16")
    print(f"\nfirst-step losses (personalization, alignment): fp32 {[c[0].item() for c in fp32]}, "
          f"bf16 {[c[0].item() for c in bf16]}")
    # the alignment residual r (≈ 0.017 per element on the tiny model) is a difference of two predictions of
    # size ≈ 1, each rounded to bf16 (step 2^-8 ≈ 0.004): mean(r²) is known to ~±20% in bf16, the MSE to ~1%
    for a, b, rel in zip(fp32, bf16, (0.05, 0.25)):
        assert torch.isfinite(b).all()
        assert b[0].item() == pytest.approx(a[0].item(), rel=rel)
    lora = load_file(host.base_dir / "models" / "loras" / "bf16.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert max(v.abs().max().item() for k, v in lora.items() if "lora_up" in k) > 0


@pytest.mark.parametrize("steps", [1, 10])
def test_a_bf16_projection_moves_with_a_first_steps_lora_as_fp32_does(pack, steps):
    """Issue 9: after k Adam steps at the paper's lr every LoRA up entry is about ±k·5e-5, far below half a bf16
    rounding step of the weights (±1.2e-4 at |W| = 0.03), so W + ΔW merged in bf16 is W and the forward does not
    move. The training projection adds the fp32 branch to the fp32 output and rounds once: averaged over its
    outputs, the bf16 change then equals the exact branch (the rounding dithers), as in fp32."""
    import comfy.ops
    guidance, palp_train = pack("guidance.palp"), pack("nodes.palp_train")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        linear = comfy.ops.disable_weight_init.Linear(320, 320, bias=False, dtype=torch.bfloat16)
        linear.comfy_cast_weights = True                            # as the host sets it for a compute dtype
        linear.weight.copy_(torch.randn(320, 320, generator=gen) * 0.03)
        adapter = guidance.LoRAAdapter.create((320, 320), 32, gen, "cpu")
        adapter.up.copy_((torch.randint(0, 2, adapter.up.shape, generator=gen) * 2 - 1) * 5e-5 * steps)
        x = torch.randn(4096, 320, generator=gen).to(torch.bfloat16)
        exact = adapter.branch(x)                                   # the fp32 change, (alpha/rank)·up(down x)
        projection = palp_train.LoRAProjection(linear, adapter)
        on = projection(x).float()
        with guidance.adapters_off([adapter]):
            off = projection(x).float()
        linear.weight_function = [adapter]                          # the merged weight wrapper, as before
        merged = linear(x).float() - off
        linear.weight_function = []

    def gain(change):
        return ((change * exact).sum() / exact.square().sum()).item()

    print(f"\nbf16 projection after {steps} step(s) at lr 5e-5: |branch| {exact.abs().mean():.2e}, output change / "
          f"exact branch: separate fp32 branch {gain(on - off):.3f}, merged into the bf16 weight {gain(merged):.3f}")
    assert gain(on - off) == pytest.approx(1.0, abs=0.05)
    assert projection(x).dtype == torch.bfloat16


def test_out_of_memory_says_what_to_lower(host, mod, sd1, subject):
    """A CUDA OOM raised inside the UNet (here by an attention patch on the caller's model) becomes advice."""
    model, clip, vae = sd1
    greedy = model.clone()

    def out_of_memory(q, k, v, extra_options):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    greedy.set_model_attn1_patch(out_of_memory)
    with pytest.raises(ValueError, match="out of memory") as error:
        train(mod, (greedy, clip, vae), subject, save_name="oom")
    message = str(error.value)
    assert "gradient_checkpointing on" in message and "bf16" in message and "batch_size" in message
    assert not (host.base_dir / "models" / "loras" / "oom.safetensors").exists()


def trainer_widgets(workflow):
    """The PALPTrainer node's ``widgets_values`` by input name, in the frontend's slot order."""
    import nodes
    import ui_to_api
    trainer, = [n for n in workflow["nodes"] if n["type"] == "PALPTrainer"]
    names = ui_to_api.widget_names(nodes.NODE_CLASS_MAPPINGS["PALPTrainer"])
    assert len(names) == len(trainer["widgets_values"]), "the saved widgets line up with the inputs"
    return trainer["widgets_values"], {name: i for i, name in enumerate(names) if name}


def tiny_workflow(host, subject, name, **widgets):
    """A shipped PALP workflow with the subject images in place and a few tiny steps (the files keep the paper's
    settings); ``widgets`` sets PALPTrainer widgets by input name."""
    from PIL import Image
    for file, image in (("subject.png", subject[0]), ("art.png", subject[1])):
        Image.fromarray((image.numpy() * 255).astype("uint8")).save(host.input_dir / file)
    workflow = json.loads((pathlib.Path(__file__).parents[2] / "workflows" / name).read_text())
    values, slot = trainer_widgets(workflow)
    for input_name, value in {"steps": 3, "gradient_accumulation": 1, "rank": 4, "resolution": SIDE, **widgets}.items():
        values[slot[input_name]] = value
    for node in workflow["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 3
    return workflow, {n["type"]: str(n["id"]) for n in workflow["nodes"]}


def test_the_single_subject_workflow_leaves_the_second_subject_empty(host):
    """Issue 12: the single-subject graph must not show second-subject values it ignores."""
    workflow = json.loads((pathlib.Path(__file__).parents[2] / "workflows" / "palp_subject_to_prompt.json").read_text())
    values, slot = trainer_widgets(workflow)
    assert [values[slot[n]] for n in ("placeholder_2", "class_word_2", "personalization_prompt_2")] == ["", "", ""]
    trainer, = [n for n in workflow["nodes"] if n["type"] == "PALPTrainer"]
    assert not any(i["name"] == "images_2" and i.get("link") is not None for i in trainer["inputs"])


def test_second_subject_texts_without_images_warn_and_images_without_texts_are_refused(mod, sd1, subject, caplog):
    with pytest.raises(ValueError, match="empty placeholder, class word or personalization prompt"):
        train(mod, sd1, subject, images_2=subject[:1], save_name="second_empty")
    with caplog.at_level("WARNING"):
        train(mod, sd1, subject, save_name="second_ignored", steps=1, gradient_accumulation=1, placeholder_2="[V2]")
    assert any("images_2 is not connected" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["palp_subject_to_prompt.json", "palp_multi_subject_art.json"])
def test_shipped_palp_workflows_run_in_the_host_executor(host, subject, name):
    import harness
    workflow, by_type = tiny_workflow(host, subject, name)
    out = harness.run_workflow(workflow, latent_side=SIDE)
    image = out[by_type["VAEDecode"]][0]
    assert image.shape == (1, SIDE, SIDE, 3) and torch.isfinite(image).all()
    curves = out[by_type["PALPTrainer"]][2]
    assert curves.shape == (1, 256, 512, 3)
    stem = "palp_cat_art" if "multi" in name else "palp_cat"
    assert (host.base_dir / "models" / "loras" / f"{stem}.safetensors").exists()
    assert (host.embeddings_dir / f"{stem}.safetensors").exists()
    assert ("multi" in name) == (host.embeddings_dir / f"{stem}_2.safetensors").exists()


def test_requeueing_the_workflow_reuses_its_files_and_a_change_says_what_differs(host, subject, caplog):
    """Issue 9 §4: each run is a fresh executor (nothing cached, as after a restart); the second run of the same
    graph reuses the trained files (no training, no error, the same outputs), a changed setting is named."""
    import copy
    import harness
    workflow, by_type = tiny_workflow(host, subject, "palp_subject_to_prompt.json", save_name="palp_requeue")
    lora = host.base_dir / "models" / "loras" / "palp_requeue.safetensors"
    first = harness.run_workflow(copy.deepcopy(workflow), latent_side=SIDE)
    written = lora.stat().st_mtime_ns
    with caplog.at_level("INFO"):
        second = harness.run_workflow(copy.deepcopy(workflow), latent_side=SIDE)
    assert any("reused, not retrained" in r.getMessage() for r in caplog.records)
    assert not any("PALP step" in r.getMessage() for r in caplog.records)
    assert lora.stat().st_mtime_ns == written
    for node, slot in ((by_type["VAEDecode"], 0), (by_type["PALPTrainer"], 2)):
        assert torch.equal(first[node][slot], second[node][slot])

    changed, _ = tiny_workflow(host, subject, "palp_subject_to_prompt.json", save_name="palp_requeue", steps=4)
    expected = r"output 'palp_requeue' exists from a run with different steps \(3 vs 4\)"
    with pytest.raises(AssertionError, match=expected):
        harness.run_workflow(changed, latent_side=SIDE)
    assert lora.stat().st_mtime_ns == written


def test_palp_trains_on_sdxl_and_writes_both_towers(host, mod, subject):
    """The tiny SDXL: pooled/size conditioning, two text towers — the embedding file holds clip_l and clip_g."""
    import comfy.sd
    import tiny_models
    sdxl = tiny_models.tiny_sdxl()
    out_model, out_clip, curves = train(mod, sdxl, subject, save_name="dog_xl", steps=3, checkpoint_every=10)
    vectors = load_file(str(host.embeddings_dir / "dog_xl.safetensors"))
    assert set(vectors) == {"clip_l", "clip_g"} and all(torch.isfinite(v).all() for v in vectors.values())
    assert vectors["clip_l"].shape[-1] == 32 and vectors["clip_g"].shape[-1] == 64
    lora = comfy.utils.load_torch_file(str(host.base_dir / "models" / "loras" / "dog_xl.safetensors"))
    with torch.inference_mode():
        loaded, _ = comfy.sd.load_lora_for_models(sdxl[0], None, lora, 1.0, 0.0)
    assert len(loaded.patches) == len({k.rsplit(".lora_", 1)[0] for k in lora if ".lora_" in k}) > 0
    assert curves.shape[-1] == 3 and torch.isfinite(curves).all()


def test_palp_trains_on_an_sdxl_refiner_for_its_one_text_tower(host, mod, subject):
    """The refiner's CLIP tokenizes for clip_l and clip_g but encodes with clip_g alone: the token is learned and
    saved for clip_g only (it failed with "'SDXLRefinerClipModel' object has no attribute 'clip_l'")."""
    import tiny_models
    refiner = tiny_models.tiny_sdxl_refiner()
    _, out_clip, curves = train(mod, refiner, subject, save_name="dog_refiner", steps=2, checkpoint_every=10)
    vectors = load_file(str(host.embeddings_dir / "dog_refiner.safetensors"))
    assert set(vectors) == {"clip_g"} and vectors["clip_g"].shape[-1] == 64 and torch.isfinite(vectors["clip_g"]).all()
    assert torch.isfinite(curves).all()
    with torch.inference_mode():
        tokens = out_clip.tokenize("a photo of embedding:dog_refiner")
    spliced = [t for t, _ in tokens["g"][0] if isinstance(t, torch.Tensor)]
    assert len(spliced) == 1 and torch.equal(spliced[0].flatten(), vectors["clip_g"].flatten())


def test_every_branch_runs_under_its_own_prompts_conditioning_on_sdxl(host, pack, mod, subject):
    """Issue 10: ε*(x_t, y_P), G^α(x̂_t, y_c), G^α(x̂_t, ∅), G^β(x̂_t, y_P), G^β(x̂_t, ∅) each see their own
    prompt's per-token context and SDXL ``y`` (pooled vector + size embeddings), as the host builds them for
    that prompt."""
    import tiny_models
    model, clip, vae = tiny_models.tiny_sdxl()
    seen = []

    def watch(apply_model, args):
        c = args["c"]
        seen.append((c["c_crossattn"].detach().clone(), c["y"].detach().clone()))
        return apply_model(args["input"], args["timestep"], **c)

    watched = model.clone()
    watched.set_model_unet_function_wrapper(watch)
    # lr 0: the learned token stays at its start, so embedding:<save_name> encodes the y_P every pass used;
    # β ≠ 1: the personalized unconditional pass runs too
    _, out_clip, _ = train(mod, (watched, clip, vae), subject, save_name="xl_branches", steps=1, batch_size=1,
                           gradient_accumulation=1, learning_rate=0.0, beta=2.0)
    assert len(seen) == 5
    trained = list(seen)

    def fresh(text):
        """What the UNet receives for ``text`` encoded afresh by CLIPTextEncode, through the host's own conds."""
        sampling, inversion, host_mod = pack("nodes.sampling"), pack("nodes.inversion"), pack("nodes.host")
        seen.clear()
        cond = inversion.conditioning(*host_mod.encode_text(out_clip, text))
        with torch.inference_mode():
            sampling.run_loop(watched, cond, cond, torch.zeros(1, 4, SIDE // 8, SIDE // 8), torch.tensor([1.0, 0.0]),
                              lambda loop, x, sigmas: (x, loop.denoise(x, 1.0)))
        return seen[0]

    y_p, y_c, empty = "a photo of embedding:xl_branches", "a sketch of a dog in Paris", ""
    expected = [fresh(y_p), fresh(y_c), fresh(empty), fresh(y_p), fresh(empty)]
    names = ["ε*(x_t, y_P)", "G^α(x̂_t, y_c)", "G^α(x̂_t, ∅)", "G^β(x̂_t, y_P)", "G^β(x̂_t, ∅)"]
    pooled_width = expected[0][1].shape[-1] - 6 * 256      # SDXL: y = pooled ⊕ six 256-wide size embeddings
    assert not torch.allclose(expected[0][1][:, :pooled_width], expected[1][1][:, :pooled_width], atol=1e-4)
    for name, (context, y), (want_context, want_y) in zip(names, trained, expected):
        assert torch.allclose(context, want_context, atol=1e-5), f"{name}: cross-attention context"
        assert torch.allclose(y, want_y, atol=1e-5), f"{name}: pooled/size embedding y " \
            f"(max difference {(y - want_y).abs().max().item():.3g})"


def test_the_text_encoders_gradient_pass_uses_the_math_attention_kernel(pack, sd1, monkeypatch):
    """PALP differentiates CLIP under ``sampling.math_attention``: its masked attention (77×77 causal) never reaches
    a fused SDPA kernel — on CUDA the memory-efficient one refuses that mask in backward (seen on an H200) — and
    computes what the host's own attention computes. The host's CLIP takes PyTorch's attention as on a GPU."""
    import comfy.model_management
    from torch.utils._python_dispatch import TorchDispatchMode
    monkeypatch.setattr(comfy.model_management, "ENABLE_PYTORCH_ATTENTION", True)
    sampling = pack("nodes.sampling")
    _, clip, _ = sd1

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    tokens = clip.tokenize("a photo of a dog")
    outs, seen = [], []
    for context in (lambda: Ops(), lambda: sampling.math_attention()):
        with torch.inference_mode(False), torch.enable_grad(), context(), Ops() as ops:
            outs.append(clip.encode_from_tokens(tokens, return_dict=True)["cond"])
        seen.append({n for n in ops.names if "scaled_dot_product" in n})
    assert seen[0], "the host's CLIP must reach a fused SDPA kernel here"
    # the math kernel decomposes into plain ops before dispatch: no SDPA op shows at all
    assert not seen[1], seen[1]
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_palp_training_sends_no_text_encoder_attention_to_a_fused_kernel(mod, sd1, subject, monkeypatch):
    """A training step with the host on PyTorch attention (as on a GPU): no differentiated SDPA call of CLIP's shape
    (77 × 77) reaches a fused kernel (the fixed prompts' encodes, without gradient, may; the old code sent CLIP's
    gradient pass to the CPU flash kernel here, and to CUDA's memory-efficient one on an H200, which failed)."""
    import comfy.model_management
    from torch.utils._python_dispatch import TorchDispatchMode
    monkeypatch.setattr(comfy.model_management, "ENABLE_PYTORCH_ATTENTION", True)

    class FusedCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kernels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if "scaled_dot_product" in name and args[0].requires_grad and args[0].shape[-2] == args[1].shape[-2] == 77:
                self.kernels.append(name)
            return func(*args, **(kwargs or {}))

    with FusedCalls() as calls:
        train(mod, sd1, subject, steps=1, gradient_accumulation=1, save_name="fused_kernels", overwrite=True,
              checkpoint_every=0)
    # the math kernel decomposes into plain ops before dispatch: only a fused kernel shows here
    assert not calls.kernels, calls.kernels
