"""PALP training cost: one PALP step (Eq. 6 alignment on) as a ratio to one plain LoRA + token step
(alignment weight 0: the same trainables, the personalization loss only).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_palp.py [--steps 20] [--res 64]

Goal (issue 5): time ≤ 2.2× the plain step. Runs the tiny SD1 model on the CPU. Time: per-step wall time
from the difference of a run of ``steps`` and a run of 1 step (so image encoding and set-up cancel),
medians of interleaved repeats. Peak memory (goal ≤ 1.15×) is not measured here: on the tiny CPU model the
process's peak RSS is set by building the models, before training, so ru_maxrss deltas read 0 for both.
"""
from __future__ import annotations

import argparse

from common import interleaved, load


def trainer(args):
    load("cpu")
    import torch
    from comfyui_personalize.nodes import palp
    import tiny_models
    # one thread, as the host tests: OpenMP spin-waiting beside other processes distorts tiny-model timings
    torch.set_num_threads(1)
    model, clip, vae = tiny_models.tiny_sd1()
    images = tiny_models.smooth_images(torch.Generator().manual_seed(0), 4, args.res, args.res).movedim(1, -1)

    def run(weight, steps):
        with torch.inference_mode():
            palp.PALPTrainer.execute(
                model, clip, vae, images, "[V]", "dog", "a photo of [V]", "a sketch of a dog in Paris", steps, 5e-5, 1,
                1, 32, 7.5, args.beta, weight, True, True, 0.0, 1.0, args.res, "fp32", 0, "bench", True, False, 0)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--res", type=int, default=64, help="image side in pixels")
    ap.add_argument("--beta", type=float, default=1.0, help="β; at 1.0 the personalized unconditional pass is skipped")
    args = ap.parse_args()

    run = trainer(args)
    run(1.0, 1)     # warm-up
    times = interleaved({"palp": lambda: run(1.0, args.steps), "plain": lambda: run(0.0, args.steps),
                         "palp1": lambda: run(1.0, 1), "plain1": lambda: run(0.0, 1)}, args.repeats)
    palp_step = (times["palp"] - times["palp1"]) / (args.steps - 1)
    plain_step = (times["plain"] - times["plain1"]) / (args.steps - 1)
    print(f"tiny SD1, CPU, {args.res}px, batch 1, rank 32, β {args.beta}")
    print(f"step: PALP {palp_step * 1e3:.1f} ms, plain {plain_step * 1e3:.1f} ms, ratio {palp_step / plain_step:.2f}x "
          "(goal <= 2.2x)")


if __name__ == "__main__":
    main()
