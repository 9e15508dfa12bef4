"""Pick-and-Draw cost: guided sampling (template + palette + guidance; NTI excluded) and null-text inversion,
each as a ratio to one plain sampling run of the same steps and CFG.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_pnd.py [--size tiny|sd15] [--device cpu|cuda] [--steps 50]

Goals (issue 3): guided ≤ 2.2× plain (the pass count puts the floor near 1.9×), NTI ≤ 10× plain.
"""
from __future__ import annotations

import argparse
import time

from common import interleaved, load, sd15_unet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--res", type=int, default=None, help="image side in pixels (default 128 tiny, 512 sd15)")
    ap.add_argument("--inner", type=int, default=10, help="null-text inner iterations")
    args = ap.parse_args()
    load(args.device)

    import torch
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    from comfyui_personalize.nodes import inversion as inv
    from comfyui_personalize.nodes import pnd

    import tiny_models
    _, clip, vae = tiny_models.tiny_sd1()
    model = tiny_models.tiny_sd1()[0] if args.size == "tiny" else sd15_unet(args.device)
    side = (args.res or (128 if args.size == "tiny" else 512)) // 8
    if args.size == "sd15":   # the tiny CLIP is 64 wide; SD1.5's context is 768: feed random 768-wide contexts
        encode = lambda text: [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(len(text))), {}]]
    else:
        encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))
    prompt, template = "a photo of a sks dog in the water", "a photo of a dog in the water"
    pos, neg, tpos = encode(prompt), encode(""), encode(template)
    latent = torch.zeros(1, 4, side, side)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", args.steps)
    noise = Noise_RandomNoise(0)
    reference = latent + torch.randn(latent.shape, generator=torch.Generator().manual_seed(1)) * 0.5

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def plain():
        with torch.inference_mode():
            comfy.sample.sample_custom(model, noise.generate_noise({"samples": latent}), 7.5,
                                       comfy.samplers.sampler_object("euler"), sigmas, pos, neg, latent, disable_pbar=True)
        sync()

    def invert(mode):
        with torch.inference_mode():
            return inv.invert(model, reference, pos, neg, prompt, sigmas, mode, 7.5, args.inner, 1e-5)

    inversion = invert("ddim")

    def guided():
        with torch.inference_mode():
            appearance = pnd.UREMDGuidance.execute(model, inversion, clip, "sks dog", 0.5, "auto", 0.2, 0.4, 1.0).args[0]
            layout = pnd.LayoutGuidance.execute(model, clip, template, "dog", tpos, neg, 7.5, noise, sigmas,
                                                {"samples": latent}, "cross", 0.0, 0.2, 1.0, 3, 0.5).args[0]
            prepared, sampler = pnd.PickAndDrawSampler.execute(model, clip, prompt, "dog", 0.1, True, appearance,
                                                               layout).args
            comfy.sample.sample_custom(prepared, noise.generate_noise({"samples": latent}), 7.5, sampler, sigmas, pos,
                                       neg, latent, disable_pbar=True)
        sync()

    plain(), guided()                                   # warm-up
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = interleaved({"plain": plain, "guided": guided}, args.repeats)
    start = time.perf_counter()
    invert("null-text")
    sync()
    t_nti = time.perf_counter() - start
    print(f"size={args.size} device={args.device} res={side * 8}px steps={args.steps} cfg=7.5")
    print(f"plain  {t['plain']:.3f} s   P&D guided {t['guided']:.3f} s   ratio {t['guided'] / t['plain']:.2f}x (goal <= 2.2x)")
    print(f"null-text inversion ({args.inner} inner steps) {t_nti:.3f} s   ratio {t_nti / t['plain']:.2f}x (goal <= 10x; "
          "0 when a saved inversion is reused)")
    if args.device == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
