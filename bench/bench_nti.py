"""Null-text inversion: this pack's NullTextInvert against a re-implementation of the reference's update loop,
on the same host model, in reconstruction PSNR and in time.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_nti.py [--size tiny|sd15] [--device cpu|cuda]
        [--steps 10 20] [--res 128] [--repeats 3] [--weights float16] [--profile]

Goals (issue 11): PSNR within 0.05 dB of the reference's on identical weights; time ≤ the reference's.

The reference is prompt-to-prompt's ``null_text_w_ptp.ipynb`` (Mokady et al.): ``NullInversion.ddim_loop``,
``null_optimization``, ``prev_step`` / ``next_step`` and its ``DDIMScheduler(scaled_linear, 0.00085–0.012,
set_alpha_to_one=False, steps_offset=1)``. ``ReferenceNTI`` below RE-IMPLEMENTS that loop for comparison
only (it is not the pack's code and shares none of it): ε-prediction UNet calls in the VP latent, the
reference's own ᾱ table, Adam(lr = 1e-2·(1 − i/100)) on the null embedding, ``loss.backward()``, early
stop below 1e-5 + 2e-5·i, and the batch-2 CFG call that advances the latent. It drives the host model's
own UNet module with the same weights, cloned once out of inference mode (autograd cannot save the
loaded inference tensors) and frozen (the reference leaves them trainable; frozen is the faster, so
the stricter, baseline). Its last latent is the notebook's reconstruction (the same CFG steps).

PSNR is measured against the VAE round trip of the reference image (decode(encode(I))), so that a
random-weight VAE's own loss does not mask the inversion's. Time is this process's CPU time on one
thread on the CPU (wall time on a GPU); both variants run interleaved, and each ratio pairs one run
of each. Both start from the encoded latent (the VAE is not timed). On half-precision weights (a GPU's
default, ``--weights float16`` on the CPU) ours is also timed with the host's per-layer cast instead of
weights cast once for the loop (``sampling.weights_cast_once``).
"""
from __future__ import annotations

import contextlib
import copy

from common import (clock, emit, inverting_in, min_median, models, parser, patched, ratio_stats, start,
                    synchronized, tf32_matmuls, timed)

PROMPT = "a photo of a dog"
GUIDANCE = 7.5


class ReferenceNTI:
    """Re-implementation, for comparison, of prompt-to-prompt's null-text inversion (see the module docstring)."""

    def __init__(self, unet, steps: int):
        import torch
        self.unet, self.steps = unet, steps
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2   # scaled_linear
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha_cumprod = self.alphas_cumprod[0]                  # set_alpha_to_one=False
        self.ratio = 1000 // steps
        self.timesteps = (torch.arange(steps) * self.ratio).flip(0) + 1    # steps_offset=1: 981, 961, …, 1 at 50

    def eps(self, latents, t, context):
        import torch
        return self.unet(latents, torch.full((latents.shape[0],), float(t), device=latents.device), context=context)

    def prev_step(self, model_output, timestep, sample):
        prev_timestep = timestep - self.ratio
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        pred_original_sample = (sample - (1 - alpha_prod_t) ** 0.5 * model_output) / alpha_prod_t ** 0.5
        return alpha_prod_t_prev ** 0.5 * pred_original_sample + (1 - alpha_prod_t_prev) ** 0.5 * model_output

    def next_step(self, model_output, timestep, sample):
        timestep, next_timestep = min(timestep - self.ratio, 999), timestep
        alpha_prod_t = self.alphas_cumprod[timestep] if timestep >= 0 else self.final_alpha_cumprod
        alpha_prod_t_next = self.alphas_cumprod[next_timestep]
        next_original_sample = (sample - (1 - alpha_prod_t) ** 0.5 * model_output) / alpha_prod_t ** 0.5
        return alpha_prod_t_next ** 0.5 * next_original_sample + (1 - alpha_prod_t_next) ** 0.5 * model_output

    def ddim_loop(self, latent, cond):
        import torch
        all_latent = [latent]
        with torch.no_grad():
            for i in range(self.steps):
                t = int(self.timesteps[self.steps - i - 1])
                latent = self.next_step(self.eps(latent, t, cond), t, latent)
                all_latent.append(latent)
        return all_latent

    def null_optimization(self, latents, cond, uncond, num_inner_steps=10, epsilon=1e-5):
        """Returns the per-step null embeddings and the last latent (the reconstruction)."""
        import torch
        import torch.nn.functional as nnf
        uncond_embeddings_list = []
        latent_cur = latents[-1]
        for i in range(self.steps):
            uncond = uncond.clone().detach()
            uncond.requires_grad = True
            optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
            latent_prev = latents[len(latents) - i - 2]
            t = int(self.timesteps[i])
            with torch.no_grad():
                noise_pred_cond = self.eps(latent_cur, t, cond)
            for _ in range(num_inner_steps):
                noise_pred_uncond = self.eps(latent_cur, t, uncond)
                noise_pred = noise_pred_uncond + GUIDANCE * (noise_pred_cond - noise_pred_uncond)
                loss = nnf.mse_loss(self.prev_step(noise_pred, t, latent_cur), latent_prev)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if loss.item() < epsilon + i * 2e-5:
                    break
            uncond_embeddings_list.append(uncond[:1].detach())
            with torch.no_grad():
                noise_pred_uncond, noise_pred_text = self.eps(torch.cat([latent_cur] * 2), t,
                                                              torch.cat([uncond, cond])).chunk(2)
                latent_cur = self.prev_step(noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond), t,
                                            latent_cur)
        return uncond_embeddings_list, latent_cur

    def invert(self, z0, cond, uncond, num_inner_steps=10):
        return self.null_optimization(self.ddim_loop(z0, cond), cond, uncond, num_inner_steps)[1]


