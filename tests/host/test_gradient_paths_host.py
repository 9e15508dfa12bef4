"""Every gradient pass through the UNet (nodes/sampling.py ``gradient_model`` / ``grad_enabled``) on the tiny SD1.

The three passes: P&D's guidance gradient (the sampler's loss Σ weight·ℓ of its active terms, Eq. 9, w.r.t. the
latent), null-text inversion's gradient w.r.t. the null embedding, and PALP's LoRA gradient. Each is checked
against an independent reference: a central finite difference of the same function differentiated naively
(``naive_autograd``: no part of the pack's machinery, every saved tensor copied, so a cut or corrupted graph
shows), the fp32 model's gradient (for fp16/bf16 weights), or the host's own attention.
"""
import contextlib
import functools
import types

import pytest
import torch
from test_checkpointing_host import lora_model

PROMPT, TEMPLATE, REF_PROMPT = "a photo of a sks dog in the water", "a photo of a dog in the water", "a photo of a sks dog"
STEPS = 10


@pytest.fixture(scope="module")
def env(host, pack):
    import tiny_models
    model, clip, vae = tiny_models.tiny_sd1()
    return types.SimpleNamespace(sampling=pack("nodes.sampling"), pnd=pack("nodes.pnd"), inversion=pack("nodes.inversion"),
                                 palp=pack("nodes.palp"), host_nodes=pack("nodes.host"), model=model, clip=clip, vae=vae,
                                 tiny=tiny_models)


@pytest.fixture(scope="module", autouse=True)
def unpatched_after(host):
    """The host keeps the last model it sampled with loaded, a LoRA merged into the shared weights: unload it,
    so later modules see the tiny model's own weights."""
    yield
    import comfy.model_management
    comfy.model_management.unload_all_models()


def encode(env, text):
    return env.clip.encode_from_tokens_scheduled(env.clip.tokenize(text))


def schedule(model):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", STEPS)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


@functools.cache
def half(dtype):
    """The tiny SD1 UNet with its weights stored in ``dtype`` (computing in it, as the host runs fp16 checkpoints)."""
    import tiny_models
    return unet_copy(tiny_models.tiny_sd1()[0], dtype)


@functools.cache
def rounded(dtype):
    """The fp32 model holding ``half(dtype)``'s weights: the reference of a computation on those weights."""
    return unet_copy(half(dtype), torch.float32)


def unet_copy(model, dtype):
    import comfy.model_base
    import comfy.model_patcher
    import tiny_models
    with torch.inference_mode():
        config = tiny_models.TinySD15(dict(tiny_models.SD1_UNET))
        config.set_inference_dtype(dtype, None)
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
        base.load_state_dict(model.model.state_dict())
    return comfy.model_patcher.ModelPatcher(base, load_device=model.load_device, offload_device=model.offload_device)


def assert_direction(run, dtype, what):
    """``run(model)``'s gradient on ``dtype`` weights against fp32: the fp32 computation on the same (rounded)
    weights gives the same direction (cosine ≥ 0.999), and so does the fp32 model itself (cosine ≥ 0.99) — for
    bf16 the rounding of the weights alone turns P&D's appearance gradient by up to cosine 0.97 on the tiny
    model, which no computation can undo, so there only the first holds."""
    got, same_weights = run(half(dtype)), run(rounded(dtype))
    assert torch.isfinite(got).all(), what
    assert cosine(got, same_weights) >= 0.999, (what, dtype, cosine(got, same_weights))
    if dtype == torch.float16:
        fp32 = run(None)
        assert cosine(got, fp32) >= 0.99, (what, dtype, cosine(got, fp32))


# --- the three gradient passes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_inversion(env):
    """The reference's DDIM inversion (P&D's palette reads only its pivots)."""
    image = env.tiny.smooth_images(torch.Generator().manual_seed(5), 1, 128, 128).movedim(1, -1)
    with torch.inference_mode():
        return env.inversion.NullTextInvert.execute(env.model, env.clip, REF_PROMPT, "ddim", STEPS, "ddim_uniform", 7.5,
                                                    10, 1e-2, 1e-5, "", image=image, vae=env.vae).args[0]


def appearance_term(env, inversion, start, end):
    """P&D's appearance term of ``inversion``, its window [start, end)."""
    with torch.inference_mode():
        return env.pnd.UREMDGuidance.execute(env.model, inversion, env.clip, "sks dog", 0.5, "auto", start, end,
                                             1.0).args[0]


@pytest.fixture(scope="module")
def pnd_terms(env, reference_inversion):
    """P&D's appearance (steps 2-3) and layout (steps 0-1) terms, built once on the fp32 model."""
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    sigmas, latent = schedule(env.model), torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        appearance = appearance_term(env, reference_inversion, 0.2, 0.4)
        layout = env.pnd.LayoutGuidance.execute(env.model, env.clip, TEMPLATE, "dog", encode(env, TEMPLATE),
                                                encode(env, ""), 7.5, Noise_RandomNoise(0), sigmas, {"samples": latent},
                                                "cross", 0.0, 0.2, 1.0, 3, 0.5).args[0]
    return appearance, layout


