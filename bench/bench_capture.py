"""AttentionCapture overhead: plain sampling vs sampling with every cross-attention layer captured for one word.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_capture.py [--size tiny|sd15] [--device cpu|cuda]

Prints the min/median time of each, their ratio (goal ≤ 1.3×), the recorded bytes, and peak GPU memory.
Time: this process's CPU time on one thread on the CPU (wall time on a GPU or with ``--threads`` > 1),
interleaved; each ratio pairs one run of each.
"""
from __future__ import annotations

from common import clock, emit, min_median, models, parser, ratio_stats, start, synchronized, timed


def main():
    ap = parser(repeats=5, res=None)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    start(args)

    import torch
    import comfy.sample
    from comfyui_personalize.attention.layers import select_layers
    from comfyui_personalize.attention.store import AttentionStore
    from comfyui_personalize.nodes import host

    model, clip, _ = models(args.size, args.device, args.weights)
    with torch.inference_mode():
        context, uncontext = (clip.encode_from_tokens(clip.tokenize(t)) for t in ("a photo of a dog", ""))
    side = (args.res or (128 if args.size == "tiny" else 512)) // 8
    layers = select_layers(host.unet_layers(model), "cross", kind="cross")
    store = AttentionStore(["dog"], [(5,)], 77, layers, offload_device=torch.device("cpu"))
    captured = host.install_capture(model, store, layers, [])
    noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    latent = torch.zeros_like(noise)
    pos, neg = [[context, {}]], [[uncontext, {}]]

    @synchronized(args.device)
    def sample(m):
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, args.steps, 7.5, "euler", "normal", pos, neg, latent, seed=0,
                                       disable_pbar=True)

    sample(model), sample(captured)                       # warm-up: load weights, pick kernels
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timed({"plain": lambda: sample(model), "capture": lambda: sample(captured)}, args.repeats,
              clock(args.device, args.threads))
    lo, med = ratio_stats(t, "capture", "plain")
    run = store.runs[-1]
    recorded = sum(v.numel() * v.element_size() for v in run.maps.values())
    print(f"size={args.size} device={args.device} res={side * 8}px steps={args.steps} cfg=7.5 layers={len(layers)} words=1")
    print(f"plain   {min_median(t['plain'])[1]:.3f} s   capture {min_median(t['capture'])[1]:.3f} s   ratio min/median "
          f"{lo:.2f}/{med:.2f}x (goal <= 1.3x)")
    print(f"recorded maps: {recorded / 1e6:.2f} MB for {len(run.steps)} steps x {len(layers)} layers x 2 branches")
    if args.device == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    emit(f"capture {args.size} {args.device}", [
        {"what": f"AttentionCapture on every cross-attention layer / plain sampling, {side * 8}px", "values": [lo, med],
         "goal": "<= 1.3", "note": f"maps {recorded / 1e6:.2f} MB"}])


if __name__ == "__main__":
    main()
