"""Captured maps come only from the sampler's own cond/uncond passes (issue 9 §2).

SAG and PAG call the UNet again from their post-CFG functions, and the Pick-and-Draw sampler makes
a gradient pass of its own; all run through the capture's patches at the same σ. The fair reference
is the maps of the sampler's own passes at the *same* x: every step's x of the run under test is
recorded, then replayed through a capture on the plain model (a sampler whose only UNet calls are
one CFG prediction per recorded x), so any difference is what the extra passes added.
"""
import pytest
import torch

PROMPT = "a photo of a sks dog on the beach"
STEPS = 4


@pytest.fixture(scope="module")
def env(host, pack):
    import tiny_models
    model, clip, _ = tiny_models.tiny_sd1()
    return pack("nodes.capture"), pack("nodes.pnd"), model, clip


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def schedule(model, steps=STEPS):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)


def capture(capture_nodes, model, clip):
    return capture_nodes.AttentionCapture.execute(model, clip, PROMPT, "dog, beach", "cross", "all", "").args


def sample(model, clip, sampler, sigmas, xs=None, seed=0):
    """SamplerCustom's path at CFG 7.5 from seeded noise; ``xs`` collects every step's x in sampler space."""
    import comfy.sample
    latent = torch.zeros(1, 4, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    callback = None if xs is None else (lambda step, x0, x, total: xs.append(x.clone()))
    with torch.inference_mode():
        return comfy.sample.sample_custom(model, noise, 7.5, sampler, sigmas, encode(clip, PROMPT), encode(clip, ""),
                                          latent, callback=callback, disable_pbar=True, seed=seed)


def replayed_run(capture_nodes, model, clip, sigmas, xs):
    """The maps a capture on ``model`` records from one CFG prediction at each recorded x, and nothing else."""
    import comfy.samplers

    def replay(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        for i, xi in enumerate(xs):
            model_k(xi, sigmas[i] * xi.new_ones([xi.shape[0]]), **extra_args)
        return x

    captured, store = capture(capture_nodes, model, clip)
    sample(captured, clip, comfy.samplers.KSAMPLER(replay), sigmas)
    return store.runs[-1]


def assert_same_maps(run, reference):
    assert set(run.maps) == set(reference.maps) and len(run.maps) > 0
    worst = max((run.maps[k].float() - reference.maps[k].float()).abs().max().item() for k in run.maps)
    assert worst < 2e-3, f"maps differ from the sampler's own passes by up to {worst:.3f}"


def sag(model, scale):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    return SelfAttentionGuidance.execute(model, scale, 2.0).args[0]


def pag(model, scale):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return PerturbedAttentionGuidance.execute(model, scale).args[0]


@pytest.mark.parametrize("guidance", [sag, pag], ids=["SAG", "PAG"])
@pytest.mark.parametrize("order", ["guidance_first", "capture_first"])
def test_sag_and_pag_extra_passes_are_not_recorded(env, guidance, order):
    import comfy.samplers
    capture_nodes, _, model, clip = env
    sigmas = schedule(model)
    if order == "guidance_first":
        captured, store = capture(capture_nodes, guidance(model, 1.0), clip)
    else:
        captured, store = capture(capture_nodes, model, clip)
        captured = guidance(captured, 1.0)
    xs = []
    out = sample(captured, clip, comfy.samplers.sampler_object("euler"), sigmas, xs)
    plain = sample(model, clip, comfy.samplers.sampler_object("euler"), sigmas)
    assert (out - plain).abs().max() > 1e-3, "the guidance must act (else the test shows nothing)"
    assert_same_maps(store.run_for(out), replayed_run(capture_nodes, model, clip, sigmas, xs))


@pytest.mark.parametrize("guider", ["DualCFG", "PerpNeg"])
def test_other_guiders_passes_are_filed_by_their_prompts(env, guider):
    """Attention patches see a cond's index in the guider's list: DualCFG passes [negative, middle, positive],
    PerpNeg [positive, negative, empty]. The 'cond' maps are the positive prompt's, 'uncond' the negative's (under
    DualCFG 'cond' showed the negative prompt's maps), and the third prompt's are not filed."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG
    from comfy_extras.nodes_perpneg import Guider_PerpNeg
    capture_nodes, _, model, clip = env
    sigmas = schedule(model)
    captured, store = capture(capture_nodes, model, clip)
    if guider == "DualCFG":
        made = Guider_DualCFG(captured)
        made.set_conds(encode(clip, PROMPT), encode(clip, "a photo"), encode(clip, ""))
        made.set_cfg(7.5, 7.5)
    else:
        made = Guider_PerpNeg(captured)
        made.set_conds(encode(clip, PROMPT), encode(clip, ""), encode(clip, "a photo"))
        made.set_cfg(7.5, 1.0)
    xs, latent = [], torch.zeros(1, 4, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = made.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=0,
                          callback=lambda step, x0, x, total: xs.append(x.clone()))
    assert_same_maps(store.run_for(out), replayed_run(capture_nodes, model, clip, sigmas, xs))


def test_heun_corrector_passes_are_not_averaged_into_the_next_step(env):
    """heun evaluates step i+1's σ at a guessed latent (its corrector) before step i+1's own pass: each step's maps
    are its own pass's, as the replay of one CFG prediction per step's x records them (they used to average both:
    off by 0.02 here, up to 0.2 on the tiny SDXL, on maps in [0, 1])."""
    import comfy.samplers
    capture_nodes, _, model, clip = env
    sigmas = schedule(model)
    captured, store = capture(capture_nodes, model, clip)
    xs = []
    out = sample(captured, clip, comfy.samplers.sampler_object("heun"), sigmas, xs)
    assert_same_maps(store.run_for(out), replayed_run(capture_nodes, model, clip, sigmas, xs))


def test_pick_and_draw_gradient_pass_is_not_recorded(env):
    """AttentionCapture upstream of the P&D sampler: its layout-gradient passes run through the capture's patches."""
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    capture_nodes, pnd, model, clip = env
    sigmas = schedule(model)
    latent = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        layout = pnd.LayoutGuidance.execute(model, clip, PROMPT, "dog", encode(clip, PROMPT), encode(clip, ""), 7.5,
                                            Noise_RandomNoise(1), sigmas, {"samples": latent}, "cross", 0.0, 0.6, 1.0,
                                            3, 0.5).args[0]
        captured, store = capture(capture_nodes, model, clip)
        prepared, sampler = pnd.PickAndDrawSampler.execute(captured, clip, PROMPT, "dog", 0.5, True, None, layout).args
    xs = []
    out = sample(prepared, clip, sampler, sigmas, xs)
    assert_same_maps(store.run_for(out), replayed_run(capture_nodes, model, clip, sigmas, xs))


def test_layout_template_ignores_pag_extra_passes(env):
    """LayoutGuidance's template is a recording too. PAG at a negligible scale keeps the template run's x (its
    extra conditional pass still runs), so the template must equal the plain model's."""
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    _, pnd, model, clip = env
    sigmas = schedule(model, 10)

    def template(m):
        with torch.inference_mode():
            return pnd.LayoutGuidance.execute(m, clip, PROMPT, "dog", encode(clip, PROMPT), encode(clip, ""), 7.5,
                                              Noise_RandomNoise(1), sigmas, {"samples": torch.zeros(1, 4, 16, 16)},
                                              "cross", 0.0, 0.2, 1.0, 3, 0.5).args[0]

    plain, with_pag = template(model), template(pag(model, 1e-6))
    for ours, theirs in zip(with_pag.maps, plain.maps):
        worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
        assert worst < 2e-3, f"the template differs by up to {worst:.3f}"


def test_the_packs_own_loops_on_a_captured_model_record_nothing(env, pack):
    """An inversion, a palette pass and a layout template given Attention Capture's MODEL are not sampling runs of it
    (the template is the pack's own run of the vanilla model): they run with
    their own prompts (no prompt check), record nothing, and give what they give on the uncaptured model."""
    capture_nodes, pnd, model, clip = env
    inv = pack("nodes.inversion")
    captured, store = capture(capture_nodes, model, clip)
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}

    def invert(m, mode):
        return inv.NullTextInvert.execute(m, clip, "a photo of a cat", mode, 3, "ddim_uniform", 7.5, 2, 1e-2, 1e-5, "",
                                          latent=latent).args
    with torch.inference_mode():
        for mode in ("ddim", "null-text"):          # ddim's reconstruction is a CFG sampling run of its own
            ours, plain = invert(captured, mode), invert(model, mode)
            assert torch.equal(ours[1]["samples"], plain[1]["samples"]), mode
        inversion = ours[0]
        palettes = [pnd.UREMDGuidance.execute(m, inversion, clip, "cat", 0.0, "auto", 0.0, 1.0, 1.0).args[0].palette
                    for m in (captured, model)]
        from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
        templates = [pnd.LayoutGuidance.execute(m, clip, "a photo of a cat", "cat", encode(clip, "a photo of a cat"),
                                                encode(clip, ""), 7.5, Noise_RandomNoise(0), schedule(model),
                                                {"samples": torch.zeros(1, 4, 16, 16)}, "cross", 0.0, 0.5, 1.0, 3,
                                                0.5).args[0].maps for m in (captured, model)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*palettes) for k in a)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*templates) for k in a)
    assert store.runs == [], "nothing recorded into the user's capture"


@pytest.mark.parametrize("sampler_name, missed", [("euler", False), ("dpm_2", False), ("dpm_adaptive", True)])
def test_an_adaptive_samplers_unrecorded_steps_are_named(env, caplog, sampler_name, missed):
    """dpm_adaptive evaluates the model at σ's of its own choosing: of the schedule's steps only the first has a pass,
    which is all Attention Maps could show, without a word before; a warning now names the steps without maps.
    dpm_2's midpoints are off the schedule too, but every step has its own pass (no warning)."""
    import comfy.samplers
    capture_nodes, _, model, clip = env
    captured, store = capture(capture_nodes, model, clip)
    sigmas = schedule(model)
    with caplog.at_level("WARNING"):
        out = sample(captured, clip, comfy.samplers.sampler_object(sampler_name), sigmas)
    warned = [r.getMessage() for r in caplog.records if "no maps" in r.getMessage()]
    recorded = store.run_for(out).steps
    assert (recorded != list(range(STEPS))) == missed
    assert bool(warned) == missed
    if missed:
        absent = [i for i in range(STEPS) if i not in recorded]
        assert f"{len(absent)} of the steps asked for have no maps (steps {', '.join(map(str, absent))})" in warned[0]