def pnd_prepared(env, model, terms, positive=None):
    """The P&D sampler node's MODEL and SAMPLER; the MODEL without its check that only its SAMPLER drives it, since
    these tests also drive it with probes of their own and plain Euler (whose result it does not change)."""
    import comfy.patcher_extension
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(model, env.clip, PROMPT, "dog", 0.1, True, *terms).args
    prepared = prepared.clone()
    prepared.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, env.pnd.MARK)
    return prepared, sampler


class CopiedInference(torch.overrides.TorchFunctionMode):
    """Every inference tensor an op receives is copied first (outside the graph)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def fresh(a):
            if isinstance(a, (list, tuple)):
                return type(a)(fresh(b) for b in a)
            if isinstance(a, torch.Tensor) and a.is_inference():
                with torch.no_grad():
                    return a.clone()
            return a
        return func(*fresh(args), **{k: fresh(v) for k, v in (kwargs or {}).items()})


@contextlib.contextmanager
def naive_autograd():
    """The reference gradient: the host's forward differentiated as it is, none of sampling.py's machinery — every
    inference tensor copied where an op meets it and every tensor autograd saves copied when saved, so no in-place
    write can reach it. Slow; only around a pass, never around model loading (it would copy the weights)."""
    with CopiedInference(), torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
        yield


def checkpointing(env):
    import importlib
    return importlib.import_module(env.sampling.__name__.rsplit(".", 1)[0] + ".checkpointing")


def without_gradient_pass(env, model):
    """``model`` (a gradient_model clone) without the pack's gradient-pass wrapper and block-wise forward
    (checkpointing, early stop), for the naive reference."""
    import comfy.patcher_extension
    plain = model.clone()
    plain.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, env.sampling.GRADIENT_PASS_KEY)
    plain.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, checkpointing(env).KEY)
    return plain


def differentiate(env, reference, loss, wrt):
    """∇ loss(wrt), through the pack's gradient pass or (``reference``) the naive one."""
    with env.sampling.grad_enabled(), naive_autograd() if reference else contextlib.nullcontext():
        z = wrt.detach().clone().requires_grad_(True)
        grad, = torch.autograd.grad(loss(z), z)
    return grad


def pnd_pass(env, model, terms, positive=None, step=0, reference=False):
    """∇ of the P&D sampler's guidance loss at ``step`` (Σ weight·ℓ of its active terms, Eq. 9) w.r.t. the latent."""
    prepared, sampler = pnd_prepared(env, model, terms)
    store = sampler.extra_options["store"]
    sigmas = schedule(model)

    def probe(loop, x, _sigmas):
        s = float(sigmas[step])

        def loss(z):
            # what sample_pick_and_draw's guidance_grad differentiates
            loop.denoise(z, sigmas[step], "positive")
            return sum(t.weight * t.loss(s, live) for t in terms if t.active(s)).sum()
        with store.live() as live:      # backward too, as the sampler does (checkpointing recomputes the capture)
            return x, differentiate(env, reference, loss, x)

    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return env.sampling.run_loop(without_gradient_pass(env, prepared) if reference else prepared,
                                     positive or encode(env, PROMPT), encode(env, ""), torch.zeros(1, 4, 16, 16),
                                     sigmas[step:], probe, noise=noise, cfg=7.5)[1]


def nti_pass(env, model, positive=None, reference=False):
    """∇ w.r.t. the null embedding ∅ of null-text inversion's per-step loss ‖x_{t-1}(∅) − pivot‖² (Mokady et al.
    Eq. 3; the CFG prediction at 7.5 against a fixed target), on NullTextInvert's fp32 worker."""
    worker = env.sampling.gradient_model(model, torch.float32)
    sigmas = schedule(model)[3:5]
    target = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))

    def probe(loop, x, _sigmas):
        def loss(null):
            cond = loop.denoise(x, sigmas[0], "positive")
            uncond = loop.denoise(x, sigmas[0], "negative", context=null)
            return ((uncond + 7.5 * (cond - uncond) - target) ** 2).mean()
        return x, differentiate(env, reference, loss, loop.context("negative"))

    with torch.inference_mode():
        return env.sampling.run_loop(without_gradient_pass(env, worker) if reference else worker,
                                     positive or encode(env, REF_PROMPT), encode(env, ""),
                                     torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), sigmas,
                                     probe, cfg=7.5)[1]


def lora_pass(env, pack, model, reference=False):
    """PALP's LoRA gradient (all factors, flattened) of a denoising loss on a fixed noisy latent."""
    worker, adapters = lora_model(pack, model)
    gen = torch.Generator().manual_seed(1)
    latent, eps = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)
    factors = [p for a in adapters for p in (a.down, a.up)]

    def fn(loop, x, sigmas):
        with env.sampling.grad_enabled(), naive_autograd() if reference else contextlib.nullcontext():
            grads = torch.autograd.grad(loop.denoise(x.clone() + 3.0 * eps, 3.0).square().mean(), factors)
        return x, torch.cat([g.flatten() for g in grads])

    with torch.inference_mode():
        return env.sampling.run_loop(without_gradient_pass(env, worker) if reference else worker,
                                     encode(env, "a photo of a dog"), encode(env, ""), latent,
                                     torch.tensor([3.0, 0.0]), fn)[1]