def frozen_fp32_copy(unet):
    """The UNet module with its weights cloned once out of inference mode, in fp32 and without gradient."""
    import torch
    with torch.inference_mode(False):
        clone = copy.deepcopy(unet)
        for module in clone.modules():
            for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
                if tensor is not None:
                    fresh = tensor.detach().clone().float()
                    if name in module._parameters:
                        module._parameters[name] = torch.nn.Parameter(fresh, requires_grad=False)
                    else:
                        module._buffers[name] = fresh
    return clone


def profile(name: str, fn, device: str, rows: int = 15) -> dict:
    """``fn`` once under torch.profiler: its operator count and top operators by self time (CPU, and CUDA on a
    GPU). Returns {operator: (calls, self CPU µs)}."""
    import torch
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    table = prof.key_averages()
    print(f"  profile of {name}: {sum(e.count for e in table)} operator calls")
    for key in ["self_cpu_time_total"] + (["self_device_time_total"] if device == "cuda" else []):
        print(table.table(sort_by=key, row_limit=rows))
    return {e.key: (e.count, e.self_cpu_time_total) for e in table}


def profile_difference(ours: dict, theirs: dict, rows: int = 12) -> None:
    """The operators ours calls more often than the reference, most extra self CPU time first."""
    extra = {k: (n - theirs.get(k, (0, 0))[0], t - theirs.get(k, (0, 0))[1]) for k, (n, t) in ours.items()}
    print("  ours − reference: operator, extra calls, extra self CPU ms")
    for key, (n, t) in sorted(extra.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"    {key:50s} {n:+7d} {t / 1e3:+9.2f}")


def psnr(a, b) -> float:
    import torch
    return (10 * torch.log10(1.0 / torch.mean((a.float() - b.float()) ** 2))).item()


