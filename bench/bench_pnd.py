"""Pick-and-Draw cost: end to end (DDIM inversion of the reference + template + palette + guided sampling)
and guided sampling alone (a ready inversion), each as a ratio to one plain sampling run of the same
steps and CFG; and the peak memory of one guided step against one plain CFG step.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_pnd.py [--size tiny|sd15] [--device cpu|cuda]
        [--steps 50] [--res 128] [--repeats 3] [--measure memory time] [--checkpointing on off] [--trials]

Goals (issue 11): end to end, inversion included, ≤ 2.2× plain; peak memory of a guided step ≤ 1.5×
a plain CFG step (at SD1.5 size: ``--size sd15 --measure memory``).
- The palette needs only the DDIM pivots (methods.md §1.3), so the inversion is NullTextInvert's
  ``ddim`` mode without its reconstruction; null-text inversion is ``bench_nti.py``'s.
- Time: this process's CPU time on one thread on the CPU (wall time on a GPU or with ``--threads`` > 1),
  the variants interleaved; each ratio pairs one run of a variant with the plain run beside it.
- Memory: the peak bytes one sampler step allocates above what exists when it starts (weights,
  palette, template), the CUDA allocator's peak on a GPU, storages counted on the CPU
  (``tests/host/memory.py``): the first step of the layout window and the first of the appearance
  window (one gradient pass each), against the same step sampled plainly with CFG; with the sampler's
  ``gradient_checkpointing`` on (the default, the goal's figure) and off. Printed first.
- Time: guided sampling with checkpointing on (the smallest blocks kept whole, the default), on for every
  block, and off; end to end with the default.
- ``--trials`` (GPU, fp16 model): the guidance passes and the DDIM inversion computing in fp16 instead of
  fp32, their time and how far their result moves (``precision_trials``). Printed last.
"""
from __future__ import annotations

from common import (clock, emit, inverting_in, min_median, models, parser, patched, ratio_stats, start, synchronized,
                    tf32_matmuls, timed)

PROMPT, TEMPLATE = "a photo of a sks dog in the water", "a photo of a dog in the water"
LAYOUT_WINDOW, APPEARANCE_WINDOW = (0.0, 0.2), (0.2, 0.4)    # percent of the schedule (Fig. 8's steps [0,10), [10,20))