def assert_same_gradient(got, reference, what):
    assert torch.isfinite(got).all() and reference.norm() > 0, what
    assert cosine(got, reference) >= 0.9999, (what, cosine(got, reference))
    assert got.norm().item() == pytest.approx(reference.norm().item(), rel=1e-3), what


# --- 1. no gradient reaches the caller's weights; no copies where no gradient flows --------------------


def weights_state(*modules):
    return [(id(p), p.requires_grad) for m in modules for p in m.parameters()]


def test_no_node_leaves_a_gradient_or_changes_requires_grad_on_the_callers_model_and_clip(env, pack, pnd_terms):
    """PALPTrainer (LoRA + token backward), NullTextInvert (null-text) and a P&D guided sampling, in turn."""
    import comfy.sample
    model, clip = env.model, env.clip
    before = weights_state(model.model, clip.cond_stage_model)
    images = env.tiny.smooth_images(torch.Generator().manual_seed(3), 2, 64, 64).movedim(1, -1)
    with torch.inference_mode():
        env.palp.PALPTrainer.execute(
            model, clip, env.vae, images, placeholder="[V]", class_word="dog", personalization_prompt="a photo of [V]",
            target_prompt="a sketch of a dog", steps=2, learning_rate=1e-2, batch_size=1, gradient_accumulation=1, rank=4,
            alpha=7.5, beta=1.0, alignment_weight=1.0, same_noise=True, rescale=True, timestep_min=0.0, timestep_max=1.0,
            resolution=64, precision="fp32", gradient_checkpointing=False, training_seed=0, save_name="gradient_paths",
            overwrite=True, resume=False, checkpoint_every=0)
        env.inversion.NullTextInvert.execute(model, clip, REF_PROMPT, "null-text", 3, "ddim_uniform", 7.5, 2, 1e-2, 1e-5,
                                             "", latent={"samples": torch.randn(1, 4, 16, 16)})
        prepared, sampler = pnd_prepared(env, model, pnd_terms)
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        comfy.sample.sample_custom(prepared, noise, 7.5, sampler, schedule(model), encode(env, PROMPT), encode(env, ""),
                                   torch.zeros(1, 4, 16, 16), seed=0, disable_pbar=True)
    with_grad = [n for n, p in [*model.model.named_parameters(), *clip.cond_stage_model.named_parameters()]
                 if p.grad is not None]
    assert not with_grad, f"{len(with_grad)} base weights hold a .grad, e.g. {with_grad[:3]}"
    assert weights_state(model.model, clip.cond_stage_model) == before


def test_passes_without_gradient_are_the_models_own_bit_for_bit(env):
    """A gradient_model clone adds no weight wrapper: its no-grad passes are the loaded model's, exactly."""
    import comfy.sample
    prepared = env.sampling.gradient_model(env.model)
    assert not prepared.weight_wrapper_patches
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = [comfy.sample.sample(m, noise, 4, 7.5, "euler", "normal", encode(env, PROMPT), encode(env, ""),
                                   torch.zeros(1, 4, 16, 16), disable_pbar=True) for m in (env.model, prepared)]
    assert torch.equal(out[0], out[1])


def test_a_compute_dtype_the_model_already_computes_in_adds_no_cast(env):
    """NullTextInvert's fp32 worker on an fp32 model: the host's layers run as loaded (no forced per-layer cast,
    which costs time for a no-op), and its passes are the model's own, bit for bit."""
    import comfy.sample
    assert env.model.model_dtype() == torch.float32
    worker = env.sampling.gradient_model(env.model, torch.float32)
    assert not worker.force_cast_weights and "manual_cast_dtype" not in worker.object_patches
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = [comfy.sample.sample(m, noise, 4, 7.5, "euler", "normal", encode(env, PROMPT), encode(env, ""),
                                   torch.zeros(1, 4, 16, 16), disable_pbar=True) for m in (env.model, worker)]
        assert torch.equal(out[0], out[1])
        half = env.sampling.gradient_model(env.model, torch.float16)
        hosts = env.model.clone()
        hosts.set_model_compute_dtype(torch.float16)
        out = [comfy.sample.sample(m, noise, 4, 7.5, "euler", "normal", encode(env, PROMPT), encode(env, ""),
                                   torch.zeros(1, 4, 16, 16), disable_pbar=True) for m in (hosts, half)]
    assert half.object_patches["manual_cast_dtype"] == torch.float16 and not half.force_cast_weights
    assert torch.equal(out[0], out[1]), "every pass computes in fp16, as the host's own compute dtype makes them"


