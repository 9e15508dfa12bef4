"""Pick-and-Draw cost: guided sampling (template + palette + guidance; NTI excluded) and null-text inversion,
each as a ratio to one plain sampling run of the same steps and CFG.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_pnd.py [--size tiny|sd15] [--device cpu|cuda]
        [--steps 50] [--res 128] [--measure guided nti]

Goals (issue 3): guided ≤ 2.2× plain (the pass count puts the floor near 1.9×), NTI ≤ 10× plain.
``--size sd15`` is an SD1.5-size random-weight UNet and CLIP-L (``tiny_models.sd15_sized``), fp16 on a GPU.
"""
from __future__ import annotations

import argparse
import resource
import time

from common import interleaved, load, models, synchronized


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--res", type=int, default=128, help="image side in pixels")
    ap.add_argument("--inner", type=int, default=10, help="null-text inner iterations")
    ap.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--measure", nargs="+", choices=["guided", "nti"], default=["guided", "nti"])
    args = ap.parse_args()
    load(args.device)

    import torch
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    from comfyui_personalize.nodes import inversion as inv
    from comfyui_personalize.nodes import pnd

    model, clip, _ = models(args.size, args.device)
    side = args.res // 8
    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))
    prompt, template = "a photo of a sks dog in the water", "a photo of a dog in the water"
    pos, neg, tpos = encode(prompt), encode(""), encode(template)
    latent = torch.zeros(1, 4, side, side)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", args.steps)
    noise = Noise_RandomNoise(0)
    reference = latent + torch.randn(latent.shape, generator=torch.Generator().manual_seed(1)) * 0.5

    @synchronized(args.device)
    def plain():
        with torch.inference_mode():
            comfy.sample.sample_custom(model, noise.generate_noise({"samples": latent}), 7.5,
                                       comfy.samplers.sampler_object("euler"), sigmas, pos, neg, latent, disable_pbar=True)

    @synchronized(args.device)
    def invert(mode):
        with torch.inference_mode():
            return inv.NullTextInvert.execute(model, clip, "a photo of a sks dog", mode, args.steps, "ddim_uniform", 7.5,
                                              args.inner, 1e-2, 1e-5, "", latent={"samples": reference}).args[0]

    inversion = invert("ddim")

    @synchronized(args.device)
    def guided():
        with torch.inference_mode():
            appearance = pnd.UREMDGuidance.execute(model, inversion, clip, "sks dog", 0.5, "auto", 0.2, 0.4, 1.0).args[0]
            layout = pnd.LayoutGuidance.execute(model, clip, template, "dog", tpos, neg, 7.5, noise, sigmas,
                                                {"samples": latent}, "cross", 0.0, 0.2, 1.0, 3, 0.5).args[0]
            prepared, sampler = pnd.PickAndDrawSampler.execute(model, clip, prompt, "dog", 0.1, True, appearance,
                                                               layout).args
            comfy.sample.sample_custom(prepared, noise.generate_noise({"samples": latent}), 7.5, sampler, sigmas, pos,
                                       neg, latent, disable_pbar=True)

    variants = {"plain": plain, "guided": guided} if "guided" in args.measure else {"plain": plain}
    for warm_up in variants.values():
        warm_up()
    t = interleaved(variants, args.repeats)
    print(f"{args.size} SD1, {args.device}, res={side * 8}px steps={args.steps} cfg=7.5")
    if "guided" in args.measure:
        print(f"plain  {t['plain']:.3f} s   P&D guided {t['guided']:.3f} s   ratio {t['guided'] / t['plain']:.2f}x "
              "(goal <= 2.2x)")
    if "nti" in args.measure:
        start = time.perf_counter()
        invert("null-text")
        t_nti = time.perf_counter() - start
        print(f"null-text inversion ({args.inner} inner steps) {t_nti:.3f} s   ratio {t_nti / t['plain']:.2f}x "
              "(goal <= 10x; 0 when a saved inversion is reused)")
    print(f"peak process memory (whole run): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
