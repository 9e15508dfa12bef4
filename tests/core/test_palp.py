"""PALP (Eq. 2, 5, 6, 7) on a toy float64 denoiser with LoRA-like parameters."""
import pytest
import torch

from comfyui_personalize.guidance.palp import (
    palp_alignment_surrogate,
    palp_loss,
    palp_residual,
    personalization_loss,
    predicted_x0,
    renoise,
    timestep_weight,
)

F64 = torch.float64
SHAPE = (2, 2, 3, 3)  # [B, C, H, W]
DIM, COND, RANK = 18, 4, 2
ALPHA, BETA = 7.5, 1.0


def vp_from_sigma(sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's VP schedule at σ, independently of guidance/palp.py: (√ᾱ, √(1−ᾱ)) for ᾱ = 1/(1+σ²)."""
    sigma = torch.as_tensor(sigma)
    scale = torch.rsqrt(1 + sigma**2)
    return scale, sigma * scale


class ToyEps(torch.nn.Module):
    """ε(x, y) = tanh(x (W0 + B A)ᵀ + e_y U) per flattened sample.

    θ = (A, B, v): a rank-2 adapter on the frozen W0 and a learned token vector v added to the
    embedding of y_P = "a photo of [V]". ``personalized=False`` is the frozen base model.
    """

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        rand = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
        self.register_buffer("w0", rand(DIM, DIM) / DIM**0.5)
        self.register_buffer("u", rand(COND, DIM) / COND**0.5)
        self.embed = {"photo": rand(COND), "clean": rand(COND), "empty": torch.zeros(COND, dtype=F64)}
        self.lora_a = torch.nn.Parameter(0.3 * rand(RANK, DIM))
        self.lora_b = torch.nn.Parameter(0.3 * rand(DIM, RANK))
        self.token = torch.nn.Parameter(0.3 * rand(COND))

    def forward(self, x, prompt, personalized=True):
        w, e = self.w0, self.embed[prompt]
        if personalized:
            w = w + self.lora_b @ self.lora_a
            e = e + self.token if prompt == "photo" else e
        return torch.tanh(x.flatten(1) @ w.T + e @ self.u).view_as(x)


def sample_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g, dtype=F64)
    eps = torch.randn(SHAPE, generator=g, dtype=F64)
    sigma = torch.tensor([0.7, 3.0], dtype=F64)
    return x0, eps, sigma


def branches(model, x_hat_t):
    """Eq. 6's four predictions at x̂_t: base on y^c / ∅, personalized on y_P / ∅."""
    return (model(x_hat_t, "clean", personalized=False), model(x_hat_t, "empty", personalized=False),
            model(x_hat_t, "photo"), model(x_hat_t, "empty"))


def forward(model, x0, eps, sigma, track_branches=False):
    """The documented training step up to the loss: (eps_pred, x0_hat, branch predictions)."""
    x_t = renoise(x0, eps, sigma)
    eps_pred = model(x_t, "photo")
    x0_hat = predicted_x0(x_t, eps_pred, sigma)
    with torch.set_grad_enabled(track_branches):
        preds = branches(model, renoise(x0_hat.detach(), eps, sigma))
    return eps_pred, x0_hat, preds


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_vp_from_sigma_matches_alpha_bar():
    sigma = torch.tensor([0.03, 1.0, 14.6], dtype=F64)
    sqrt_a, sqrt_1ma = vp_from_sigma(sigma)
    alpha_bar = 1 / (1 + sigma**2)
    torch.testing.assert_close(sqrt_a**2, alpha_bar, rtol=1e-14, atol=0)
    torch.testing.assert_close(sqrt_1ma**2, 1 - alpha_bar, rtol=1e-12, atol=0)
    torch.testing.assert_close(sqrt_1ma / sqrt_a, sigma, rtol=1e-14, atol=0)


def test_predicted_x0_is_eq2_in_vp_space():
    x_t, eps, sigma = sample_inputs()
    sqrt_a, sqrt_1ma = (s.view(-1, 1, 1, 1) for s in vp_from_sigma(sigma))
    x_vp = sqrt_a * x_t
    torch.testing.assert_close(predicted_x0(x_t, eps, sigma), (x_vp - sqrt_1ma * eps) / sqrt_a,
                               rtol=1e-12, atol=1e-12)