def test_a_compute_dtype_leaves_no_cast_flags_on_the_shared_modules(env):
    """NullTextInvert's (and PALP's) worker computing in fp32 on an fp16 model: the host's set_model_compute_dtype
    left `prev_comfy_cast_weights` on every layer of the modules all clones share, and a later partial (--lowvram)
    load took them for streamed layers already patched and installed no LoRA patch on them (found by review: a
    LoRA sample after NullTextInvert lost its LoRA in those layers)."""
    import comfy.model_management
    import comfy.sample
    model = half(torch.float16)
    layers = [m for m in model.model.diffusion_model.modules() if hasattr(m, "comfy_cast_weights")]
    before = [m.comfy_cast_weights for m in layers]
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        comfy.sample.sample(env.sampling.gradient_model(model, torch.float32), noise, 2, 7.5, "euler", "normal",
                            encode(env, PROMPT), encode(env, ""), torch.zeros(1, 4, 16, 16), disable_pbar=True)
    comfy.model_management.unload_all_models()
    assert not [m for m in layers if hasattr(m, "prev_comfy_cast_weights")]
    assert [m.comfy_cast_weights for m in layers] == before


def test_weights_held_readable_for_a_loop_are_aliases_also_under_inference_mode(env):
    """A loop's hold (P&D's sampler, null-text inversion) is entered in the executor's inference mode: the
    weights inside are plain tensors over the loaded memory, a nested per-pass block keeps them, and on exit
    the loaded tensors themselves are back."""
    unet = env.model.model.diffusion_model
    with torch.inference_mode():
        loaded = {n: p for n, p in unet.named_parameters()}
        assert all(p.is_inference() for p in loaded.values())
        with env.sampling.readable_weights([unet]):
            held = {n: p for n, p in unet.named_parameters()}
            assert not any(p.is_inference() or p.requires_grad for p in held.values())
            assert all(held[n].data_ptr() == loaded[n].data_ptr() for n in loaded)
            with env.sampling.readable_weights([unet]):
                assert all(p is held[n] for n, p in unet.named_parameters())
        assert all(p is loaded[n] for n, p in unet.named_parameters())


# --- 2. half precision: the same direction as fp32 ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pnd_guidance_gradient_in_half_precision_points_where_fp32_does(env, pnd_terms, dtype):
    """Both terms (layout at step 0, appearance at step 2) at weight 1e-3: a weight the normalised step makes
    legitimate, and per-element gradients of the size issue 9 measured on SD1.5 (~1e-6), subnormal in fp16."""
    import dataclasses
    light = [dataclasses.replace(t, weight=1e-3) for t in pnd_terms]
    for step in (0, 2):
        assert_direction(lambda m: pnd_pass(env, m or env.model, light, step=step), getattr(torch, dtype),
                         f"P&D step {step}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pnd_guided_image_in_half_precision_moves_as_in_fp32(env, pnd_terms, dtype):
    """What guidance changes in the sampled latent (guided − plain Euler, each on its own model) against fp32
    on the same weights: cosine ≥ 0.99 and norm within 5% (fp16: 0.999 and 1%; its sampling passes are fp16)."""
    import comfy.sample
    import comfy.samplers
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def displacement(model):
        prepared, sampler = pnd_prepared(env, model, pnd_terms)
        with torch.inference_mode():
            run = [comfy.sample.sample_custom(prepared, noise, 7.5, s, schedule(model), encode(env, PROMPT),
                                              encode(env, ""), torch.zeros(1, 4, 16, 16), seed=0, disable_pbar=True)
                   for s in (sampler, comfy.samplers.sampler_object("euler"))]
        return (run[0] - run[1]).float()

    dtype = getattr(torch, dtype)
    reference, moved = displacement(rounded(dtype)), displacement(half(dtype))
    print(f"\n{dtype}: guided displacement vs fp32 on the same weights: cosine {cosine(moved, reference):.5f}, "
          f"norm ratio {moved.norm() / reference.norm():.4f}; vs the fp32 model: "
          f"cosine {cosine(moved, displacement(env.model)):.5f}")
    tight = dtype == torch.float16
    assert cosine(moved, reference) >= (0.999 if tight else 0.99)
    assert moved.norm() == pytest.approx(reference.norm().item(), rel=0.01 if tight else 0.05)


def guided_latent(env, model, terms, steps=4, full_forward=False, monkeypatch=None, positive=None, **options):
    """The P&D sampler's latent after ``steps`` steps and, with ``monkeypatch``, the UNet blocks its gradient passes
    ran, as (block id, σ) in order, recomputations included. ``full_forward``: the host's own UNet forward, no
    block-wise wrapper."""
    import comfy.patcher_extension
    import comfy.sample
    from comfy.ldm.modules.diffusionmodules import openaimodel
    blocks = []
    if monkeypatch is not None:
        original = openaimodel.forward_timestep_embed

        def spy(ts, x, emb, context=None, transformer_options={}, *args, **kwargs):
            if torch.is_grad_enabled():
                blocks.append((transformer_options.get("block"), float(transformer_options["sigmas"][0])))
            return original(ts, x, emb, context, transformer_options, *args, **kwargs)
        monkeypatch.setattr(openaimodel, "forward_timestep_embed", spy)
    with torch.inference_mode():
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(model, env.clip, PROMPT, "dog", 0.5, True, *terms,
                                                               **options).args
    if full_forward:
        prepared = prepared.clone()
        prepared.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, checkpointing(env).KEY)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = comfy.sample.sample_custom(prepared, noise, 7.5, sampler, schedule(model)[:steps + 1],
                                         positive or encode(env, PROMPT), encode(env, ""), torch.zeros(1, 4, 16, 16),
                                         seed=0, disable_pbar=True)
    if monkeypatch is not None:
        monkeypatch.undo()
    return out.float(), blocks


