"""Layout-and-Retouch cost: the whole pipeline (stage 1 + both DDIM inversions + stage 2) and stage 2 alone,
each as a ratio to one plain sampling run of the same steps and CFG.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_lnr.py [--size tiny|sd15] [--device cpu|cuda]
        [--steps 50] [--res 128]

Goal (issue 4): whole pipeline ≤ 5× plain (the paper's ≈ 30 s / 18 GiB on a 3090 is ≈ 8–10× plain).
"""
from __future__ import annotations

import argparse
import resource

from common import interleaved, load, models, synchronized


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--res", type=int, default=128, help="image side in pixels")
    ap.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    load(args.device)

    import torch
    import nodes
    from comfyui_personalize.nodes import inversion as inv
    from comfyui_personalize.nodes import lnr

    model, clip, _ = models(args.size, args.device)
    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))
    y_r, y_p, y_minus, empty = (encode(t) for t in ("a photo of a sks dog", "a photo of a sks dog in the jungle",
                                                    "a photo of a dog in the jungle", ""))
    side = args.res // 8
    latent = {"samples": torch.zeros(1, 4, side, side)}
    reference = {"samples": torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1)) * 0.5}

    def ddim_inversion(samples):
        return inv.NullTextInvert.execute(model, clip, "", "ddim", args.steps, "ddim_uniform", 7.5, 10, 1e-2, 1e-5, "",
                                          latent=samples, reconstruct=False).args[0]

    @synchronized(args.device)
    def plain():
        with torch.inference_mode():
            nodes.common_ksampler(model, 0, args.steps, 7.5, "ddim", "ddim_uniform", y_p, empty, latent)

    def stage2(ref_inv, layout_inv):
        return lnr.MultiSourceAttnSwap.execute(model, ref_inv, layout_inv, y_r, y_p, empty, 7.5, -1, -1, "auto", "auto",
                                               clip, "a photo of a sks dog in the jungle", "dog", None, 0.1)

    with torch.inference_mode():
        fixed = ddim_inversion(reference), ddim_inversion(reference)

    @synchronized(args.device)
    def stage2_only():
        with torch.inference_mode():
            stage2(*fixed)

    @synchronized(args.device)
    def pipeline():
        with torch.inference_mode():
            layout = lnr.StepBlendSampler.execute(model, model, y_minus, empty, y_p, empty, latent, 0, args.steps, 7.5,
                                                  "ddim", "ddim_uniform", 5).args[0]
            stage2(ddim_inversion(reference), ddim_inversion(layout))

    plain(), stage2_only()                                # warm-up
    t = interleaved({"plain": plain, "stage2": stage2_only, "pipeline": pipeline}, args.repeats)
    print(f"{args.size} SD1, {args.device}, res={args.res}px steps={args.steps} cfg=7.5")
    print(f"plain {t['plain']:.3f} s   stage 2 {t['stage2']:.3f} s ({t['stage2'] / t['plain']:.2f}x)   whole pipeline "
          f"{t['pipeline']:.3f} s ({t['pipeline'] / t['plain']:.2f}x, goal <= 5x)")
    print(f"peak process memory (whole run): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
