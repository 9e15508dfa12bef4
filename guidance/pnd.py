"""Pick-and-Draw's guided latent update (Eq. 10) and guidance windows (App. D, Fig. 8) in σ-space."""
import math

import torch

# P&D App. D / Fig. 8 on 50 DDIM steps: layout on steps [0, 10), appearance on [10, 20), as fractions.
LAYOUT_WINDOW = (0.0, 0.2)
APPEARANCE_WINDOW = (0.2, 0.4)


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


def step_window(sigmas, start, end, full_sigmas=None):
    """Which sampling steps of ``sigmas`` fall in a guidance window given as fractions of a schedule.

    The window [``start``, ``end``) covers the steps k of the full schedule (n steps) with
    start ≤ k/n < end — ``LAYOUT_WINDOW`` = (0, 0.2) is the paper's steps [0, 10) of 50 and becomes
    [0, 6) of 30. It is defined on ``full_sigmas``, the whole schedule (denoise = 1) the run belongs
    to, and matched by σ: step i of ``sigmas`` is in the window iff its σ_i lies in
    (σ_full[k_end], σ_full[k_start]] (relative tolerance 1e-5). So with denoise < 1, where the host
    samples only the tail of a longer schedule, the window keeps its σ range and the truncated run
    guides only the part of it that it still covers; a different step count maps by σ range too.
    ``full_sigmas=None`` takes ``sigmas`` as the full schedule. Returns a bool ``[len(sigmas) − 1]``.
    """
    if not 0 <= start <= end <= 1:
        raise ValueError(f"need 0 ≤ start ≤ end ≤ 1, got [{start}, {end})")
    full = sigmas if full_sigmas is None else full_sigmas
    n = len(full) - 1
    k_start, k_end = (min(math.ceil(f * n - 1e-9), n) for f in (start, end))
    upper, lower = full[k_start] * (1 + 1e-5), full[k_end] * (1 + 1e-5)
    steps = sigmas[:-1]
    return (steps <= upper) & (steps > lower)  # an empty window (k_start = k_end) has upper = lower