def plain_latent(env, model, steps=4):
    import comfy.sample
    import comfy.samplers
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, 7.5, comfy.samplers.sampler_object("euler"),
                                          schedule(model)[:steps + 1], encode(env, PROMPT), encode(env, ""),
                                          torch.zeros(1, 4, 16, 16), seed=0, disable_pbar=True).float()


def assert_same_latent(got, reference, what):
    assert torch.allclose(got, reference, rtol=0, atol=1e-5), (what, (got - reference).abs().max())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_pnd_checkpointing_and_early_stop_leave_the_guided_latent_unchanged(env, pnd_terms, dtype, monkeypatch):
    """The guidance pass recomputed block by block in backward (gradient_checkpointing on, recomputing in the pass's
    fp32 on half-precision weights) and ended after the last block a term reads (both settings) gives the latent
    of the host's own full forward kept whole for backward; the appearance steps' passes run no block after the
    last appearance layer's."""
    model = env.model if dtype == "float32" else half(getattr(torch, dtype))
    host_forward, all_blocks = guided_latent(env, model, pnd_terms, full_forward=True, gradient_checkpointing=False,
                                             monkeypatch=monkeypatch)
    assert not torch.allclose(host_forward, plain_latent(env, model)), "guidance must move the latent"
    order = checkpointing(env).block_order
    last = max((k[:2] for k in pnd_terms[0].layers), key=order)
    appearance_sigmas = {float(s) for s in schedule(model)[2:4]}
    reached = lambda blocks: max((b for b, s in blocks if s in appearance_sigmas), key=order)
    assert order(reached(all_blocks)) > order(last), "the host's forward runs past the appearance layers"
    for on in (True, False):
        got, blocks = guided_latent(env, model, pnd_terms, gradient_checkpointing=on, monkeypatch=monkeypatch)
        assert_same_latent(got, host_forward, (dtype, on))
        assert reached(blocks) == last, (on, reached(blocks), last)


def test_pnd_with_both_terms_active_at_one_step_is_right_checkpointed(env, pnd_terms, reference_inversion):
    """Overlapping windows (layout [0, 0.2), appearance [0, 0.4)): one backward per term, so backward recomputes each
    checkpointed block twice; the latent is the host forward's (found by review: the recomputation's context could be
    entered only once)."""
    terms = (appearance_term(env, reference_inversion, 0.0, 0.4), pnd_terms[1])
    reference, _ = guided_latent(env, env.model, terms, steps=2, full_forward=True, gradient_checkpointing=False)
    assert not torch.allclose(reference, plain_latent(env, env.model, steps=2))
    for on in (True, False):
        assert_same_latent(guided_latent(env, env.model, terms, steps=2, gradient_checkpointing=on)[0], reference, on)


