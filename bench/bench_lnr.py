"""Layout-and-Retouch cost: the whole pipeline (stage 1 + both DDIM inversions + stage 2) and stage 2 alone,
each as a ratio to one plain sampling run of the same steps and CFG.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_lnr.py [--size tiny|sd15] [--device cpu|cuda]
        [--steps 50] [--res 128] [--repeats 3]

Goal (issue 11): whole pipeline ≤ 4.5× plain (the paper's ≈ 30 s / 18 GiB on a 3090 is ≈ 8–10× plain).
Both inversions are NullTextInvert's ``ddim`` mode without the reconstruction (L&R needs only the
inverted latents). Time: this process's CPU time on one thread on the CPU (wall time on a GPU or with
``--threads`` > 1), the variants interleaved; each ratio pairs one run with the plain run beside it.
"""
from __future__ import annotations

from common import clock, emit, min_median, models, parser, ratio_stats, start, synchronized, timed


def main():
    ap = parser(repeats=3)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    start(args)

    import torch
    import nodes
    from comfyui_personalize.nodes import inversion as inv
    from comfyui_personalize.nodes import lnr

    model, clip, _ = models(args.size, args.device, args.weights)
    def encode(text):
        with torch.inference_mode():            # as the executor runs every node
            return clip.encode_from_tokens_scheduled(clip.tokenize(text))
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

    fns = {"plain": plain, "stage2": stage2_only, "pipeline": pipeline}
    for fn in fns.values():
        fn()                                                  # warm-up
    t = timed(fns, args.repeats, clock(args.device, args.threads))
    print(f"{args.size} SD1, {args.device}, res={args.res}px steps={args.steps} cfg=7.5")
    rows = []
    for name, label, goal in (("pipeline", "L&R whole pipeline (stage 1 + both DDIM inversions + stage 2) / plain "
                                           "sampling", "<= 4.5"),
                              ("stage2", "L&R stage 2 alone / plain sampling", "")):
        lo, med = ratio_stats(t, name, "plain")
        print(f"{name:9s} {min_median(t[name])[1]:8.3f} s  plain {min_median(t['plain'])[1]:.3f} s  ratio min/median "
              f"{lo:.2f}/{med:.2f}x" + (f" (goal {goal}x)" if goal else ""))
        rows.append({"what": label, "values": [lo, med], "goal": goal})
    emit(f"lnr {args.size} {args.device}", rows)

if __name__ == "__main__":
    main()
