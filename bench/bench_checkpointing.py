"""What keeping the smallest UNet blocks whole buys a checkpointed gradient pass (``nodes/checkpointing.py``).

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_checkpointing.py [--size sd15] [--res 256] [--keep 0.5 2]

One gradient pass (forward and backward of the UNet's prediction at one σ, batch 1, w.r.t. the latent, as
P&D's guidance pass differentiates it) through the block-wise forward, in four variants interleaved:
every block checkpointed (``keep`` 0), the smallest blocks kept whole at each ``--keep`` share of the
largest block's activations (the P&D sampler's default is ``pnd.KEEP_WHOLE``), and no checkpointing. Each
variant runs once before timing, so the kept-whole plan is made (the first pass at a size counts). Time:
process CPU time on one thread (wall time on a GPU), min / median; memory: the peak above the weights
(storages counted on the CPU, ``tests/host/memory.py``; the allocator's peak on a GPU), against one plain
batch-2 CFG pass without gradient.
"""
from __future__ import annotations

from common import clock, emit, min_median, models, parser, start, synchronized, timed


def main():
    ap = parser(repeats=3, res=256)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 2.0],
                    help="shares of the largest block's activations within which the smallest blocks are kept whole")
    args = ap.parse_args()
    start(args)

    import torch
    from comfyui_personalize.nodes import checkpointing, host, inversion, sampling
    from memory import PeakMemory

    model, clip, _ = models(args.size, args.device, args.weights)
    side = args.res // 8
    with torch.inference_mode():
        cond = inversion.conditioning(*host.encode_text(clip, "a photo of a dog"))
    latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    sigma = 3.0
    worker = sampling.gradient_model(model)
    variants = {"every block checkpointed": checkpointing.with_gradient_checkpointing(worker, keep=0.0),
                **{f"kept whole within {k:g}x": checkpointing.with_gradient_checkpointing(worker, keep=k)
                   for k in args.keep},
                "not checkpointed": checkpointing.with_gradient_checkpointing(worker, checkpoint=False)}

    def gradient_pass(patched, meter=None):
        def fn(loop, x, sigmas):
            with sampling.grad_enabled():
                xg = (x + sigma * latent.to(x)).detach().requires_grad_(True)
                loop.denoise(xg, sigma).square().mean().backward()
            return x, None
        with torch.inference_mode():
            sampling.run_loop(patched, cond, cond, latent, torch.tensor([sigma, 0.0]), fn)

    def plain_pass():
        def fn(loop, x, sigmas):
            loop.cfg_denoise(x + sigma * latent.to(x), sigma)
            return x, None
        with torch.inference_mode():
            sampling.run_loop(model, cond, cond, latent, torch.tensor([sigma, 0.0]), fn, cfg=7.5)

    fns = {name: synchronized(args.device)(lambda p=patched: gradient_pass(p)) for name, patched in variants.items()}
    for fn in fns.values():
        fn()                                    # loads the model; makes each kept-whole plan
    plain_pass()
    peaks = {}
    for name, fn in {"plain CFG pass": plain_pass, **fns}.items():
        with PeakMemory(args.device) as meter:
            fn()
        peaks[name] = meter.peak
    times = timed(fns, args.repeats, clock(args.device, args.threads))
    every = times["every block checkpointed"]
    rows = []
    print(f"{args.size}, {args.device}, {args.res}px, one gradient pass (batch 1); plain CFG pass "
          f"{peaks['plain CFG pass'] / 2**20:.1f} MiB")
    for name in fns:
        ratios = [t / e for t, e in zip(times[name], every)]
        lo, med = min_median(ratios)
        memory = peaks[name] / peaks["plain CFG pass"]
        print(f"{name:28s} {min_median(times[name])[1]:7.2f} s  / every block checkpointed min/median "
              f"{lo:.2f}/{med:.2f}x  peak {peaks[name] / 2**20:7.1f} MiB ({memory:.2f}x the plain CFG pass)")
        rows.append({"what": f"gradient pass, {name} / every block checkpointed, time ({args.res}px)",
                     "values": [lo, med], "goal": "", "note": f"peak {memory:.2f}x a plain CFG pass"})
    emit(f"checkpointing {args.size} {args.device}", rows)


if __name__ == "__main__":
    main()