@pytest.mark.parametrize("wrapper", ["DIFFUSION_MODEL", "model_function_wrapper"])
def test_pnd_runs_the_whole_forward_under_another_packs_model_wrapper(env, pnd_terms, wrapper, monkeypatch):
    """Another pack's wrapper around the UNet would see an early-ended pass's zeros (or be skipped by the block-wise
    forward): with one, the guidance pass runs the host's whole forward, and the latent is the same."""
    import comfy.patcher_extension
    seen = []
    model = env.model.clone()
    if wrapper == "DIFFUSION_MODEL":
        def other(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            seen.append(out.abs().max().item())
            return out
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "another.pack", other)
    else:
        def other(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            seen.append(out.abs().max().item())
            return out
        model.set_model_unet_function_wrapper(other)
    reference, _ = guided_latent(env, env.model, pnd_terms)
    got, blocks = guided_latent(env, model, pnd_terms, monkeypatch=monkeypatch)
    assert_same_latent(got, reference, wrapper)
    assert seen and min(seen) > 0, "the wrapper saw a stopped pass's zeros"
    last_block = ("output", len(env.model.model.diffusion_model.output_blocks) - 1)
    appearance_sigmas = {float(s) for s in schedule(env.model)[2:4]}
    assert any(b == last_block and s in appearance_sigmas for b, s in blocks), "the appearance passes must run whole"


def test_pnd_checkpointing_keeps_a_guided_step_at_the_memory_of_a_plain_step(env, pnd_terms):
    """One guided step of each window, checkpointed: its peak is within 15% of the same step sampled plainly with CFG
    (the gradient pass at batch 1 recomputes one block at a time; the smallest blocks kept whole, within the
    largest's activations, are what it adds: 1.12× here, 1.05× at SD1.5 size in bench_pnd.py), and below the
    same step keeping the pass's activations. A live capture keeps the forward's maps, never a
    recomputation's (which would hold every recomputed block alive)."""
    import comfy.sample
    import comfy.samplers
    from memory import PeakMemory
    sigmas = schedule(env.model)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    appearance, layout = pnd_terms

    def peak(model, sampler, step):
        run = lambda: comfy.sample.sample_custom(model, noise, 7.5, sampler, sigmas[step:step + 2], encode(env, PROMPT),
                                                 encode(env, ""), torch.zeros(1, 4, 16, 16), seed=0, disable_pbar=True)
        with torch.inference_mode():
            run()
            with PeakMemory() as meter:
                run()
        return meter.peak

    for step, terms in ((0, (None, layout)), (2, (appearance, None))):     # one window's term: its step's alone
        plain = peak(env.model, comfy.samplers.sampler_object("euler"), step)
        guided = {}
        for on in (True, False):
            with torch.inference_mode():
                prepared, sampler = env.pnd.PickAndDrawSampler.execute(env.model, env.clip, PROMPT, "dog", 0.5, True,
                                                                       *terms, gradient_checkpointing=on).args
            guided[on] = peak(prepared, sampler, step)
        assert guided[True] <= 1.15 * plain and guided[True] < guided[False], (step, plain, guided)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_null_text_inversion_in_half_precision_matches_fp32(env, dtype):
    """The null-embedding gradient (``assert_direction``) and NullTextInvert's result: the learned change of ∅
    (cosine ≥ 0.99) and the reconstruction (within 1% of the latent's norm) against fp32 on the same weights,
    and for fp16 against the fp32 model too."""
    model = half(getattr(torch, dtype))
    assert_direction(lambda m: nti_pass(env, m or env.model), getattr(torch, dtype), "NTI")
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))}

    def invert(m):
        with torch.inference_mode():
            inv, rec = env.inversion.NullTextInvert.execute(m, env.clip, REF_PROMPT, "null-text", 4, "ddim_uniform", 7.5,
                                                            3, 1e-2, 1e-5, "", latent=latent).args[:2]
        return inv.null_embeddings - inv.uncond, rec["samples"]

    references = [rounded(getattr(torch, dtype))] + ([env.model] if dtype == "float16" else [])
    learned, rec = invert(model)
    for reference in references:
        learned_ref, rec_ref = invert(reference)
        assert cosine(learned, learned_ref) >= 0.99
        assert (rec - rec_ref).norm() <= 0.01 * rec_ref.norm()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_null_text_inversion_casts_half_weights_once_with_the_same_result(env, dtype, monkeypatch):
    """Issue 11 (NTI on a GPU): on half-precision weights the inversion's fp32 passes read weights cast once for the
    loop, and the host's per-layer cast copies nothing; without room for the copies it casts per layer as before.
    The result is bit for bit the per-layer path's, and the caller's model keeps its own weights."""
    import comfy.model_management
    model = half(getattr(torch, dtype))
    unet = model.model.diffusion_model
    before = dict(unet.named_parameters())
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))}
    casts = []
    original_cast = comfy.model_management.cast_to
    monkeypatch.setattr(comfy.model_management, "cast_to", lambda weight, dtype=None, *a, **k: (
        dtype not in (None, weight.dtype) and casts.append(weight)) or original_cast(weight, dtype, *a, **k))

    def invert():
        casts.clear()
        with torch.inference_mode():
            inv, rec = env.inversion.NullTextInvert.execute(model, env.clip, REF_PROMPT, "null-text", 4, "ddim_uniform",
                                                            7.5, 3, 1e-2, 1e-5, "", latent=latent).args[:2]
        return inv.null_embeddings, rec["samples"], len(casts)

    nulls, rec, once = invert()
    with monkeypatch.context() as m:
        m.setattr(env.inversion, "weights_cast_once", lambda *_: contextlib.nullcontext())
        per_layer = invert()
    with monkeypatch.context() as m:
        m.setattr(env.sampling, "_fits", lambda *_: False)
        no_room = invert()
    assert once == 0 < per_layer[2] == no_room[2]
    for other in (per_layer, no_room):
        assert torch.equal(nulls, other[0]) and torch.equal(rec, other[1])
    assert all(t is before[name] and t.grad is None for name, t in unet.named_parameters())


def test_weights_cast_once_leaves_weights_that_hooks_patch_to_the_host(env):
    """Weight hooks (``comfy.hooks``) patch the stored weights during sampling: with any registered, the casts are
    left to the host's per-layer path (the hook would write into the copies, and round to their dtype)."""
    base = half(torch.float16).model
    weight = base.diffusion_model.out[-1].weight
    with env.sampling._computing_in(base, torch.float32):       # the compute dtype a loaded NTI clone has
        for hooks, expected in (({}, torch.float32), ({"a hook": {}}, torch.float16)):
            patcher = types.SimpleNamespace(model=base, hook_patches=hooks)
            with env.sampling.weights_cast_once(patcher, weight.device):
                assert base.diffusion_model.out[-1].weight.dtype == expected
            assert base.diffusion_model.out[-1].weight is weight


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_palp_lora_gradient_in_half_precision_points_where_fp32_does(env, pack, dtype):
    assert_direction(lambda m: lora_pass(env, pack, m or env.model), getattr(torch, dtype), "LoRA")


# --- 3. attention kernels without a backward --------------------------------------------------------------