def main():
    ap = parser(repeats=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--measure", nargs="+", choices=["time", "memory"], default=["time", "memory"])
    ap.add_argument("--windows", nargs="+", choices=["layout", "appearance"], default=["layout", "appearance"],
                    help="whose first step the memory figure measures")
    ap.add_argument("--checkpointing", nargs="+", choices=["on", "off"], default=["on", "off"],
                    help="the sampler's gradient_checkpointing settings the memory figure measures")
    ap.add_argument("--trials", action="store_true",
                    help="also time precision trials (GPU, fp16 model): the guidance passes and the DDIM inversion "
                         "computing in the model's fp16 instead of fp32, against the default, with how far their "
                         "result moves")
    ap.add_argument("--no-memory-warmup", dest="memory_warmup", action="store_false",
                    help="measure each step's first run (saves time at SD1.5 size on a CPU)")
    args = ap.parse_args()
    start(args)

    import torch
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    from comfyui_personalize.nodes import inversion as inv
    from comfyui_personalize.nodes import pnd

    model, clip, _ = models(args.size, args.device, args.weights)
    side = args.res // 8
    def encode(text):
        with torch.inference_mode():            # as the executor runs every node
            return clip.encode_from_tokens_scheduled(clip.tokenize(text))
    pos, neg, tpos = encode(PROMPT), encode(""), encode(TEMPLATE)
    latent = torch.zeros(1, 4, side, side)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", args.steps)
    noise = Noise_RandomNoise(0)
    reference = latent + torch.randn(latent.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    euler = comfy.samplers.sampler_object("euler")

    def sample(m, sampler, schedule):
        return comfy.sample.sample_custom(m, noise.generate_noise({"samples": latent}), 7.5, sampler, schedule, pos,
                                          neg, latent, disable_pbar=True)

    def invert():
        return inv.NullTextInvert.execute(model, clip, "a photo of a sks dog", "ddim", args.steps, "ddim_uniform", 7.5,
                                          10, 1e-2, 1e-5, "", latent={"samples": reference}, reconstruct=False).args[0]

    def terms(inversion, schedule=sigmas):
        appearance = pnd.UREMDGuidance.execute(model, inversion, clip, "dog", 0.5, "auto", *APPEARANCE_WINDOW,
                                               1.0).args[0]
        layout = pnd.LayoutGuidance.execute(model, clip, TEMPLATE, "dog", tpos, neg, 7.5, noise, schedule,
                                            {"samples": latent}, "cross", *LAYOUT_WINDOW, 1.0, 3, 0.5).args[0]
        return {"appearance": appearance, "layout": layout}

    def sampler_for(appearance=None, layout=None, checkpointing=True):
        return pnd.PickAndDrawSampler.execute(model, clip, PROMPT, "dog", 0.1, True, appearance, layout,
                                              gradient_checkpointing=checkpointing).args

    def prepare(inversion, checkpointing=True):
        return sampler_for(**terms(inversion), checkpointing=checkpointing)

    with torch.inference_mode():
        inversion = invert()

    @synchronized(args.device)
    def plain():
        with torch.inference_mode():
            sample(model, euler, sigmas)

    @synchronized(args.device)
    def guided():
        with torch.inference_mode():
            sample(*prepare(inversion), sigmas)

    @synchronized(args.device)
    def guided_kept():
        with torch.inference_mode():
            sample(*prepare(inversion, checkpointing=False), sigmas)

    @synchronized(args.device)
    def guided_every_block():
        with torch.inference_mode(), patched(pnd, "KEEP_WHOLE", 0.0):
            sample(*prepare(inversion), sigmas)

    @synchronized(args.device)
    def end_to_end():
        with torch.inference_mode():
            sample(*prepare(invert()), sigmas)

    rows = []
    print(f"{args.size} SD1, {args.device}, res={side * 8}px steps={args.steps} cfg=7.5")
    if "memory" in args.measure:
        from memory import PeakMemory                              # tests/host (on the path: common.load)
        with torch.inference_mode():
            made = terms(inversion)
        peaks = {}
        sampling = model.get_model_object("model_sampling")
        windows = {"layout": LAYOUT_WINDOW, "appearance": APPEARANCE_WINDOW}
        for window in args.windows:
            # the window's first step: σ ≤ the window start's, as the nodes place their windows
            k = next(i for i, s in enumerate(sigmas) if s <= sampling.percent_to_sigma(windows[window][0]))
            step = sigmas[k:k + 2]
            # only the window's own term: the sampler refuses a term whose window holds no step of the run (the
            # other term is inactive at this step, so the step computes the same)
            runs = {"plain": lambda: sample(model, euler, step)}
            for name, on in (("guided", True), ("guided, activations kept", False)):
                if ("on" if on else "off") in args.checkpointing:
                    with torch.inference_mode():
                        prepared, sampler = sampler_for(**{window: made[window]}, checkpointing=on)
                    runs[name] = lambda prepared=prepared, sampler=sampler: sample(prepared, sampler, step)
            for name, run in runs.items():
                if args.memory_warmup:
                    run()                                          # loads the model: not part of a step
                with torch.inference_mode(), PeakMemory(args.device) as meter:
                    run()
                peaks[window, name] = meter.peak
            for name, goal in (("guided", "<= 1.5"), ("guided, activations kept", "")):
                if (window, name) not in peaks:
                    continue
                ratio = peaks[window, name] / peaks[window, "plain"]
                print(f"peak memory of step {k} ({window} window): plain CFG {peaks[window, 'plain'] / 2**20:.1f} MiB, "
                      f"P&D {name} {peaks[window, name] / 2**20:.1f} MiB, ratio {ratio:.2f}x"
                      + (f" (goal {goal}x)" if goal else ""))
                label = "gradient checkpointing" if name == "guided" else "gradient_checkpointing off"
                rows.append({"what": f"P&D peak memory of one guided step ({window} window, {label}) / plain CFG "
                                     f"step, {args.res}px", "values": [ratio], "goal": goal,
                             "note": f"{peaks[window, name] / 2**20:.1f} / {peaks[window, 'plain'] / 2**20:.1f} MiB"})
    if "time" in args.measure:
        fns = {"plain": plain, "guided": guided, "guided, activations kept": guided_kept,
               "guided, every block checkpointed": guided_every_block, "end to end": end_to_end}
        for fn in fns.values():
            fn()                                                   # warm-up
        t = timed(fns, args.repeats, clock(args.device, args.threads))
        for name, goal in (("end to end", "<= 2.2"), ("guided", ""), ("guided, activations kept", ""),
                           ("guided, every block checkpointed", "")):
            lo, med = ratio_stats(t, name, "plain")
            print(f"P&D {name:24s} {min_median(t[name])[1]:8.3f} s  plain {min_median(t['plain'])[1]:.3f} s  ratio "
                  f"min/median {lo:.2f}/{med:.2f}x" + (f" (goal {goal}x)" if goal else ""))
            label = {"end to end": "P&D end to end (DDIM inversion + template + palette + guided sampling) / plain "
                                   "sampling",
                     "guided": "P&D guided sampling, inversion excluded / plain sampling",
                     "guided, activations kept": "P&D guided sampling, gradient_checkpointing off / plain sampling",
                     "guided, every block checkpointed": "P&D guided sampling, every block checkpointed (before the "
                                                         "smallest were kept whole) / plain sampling"}[name]
            rows.append({"what": label, "values": [lo, med], "goal": goal})
    if args.trials:
        rows += precision_trials(args, model, inversion, invert, prepare, sample, sigmas, inv, pnd)
    emit(f"pnd {args.size} {args.device}", rows)


def precision_trials(args, model, inversion, invert, prepare, sample, sigmas, inv, pnd):
    """Issue 11's GPU question for P&D: what fp32 costs where the model computes in fp16. (1) the guidance
    gradient passes in the model's own fp16 (no upcast) against fp32: time of guided sampling, and the cosine
    and norm ratio of what guidance moves in the result (guided − plain); on CUDA also fp32 passes with TF32
    matrix products (fp32's range, so no gradient underflows as in fp16); (2) the DDIM inversion
    (NullTextInvert 'ddim', fp32 by default) in fp16: its time, and the relative difference of its pivots."""
    import contextlib
    import comfy.samplers
    import torch
    from comfyui_personalize.nodes import sampling

    own = model.model_dtype()
    name = str(own).removeprefix("torch.")
    passes_in_own = lambda: patched(pnd, "gradient_model", lambda m: sampling.gradient_model(m, own))
    out = {}

    variants = {False: contextlib.nullcontext, True: passes_in_own, "tf32": tf32_matmuls}

    def guided(trial):
        @synchronized(args.device)
        def run():
            with variants[trial](), torch.inference_mode():
                out[trial] = sample(*prepare(inversion), sigmas).float()
        return run

    def inverted(trial):
        @synchronized(args.device)
        def run():
            with inverting_in(inv, own) if trial else contextlib.nullcontext(), torch.inference_mode():
                out["inversion", trial] = invert().trajectory.float()
        return run

    @synchronized(args.device)
    def plain():
        with torch.inference_mode():
            out["plain"] = sample(model, comfy.samplers.sampler_object("euler"), sigmas).float()

    tf32 = {"fp32 passes, TF32": guided("tf32")} if args.device == "cuda" else {}
    fns = {"fp32 passes": guided(False), f"{name} passes": guided(True), **tf32, "plain": plain,
           "fp32 inversion": inverted(False), f"{name} inversion": inverted(True)}
    for fn in fns.values():
        fn()
    first = out[False]
    t = timed(fns, args.repeats, clock(args.device, args.threads))
    moved = {k: (out[k] - out["plain"]).flatten().double() for k in variants if k in out}
    moved["rerun"] = (first - out["plain"]).flatten().double()     # the floor: fp32 against its own re-run

    def against_fp32(k):
        """Cosine and norm ratio of what guidance moves with variant ``k`` against fp32 passes."""
        return (torch.nn.functional.cosine_similarity(moved[k], moved[False], 0).item(),
                (moved[k].norm() / moved[False].norm()).item())
    cos, norm = against_fp32(True)
    floor = against_fp32("rerun")[0]
    pivots = ((out["inversion", True] - out["inversion", False]).norm() / out["inversion", False].norm()).item()
    passes, inverting = ratio_stats(t, f"{name} passes", "fp32 passes"), ratio_stats(t, f"{name} inversion", "fp32 inversion")
    inversion_share = ratio_stats(t, "fp32 inversion", "plain")
    print(f"trial: guidance passes in {name}: guided sampling time {passes[0]:.2f}/{passes[1]:.2f} of fp32's; what "
          f"guidance moves: cosine {cos:.4f}, norm ratio {norm:.3f} against fp32 passes (fp32 against its own "
          f"re-run: cosine {floor:.4f})")
    print(f"trial: DDIM inversion in {name}: time {inverting[0]:.2f}/{inverting[1]:.2f} of fp32's (fp32 inversion = "
          f"{inversion_share[1]:.2f}x a plain sampling); pivots differ by {pivots:.2e} (relative)")
    rows = []
    if tf32:
        speed, (cos32, norm32) = ratio_stats(t, "fp32 passes, TF32", "fp32 passes"), against_fp32("tf32")
        print(f"trial: guidance passes in fp32 with TF32 products: guided sampling time {speed[0]:.2f}/{speed[1]:.2f} "
              f"of fp32's; what guidance moves: cosine {cos32:.4f}, norm ratio {norm32:.3f} against fp32 passes")
        rows.append({"what": "P&D trial: guidance passes in fp32 with TF32 products / fp32, guided sampling time",
                     "values": list(speed), "goal": "", "note": f"displacement cosine {cos32:.4f}, norm ratio {norm32:.3f}"})
    return rows + [
            {"what": f"P&D trial: guidance passes in {name} / fp32, guided sampling time", "values": list(passes),
             "goal": "", "note": f"displacement cosine {cos:.4f}, norm ratio {norm:.3f}; fp32 re-run {floor:.4f}"},
            {"what": f"P&D trial: DDIM inversion in {name} / fp32, time", "values": list(inverting), "goal": "",
             "note": f"pivots differ by {pivots:.2e}; fp32 inversion {inversion_share[1]:.2f}x plain"}]


if __name__ == "__main__":
    main()
