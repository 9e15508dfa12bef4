"""Gradient checkpointing of the host's UNet (``nodes/checkpointing.py``) on the tiny SD1 and SDXL models.

The reference is the host's own, unwrapped UNet forward: the checkpointed forward must give the same
prediction bit for bit and the same LoRA gradients, with less memory held for backward.
"""
import contextlib

import pytest
import torch
from memory import PeakMemory


@pytest.fixture(scope="module")
def ckpt(pack):
    return pack("nodes.checkpointing")


def lora_model(pack, model, rank=4, seed=0):
    """A fresh-weight clone with one trainable LoRA adapter per attention projection (PALP's trainables)."""
    palp, sampling = pack("nodes.palp"), pack("nodes.sampling")
    worker = sampling.gradient_model(model)
    gen = torch.Generator().manual_seed(seed)
    adapters = []
    with torch.inference_mode(False):
        for name, shape in palp.attention_projections(model):
            adapter = palp.LoRAAdapter.create(shape, rank, gen, "cpu")
            with torch.no_grad():
                adapter.up.normal_(0, 0.05, generator=gen)     # nonzero, so both factors get gradients
            worker.add_weight_wrapper(f"{name}.weight", adapter)
            adapters.append(adapter)
    return worker, adapters


def gradient_pass(pack, model, clip, adapters, measure=False):
    """One differentiated UNet pass on a fixed noisy latent; (prediction, LoRA gradients, peak bytes or None)."""
    sampling = pack("nodes.sampling")
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 4, 16, 16, generator=gen)
    eps = torch.randn(latent.shape, generator=gen)
    cond = pack("nodes.inversion").conditioning(*pack("nodes.host").encode_text(clip, "a photo of a dog"))

    def fn(loop, x, sigmas):
        with sampling.grad_enabled():
            for a in adapters:
                a.zero_grad(set_to_none=True)
            with PeakMemory() if measure else contextlib.nullcontext() as tracker:
                x_t = x.clone() + 3.0 * eps
                denoised = loop.denoise(x_t, 3.0)
                denoised.square().mean().backward()
            grads = [p.grad.clone() for a in adapters for p in (a.down, a.up)]
            return x, (denoised.detach().clone(), grads, tracker.peak if measure else None)

    with torch.inference_mode():
        return sampling.run_loop(model, cond, cond, latent, torch.tensor([3.0, 0.0]), fn)[1]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_checkpointed_forward_and_gradients_equal_the_hosts(pack, tiny, ckpt, family):
    model, clip, _ = getattr(tiny, f"tiny_{family}")()
    worker, adapters = lora_model(pack, model)
    plain = gradient_pass(pack, worker, clip, adapters)
    checkpointed = gradient_pass(pack, ckpt.with_gradient_checkpointing(worker), clip, adapters)
    assert torch.equal(plain[0], checkpointed[0])
    for g_plain, g_ckpt in zip(plain[1], checkpointed[1]):
        assert torch.allclose(g_plain, g_ckpt, rtol=1e-5, atol=1e-9)
    assert sum(g.abs().sum() for g in plain[1]) > 0


@contextlib.contextmanager
def counting_block_runs(runs: list):
    """Records the index of every UNet block run (forward or backward's recomputation)."""
    from comfy.ldm.modules.diffusionmodules import openaimodel
    original = openaimodel.forward_timestep_embed

    def counted(block, *args, **kwargs):
        runs.append(args[3]["block"])
        return original(block, *args, **kwargs)
    openaimodel.forward_timestep_embed = counted
    try:
        yield
    finally:
        openaimodel.forward_timestep_embed = original


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_blocks_kept_whole_give_the_same_gradients_and_are_not_recomputed(pack, tiny, ckpt, family):
    """keep > 0: the first pass checkpoints every block and counts; the next keeps the smallest blocks whole (run
    once, not again in backward), with the host's forward and gradients, within keep × the largest block's bytes."""
    model, clip, _ = getattr(tiny, f"tiny_{family}")()
    worker, adapters = lora_model(pack, model)
    plain = gradient_pass(pack, worker, clip, adapters)
    wrapped = ckpt.with_gradient_checkpointing(worker, keep=0.5)
    first, second = [], []
    with counting_block_runs(first):
        counted = gradient_pass(pack, wrapped, clip, adapters)
    with counting_block_runs(second):
        planned = gradient_pass(pack, wrapped, clip, adapters)
    for result in (counted, planned):
        assert torch.equal(plain[0], result[0])
        for g_plain, g in zip(plain[1], result[1]):
            assert torch.allclose(g_plain, g, rtol=1e-5, atol=1e-9)
    # a checkpointed block runs again in backward when something in it needs a gradient (an adapter, or a gradient
    # flowing into its input); one kept whole runs once
    recomputed = {b for b in first if first.count(b) == 2}
    whole = {b for b in recomputed if second.count(b) == 1}
    assert whole and whole != recomputed
    assert all(second.count(b) == first.count(b) for b in set(first) - whole)