def no_backward_kernel(kind):
    """An attention kernel as a backward-less one behaves: values right, graph cut (``detached``) or a backward
    that raises (``raises``), as flash attention's custom op, SageAttention or xformers without a backward."""
    import comfy.ldm.modules.attention as attention
    pytorch = attention.attention_pytorch.__wrapped__

    class Forward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, heads):
            return pytorch(q, k, v, heads)

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("this kernel has no backward")

    @attention.wrap_attn
    def kernel(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        if kind == "detached":
            with torch.no_grad():
                return pytorch(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                               skip_output_reshape=skip_output_reshape)
        return Forward.apply(q, k, v, heads)
    return kernel


@contextlib.contextmanager
def selected_attention(kernel):
    """The host's selected attention (``optimized_attention``, read by every CrossAttention at call time)."""
    import comfy.ldm.modules.attention as attention
    saved = attention.optimized_attention
    attention.optimized_attention = kernel
    try:
        yield
    finally:
        attention.optimized_attention = saved


@pytest.mark.parametrize("kind", ["detached", "raises"])
def test_gradient_passes_use_an_attention_with_a_backward(env, pack, pnd_terms, kind):
    """P&D, NTI and LoRA gradients with a backward-less kernel selected equal those with the host's own."""
    reference = pnd_pass(env, env.model, pnd_terms), nti_pass(env, env.model), lora_pass(env, pack, env.model)
    with selected_attention(no_backward_kernel(kind)):
        got = pnd_pass(env, env.model, pnd_terms), nti_pass(env, env.model), lora_pass(env, pack, env.model)
    for name, a, b in zip(("P&D", "NTI", "LoRA"), got, reference):
        assert cosine(a, b) >= 0.9999 and a.norm() == pytest.approx(b.norm().item(), rel=1e-3), name


def test_an_override_that_cuts_the_gradient_is_refused_by_name(env, pnd_terms):
    """Another pack's attention override forcing a backward-less kernel: refused with the host flag to use."""
    kernel = no_backward_kernel("detached")
    model = env.model.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
        lambda func, *args, **kwargs: kernel.__wrapped__(*args, **kwargs)
    with pytest.raises(ValueError, match="--use-pytorch-cross-attention"):
        pnd_pass(env, model, pnd_terms)


def test_a_patch_that_cuts_the_gradient_is_refused(env, pnd_terms):
    """Another pack's patch returning a detached tensor (here an attn1 output patch) would silently drop that
    path from the gradient: refused."""
    model = env.model.clone()
    model.set_model_attn1_output_patch(lambda out, extra_options: out.detach())
    with pytest.raises(ValueError, match="returned no gradient"):
        pnd_pass(env, model, pnd_terms)


# --- 4. other packs' patches in the chain -------------------------------------------------------------------


def freeu_v2(env, model):
    from comfy_extras.nodes_freelunch import FreeU_V2
    return FreeU_V2().patch(model, 1.3, 1.4, 0.9, 0.2)[0]


def sag(env, model):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    return SelfAttentionGuidance.execute(model, 0.5, 2.0).args[0]


def pag(env, model):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return PerturbedAttentionGuidance.execute(model, 3.0).args[0]


def host_lora(env, model):
    """A LoRA on every attention projection, loaded as LoraLoader does (``comfy.sd.load_lora_for_models``)."""
    import comfy.sd
    gen = torch.Generator().manual_seed(11)
    lora = {}
    for name, module in model.model.diffusion_model.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")):
            out_f, in_f = module.weight.shape
            lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(2, in_f, generator=gen) * 0.3
            lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, 2, generator=gen) * 0.3
    with torch.inference_mode():
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert len(patched.patches) == len(lora) // 2
    return patched


