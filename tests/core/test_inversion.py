import importlib

import pytest
import torch

from comfyui_personalize.guidance.inversion import cfg_combine, ddim_invert, ddim_step, null_text_invert, replay

SHAPE = (1, 4, 4, 4)


def sd_sigmas(n):
    """SD1.x's discrete schedule (scaled-linear betas) at n evenly spaced timesteps, then 0."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    idx = torch.linspace(999, 0, n, dtype=torch.float64).round().long()
    return torch.cat([sigmas[idx], sigmas.new_zeros(1)])


class GaussianDenoiser(torch.nn.Module):
    """The exact x0 predictor for data ~ N(μ(ctx), s²) in σ-space, with a context-dependent mean.

    μ(ctx) = tanh(ctx · A) makes the prediction depend on the prompt, so CFG at 7.5 pulls the
    trajectory far from what a guidance-1 inversion recorded; a small nonlinearity in x keeps the
    flow from being linear.
    """

    def __init__(self, ctx_numel=96, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = torch.Size(SHAPE).numel()
        self.a = torch.nn.Parameter(torch.randn(ctx_numel, n, generator=g, dtype=torch.float64) * 3 / ctx_numel ** 0.5)
        self.s = 0.5 + torch.rand(SHAPE, generator=g, dtype=torch.float64)

    def forward(self, x, sigma, ctx):
        a, s = self.a.to(x.dtype), self.s.to(x.dtype)
        mu = torch.tanh(ctx.reshape(-1).to(x.dtype) @ a).reshape(SHAPE)
        k = s ** 2 / (s ** 2 + sigma ** 2)
        return mu + k * (x - mu) + 0.05 * sigma / (1 + sigma) * torch.tanh(x)


def contexts(seed=1):
    """(cond, uncond): prompt embeddings small against the toy's sensitivity, as SD's are."""
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(1, 6, 16, generator=g), 0.1 * torch.randn(1, 6, 16, generator=g)


def clean_latent(seed=2):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_ddim_step_is_the_hosts_euler_step_and_lands_on_x0_at_zero():
    x, d = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    sigma, sigma_next = torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.2, dtype=torch.float64)
    assert torch.allclose(ddim_step(x, d, sigma, sigma_next), x + (x - d) / sigma * (sigma_next - sigma), rtol=1e-14)
    assert torch.equal(ddim_step(x, d, sigma, torch.tensor(0.0, dtype=torch.float64)), d)


def test_ddim_step_is_vp_ddim():
    """Song et al. Eq. 12 (η = 0) on z = x/√(1+σ²) with ᾱ = 1/(1+σ²)."""
    x, d = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    sigma, sigma_next = torch.tensor(4.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    a, a_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    z = x * a.sqrt()
    eps = (z - a.sqrt() * d) / (1 - a).sqrt()
    z_next = a_next.sqrt() * d + (1 - a_next).sqrt() * eps
    assert torch.allclose(ddim_step(x, d, sigma, sigma_next), z_next / a_next.sqrt(), rtol=1e-13)


def test_cfg_combine_equals_cfg_on_eps():
    x, dc, du = (torch.randn(4, dtype=torch.float64) for _ in range(3))
    sigma, scale = 2.5, 7.5
    eps_c, eps_u = (x - dc) / sigma, (x - du) / sigma
    assert torch.allclose(cfg_combine(dc, du, scale), x - sigma * (eps_u + scale * (eps_c - eps_u)), rtol=1e-13)


def test_ddim_invert_matches_the_reference_next_step_in_vp_space():
    """The notebook's next_step: ε = ε_θ(z_lo, t_hi); x̂0 = (z_lo − √(1−ᾱ_lo) ε)/√ᾱ_lo;
    z_hi = √ᾱ_hi x̂0 + √(1−ᾱ_hi) ε."""
    model, (cond, _) = GaussianDenoiser(), contexts()
    sigmas, x0 = sd_sigmas(10), clean_latent().double()
    alpha = 1 / (1 + sigmas ** 2)

    def eps_theta(z, k):                    # an EPS UNet's view of the σ-space toy at timestep k
        x = z / alpha[k].sqrt()
        return (x - model(x, sigmas[k], cond)) / sigmas[k]

    z, expected = x0, [x0]
    for k in range(9, -1, -1):
        eps = eps_theta(z, k)
        pred_x0 = (z - (1 - alpha[k + 1]).sqrt() * eps) / alpha[k + 1].sqrt()
        z = alpha[k].sqrt() * pred_x0 + (1 - alpha[k]).sqrt() * eps
        expected.append(z / alpha[k].sqrt())
    trajectory = ddim_invert(model, x0, sigmas, cond)
    assert trajectory.shape == (11, *SHAPE)
    assert torch.allclose(trajectory, torch.stack(expected[::-1]), rtol=1e-10, atol=1e-12)
    assert torch.equal(trajectory[-1], x0)


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_each_inversion_step_shows_the_model_its_last_input_at_the_next_sigma(sigma_data):
    """The reference's next_step feeds the UNet z_lo with timestep t_hi: in σ-space the model's input, x/√(σ_d²+σ²)
    (the host's calculate_input), at σ_hi equals the current latent's at σ_lo. With an EDM model's σ_d ≠ 1
    (Playground v2.5: 0.5) the SD scaling √((1+σ_hi²)/(1+σ_lo²)) showed it another input."""
    model, (cond, _) = GaussianDenoiser(), contexts()
    sigmas, x0 = sd_sigmas(10), clean_latent().double()
    seen = {}

    def recording(x, sigma, c):
        seen[float(sigma)] = x / (sigma_data ** 2 + sigma ** 2).sqrt()
        return model(x, sigma, c)
    trajectory = ddim_invert(recording, x0, sigmas, cond, sigma_data=sigma_data)
    for k in range(10):
        expected = trajectory[k + 1] / (sigma_data ** 2 + sigmas[k + 1] ** 2).sqrt()
        assert torch.allclose(seen[float(sigmas[k])], expected, rtol=1e-12, atol=1e-12)


def test_ddim_inversion_then_sampling_reconstructs_to_first_order():
    model, (cond, _) = GaussianDenoiser(), contexts()
    x0 = clean_latent()
    errors = []
    for n in (25, 50, 100):
        sigmas = sd_sigmas(n)
        trajectory = ddim_invert(model, x0, sigmas, cond)
        assert trajectory.dtype == torch.float32 and trajectory[0].std() > 5   # x_T at σ_max's scale
        rec = replay(model, trajectory[0], sigmas, cond, None, cfg=1.0)
        assert rec.shape == trajectory.shape and torch.equal(rec[0], trajectory[0])
        errors.append(((rec[-1] - x0).norm() / x0.norm()).item())
    assert errors[1] < 0.03
    assert errors[2] < 0.6 * errors[1] and errors[1] < 0.6 * errors[0]     # DDIM is first order


def test_null_text_inversion_beats_plain_ddim_inversion_at_cfg():
    model, (cond, uncond) = GaussianDenoiser(), contexts()
    sigmas, x0, n = sd_sigmas(20), clean_latent(), 20
    trajectory = ddim_invert(model, x0, sigmas, cond)
    ddim_rec = replay(model, trajectory[0], sigmas, cond, [uncond] * n, cfg=7.5)[-1]
    nti = null_text_invert(model, trajectory, sigmas, cond, uncond, cfg=7.5)
    err_ddim, err_nti = (ddim_rec - x0).norm() / x0.norm(), (nti.latent - x0).norm() / x0.norm()
    assert err_ddim > 0.3                                      # CFG 7.5 really breaks plain inversion
    assert err_nti < 0.05 and err_nti < err_ddim / 20
    assert nti.null_embeddings.shape == (n, *uncond.shape) and nti.losses.shape == (n,)
    assert model.a.grad is None                                # only ∅_t was differentiated


def test_null_text_losses_are_in_the_models_input_scale():
    """The loss (the reference's early-stop measure) is the MSE of the model's input x/√(σ_d²+σ²): with lr 0 the
    steps are the same, so each loss times σ_d²+σ_next² is the same σ-space MSE for σ_d = 1 and 0.5."""
    model, (cond, uncond) = GaussianDenoiser(), contexts()
    sigmas, x0 = sd_sigmas(5), clean_latent().double()
    trajectory = ddim_invert(model, x0, sigmas, cond)
    mse = [null_text_invert(model, trajectory, sigmas, cond, uncond, lr=0.0, sigma_data=d).losses
           * (d ** 2 + sigmas[1:] ** 2) for d in (1.0, 0.5)]
    assert torch.allclose(mse[0], mse[1], rtol=1e-12) and (mse[0] > 0).all()


def test_replay_of_stored_embeddings_reproduces_nti_exactly():
    model, (cond, uncond) = GaussianDenoiser(), contexts()
    sigmas, x0 = sd_sigmas(8), clean_latent()
    trajectory = ddim_invert(model, x0, sigmas, cond)
    nti = null_text_invert(model, trajectory, sigmas, cond, uncond.half(), cfg=7.5, inner_steps=3)
    assert nti.null_embeddings.dtype == torch.float32          # optimised in fp32 whatever the input
    latents = replay(model, trajectory[0], sigmas, cond, nti.null_embeddings, cfg=7.5)
    assert torch.equal(latents[-1], nti.latent)
    assert torch.equal(latents[0], trajectory[0])


def test_null_text_progress_is_absolute_and_early_stop_jumps():
    model, (cond, uncond) = GaussianDenoiser(), contexts()
    sigmas, x0 = sd_sigmas(5), clean_latent()
    trajectory = ddim_invert(model, x0, sigmas, cond)
    calls = []
    null_text_invert(model, trajectory, sigmas, cond, uncond, inner_steps=4, early_stop=1e9,
                     on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 20), (8, 20), (12, 20), (16, 20), (20, 20)]
    calls.clear()
    null_text_invert(model, trajectory, sigmas, cond, uncond, inner_steps=2, early_stop=-1.0,
                     on_step=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 10) for k in range(1, 11)]


def test_on_step_can_abort():
    model, (cond, uncond) = GaussianDenoiser(), contexts()
    sigmas, x0 = sd_sigmas(5), clean_latent()

    def cancel(done, total):
        if done == 2:
            raise InterruptedError

    for run in (lambda: ddim_invert(model, x0, sigmas, cond, on_step=cancel),
                lambda: null_text_invert(model, ddim_invert(model, x0, sigmas, cond), sigmas, cond, uncond,
                                         on_step=cancel),
                lambda: replay(model, x0, sigmas, cond, None, 1.0, on_step=cancel)):
        with pytest.raises(InterruptedError):
            run()


@pytest.mark.parametrize("n", [10, 50, 120])
def test_null_text_schedule_is_the_reference_codes_literally_at_every_step(monkeypatch, n):
    """prompt-to-prompt's null_optimization, step i: Adam(lr=1e-2·(1 − i/100)), stop once the loss <
    1e-5 + i·2e-5, whatever the step count (issue 11 item 3); lr reaches 0 at step 100: ∅ is kept from there."""
    core = importlib.import_module(null_text_invert.__module__)
    real, used = core._optimise_null, []

    def spy(step_to, target, vp_scale, null, lr, threshold, *rest):
        used.append((lr, threshold))
        return real(step_to, target, vp_scale, null, lr, threshold, *rest)

    monkeypatch.setattr(core, "_optimise_null", spy)
    model, (cond, uncond) = GaussianDenoiser(), contexts()
    sigmas = sd_sigmas(n)
    trajectory = ddim_invert(model, clean_latent(), sigmas, cond)
    calls = []
    nti = null_text_invert(model, trajectory, sigmas, cond, uncond, inner_steps=2,
                           on_step=lambda done, total: calls.append((done, total)))
    optimised = min(n, 100)
    lrs, thresholds = zip(*used)
    assert lrs == pytest.approx([1e-2 * (1 - i / 100) for i in range(optimised)], rel=1e-12)
    assert thresholds == pytest.approx([1e-5 + i * 2e-5 for i in range(optimised)], rel=1e-12)
    if n > 100:
        assert all(torch.equal(null, nti.null_embeddings[99]) for null in nti.null_embeddings[100:])
        assert not torch.equal(nti.null_embeddings[99], nti.null_embeddings[98])
        assert calls[-1] == (2 * n, 2 * n) and torch.isfinite(nti.losses).all()
