"""PALP prompt-aligned personalization losses (arXiv 2401.06105, §4.2-4.4, Eq. 1, 2, 5, 6, 7).

Space: this whole module works in the host's sigma-space, where a noisy latent is
``x_t = x_0 + σ ε`` (EPS model; ComfyUI's ``noise_scaling`` / ``calculate_denoised``). The paper's
VP latent is ``x_vp = √ᾱ x_0 + √(1−ᾱ) ε`` with ᾱ = 1 / (1 + σ²), so ``x_vp = √ᾱ · x_t`` and
σ = √(1−ᾱ)/√ᾱ. The estimate x̂_0 (Eq. 2) is the same tensor in both spaces, hence so are the
residual, ∂x̂_0/∂θ and every loss here; only x_t is represented differently.

A training step (one image, one σ, one shared ε) reads:

    x_t      = renoise(x_0, ε, σ)
    eps_pred = personalized(x_t, y_P)                         # with grad: the only θ path
    x0_hat   = predicted_x0(x_t, eps_pred, σ)
    x_hat_t  = renoise(x0_hat.detach(), ε, σ)                 # "same noise" (§4.4)
    with torch.no_grad():                                     # four CFG branches at x̂_t
        r = palp_residual(base(x_hat_t, y_c), base(x_hat_t, ∅),
                          personalized(x_hat_t, y_P), personalized(x_hat_t, ∅), α, β)
    loss = palp_loss(eps_pred, ε, x0_hat, r, σ, alignment_weight)
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """Eq. 2, x̂_0 = (x_vp − √(1−ᾱ) ε) / √ᾱ, written in sigma-space as x̂_0 = x_t − σ ε.

    ``sigma`` is a float, a 0-d tensor or one value per sample ([B]).
    """
    return x_t - _per_sample(sigma, x_t) * eps


def renoise(x0_hat: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x̂_t = x̂_0 + σ ε (the VP √ᾱ x̂_0 + √(1−ᾱ) ε, in sigma-space).

    Pass the ε that made x_t: the paper's "same noise" variant (§4.4), which aligned better
    than a fresh i.i.d. draw. Detach x̂_0 first: the branches evaluated at x̂_t are constants.
    """
    return x0_hat + _per_sample(sigma, x0_hat) * eps