def ip_adapter_like(env, model):
    """An IPAdapter-style attn2 *replace* on every cross-attention layer: image tokens through the pack's own
    projections (inference tensors, as weights loaded by a node), masked by an inference-tensor mask and added
    to the text attention in place, as IPAdapter implementations do."""
    import comfy.ldm.modules.attention as attention
    gen = torch.Generator().manual_seed(12)
    patched = model.clone()
    shapes = {tuple(m.to_k.weight.shape) for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2")}
    with torch.inference_mode():
        tokens = torch.randn(1, 4, 64, generator=gen)
        weights = {shape: (torch.randn(shape, generator=gen) / 8, torch.randn(shape, generator=gen) / 8)
                   for shape in sorted(shapes)}
        scale = torch.tensor(0.5)

    def patch(q, k, v, extra_options):
        out = attention.optimized_attention(q, k, v, extra_options["n_heads"], transformer_options=extra_options)
        w_k, w_v = weights[(q.shape[-1], tokens.shape[-1])]
        ip_k = torch.nn.functional.linear(tokens, w_k).expand(q.shape[0], -1, -1)
        ip_v = torch.nn.functional.linear(tokens, w_v).expand(q.shape[0], -1, -1)
        out += attention.optimized_attention(q, ip_k, ip_v, extra_options["n_heads"]) * scale
        return out

    for layer in env.host_nodes.unet_layers(model):
        if layer.kind == "cross":
            patched.set_model_attn2_replace(patch, *layer.key)
    return patched


def tiny_controlnet(model):
    """A ControlNet of the tiny UNet's shape (the host's own cldm class, random zero-convs so it acts)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    import tiny_models
    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device=torch.device("cpu"))
    with torch.inference_mode():
        control_model = comfy.cldm.cldm.ControlNet(**config)
        tiny_models.init_weights(control_model, torch.Generator().manual_seed(13))
    return comfy.controlnet.ControlNet(control_model, load_device=model.load_device)


def with_controlnet(env, text):
    """``text`` encoded, with the tiny ControlNet applied by the host's ControlNetApplyAdvanced."""
    from nodes import ControlNetApplyAdvanced
    hint = env.tiny.smooth_images(torch.Generator().manual_seed(14), 1, 128, 128).movedim(1, -1)
    with torch.inference_mode():
        return ControlNetApplyAdvanced().apply_controlnet(encode(env, text), encode(env, ""), tiny_controlnet(env.model),
                                                          hint, 1.0, 0.0, 1.0)[0]


PATCHES = {"FreeU_V2": freeu_v2, "SAG": sag, "PAG": pag, "LoRA": host_lora, "IPAdapter-style attn2": ip_adapter_like}


@pytest.mark.parametrize("name", [*PATCHES, "ControlNet"])
def test_gradient_passes_are_right_with_other_packs_patches_in_the_chain(env, pack, pnd_terms, name):
    """P&D's, NTI's and PALP's gradients through the patched model equal the naive reference's, and the patch
    changes what they see."""
    model, pnd_positive, nti_positive = env.model, None, None
    if name == "ControlNet":
        pnd_positive, nti_positive = with_controlnet(env, PROMPT), with_controlnet(env, REF_PROMPT)
    else:
        with torch.inference_mode():
            model = PATCHES[name](env, env.model)
    pnd = pnd_pass(env, model, pnd_terms, positive=pnd_positive)
    assert_same_gradient(pnd, pnd_pass(env, model, pnd_terms, positive=pnd_positive, reference=True), f"P&D, {name}")
    nti = nti_pass(env, model, positive=nti_positive)
    assert_same_gradient(nti, nti_pass(env, model, positive=nti_positive, reference=True), f"NTI, {name}")
    if name != "ControlNet":    # a ControlNet lives in the conds, which PALP makes itself
        assert_same_gradient(lora_pass(env, pack, model), lora_pass(env, pack, model, reference=True), f"LoRA, {name}")
    if name not in ("SAG", "PAG"):    # they change the unconditional pass and their own extra passes only
        assert not torch.allclose(pnd, pnd_pass(env, env.model, pnd_terms)), "the patch must act on the pass"


@pytest.mark.parametrize("name", ["FreeU_V2", "IPAdapter-style attn2", "ControlNet"])
def test_pnd_sampler_checkpointed_and_stopped_early_is_right_with_other_packs_patches(env, pnd_terms, name):
    """The sampler's own guidance path (checkpointed blocks, early end; the ControlNet's residuals added in place
    between blocks) through another pack's patch gives the latent of the host's whole forward kept for backward."""
    model, positive = env.model, None
    if name == "ControlNet":
        positive = with_controlnet(env, PROMPT)
    else:
        with torch.inference_mode():
            model = PATCHES[name](env, env.model)
    reference, _ = guided_latent(env, model, pnd_terms, full_forward=True, positive=positive,
                                 gradient_checkpointing=False)
    got, _ = guided_latent(env, model, pnd_terms, positive=positive)
    assert_same_latent(got, reference, name)
    assert not torch.allclose(reference, guided_latent(env, env.model, pnd_terms)[0]), "the patch must act"


def test_palp_trains_through_every_patch_at_once(env, pack):
    """PALPTrainer on a model carrying FreeU_V2, SAG, PAG, a host LoRA and an IPAdapter-style replace."""
    model = env.model
    with torch.inference_mode():
        for make in PATCHES.values():
            model = make(env, model)
    images = env.tiny.smooth_images(torch.Generator().manual_seed(3), 2, 64, 64).movedim(1, -1)
    with torch.inference_mode():
        out, _, _ = env.palp.PALPTrainer.execute(
            model, env.clip, env.vae, images, placeholder="[V]", class_word="dog", personalization_prompt="a photo of [V]",
            target_prompt="a sketch of a dog", steps=2, learning_rate=1e-2, batch_size=1, gradient_accumulation=1, rank=4,
            alpha=7.5, beta=1.0, alignment_weight=1.0, same_noise=True, rescale=True, timestep_min=0.0, timestep_max=1.0,
            resolution=64, precision="fp32", gradient_checkpointing=True, training_seed=0, save_name="gradient_paths_patched",
            overwrite=True, resume=False, checkpoint_every=0).args
    import folder_paths
    from safetensors.torch import load_file
    lora = load_file(folder_paths.get_full_path_or_raise("loras", "gradient_paths_patched.safetensors"))
    ups = {k.removesuffix(".lora_up.weight"): v for k, v in lora.items() if k.endswith(".lora_up.weight")}
    assert ups and all(torch.isfinite(u).all() for u in ups.values())
    assert any(u.abs().max() > 0 for u in ups.values()), "two Adam steps must move the LoRA's up factors off zero"
    assert all(f"{module}.weight" in out.patches for module in ups)     # the MODEL output carries the saved LoRA

