import torch

from comfyui_personalize.attention.swap import LAYOUT, REFERENCE, TARGET, SwapState, blend_output_patch, reference_kv
from transfers import CpuToDevice

H, W, C = 4, 6, 8
KEY = ("output", 3, 0)


def options(chunks=2):
    return {"cond_or_uncond": list(range(chunks)), "activations_shape": [6, C, H, W], "block": KEY[:2], "block_index": 0}


def paths(seed=0, chunks=2):
    return torch.randn(chunks * 3, H * W, C, generator=torch.Generator().manual_seed(seed))


def test_blend_mixes_only_the_target_by_the_mask_per_chunk():
    state = SwapState()
    mask = (torch.rand(1, 2 * H, 2 * W, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    state.set_mask(mask)
    out = paths()
    blended = blend_output_patch({KEY}, state)(out, options()).reshape(2, 3, 1, H * W, C)
    m = torch.nn.functional.avg_pool2d(mask[None], 2)[0].flatten(1)[..., None]     # area resize to H×W
    expect = out.reshape(2, 3, 1, H * W, C)
    for chunk in range(2):
        assert torch.equal(blended[chunk, REFERENCE], expect[chunk, REFERENCE])
        assert torch.equal(blended[chunk, LAYOUT], expect[chunk, LAYOUT])
        torch.testing.assert_close(blended[chunk, TARGET],
                                   m * expect[chunk, TARGET] + (1 - m) * expect[chunk, LAYOUT])


def test_swap_gives_the_target_the_references_keys_and_values():
    k, v = paths(2), paths(3)
    k2, v2 = reference_kv(k, v, 2)
    for new, old in ((k2, k), (v2, v)):
        new, old = new.reshape(2, 3, 1, H * W, C), old.reshape(2, 3, 1, H * W, C)
        assert torch.equal(new[:, TARGET], old[:, REFERENCE]) and torch.equal(new[:, :TARGET], old[:, :TARGET])


def test_blending_copies_nothing_from_the_cpu_after_the_first_pass():
    # the mask is made on the CPU; on a GPU a copy at every call waits for the device's queue
    state = SwapState()
    state.set_mask(torch.ones(1, H, W))
    patch = blend_output_patch({KEY}, state)
    out = paths().to("meta")
    patch(out, options())
    with CpuToDevice() as seen:
        patch(out, options())
    assert seen.seen == []


def test_mask_cached_in_inference_mode_serves_a_later_gradient_pass():
    state = SwapState()
    patch = blend_output_patch({KEY}, state)
    with torch.inference_mode():
        state.set_mask(torch.rand(1, H, W))
        patch(paths(), options())
    out = paths().requires_grad_(True)
    patch(out, options()).sum().backward()
    assert out.grad is not None