def main():
    ap = parser(repeats=3)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--inner", type=int, default=10, help="inner Adam iterations per step")
    ap.add_argument("--compute-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16", "tf32"],
                    help="the trial of issue 11 (GPU): our UNet passes computing in these dtypes instead of fp32 (tf32: "
                         "fp32 with TF32 matrix products, CUDA), the null embedding and its optimiser staying fp32; "
                         "each against ours in fp32, PSNR and time")
    ap.add_argument("--profile", action="store_true",
                    help="also run ours and the reference once each under torch.profiler and print their top operators "
                         "(where ours spends what the reference does not: the GPU's 1.51x of the first lease)")
    args = ap.parse_args()
    start(args)

    import torch
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import tiny_models
    from comfyui_personalize.nodes import inversion as inv

    model, clip, vae = models(args.size, args.device, args.weights)
    image = tiny_models.smooth_images(torch.Generator().manual_seed(7), 1, args.res, args.res).movedim(1, -1)
    with torch.inference_mode():
        samples = vae.encode(image)
        round_trip = vae.decode(samples)
        cond, uncond = (clip.encode_from_tokens(clip.tokenize(t)) for t in (PROMPT, ""))
        pos, neg = [[cond, {}]], [[uncond, {}]]
    device = comfy.model_management.get_torch_device()
    unet = frozen_fp32_copy(model.model.diffusion_model).to(device)
    z0 = model.model.process_latent_in(samples).clone().to(device)
    ref_cond, ref_uncond = cond.clone().to(device), uncond.clone().to(device)

    rows = []
    print(f"{args.size} SD1, {args.device}, res={args.res}px cfg={GUIDANCE} inner={args.inner}")
    for steps in args.steps:
        reference = ReferenceNTI(unet, steps)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)
        out = {}

        def ours_with(key, context=contextlib.nullcontext):
            """NullTextInvert into ``out[key]``, inside ``context()`` (a variant of the pack's code)."""
            @synchronized(args.device)
            def run():
                with context(), torch.inference_mode():
                    out[key] = inv.NullTextInvert.execute(model, clip, PROMPT, "null-text", steps, "ddim_uniform",
                                                          GUIDANCE, args.inner, 1e-2, 1e-5, "",
                                                          latent={"samples": samples}).args[1]["samples"]
            return run

        @synchronized(args.device)
        def theirs():
            out["reference"] = reference.invert(z0, ref_cond, ref_uncond, args.inner)

        @synchronized(args.device)
        def plain():
            with torch.inference_mode():
                comfy.sample.sample_custom(model, torch.zeros_like(samples), GUIDANCE,
                                           comfy.samplers.sampler_object("euler"), sigmas, pos, neg,
                                           torch.randn(samples.shape, generator=torch.Generator().manual_seed(0)),
                                           disable_pbar=True)

        ours = ours_with("ours")
        per_layer = ours_with("per-layer cast",
                              lambda: patched(inv, "weights_cast_once", lambda *_: contextlib.nullcontext()))
        def ours_in(dtype):
            return ours_with(dtype, tf32_matmuls if dtype == "tf32" else lambda: inverting_in(inv, getattr(torch, dtype)))

        half = model.model.manual_cast_dtype is None and model.model_dtype() != torch.float32
        fns = {"ours": ours, "reference": theirs, "plain": plain, **({"per-layer cast": per_layer} if half else {}),
               **{dtype: ours_in(dtype) for dtype in args.compute_dtypes if dtype != "float32"}}
        for fn in fns.values():
            fn()                                                    # warm-up
        if args.profile:
            profile_difference(*(profile(name, fns[name], args.device) for name in ("ours", "reference")))
        t = timed(fns, args.repeats, clock(args.device, args.threads))
        with torch.inference_mode():
            ours_image = vae.decode(out["ours"])
            ref_image = vae.decode(model.model.process_latent_out(out["reference"].detach().cpu()))
            trials = {dtype: psnr(vae.decode(out[dtype]), round_trip) for dtype in args.compute_dtypes if dtype in out}
        p_ours, p_ref = psnr(ours_image, round_trip), psnr(ref_image, round_trip)
        for dtype, p_trial in trials.items():
            speed = ratio_stats(t, dtype, "ours")
            print(f"  trial: UNet passes in {dtype}: PSNR {p_trial:.3f} dB ({p_trial - p_ours:+.3f} vs fp32), time "
                  f"{speed[0]:.3f}/{speed[1]:.3f} of fp32's (min/median)")
            rows += [{"what": f"NTI trial, {steps} steps, UNet passes in {dtype}: PSNR − ours in fp32 (dB)",
                      "values": [p_trial - p_ours], "goal": ">= -0.05", "note": f"{p_trial:.3f} dB"},
                     {"what": f"NTI trial, {steps} steps, UNet passes in {dtype}: time / ours in fp32",
                      "values": list(speed), "goal": ""}]
        if half:
            cast = ratio_stats(t, "ours", "per-layer cast"), ratio_stats(t, "per-layer cast", "reference")
            print(f"  {model.model_dtype()} weights: fp32 weights cast once / cast at every layer and pass (the host's "
                  f"manual cast) {cast[0][0]:.3f}/{cast[0][1]:.3f}; the latter / reference {cast[1][0]:.3f}/{cast[1][1]:.3f}; "
                  f"same latent: {torch.equal(out['ours'], out['per-layer cast'])}")
            rows += [{"what": f"NTI time, {steps} steps, {model.model_dtype()} weights: cast once / cast per layer",
                      "values": list(cast[0]), "goal": ""}]
        vs_ref, to_plain, ref_to_plain = (ratio_stats(t, "ours", "reference"), ratio_stats(t, "ours", "plain"),
                                          ratio_stats(t, "reference", "plain"))
        print(f"{steps} steps: PSNR vs VAE round trip: ours {p_ours:.3f} dB, reference {p_ref:.3f} dB "
              f"(difference {p_ours - p_ref:+.3f} dB, goal >= -0.05)")
        print(f"  time min/median: ours {min_median(t['ours'])[0]:.2f}/{min_median(t['ours'])[1]:.2f} s, reference "
              f"{min_median(t['reference'])[0]:.2f}/{min_median(t['reference'])[1]:.2f} s; ours/reference "
              f"{vs_ref[0]:.3f}/{vs_ref[1]:.3f} (goal <= 1); to one plain CFG sampling: ours {to_plain[0]:.2f}/"
              f"{to_plain[1]:.2f}x, reference {ref_to_plain[0]:.2f}/{ref_to_plain[1]:.2f}x")
        rows += [
            {"what": f"NTI PSNR vs VAE round trip, {steps} steps: ours − reference (dB)", "values": [p_ours - p_ref],
             "goal": ">= -0.05", "note": f"ours {p_ours:.3f}, reference {p_ref:.3f}"},
            {"what": f"NTI time, {steps} steps: ours / reference", "values": list(vs_ref), "goal": "<= 1.0"},
            {"what": f"NTI time, {steps} steps: ours / plain CFG sampling", "values": list(to_plain), "goal": "",
             "note": f"reference {ref_to_plain[0]:.2f}/{ref_to_plain[1]:.2f}x"},
        ]
    emit(f"nti {args.size} {args.device}", rows)


if __name__ == "__main__":
    main()
