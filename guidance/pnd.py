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


def guided_update(x, grad, sigma, eta, normalise=True, weights=None, sigma_data=1.0):
    """P&D Eq. 9–10, z ← z − η_g ∇_z ℓ with ℓ = Σ_k w_k ℓ_k, applied to the host's σ-space latent x (methods.md §1.5).

    ``grad`` is ∇_x ℓ_k of one term, or a sequence of them (one per active term) with ``weights`` w_k
    (α, β of Eq. 9; default 1 each).

    Derivation: the sampler's x = z·s with s = √(σ_d²+σ²) (z the model's input; σ_d = ``sigma_data`` is 1 on
    SD1.x/SDXL, where s = √(1+σ²)), so ∇_z ℓ = s·∇_x ℓ and Eq. 10 becomes
    x ← s·(x/s − η s ∇_x ℓ) = x − η s² Σ_k w_k ∇_x ℓ_k. That is ``normalise=False``, the paper's
    exact form, where η carries the loss's scale.

    ``normalise=True`` (default) is the scale-free form, applied per term: each term's z-step is
    η·w_k·∇_z ℓ_k / RMS(∇_z ℓ_k) per batch item, so a single active term moves every item's VP latent by
    exactly η·w_k in RMS whatever its loss's magnitude, and α, β scale their terms' steps (normalising
    the weighted sum instead would cancel a lone term's weight). The RMS division cancels the
    chain-rule factor s, and mapping the step back to x brings one s, so
    x ← x − η s Σ_k w_k ∇_x ℓ_k / RMS(∇_x ℓ_k). Only each term's direction of Eq. 10 is kept; η is
    in units of the unit-variance latent z, comparable across steps and models.

    ``sigma`` and ``eta`` are scalars or per-item ``[B]``. An item whose gradient (of any term) is not
    finite is returned unchanged; a term whose gradient is all zero for an item adds nothing to it.
    Returns ``(x_new, skipped)`` with ``skipped`` the boolean ``[B]`` mask of non-finite items (for the
    caller to warn about).
    """
    grads = [grad] if isinstance(grad, torch.Tensor) else list(grad)
    weights = [1.0] * len(grads) if weights is None else list(weights)
    if len(weights) != len(grads):
        raise ValueError(f"{len(grads)} gradients but {len(weights)} weights")
    per_item = (-1,) + (1,) * (x.dim() - 1)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(per_item)
    eta = torch.as_tensor(eta, dtype=x.dtype, device=x.device).reshape(per_item)
    finite = torch.stack([torch.isfinite(g).flatten(1).all(dim=1) for g in grads]).all(dim=0)
    step = torch.zeros_like(x)
    for g, w in zip(grads, weights):
        g = torch.where(finite.reshape(per_item), g, torch.zeros_like(g))
        if normalise:
            wide = g.to(torch.promote_types(g.dtype, torch.float32))
            rms = wide.square().flatten(1).mean(dim=1).sqrt().reshape(per_item).to(x.dtype)
            g = g / torch.where(rms > 0, rms, torch.ones_like(rms))
        step = step + w * g
    scale = (sigma_data ** 2 + sigma ** 2).sqrt() if normalise else sigma_data ** 2 + sigma ** 2
    return x - eta * scale * step, ~finite


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
    subject: str = ""       # the subject word in the reference's prompt, and its token count
    tokens: int = 1

    def loss(self, sigma: float, live, on_empty=None) -> torch.Tensor:
        """ℓ_app per batch item: UREMD (Eq. 6) of each layer's masked features, mean over layers.

        A generated set with no vector (no position's subject attention ≥ τ) adds 0 to its layer's
        mean; ``on_empty(layer_key, item)`` hears of each such set, for the caller to warn about.
        """
        ref = self.palette[_match(self.sigmas, sigma)]
        per_layer = []
        for key in self.layers:
            feats, maps = live.features[key], live.maps[key]
            palette = ref[key].to(feats.device)     # stored on the offload device: moved once per layer, not per item
            items = []
            for b in range(feats.shape[0]):
                generated = masked_vectors(feats[b].flatten(0, 1), maps[b, 0] >= self.tau)
                if generated.shape[0] == 0 and on_empty is not None:
                    on_empty(key, b)
                items.append(uremd_loss(palette, generated))
            per_layer.append(torch.stack(items))
        return torch.stack(per_layer).mean(0)


@dataclass
class LayoutTerm(_Term):
    """P&D §3.3: the vanilla template's maps Â^temp_l of the subject per step and layer ([B or 1, h, w])."""
    maps: list              # per step: {layer key: [B, h, w]}
    kernel_size: int = 3
    smooth_sigma: float = 0.5
    latent_shape: tuple | None = None   # (batch, height, width) of the latent the template was sampled for
    subject: str = ""       # the class word in the template prompt, and its token count
    tokens: int = 1

    def loss(self, sigma: float, live) -> torch.Tensor:
        """ℓ_lay per batch item (Eq. 8): smoothed Frobenius distance to the template, mean over layers."""
        template = self.maps[_match(self.sigmas, sigma)]
        return layout_loss([live.maps[k][:, 0] for k in self.layers], [template[k].to(live.maps[k]) for k in self.layers],
                           self.kernel_size, self.smooth_sigma)


def sample_guided(denoise, x, sigmas, guidance_grad, eta, normalise=True, callback=None, on_skip=None,
                  sigma_data=1.0):
    """P&D guided sampling (Eq. 9–10) on Euler steps, Euler in σ being DDIM with η = 0.

    Each step first moves x by Eq. 10 when ``guidance_grad(x, σ)`` returns ``(gradients, weights)`` of
    the active terms (None outside every window; see ``guided_update``), then takes the step exactly
    as the host's ``sample_euler`` does, so with
    ``eta == 0`` the result equals the host's Euler sampler bit for bit. ``on_skip(i, mask)`` hears
    of batch items whose gradient was not finite (their update is skipped, never a NaN latent).
    """
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        active = guidance_grad(x, sigma) if eta else None
        if active is not None:
            grads, weights = active
            x, skipped = guided_update(x, grads, sigma, eta, normalise, weights, sigma_data)
            if on_skip is not None and skipped.any():
                on_skip(i, skipped)
        denoised = denoise(x, sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    return x
