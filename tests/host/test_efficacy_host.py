"""Efficacy, not only exactness: the cheapest claim of each paper on the toy world's trained model (issue 13).

The toy world (``shared/toyworld``: a small text-to-image model trained on a synthetic world, and an oracle
that scores latents) is looked for beside the repo (CI keeps shared/ at ../shared) or at $TOYWORLD; without
it these tests skip. The full measurements, with ≥ 32 seeds and the caveats, are bench/FIDELITY.md
(``bench/fidelity/run.py``); the thresholds here sit well inside the effects measured there.
"""
import pathlib
import sys
import types

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "fidelity"))
import toylab  # noqa: E402  (imports no host module at import time)

STEPS, CFG, SEEDS, SEED = 25, 5.0, 8, 1
SNOW = "snow"


@pytest.fixture(scope="module")
def lab(host, pack):
    if toylab.find_toyworld() is None:
        pytest.skip("the toy world (shared/toyworld) is not beside the repo and $TOYWORLD is unset")
    torch.set_num_threads(1)
    clip = toylab.load_clip()
    return types.SimpleNamespace(world=toylab.world(), clip=clip, vanilla=toylab.load_model(), vae=toylab.ToyVAE(),
                                 encode=toylab.encoder(clip), personalized=None,
                                 nodes=types.SimpleNamespace(pnd=pack("nodes.pnd"), lnr=pack("nodes.lnr"),
                                                             palp=pack("nodes.palp"), inversion=pack("nodes.inversion")))


@pytest.fixture(scope="module")
def lora(lab):
    """PALPTrainer at alignment weight 0 (plain LoRA + token) and at 1, 100 steps each on the sks dog's 4 city
    latents: (MODEL, CLIP) per weight. The plain one overfits to the city (bench/FIDELITY.md §4)."""
    return {w: toylab.palp_train(lab, f"efficacy_w{w:g}", 100, w, lr=1e-2, rank=4) for w in (0.0, 1.0)}


def context_of(lab, samples, context):
    return toylab.score(samples, lab.world.CONTEXTS.index(context))


def test_the_stand_in_vae_is_exact(lab):
    latents = toylab.subject_latents(4)
    images = lab.vae.decode(latents)
    assert images.shape == (4, 128, 128, 3) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(lab.vae.encode(images), latents, atol=1e-4, rtol=0)


def test_pick_and_draw_appearance_moves_the_vanilla_models_subject_toward_the_reference(lab):
    """P&D §4.4 on the vanilla model: UREMD appearance guidance from the sks dog's inverted latent turns the
    plain dog's colour toward the subject's (bench: cos −0.36 → −0.23 at η 0.3, 32 seeds)."""
    reference = toylab.invert(lab, lab.vanilla, toylab.subject_latents(4)[:1], "a photo of a dog", STEPS)
    _, prompt = toylab.prompts(SNOW)
    plain = context_of(lab, toylab.plain(lab, lab.vanilla, prompt, SEEDS, SEED, STEPS, CFG), SNOW)
    guided = context_of(lab, toylab.pick_and_draw(lab, lab.vanilla, SNOW, SEEDS, SEED, STEPS, CFG, reference=reference,
                                                  layout=False, personal=False, eta=0.3), SNOW)
    print(f"\ncos to the subject colour: plain {plain['cos'].mean():.3f}, guided {guided['cos'].mean():.3f}")
    assert guided["cos"].mean() > plain["cos"].mean() + 0.06
    assert guided["dog"].mean() == 1, "still a dog (a disc)"


def test_palp_alignment_keeps_the_target_prompts_context_where_plain_lora_loses_it(lab, lora):
    """PALP's claim: trained toward "a photo of a dog in the snow", the personalized model still draws the snow for
    its subject; plain LoRA + token (alignment weight 0) on city-only images draws the city."""
    acc = {}
    for weight, (model, clip) in lora.items():
        encode = toylab.encoder(clip)
        out = toylab.sample(model, toylab.euler(), toylab.schedule(model, STEPS),
                            encode(f"a photo of a embedding:efficacy_w{weight:g} in the snow"), encode(""),
                            torch.zeros(SEEDS, 4, 16, 16), SEED, CFG)
        acc[weight] = context_of(lab, out, SNOW)["context"].mean().item()
    print(f"\ncontext accuracy for the target prompt: LoRA + token {acc[0.0]:.2f}, PALP {acc[1.0]:.2f}")
    assert acc[1.0] >= acc[0.0] + 0.5


def test_step_blend_restores_the_prompts_context_on_an_overfit_model(lab):
    """L&R stage 1: λ1 vanilla steps with the class prompt give an overfit model's sample the prompt's context.
    The overfit model: the whole UNet fine-tuned 150 steps on the sks dog in the city (bench: 600 steps)."""
    personalized = toylab.finetune(lab.clip, steps=150, cache=False, log=lambda *_: None)
    prompt, template = toylab.prompts(SNOW)
    positive, vanilla, negative = lab.encode(prompt), lab.encode(template), lab.encode("")

    def stage1(lambda1):
        with torch.inference_mode():
            out = lab.nodes.lnr.StepBlendSampler.execute(lab.vanilla, personalized, vanilla, negative, positive, negative,
                                                         {"samples": torch.zeros(SEEDS, 4, 16, 16)}, SEED, STEPS, CFG,
                                                         "ddim", "ddim_uniform", lambda1).args[0]["samples"]
        return context_of(lab, out, SNOW)["context"].mean().item()

    overfit, blended = stage1(0), stage1(5)
    print(f"\ncontext accuracy: λ1 0 {overfit:.2f}, λ1 5 {blended:.2f}")
    assert blended >= overfit + 0.5