def test_kept_whole_takes_the_smallest_blocks_within_the_budget(ckpt):
    sizes = {("input", 1): 100, ("input", 2): 10, ("middle", 0): 20, ("output", 0): 25, ("output", 1): 60}
    assert ckpt.kept_whole(sizes, 0.5) == {("input", 2), ("middle", 0)}
    assert ckpt.kept_whole(sizes, 0.55) == {("input", 2), ("middle", 0), ("output", 0)}
    assert ckpt.kept_whole(sizes, 0.0) == set()
    assert ckpt.kept_whole({}, 0.5) == set()


def test_checkpointing_keeps_the_hosts_patches_in_place(pack, tiny, ckpt):
    """emb, block and attention patches that read the block and transformer index: same forward, same gradients."""
    model, clip, _ = tiny.tiny_sd1()
    worker, adapters = lora_model(pack, model)
    worker.set_model_emb_patch(lambda emb, channels, options: emb * 1.05)
    worker.set_model_input_block_patch(lambda h, options: h * (1 + 0.01 * options["block"][1]))
    worker.set_model_input_block_patch_after_skip(lambda h, options: h * 0.98)
    worker.set_model_output_block_patch(lambda h, skip, options: (h * 1.02, skip * (1 - 0.01 * options["block"][1])))
    worker.set_model_attn2_output_patch(lambda out, extra: out * (1 + 0.1 * extra["transformer_index"]))
    plain = gradient_pass(pack, worker, clip, adapters)
    checkpointed = gradient_pass(pack, ckpt.with_gradient_checkpointing(worker), clip, adapters)
    assert torch.equal(plain[0], checkpointed[0])
    for g_plain, g_ckpt in zip(plain[1], checkpointed[1]):
        assert torch.allclose(g_plain, g_ckpt, rtol=1e-5, atol=1e-9)
    unpatched_worker, unpatched_adapters = lora_model(pack, model)
    assert not torch.allclose(gradient_pass(pack, unpatched_worker, clip, unpatched_adapters)[0], plain[0])


def test_checkpointing_lowers_peak_memory_of_a_gradient_pass(pack, tiny, ckpt):
    model, clip, _ = tiny.tiny_sd1()
    worker, adapters = lora_model(pack, model)
    plain = gradient_pass(pack, worker, clip, adapters, measure=True)[2]
    checkpointed = gradient_pass(pack, ckpt.with_gradient_checkpointing(worker), clip, adapters,
                                 measure=True)[2]
    wrapped = ckpt.with_gradient_checkpointing(worker, keep=0.5)
    gradient_pass(pack, wrapped, clip, adapters)                          # counts the blocks
    kept = gradient_pass(pack, wrapped, clip, adapters, measure=True)[2]
    print(f"peak bytes of one gradient pass: plain {plain}, checkpointed {checkpointed} "
          f"({checkpointed / plain:.2f}x), small blocks kept whole {kept} ({kept / checkpointed:.2f}x checkpointed)")
    assert checkpointed < 0.8 * plain
    assert kept <= 1.5 * checkpointed and kept < plain


def test_checkpointing_is_installed_on_a_clone_only(pack, tiny, ckpt):
    model, _, _ = tiny.tiny_sd1()
    wrapped = ckpt.with_gradient_checkpointing(model)
    assert ckpt.KEY not in str(model.wrappers)
    assert ckpt.KEY in str(wrapped.wrappers)
