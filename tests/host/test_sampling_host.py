"""The pack's own loops inside the host's sampling machinery (nodes/sampling.py), on the tiny models."""
import copy

import pytest
import torch


@pytest.fixture(scope="module")
def parts(host, pack):
    import tiny_models
    model, clip, vae = tiny_models.tiny_sd1()

    def encode(text):
        out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
        return [[out["cond"], {"pooled_output": out["pooled_output"]}]]
    return pack("nodes.sampling"), model, encode("a photo of a dog"), encode("")


def sigmas_for(model, steps):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)


def test_own_euler_loop_reproduces_the_host_sampler_exactly(parts):
    import comfy.sample
    sampling, model, pos, neg = parts
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros_like(noise)

    def euler(loop, x, sigmas):
        for i in range(len(sigmas) - 1):
            denoised = loop.cfg_denoise(x, sigmas[i])
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x, None

    with torch.inference_mode():
        ours, _ = sampling.run_loop(model, pos, neg, latent, sigmas_for(model, 6), euler, noise=noise, cfg=7.5)
        host = comfy.sample.sample(model, noise, 6, 7.5, "euler", "normal", pos, neg, latent, disable_pbar=True)
    assert torch.equal(ours, host)


def test_gradients_through_the_unet_match_finite_differences(parts):
    sampling, model, pos, neg = parts
    before = copy.deepcopy(model.model_options), dict(model.weight_wrapper_patches)
    fresh = sampling.gradient_model(model)
    sigma = sigmas_for(model, 10)[3]
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    direction = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))

    def probe(loop, x, sigmas):
        def f(z, ctx=None):
            return (loop.denoise(z, sigma, "positive", context=ctx) * direction).sum()
        with sampling.grad_enabled():
            z = x.detach().clone().requires_grad_(True)
            ctx = loop.context("negative").detach().clone().requires_grad_(True)
            gx, = torch.autograd.grad(f(z), z)
            gc, = torch.autograd.grad(f(z, ctx), ctx)
        eps = 1e-3
        fd = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
        same = torch.equal(loop.denoise(x, sigma, "negative"), loop.denoise(x, sigma, "positive", context=loop.context("negative")))
        return x, ((gx * direction).sum(), fd, gc, same)

    with torch.inference_mode():
        _, (analytic, numeric, gc, same) = sampling.run_loop(fresh, pos, neg, x0, sigmas_for(model, 10)[3:], probe)
    assert torch.isfinite(analytic) and abs(analytic - numeric) <= 2e-3 * abs(numeric) + 1e-4
    assert torch.isfinite(gc).all() and gc.abs().max() > 0, "the text embedding must receive gradient (null-text inversion)"
    assert same, "a replaced context must act exactly like the branch it came from"
    assert repr((model.model_options, dict(model.weight_wrapper_patches))) == repr(before)
