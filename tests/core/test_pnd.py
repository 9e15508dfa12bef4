import pytest
import torch

from comfyui_personalize.attention.store import LiveCapture
from comfyui_personalize.guidance.losses import layout_loss
from comfyui_personalize.guidance.pnd import AppearanceTerm, LayoutTerm, guided_update, sample_guided

SIGMA = torch.tensor([14.6, 3.0, 0.4], dtype=torch.float64)       # one σ per batch item


def toy_loss(x):
    """Per-item smooth loss of the σ-space latent, standing in for ℓ_t through the UNet."""
    w = torch.linspace(0.5, 2.0, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return (w * torch.sin(x) ** 2).flatten(1).sum(1) + x.flatten(1).pow(3).mean(1)


def grad_x(x):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(toy_loss(x).sum(), x)[0]


def vp_reference(x, sigma, eta, normalise, sigma_data=1.0):
    """Eq. 10 where the paper states it: on the model's input z = x/√(σ_d²+σ²) (the VP latent z = x/√(1+σ²) for
    SD's σ_d = 1), with ∇_z, then mapped back to x."""
    s = (sigma_data ** 2 + sigma ** 2).sqrt().reshape(-1, 1, 1, 1)
    z = (x / s).requires_grad_(True)
    grad_z = torch.autograd.grad(toy_loss(z * s).sum(), z)[0]
    if normalise:
        grad_z = grad_z / grad_z.pow(2).flatten(1).mean(1).sqrt().reshape(-1, 1, 1, 1)
    return (z - eta * grad_z).detach() * s


@pytest.fixture
def x():
    return torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])        # SD1.x/SDXL; an EDM model such as Playground v2.5
@pytest.mark.parametrize("normalise", [False, True])
def test_guided_update_equals_eq10_in_vp_space(x, normalise, sigma_data):
    new, skipped = guided_update(x, grad_x(x), SIGMA, 0.05, normalise=normalise, sigma_data=sigma_data)
    assert torch.allclose(new, vp_reference(x, SIGMA, 0.05, normalise, sigma_data), rtol=1e-12, atol=1e-12)
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


def test_eta_zero_is_the_plain_euler_loop_bit_for_bit():
    sigmas = torch.tensor([14.6, 6.0, 2.0, 0.5, 0.0])
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    denoise = lambda x, s: 0.7 * x / (1 + s ** 2).sqrt()
    calls = []
    out = sample_guided(denoise, x0 * 14.6, sigmas, lambda x, s: calls.append(s), eta=0.0)
    x = x0 * 14.6
    for i in range(4):                       # the host's sample_euler, written out
        d = (x - denoise(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    assert torch.equal(out, x) and calls == []


def test_guidance_moves_x_only_where_a_gradient_is_given():
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    target = torch.zeros(1, 4, 4, 4)
    def grad(x, s):
        return ([x - target], [1.0]) if s > 4 else None   # a window covering the first two steps
    seen = []
    sample_guided(lambda x, s: x * 0, torch.ones(1, 4, 4, 4), sigmas, grad, eta=0.1,
                  callback=lambda info: seen.append(info["x"].clone()))
    ones = torch.ones(1, 4, 4, 4)
    assert torch.allclose(seen[0], guided_update(ones, ones, 10.0, 0.1)[0])
    assert (seen[0] < 1).all()


def toy_loss_2(x):
    """A second per-item loss, standing in for the other term (ℓ_lay beside ℓ_app)."""
    return (x - 0.3).pow(2).flatten(1).sum(1) * 1e-4


def grad_of(loss, x):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(loss(x).sum(), x)[0]


def test_normalised_weights_scale_each_terms_step_exactly(x):
    """Issue 10: with normalise on, α and β mean something. A lone term's step is η·w in RMS (doubling w doubles it,
    exactly), and with two terms each one's step is its own normalised gradient times its weight, whatever the two
    losses' scales (here 1e4 apart)."""
    g1, g2 = grad_of(toy_loss, x), grad_of(toy_loss_2, x)
    step = lambda grads, weights: x - guided_update(x, grads, SIGMA, 0.05, True, weights)[0]
    one, two = step([g1], [1.0]), step([g1], [2.0])
    assert torch.allclose(two, 2 * one, rtol=1e-12, atol=0)
    dz = two / (1 + SIGMA ** 2).sqrt().reshape(-1, 1, 1, 1)
    assert torch.allclose(dz.pow(2).flatten(1).mean(1).sqrt(), torch.full((3,), 0.1, dtype=torch.float64))
    both, alpha_doubled = step([g1, g2], [1.0, 1.0]), step([g1, g2], [2.0, 1.0])
    assert torch.allclose(alpha_doubled - both, one, rtol=1e-10, atol=1e-14), "doubling α adds exactly its term's step"
    assert torch.allclose(both, one + step([g2], [1.0]), rtol=1e-10, atol=1e-14)


def test_unnormalised_weighted_terms_are_eq10_of_the_weighted_loss(x):
    """normalise off stays exact to Eq. 9–10: the step of (α, β) per-term gradients is the step of ∇(αℓ_1 + βℓ_2)."""
    new, _ = guided_update(x, [grad_of(toy_loss, x), grad_of(toy_loss_2, x)], SIGMA, 0.05, False, [0.7, 3.0])
    s = (1 + SIGMA ** 2).sqrt().reshape(-1, 1, 1, 1)
    z = (x / s).requires_grad_(True)
    grad_z = torch.autograd.grad((0.7 * toy_loss(z * s) + 3.0 * toy_loss_2(z * s)).sum(), z)[0]
    assert torch.allclose(new, (z - 0.05 * grad_z).detach() * s, rtol=1e-12, atol=1e-12)


def test_an_item_is_skipped_when_any_terms_gradient_is_not_finite(x):
    g1, g2 = grad_of(toy_loss, x), grad_of(toy_loss_2, x)
    g2[2, 0, 0, 0] = float("nan")
    new, skipped = guided_update(x, [g1, g2], SIGMA, 0.05, True, [1.0, 1.0])
    assert skipped.tolist() == [False, False, True] and torch.equal(new[2], x[2]) and torch.isfinite(new).all()


def slow_uremd(ref, gen):
    cos = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(r, g, dim=0) for r in ref]) for g in gen])
    return (1 - cos).min(dim=1).values.mean()


