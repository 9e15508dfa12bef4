import pytest
import torch

from comfyui_personalize.guidance.pnd import APPEARANCE_WINDOW, LAYOUT_WINDOW, guided_update, step_window

SIGMA = torch.tensor([14.6, 3.0, 0.4], dtype=torch.float64)       # one σ per batch item


def toy_loss(x):
    """Per-item smooth loss of the σ-space latent, standing in for ℓ_t through the UNet."""
    w = torch.linspace(0.5, 2.0, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return (w * torch.sin(x) ** 2).flatten(1).sum(1) + x.flatten(1).pow(3).mean(1)


def grad_x(x):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(toy_loss(x).sum(), x)[0]


def vp_reference(x, sigma, eta, normalise):
    """Eq. 10 where the paper states it: on z = x/√(1+σ²), with ∇_z, then mapped back to x."""
    s = (1 + sigma ** 2).sqrt().reshape(-1, 1, 1, 1)
    z = (x / s).requires_grad_(True)
    grad_z = torch.autograd.grad(toy_loss(z * s).sum(), z)[0]
    if normalise:
        grad_z = grad_z / grad_z.pow(2).flatten(1).mean(1).sqrt().reshape(-1, 1, 1, 1)
    return (z - eta * grad_z).detach() * s


@pytest.fixture
def x():
    return torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("normalise", [False, True])
def test_guided_update_equals_eq10_in_vp_space(x, normalise):
    new, skipped = guided_update(x, grad_x(x), SIGMA, 0.05, normalise=normalise)
    assert torch.allclose(new, vp_reference(x, SIGMA, 0.05, normalise), rtol=1e-12, atol=1e-12)
    assert not skipped.any()


def test_scalar_sigma_equals_per_item_sigma(x):
    per_item, _ = guided_update(x, grad_x(x), torch.full((3,), 2.0, dtype=torch.float64), 0.1)
    assert torch.allclose(guided_update(x, grad_x(x), 2.0, 0.1)[0], per_item, rtol=1e-14)


def test_normalised_step_moves_the_vp_latent_by_eta_rms(x):
    new, _ = guided_update(x, grad_x(x), SIGMA, 0.05)
    dz = (new - x) / (1 + SIGMA ** 2).sqrt().reshape(-1, 1, 1, 1)
    assert torch.allclose(dz.pow(2).flatten(1).mean(1).sqrt(), torch.full((3,), 0.05, dtype=torch.float64))


def test_normalised_step_is_independent_of_the_loss_scale(x):
    g = grad_x(x)
    assert torch.allclose(guided_update(x, g, SIGMA, 0.05)[0], guided_update(x, 1e-6 * g, SIGMA, 0.05)[0])


def test_a_small_normalised_step_decreases_every_items_loss(x):
    new, _ = guided_update(x, grad_x(x), SIGMA, 1e-3)
    assert torch.all(toy_loss(new) < toy_loss(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("normalise", [False, True])
def test_non_finite_items_are_skipped_not_propagated(x, bad, normalise):
    g = grad_x(x)
    g[1, 2, 3, 4] = bad
    new, skipped = guided_update(x, g, SIGMA, 0.05, normalise=normalise)
    assert skipped.tolist() == [False, True, False]
    assert torch.isfinite(new).all()
    assert torch.equal(new[1], x[1])
    assert torch.equal(new[[0, 2]], guided_update(x[[0, 2]], g[[0, 2]], SIGMA[[0, 2]], 0.05, normalise)[0])


def test_zero_gradient_leaves_x_unchanged(x):
    new, skipped = guided_update(x, torch.zeros_like(x), SIGMA, 0.05)
    assert torch.equal(new, x) and not skipped.any()


def schedule(n):
    """A strictly decreasing σ schedule ending in 0, like the host's SIGMAS."""
    return torch.cat([torch.logspace(1.16, -1.5, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def steps(mask):
    return mask.nonzero().flatten().tolist()


def test_paper_windows_on_50_steps():
    sigmas = schedule(50)
    assert steps(step_window(sigmas, *LAYOUT_WINDOW)) == list(range(0, 10))
    assert steps(step_window(sigmas, *APPEARANCE_WINDOW)) == list(range(10, 20))
    assert step_window(sigmas, 0, 1).all() and step_window(sigmas, 0, 1).shape == (50,)
    assert not step_window(sigmas, 0.3, 0.3).any()


@pytest.mark.parametrize("n, layout, appearance", [(30, range(0, 6), range(6, 12)), (7, range(0, 2), range(2, 3))])
def test_windows_scale_with_the_step_count(n, layout, appearance):
    sigmas = schedule(n)
    assert steps(step_window(sigmas, *LAYOUT_WINDOW)) == list(layout)
    assert steps(step_window(sigmas, *APPEARANCE_WINDOW)) == list(appearance)


def test_truncated_schedule_keeps_the_full_schedules_sigma_range():
    # the host's denoise 0.9 at 45 steps: the last 46 σ's of a 50-step schedule, step i = full step i + 5
    full = schedule(50)
    tail = full[-46:].clone()
    assert steps(step_window(tail, *LAYOUT_WINDOW, full_sigmas=full)) == list(range(0, 5))
    assert steps(step_window(tail, *APPEARANCE_WINDOW, full_sigmas=full)) == list(range(5, 15))
    # denoise 0.5: the run starts below both windows
    assert not step_window(full[-26:], *APPEARANCE_WINDOW, full_sigmas=full).any()


def test_window_rejects_bad_fractions():
    with pytest.raises(ValueError):
        step_window(schedule(10), 0.5, 0.2)