def test_same_noise_renoise_returns_x_t_for_an_exact_denoiser():
    x0, eps, sigma = sample_inputs()
    sqrt_a, sqrt_1ma = (s.view(-1, 1, 1, 1) for s in vp_from_sigma(sigma))
    x_t = (sqrt_a * x0 + sqrt_1ma * eps) / sqrt_a  # the paper's VP x_t, in sigma-space
    oracle_eps = (x_t - x0) / sigma.view(-1, 1, 1, 1)  # identity-like toy: recovers ε exactly
    x0_hat = predicted_x0(x_t, oracle_eps, sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(renoise(x0_hat, eps, sigma), x_t, rtol=0, atol=1e-12)


def test_residual_is_eq5_cfg_difference_and_detached():
    g = torch.Generator().manual_seed(3)
    bc, bu, pc, pu = (torch.randn(SHAPE, generator=g, dtype=F64, requires_grad=True) for _ in range(4))
    r = palp_residual(bc, bu, pc, pu, ALPHA, BETA)
    want = ((1 - ALPHA) * bu + ALPHA * bc) - ((1 - BETA) * pu + BETA * pc)
    torch.testing.assert_close(r, want.detach(), rtol=1e-12, atol=1e-12)
    assert not r.requires_grad


def test_timestep_weight_is_sqrt_alpha_bar_over_sqrt_one_minus():
    sigma = torch.tensor([0.1, 2.0], dtype=F64)
    sqrt_a, sqrt_1ma = vp_from_sigma(sigma)
    torch.testing.assert_close(timestep_weight(sigma), sqrt_a / sqrt_1ma, rtol=1e-14, atol=0)
    assert torch.equal(timestep_weight(sigma, rescale=False), torch.ones_like(sigma))


def test_surrogate_sign_and_normalisation():
    """∂S/∂x̂_0 = +w r / N: descending S moves x̂_0 along −r (Eq. 6)."""
    x0_hat = torch.randn(SHAPE, dtype=F64, requires_grad=True)
    r = torch.randn(SHAPE, dtype=F64)
    w = torch.tensor([0.5, 2.0], dtype=F64)
    palp_alignment_surrogate(x0_hat, r, w).backward()
    torch.testing.assert_close(x0_hat.grad, w.view(-1, 1, 1, 1) * r / r.numel(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("rescale", [True, False])
def test_surrogate_gradient_matches_central_finite_differences(rescale):
    model = ToyEps()
    x0, eps, sigma = sample_inputs()
    _, x0_hat, preds = forward(model, x0, eps, sigma)
    r = palp_residual(*preds, ALPHA, BETA)
    w = timestep_weight(sigma, rescale).view(-1, 1, 1, 1)
    got = torch.cat([g.flatten() for g in grads(model, palp_alignment_surrogate(x0_hat, r, w.flatten()))])

    x_t = renoise(x0, eps, sigma)
    h, want = 1e-6, []
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            for i in range(flat.numel()):
                flat[i] += h
                plus = predicted_x0(x_t, model(x_t, "photo"), sigma)
                flat[i] -= 2 * h
                minus = predicted_x0(x_t, model(x_t, "photo"), sigma)
                flat[i] += h
                jacobian_column = (plus - minus) / (2 * h)  # ∂x̂_0/∂θ_i
                want.append((w * r * jacobian_column).sum() / r.numel())
    want = torch.stack(want)
    assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_rescaled_gradient_is_eq7_uniform_in_sigma():
    """With the √ᾱ/√(1−ᾱ) rescale the alignment gradient is −w̃ rᵀ ∂ε*_θ(x_t, y_P)/∂θ / N."""
    model = ToyEps()
    x0, eps, sigma = sample_inputs()
    eps_pred, x0_hat, preds = forward(model, x0, eps, sigma)
    r = palp_residual(*preds, ALPHA, BETA)
    got = torch.autograd.grad(palp_alignment_surrogate(x0_hat, r, timestep_weight(sigma)),
                              list(model.parameters()), retain_graph=True)
    want = torch.autograd.grad(eps_pred, list(model.parameters()), grad_outputs=-r / r.numel())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_alignment_weight_zero_is_plain_lora_training():
    model = ToyEps()
    x0, eps, sigma = sample_inputs()
    eps_pred, x0_hat, preds = forward(model, x0, eps, sigma)
    r = palp_residual(*preds, ALPHA, BETA)
    total = grads(model, palp_loss(eps_pred, eps, x0_hat, r, sigma, alignment_weight=0.0))

    eps_pred, _, _ = forward(model, x0, eps, sigma)
    plain = grads(model, personalization_loss(eps_pred, eps))
    assert all(torch.equal(a, b) for a, b in zip(total, plain))
    assert any(a.abs().sum() > 0 for a in plain)


def test_no_gradient_flows_into_the_residual_branches():
    model = ToyEps()
    x0, eps, sigma = sample_inputs()
    eps_pred, x0_hat, preds = forward(model, x0, eps, sigma, track_branches=True)
    assert preds[2].requires_grad and preds[3].requires_grad  # personalized: depend on θ
    for p in preds:
        if p.requires_grad:
            p.retain_grad()
    base = preds[1] + ALPHA * (preds[0] - preds[1])  # residual built by hand, not detached
    personalized = preds[3] + BETA * (preds[2] - preds[3])
    tracked = grads(model, palp_loss(eps_pred, eps, x0_hat, base - personalized, sigma, 1.0))
    assert all(p.grad is None for p in preds)

    eps_pred, x0_hat, preds = forward(model, x0, eps, sigma)  # branches under no_grad
    r = palp_residual(*preds, ALPHA, BETA)
    untracked = grads(model, palp_loss(eps_pred, eps, x0_hat, r, sigma, 1.0))
    for a, b in zip(tracked, untracked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