def test_appearance_term_is_the_layer_mean_of_uremd_over_masked_vectors():
    g = torch.Generator().manual_seed(3)
    keys = [("output", 6, 0), ("output", 7, 0)]
    palette = [{k: torch.randn(5, 8, generator=g) for k in keys}, {k: torch.randn(7, 8, generator=g) for k in keys}]
    term = AppearanceTerm(9.0, 3.0, 1.0, [8.0, 4.0], keys, palette, tau=0.5)
    live = LiveCapture(maps={k: torch.rand(2, 1, 4, 4, generator=g) for k in keys},
                       features={k: torch.randn(2, 4, 4, 8, generator=g) for k in keys})
    loss = term.loss(4.0, live)
    for b in range(2):
        ref = torch.stack([slow_uremd(palette[1][k], live.features[k][b][live.maps[k][b, 0] >= 0.5]) for k in keys]).mean()
        assert torch.allclose(loss[b], ref, atol=1e-5)
    assert term.active(8.0) and term.active(4.0) and not term.active(3.0) and not term.active(9.5)
    assert term.missing([12.0, 8.0, 6.0, 4.0, 2.0, 0.0]) == [6.0]


def test_layout_term_matches_layout_loss_and_broadcasts_a_one_item_template():
    g = torch.Generator().manual_seed(4)
    keys = [("input", 1, 0), ("middle", 0, 0)]
    template = {keys[0]: torch.rand(1, 8, 8, generator=g), keys[1]: torch.rand(1, 2, 2, generator=g)}
    term = LayoutTerm(99.0, 5.0, 1.0, [10.0], keys, [template])
    live = LiveCapture(maps={keys[0]: torch.rand(3, 1, 8, 8, generator=g), keys[1]: torch.rand(3, 1, 2, 2, generator=g)})
    expected = layout_loss([live.maps[k][:, 0] for k in keys], [template[k] for k in keys])
    assert torch.equal(term.loss(10.0, live), expected) and expected.shape == (3,)


def test_an_empty_generated_set_is_reported_not_silent():
    """Issue 9 §3: an item whose subject attention reaches τ nowhere adds 0 to the layer mean, and the caller hears of it."""
    keys = [("output", 6, 0), ("output", 7, 0)]
    g = torch.Generator().manual_seed(5)
    term = AppearanceTerm(9.0, 3.0, 1.0, [4.0], keys, [{k: torch.randn(5, 8, generator=g) for k in keys}], tau=0.5)
    maps = {k: torch.rand(2, 1, 4, 4, generator=g) for k in keys}
    maps[keys[1]][1] = 0.1                                 # item 1 never attends in layer 2
    live = LiveCapture(maps=maps, features={k: torch.randn(2, 4, 4, 8, generator=g) for k in keys})
    empty = []
    loss = term.loss(4.0, live, lambda key, b: empty.append((key, b)))
    assert empty == [(keys[1], 1)]
    only_first = slow_uremd(term.palette[0][keys[0]], live.features[keys[0]][1][maps[keys[0]][1, 0] >= 0.5])
    assert torch.allclose(loss[1], only_first / 2, atol=1e-5)
