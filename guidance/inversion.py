"""DDIM inversion and null-text inversion (Mokady et al. 2023) in the host's σ-space.

Conventions shared by every function here (host notes §2.5–2.6):

- ``x = x0 + σ·ε = z·√(σ_d²+σ²)``, ``z`` the model's input (its ``calculate_input``); with the data's
  σ_d = 1 (SD1.x, SDXL: ``sigma_data``) that is the VP latent of the papers, ᾱ = 1/(1+σ²). EDM models
  may have another σ_d (Playground v2.5: 0.5).
- ``denoise(x, sigma, cond) -> x0`` is a plain callable: the model's x0 prediction for one
  conditioning, ``sigma`` a 0-dim tensor (the caller's adapter broadcasts it to the batch).
- ``sigmas`` is the *generation* schedule, decreasing, ending in 0 — the host's SIGMAS for the
  sampling that will later replay the trajectory; a truncated (denoise < 1) schedule works too.
  A trajectory is a tensor ``[len(sigmas), *x.shape]`` indexed like ``sigmas``: ``trajectory[0]`` is
  the noisiest latent x_T, ``trajectory[-1]`` the clean latent.
- ``on_step(done, total)`` is called after each unit of work with absolute, increasing counts
  (``done`` reaches ``total``); it may raise to abort (the node's Cancel).
- Work is done in at least fp32, whatever the input dtype, without gradient except where stated.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


def cfg_combine(cond_x0, uncond_x0, scale):
    """Classifier-free guidance (Ho & Salimans), x̂0 = x̂0_∅ + s·(x̂0_c − x̂0_∅).

    Applied to x0 predictions; at a shared x this equals applying it to ε, as x0 = x − σε is affine in ε.
    """
    return uncond_x0 + scale * (cond_x0 - uncond_x0)


def ddim_step(x, denoised, sigma, sigma_next):
    """One deterministic DDIM (η = 0) step, Song et al. 2021 Eq. 12, in σ-space.

    x_next = x̂0 + σ_next·ε̂ with ε̂ = (x − x̂0)/σ: the host's Euler step x + (x − x̂0)/σ·(σ_next − σ),
    written so that σ_next = 0 returns x̂0 exactly. Valid in both directions (σ_next > σ inverts).
    """
    return denoised + (x - denoised) * (sigma_next / sigma)


def ddim_invert(denoise, x0, sigmas, cond, on_step=None, sigma_data=1.0):
    """Deterministic DDIM inversion (Mokady et al. §3, "DDIM inversion"): the pivots z*_T … z*_0.

    Walks the decreasing generation schedule backwards (no flipping by the caller). Each step from
    σ_lo = σ_{k+1} up to σ_hi = σ_k evaluates ε at σ_hi — the σ at which sampling will later take that
    step — on the current latent, as the reference notebook's ``next_step`` does (UNet input
    z_lo with timestep t_hi); in σ-space that is ``denoise`` at σ_hi of x·√((σ_d²+σ_hi²)/(σ_d²+σ_lo²)),
    the same model input at σ_hi's scale, and then x_hi = x + (σ_hi − σ_lo)·ε. This differs from the
    host's FlipSigmas + Euler, which evaluates at σ_lo (and at 1e-4 for the clean image): on the
    tests' toy model the reference convention halves the inversion–sampling round-trip error, and
    the model is only ever called at σ's of the generation schedule.
    Returns the trajectory ``[len(sigmas), *x0.shape]`` indexed like ``sigmas``, ``[-1]`` being x0.
    """
    x = _work(x0)
    xs = [x]
    total = len(sigmas) - 1
    with torch.no_grad():
        for done, k in enumerate(range(total - 1, -1, -1), start=1):
            x = _invert_step(denoise, x, sigmas[k + 1], sigmas[k], cond, sigma_data)
            xs.append(x)
            _report(on_step, done, total)
    return torch.stack(xs[::-1])


def _invert_step(denoise, x, sigma_lo, sigma_hi, cond, sigma_data=1.0):
    x_hi_scale = x * ((sigma_data ** 2 + sigma_hi ** 2) / (sigma_data ** 2 + sigma_lo ** 2)).sqrt()
    eps = (x_hi_scale - denoise(x_hi_scale, sigma_hi, cond)) / sigma_hi
    return x + (sigma_hi - sigma_lo) * eps


class NullTextInversion(NamedTuple):
    null_embeddings: torch.Tensor  # [n_steps, *uncond.shape], ∅_t for step t of ``sigmas``
    latent: torch.Tensor           # the reconstructed clean latent, ≈ trajectory[-1]
    losses: torch.Tensor           # [n_steps], each step's last loss (VP-latent MSE, measured before
                                   # that iteration's Adam update, as the reference measures it)


def null_text_invert(denoise, trajectory, sigmas, cond, uncond_init, cfg=7.5, inner_steps=10, lr=1e-2,
                     early_stop=1e-5, on_step=None, sigma_data=1.0):
    """Null-text inversion (Mokady et al. 2023, Alg. 1; methods.md §1.1) in σ-space.

    From the noisiest pivot down, step t optimises the null embedding ∅_t (Adam, ``inner_steps``
    iterations, initialised from ∅_{t+1}) so that the CFG DDIM step from the current latent lands on
    the next pivot ``trajectory[t+1]``; then the current latent advances by that CFG step with the
    optimised ∅_t, so later steps correct the earlier steps' residual. The conditional prediction is
    computed once per step without gradient; gradient reaches nothing but ∅_t (``autograd.grad``, so
    no ``.grad`` accumulates on model weights).

    Reference-code details kept: the loss is the MSE in the VP latent z (σ-space MSE / (σ_d²+σ_next²)),
    which is what the reference's thresholds are measured in; step i's learning rate and early-stop
    threshold are the reference's literally, for any step count (:func:`nti_schedule`). The Adam
    moments restart every step, as in the reference.

    ``on_step`` is called after every inner iteration (total = n·inner_steps; an early stop, or a step
    with learning rate 0, jumps to the step's end). Returns ``NullTextInversion``; ``replay`` with its
    embeddings reproduces ``latent`` exactly.
    """
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be ≥ 1, got {inner_steps}")
    n = len(sigmas) - 1
    x = _work(trajectory[0])
    null = _work(uncond_init)
    nulls, losses = [], []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        target, vp_scale = _work(trajectory[i + 1]), sigma_data ** 2 + sigma_next ** 2
        with torch.no_grad():
            cond_x0 = denoise(x, sigma, cond)

        def step_to(null_embedding):
            return ddim_step(x, cfg_combine(cond_x0, denoise(x, sigma, null_embedding), cfg), sigma, sigma_next)

        step_lr, threshold = nti_schedule(i, lr, early_stop)
        if step_lr > 0:
            null, loss = _optimise_null(step_to, target, vp_scale, null, step_lr, threshold, inner_steps,
                                        on_step, i * inner_steps, n * inner_steps)
        else:       # Adam with lr 0 leaves ∅ as it is: skip its passes, keep the loss it would report
            loss = None
            _report(on_step, (i + 1) * inner_steps, n * inner_steps)
        with torch.no_grad():
            x = step_to(null)
            if loss is None:
                loss = F.mse_loss(x, target) / vp_scale
        nulls.append(null)
        losses.append(loss)
    return NullTextInversion(torch.stack(nulls), x, torch.stack(losses))


def nti_schedule(i, lr=1e-2, early_stop=1e-5):
    """Step i's Adam learning rate and early-stop threshold: the reference code's (prompt-to-prompt's
    ``null_text_w_ptp`` notebook, ``null_optimization``) literally, i the step index from the noisiest
    step: lr·(1 − i/100) and early_stop + 2e-5·i. The formula is kept per step for every step count
    (not rescaled to it; at 50 steps it is the reference's exactly): the learning rate reaches 0 at
    step 100, so steps from 100 on keep ∅ of step 99.
    """
    return lr * max(0.0, 1 - i / 100), early_stop + 2e-5 * i


def _optimise_null(step_to, target, vp_scale, null, lr, threshold, inner_steps, on_step, done, total):
    null = null.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([null], lr=lr)
    for j in range(inner_steps):
        with torch.enable_grad():
            loss = F.mse_loss(step_to(null), target) / vp_scale
            (null.grad,) = torch.autograd.grad(loss, null)
        optimizer.step()
        stop = loss.item() < threshold  # one sync per iteration: early stopping needs the value
        _report(on_step, done + (inner_steps if stop else j + 1), total)
        if stop:
            break
    return null.detach(), loss.detach()


def replay(denoise, x_T, sigmas, cond, null_embeddings, cfg, on_step=None):
    """Replays a trajectory with per-step null embeddings (Mokady et al. Alg. 1's output in use).

    Each step is the CFG DDIM step of ``null_text_invert`` with ``null_embeddings[i]`` as the
    unconditional input, so replaying NTI's embeddings from ``trajectory[0]`` reproduces its
    reconstruction exactly. P&D's palette pass (§3.2) is *not* this replay: it is one cond-only pass at
    each DDIM pivot ``trajectory[i]``, which the null embeddings never enter (they only make this CFG
    replay land on those pivots), so plain DDIM and null-text inversions give the same palette.
    ``null_embeddings=None`` samples with the conditional prediction alone (``cfg`` unused): plain
    DDIM sampling, the reconstruction of a plain DDIM inversion. For a fixed unconditional
    embedding pass ``[uncond] * n_steps``. Returns all latents ``[len(sigmas), *x_T.shape]``.
    """
    x = _work(x_T)
    xs = [x]
    total = len(sigmas) - 1
    with torch.no_grad():
        for i in range(total):
            denoised = denoise(x, sigmas[i], cond)
            if null_embeddings is not None:
                denoised = cfg_combine(denoised, denoise(x, sigmas[i], null_embeddings[i]), cfg)
            x = ddim_step(x, denoised, sigmas[i], sigmas[i + 1])
            xs.append(x)
            _report(on_step, i + 1, total)
    return torch.stack(xs)


def _work(t):
    return t.detach().to(torch.promote_types(t.dtype, torch.float32)).clone()


def _report(on_step, done, total):
    if on_step is not None:
        on_step(done, total)