def palp_residual(
    eps_base_cond: torch.Tensor,
    eps_base_uncond: torch.Tensor,
    eps_pers_cond: torch.Tensor,
    eps_pers_uncond: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """r = G^α_θ(x̂_t, y^c) − G^β_θLoRA(x̂_t, y_P), the bracket of Eq. 6, returned detached.

    Each term is Eq. 5's classifier-free guidance ε_u + s (ε_c − ε_u):
    - base (frozen, no LoRA, no learned [V]) on the clean prompt y^c ("a sketch of a cat"),
      scale α;
    - personalized (LoRA + [V]) on y_P ("a photo of [V]"), scale β.
    The unconditional prompt of both is Eq. 5's y = ∅, the empty prompt "" encoded by each
    model's own text encoder (identical unless the text encoder is tuned: "" has no [V]).
    Detached because the whole residual is a stop-gradient constant in Eq. 6, although the
    personalized term depends on θ (the DDS form: only ∂x̂_0/∂θ carries gradient).
    """
    base = _cfg(eps_base_cond, eps_base_uncond, alpha)
    personalized = _cfg(eps_pers_cond, eps_pers_uncond, beta)
    return (base - personalized).detach()


def timestep_weight(sigma, rescale: bool = True) -> torch.Tensor:
    """w̃(t) of Eq. 6, times √ᾱ/√(1−ᾱ) = 1/σ when ``rescale`` (§4.4, last paragraph).

    The paper leaves w̃(t) unspecified; it is 1 here, so the only time dependence is the
    rescale. The rescale multiplies the whole Eq. 6 gradient (the alignment term only, never
    the personalization MSE): by Eq. 7, ∂x̂_0/∂θ = −σ ∂ε*_θ(x_t, y_P)/∂θ, so with the rescale
    the alignment gradient becomes −w̃ r ∂ε*_θ/∂θ, uniform across timesteps. σ must be > 0.
    """
    sigma = torch.as_tensor(sigma)
    return 1 / sigma if rescale else torch.ones_like(sigma)


def palp_alignment_surrogate(
    x0_hat: torch.Tensor, residual: torch.Tensor, weight
) -> torch.Tensor:
    """Scalar S with ∇_θ S = mean-reduced Eq. 6: w · sg(r)ᵀ ∂x̂_0/∂θ / N.

    S = mean(w · sg(r) ⊙ x̂_0), N = x̂_0.numel(). Sign: Eq. 6 is the gradient that the
    optimizer *descends*, so S enters the loss with a plus; a descent step moves x̂_0 along
    −r, i.e. towards the base model's y^c estimate and away from the personalized one
    (x̂_0^base − x̂_0^pers = −σ r at x̂_t). The mean matches ``personalization_loss``'s
    reduction, so the alignment weight compares per-element gradients of the two terms.
    ``weight`` is a float, 0-d or per-sample [B] tensor (e.g. ``timestep_weight(σ)``).
    S's value has no meaning; only its gradient does.
    """
    return (_per_sample(weight, x0_hat) * residual.detach() * x0_hat).mean()


def personalization_loss(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 1 on the subject images, ‖ε*_θ(x_t, y_P) − ε‖², mean over all elements."""
    return F.mse_loss(eps_pred, eps)


def palp_loss(
    eps_pred: torch.Tensor,
    eps: torch.Tensor,
    x0_hat: torch.Tensor,
    residual: torch.Tensor,
    sigma,
    alignment_weight: float,
    rescale: bool = True,
) -> torch.Tensor:
    """Personalization MSE + alignment_weight · Eq. 6 surrogate (the paper gives no weight).

    ``x0_hat`` must be ``predicted_x0(x_t, eps_pred, sigma)`` from the same forward pass, so
    the alignment term reuses the personalization branch's graph (Eq. 7: no extra backward).
    """
    alignment = palp_alignment_surrogate(x0_hat, residual, timestep_weight(sigma, rescale))
    return personalization_loss(eps_pred, eps) + alignment_weight * alignment


def _cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 5, (1 − s) ε_u + s ε_c, as ε_u + s (ε_c − ε_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample [B] value shaped to broadcast against ``like`` [B, ...]."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.view(-1, *([1] * (like.dim() - 1))) if value.dim() == 1 else value


# --- the trainable adapter ------------------------------------------------------------------------


class LoRAAdapter(torch.nn.Module):
    """LoRA (Hu et al. 2022, PALP §4.1) of one projection h = W x: h = W x + (alpha/rank)·up(down x), switchable off.

    Two ways to apply it: ``branch(x)`` is the low-rank branch, computed in fp32 (what training adds to the
    base projection, so a bf16 UNet sees the adapter from the first step); called on a weight, it is a host
    weight wrapper W ↦ W + (alpha/rank)·up@down merged in fp32 and cast to the weight's dtype. A wrapper sees
    the stored weight, before an op's own scaling (a scaled-fp8 layer multiplies W + ΔW by its scale_weight),
    so the trained MODEL is never built from wrappers: it is the saved LoRA through the host's loader. Off,
    both leave the base projection alone: the frozen pre-trained model G_θ of Eq. 6.
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float):
        super().__init__()
        self.down = torch.nn.Parameter(down)
        self.up = torch.nn.Parameter(up)
        self.alpha = alpha
        self.enabled = True

    @classmethod
    def create(cls, weight_shape, rank: int, gen: torch.Generator, device) -> "LoRAAdapter":
        """down ~ U(±1/√fan_in) (PyTorch's Linear init), up = 0: training starts at the base model."""
        out_features, in_features = weight_shape[0], math.prod(weight_shape[1:])
        bound = 1 / math.sqrt(in_features)
        down = (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound
        return cls(down.to(device), torch.zeros(out_features, rank, device=device), float(rank))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/rank)·up(down x) in fp32, x [..., in_features] (the caller honours ``enabled``)."""
        down, up = self.down.to(x.device, torch.float32), self.up.to(x.device, torch.float32)
        return F.linear(F.linear(x.float(), down), up) * (self.alpha / self.rank)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        delta = (self.up.to(weight.device) @ self.down.to(weight.device)) * (self.alpha / self.rank)
        return weight + delta.reshape(weight.shape).to(weight.dtype)


@contextlib.contextmanager
def adapters_off(adapters):
    """The frozen base model of Eq. 6 (G_θ with no LoRA), on the same clone."""
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True
