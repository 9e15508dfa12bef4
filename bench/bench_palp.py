"""PALP training cost: one PALP step (Eq. 6 alignment on) against one plain LoRA + token step (alignment
weight 0: the same trainables, the personalization loss only), in time and in peak memory, and what
gradient checkpointing trades.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_palp.py [--size tiny|sd15] [--device cpu|cuda]
        [--res 64] [--steps 20] [--repeats 3] [--threads 1] [--weights float16] [--measure time memory]

Goals (issue 11): time ≤ 2.0×, peak memory ≤ 1.15× the plain step.
- Time: per-step time from the difference of a run of ``steps`` and a run of 1 step (so image
  encoding and set-up cancel), interleaved repeats, each ratio within one repeat; this process's CPU
  time on the tiny model (one thread), wall time otherwise.
- Memory: the peak bytes the training loop of a 2-step run allocates above what is allocated when it
  starts (models, encoded images and prompts): the CUDA allocator's peak on a GPU; on the CPU, storages
  counted as they are made and freed (``tests/host/memory.py``), since the process's peak RSS is set by
  building the models. Image encoding is left out: at small sides on the CPU it would set the peak.
"""
from __future__ import annotations

from common import clock, emit, min_median, models, parser, start, synchronized, timed

VARIANTS = {  # name: (alignment weight, gradient checkpointing)
    "plain": (0.0, False),
    "palp": (1.0, False),
    "palp + checkpointing": (1.0, True),
}


def trainer(args):
    start(args)
    import torch
    from comfyui_personalize.nodes import palp
    import tiny_models
    model, clip, vae = models(args.size, args.device, args.weights)
    images = tiny_models.smooth_images(torch.Generator().manual_seed(0), 4, args.res, args.res).movedim(1, -1)

    @synchronized(args.device)
    def run(variant, steps):
        weight, checkpointing = VARIANTS[variant]
        with torch.inference_mode():
            palp.PALPTrainer.execute(
                model, clip, vae, images, placeholder="[V]", class_word="dog", personalization_prompt="a photo of [V]",
                target_prompt="a sketch of a dog in Paris", steps=steps, learning_rate=5e-5, batch_size=1,
                gradient_accumulation=1, rank=32, alpha=7.5, beta=args.beta, alignment_weight=weight, same_noise=True,
                rescale=True, timestep_min=0.0, timestep_max=1.0, resolution=args.res, precision="fp32",
                gradient_checkpointing=checkpointing, training_seed=0, save_name="bench", overwrite=True, resume=False,
                checkpoint_every=0)
        # an honest ratio: neither variant may compute (or keep) gradients of the frozen base weights
        leaked = [n for n, p in model.model.named_parameters() if p.grad is not None or p.requires_grad is not requires[n]]
        if leaked:
            raise SystemExit(f"{variant}: {len(leaked)} base UNet weights got a .grad or changed requires_grad")
    requires = {n: p.requires_grad for n, p in model.model.named_parameters()}
    return run


def training_peak(fn, device) -> int:
    """Peak bytes of ``fn()``'s training loop: counted from the trainer's progress bar start (value 0)."""
    import comfy.utils
    from memory import PeakMemory
    previous = comfy.utils.PROGRESS_BAR_HOOK
    with PeakMemory(device) as meter:
        def hook(value, total, preview, node_id=None):
            if value == 0 and total == 2:
                meter.restart()
        comfy.utils.set_progress_bar_global_hook(hook)
        try:
            fn()
        finally:
            comfy.utils.set_progress_bar_global_hook(previous)
    return meter.peak


def main():
    ap = parser(repeats=3, res=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--beta", type=float, default=1.0, help="β; at 1.0 the personalized unconditional pass is skipped")
    ap.add_argument("--measure", nargs="+", choices=["time", "memory"], default=["time", "memory"])
    args = ap.parse_args()

    run = trainer(args)
    run("palp", 1)     # warm-up: loads the model, picks kernels
    print(f"{args.size} SD1, {args.device}, {args.res}px, batch 1, rank 32, β {args.beta}")
    rows = []
    if "time" in args.measure:
        fns = {}
        for variant in VARIANTS:
            fns[variant] = lambda v=variant: run(v, args.steps)
            fns[variant + " 1"] = lambda v=variant: run(v, 1)
        times = timed(fns, args.repeats, clock(args.device, args.threads))
        # per repeat: the step's time, and its ratio to the plain step of the same repeat
        step = {v: [(n - one) / (args.steps - 1) for n, one in zip(times[v], times[v + " 1"])] for v in VARIANTS}
        for variant, seconds in step.items():
            ratio = min_median([s / p for s, p in zip(seconds, step["plain"])])
            print(f"time per step  {variant:22s} {min_median(seconds)[1] * 1e3:9.1f} ms  min/median "
                  f"{ratio[0]:.2f}/{ratio[1]:.2f}x plain")
            if variant != "plain":
                rows.append({"what": f"{variant} step / plain LoRA + token step, time", "values": list(ratio),
                             "goal": "<= 2.0" if variant == "palp" else ""})
    if "memory" in args.measure:
        peak = {v: training_peak(lambda v=v: run(v, 2), args.device) for v in VARIANTS}
        for variant, size in peak.items():
            print(f"peak memory    {variant:22s} {size / 2**20:9.1f} MiB {size / peak['plain']:.2f}x plain")
            if variant != "plain":
                rows.append({"what": f"{variant} step / plain LoRA + token step, loop peak memory, {args.res}px",
                             "values": [size / peak["plain"]], "goal": "<= 1.15" if variant == "palp" else "",
                             "note": f"{size / 2**20:.1f} / {peak['plain'] / 2**20:.1f} MiB"})
    print("goals: PALP time <= 2.0x, PALP peak memory <= 1.15x")
    emit(f"palp {args.size} {args.device}", rows)


if __name__ == "__main__":
    main()
