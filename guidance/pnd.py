"""Pick-and-Draw's guided sampling (Eq. 9–10, App. D) in the host's σ-space: the two guidance terms,
the guided latent update and the sampler loop.

Windows are in the host's percent units (``model_sampling.percent_to_sigma``, as the host's
timestep-range conditioning uses them), turned into σ bounds by the caller: P&D's steps [0, 10)
and [10, 20) of 50 DDIM steps are exactly [0, 0.2) and [0.2, 0.4) on the ``ddim_uniform``
schedule, and keep their meaning for other step counts, schedulers and denoise < 1.
"""
from dataclasses import dataclass

import torch

from .losses import layout_loss, masked_vectors, uremd_loss

LAYOUT_WINDOW = (0.0, 0.2)       # P&D Fig. 8: layout guidance on steps [0, 10) of 50
APPEARANCE_WINDOW = (0.2, 0.4)   # appearance guidance on steps [10, 20) of 50


def guided_update(x, grad, sigma, eta, normalise=True):
    """P&D Eq. 10, z ← z − η_g ∇_z ℓ, applied to the host's σ-space latent x (methods.md §1.5).

    Derivation: the sampler's x = z·s with s = √(1+σ²), so ∇_z ℓ = s·∇_x ℓ and Eq. 10 becomes
    x ← s·(x/s − η s ∇_x ℓ) = x − η (1+σ²) ∇_x ℓ. That is ``normalise=False``, the paper's exact form,
    where η carries the loss's scale.

    ``normalise=True`` (default) is the scale-free form: the z-step is η·∇_z ℓ / RMS(∇_z ℓ) per batch
    item, i.e. every item's VP latent moves by exactly η in RMS whatever its loss's magnitude. The
    RMS division cancels the chain-rule factor s, and mapping the step back to x brings one s, so
    x ← x − η √(1+σ²) ∇_x ℓ / RMS(∇_x ℓ). Only the direction of Eq. 10 is kept; η is in units of the
    unit-variance latent z, comparable across steps and models.

    ``sigma`` and ``eta`` are scalars or per-item ``[B]``. An item whose gradient is not finite is
    returned unchanged, as is one with an all-zero gradient; returns ``(x_new, skipped)`` with
    ``skipped`` the boolean ``[B]`` mask of non-finite items (for the caller to warn about).
    """
    per_item = (-1,) + (1,) * (x.dim() - 1)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(per_item)
    eta = torch.as_tensor(eta, dtype=x.dtype, device=x.device).reshape(per_item)
    finite = torch.isfinite(grad).flatten(1).all(dim=1)
    grad = torch.where(finite.reshape(per_item), grad, torch.zeros_like(grad))
    if normalise:
        wide = grad.to(torch.promote_types(grad.dtype, torch.float32))
        rms = wide.square().flatten(1).mean(dim=1).sqrt().reshape(per_item).to(x.dtype)
        step = eta * (1 + sigma ** 2).sqrt() * grad / torch.where(rms > 0, rms, torch.ones_like(rms))
    else:
        step = eta * (1 + sigma ** 2) * grad
    return x - step, ~finite




def _match(sigmas: list[float], sigma: float) -> int | None:
    for i, s in enumerate(sigmas):
        if abs(s - sigma) <= 1e-3 * max(s, 1e-3):
            return i
    return None


@dataclass
class _Term:
    sigma_start: float      # the window is σ_end < σ ≤ σ_start (its start is the noisier end)
    sigma_end: float
    weight: float
    sigmas: list[float]     # σ of every step the term holds data for
    layers: list            # layer keys

    def active(self, sigma: float) -> bool:
        return self.sigma_end < sigma <= self.sigma_start

    def missing(self, schedule: list[float]) -> list[float]:
        """σ of the schedule's steps inside the window that this term holds no data for."""
        return [s for s in schedule[:-1] if self.active(s) and _match(self.sigmas, s) is None]


@dataclass
class AppearanceTerm(_Term):
    """P&D §3.2: the palette V^ref_l (masked features of the reference's pivots) per step and layer."""
    palette: list           # per step: {layer key: [n, C]}
    tau: float

    def loss(self, sigma: float, live) -> torch.Tensor:
        """ℓ_app per batch item: UREMD (Eq. 6) of each layer's masked features, mean over layers."""
        ref = self.palette[_match(self.sigmas, sigma)]
        per_layer = []
        for key in self.layers:
            feats, maps = live.features[key], live.maps[key]
            per_layer.append(torch.stack([
                uremd_loss(ref[key], masked_vectors(feats[b].flatten(0, 1), maps[b, 0] >= self.tau))
                for b in range(feats.shape[0])]))
        return torch.stack(per_layer).mean(0)


@dataclass
class LayoutTerm(_Term):
    """P&D §3.3: the vanilla template's maps Â^temp_l of the subject per step and layer ([B or 1, h, w])."""
    maps: list              # per step: {layer key: [B, h, w]}
    kernel_size: int = 3
    smooth_sigma: float = 0.5

    def loss(self, sigma: float, live) -> torch.Tensor:
        """ℓ_lay per batch item (Eq. 8): smoothed Frobenius distance to the template, mean over layers."""
        template = self.maps[_match(self.sigmas, sigma)]
        return layout_loss([live.maps[k][:, 0] for k in self.layers], [template[k].to(live.maps[k]) for k in self.layers],
                           self.kernel_size, self.smooth_sigma)


def sample_guided(denoise, x, sigmas, guidance_grad, eta, normalise=True, callback=None, on_skip=None):
    """P&D guided sampling (Eq. 9–10) on Euler steps, Euler in σ being DDIM with η = 0.

    Each step first moves x by Eq. 10 when ``guidance_grad(x, σ)`` returns a gradient (None outside
    every window), then takes the step exactly as the host's ``sample_euler`` does, so with
    ``eta == 0`` the result equals the host's Euler sampler bit for bit. ``on_skip(i, mask)`` hears
    of batch items whose gradient was not finite (their update is skipped, never a NaN latent).
    """
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        grad = guidance_grad(x, sigma) if eta else None
        if grad is not None:
            x, skipped = guided_update(x, grad, sigma, eta, normalise)
            if on_skip is not None and skipped.any():
                on_skip(i, skipped)
        denoised = denoise(x, sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    return x
