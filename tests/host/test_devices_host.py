"""No stored tensor meets a computation on another device without an explicit move (issue 9 §1).

The tests run each node flow twice on the CPU: plainly, and under ``virtual_devices.VirtualDevices`` with
the model's load device set to a stand-in compute device, where every tensor keeps the device it would
be on in a GPU run and an op mixing two devices raises as CUDA does. The flow must run there and give
bit-identical numbers (the stand-in changes no value, only checks where each tensor would live).
"""

import pytest
import torch

from virtual_devices import COMPUTE, HOST, MixedDevices, VirtualDevices, on_compute

STEPS = 10
PROMPT, REF_PROMPT = "a photo of a sks dog in the water", "a photo of a sks dog"


@pytest.fixture(scope="module")
def env(sd1_nodes):
    return sd1_nodes


def image(env, seed, side=128):
    return env.tiny.smooth_images(torch.Generator().manual_seed(seed), 1, side, side).movedim(1, -1)


def schedule(model, steps=STEPS):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)


def twice(flow, env):
    """``flow(model, mode)`` plainly and under virtual devices; returns both results."""
    with torch.inference_mode():
        plain = flow(env.model, None)
    mode = VirtualDevices()
    with torch.inference_mode(), mode:
        virtual = flow(on_compute(env.model, mode), mode)
    return plain, virtual, mode


def place(mode, tree):
    return tree if mode is None else mode.place(tree)


def test_the_stand_in_catches_a_missing_move_and_passes_an_explicit_one():
    mode = VirtualDevices()
    with mode:
        x = torch.randn(4, 3).to(COMPUTE)
        kept = (x * 2).detach().float().cpu()                  # the palette's old way of keeping state
        assert x.device == COMPUTE and kept.device == HOST
        with pytest.raises(MixedDevices, match="matmul mixes tensors on two devices"):
            x @ kept.t()
        assert torch.equal(x @ kept.to(x.device).t(), x @ (x * 2).t())
        assert (x * torch.tensor(2.0)).device == COMPUTE       # a 0-dim CPU tensor mixes, as on CUDA
        assert torch.zeros(2, device=x.device).device == COMPUTE and torch.zeros(2).device == HOST


def test_pick_and_draw_appearance_and_layout_keep_devices_apart(env):
    """P&D's palette is kept on the CPU; the first appearance step used to multiply it with GPU features."""
    import comfy.sample
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    sigmas = schedule(env.model)

    def flow(model, mode):
        place(mode, sigmas)
        latent = place(mode, torch.zeros(1, 4, 16, 16))
        inversion = env.inv.NullTextInvert.execute(model, env.clip, REF_PROMPT, "ddim", STEPS, "ddim_uniform", 7.5, 10,
                                                   1e-2, 1e-5, "", image=place(mode, image(env, 5)), vae=env.vae).args[0]
        appearance = env.pnd.UREMDGuidance.execute(model, inversion, env.clip, "sks dog", 0.5, "auto", 0.2, 0.4,
                                                   1.0).args[0]
        layout = env.pnd.LayoutGuidance.execute(model, env.clip, PROMPT, "dog", env.encode(PROMPT), env.encode(""), 7.5,
                                                Noise_RandomNoise(1), sigmas, {"samples": latent}, "cross", 0.0, 0.2,
                                                1.0, 3, 0.5).args[0]
        prepared, sampler = env.pnd.PickAndDrawSampler.execute(model, env.clip, PROMPT, "dog", 0.5, True, appearance,
                                                               layout).args
        noise = place(mode, Noise_RandomNoise(0).generate_noise({"samples": latent}))
        return comfy.sample.sample_custom(prepared, noise, 7.5, sampler, sigmas, env.encode(PROMPT), env.encode(""),
                                          latent, disable_pbar=True, seed=0)

    plain, virtual, mode = twice(flow, env)
    assert torch.equal(plain, virtual)
    assert mode.device_of(virtual) == HOST, "the sampler's LATENT comes back to the CPU"


def test_null_text_inversion_saved_and_loaded_keeps_devices_apart(env, host):
    """NullTextInvert's null embeddings and trajectory, written and read back, replayed by UREMD's palette pass."""
    def flow(model, mode):
        name = "devices" if mode is None else "devices_virtual"
        made = env.inv.NullTextInvert.execute(model, env.clip, REF_PROMPT, "null-text", 4, "ddim_uniform", 7.5, 2, 0.1,
                                              1e-5, name, image=place(mode, image(env, 6)), vae=env.vae).args
        loaded = env.inv.LoadInversion.execute(name + ".safetensors", model).args[0]
        place(mode, [getattr(loaded, k) for k in env.inv.TENSOR_FIELDS])    # a file is read onto the CPU
        term = env.pnd.UREMDGuidance.execute(model, loaded, env.clip, "sks dog", 0.3, "auto", 0.0, 0.9, 1.0).args[0]
        return made[1]["samples"], loaded.null_embeddings, [v for step in term.palette for v in step.values()]

    plain, virtual, mode = twice(flow, env)
    assert torch.equal(plain[0], virtual[0]) and torch.equal(plain[1], virtual[1])
    assert all(torch.equal(a, b) for a, b in zip(plain[2], virtual[2]))
    assert mode.device_of(virtual[0]) == HOST, "the reconstruction LATENT comes back where the host's samplers put theirs"


@pytest.mark.parametrize("mask_on", ["cpu", "compute device", "compute device, --highvram"])
def test_layout_and_retouch_masks_and_swap_keep_devices_apart(env, mask_on):
    """MultiSourceAttnSwap: the capture store's M^c (offloaded: the CPU, or the GPU under --highvram), a MASK input
    (on the CPU, or on the GPU as another node may leave it) and the swap masks; its LATENT and MASK come back
    where the host's samplers and mask nodes put theirs."""
    def flow(model, mode):
        if mode is not None and mask_on.endswith("--highvram"):
            model.offload_device = COMPUTE
        inversions = [env.inv.NullTextInvert.execute(model, env.clip, "", "ddim", 6, "normal", 7.5, 10, 1e-2, 1e-5, "",
                                                     image=place(mode, image(env, s, 64)), vae=env.vae,
                                                     reconstruct=False).args[0] for s in (7, 8)]
        mask = (torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
        if mode is not None:
            mode.place(mask, HOST if mask_on == "cpu" else COMPUTE)
        out, used = env.lnr.MultiSourceAttnSwap.execute(
            model, *inversions, env.encode(REF_PROMPT), env.encode(PROMPT), env.encode(""), 7.5, 2, 4, "auto", "auto",
            env.clip, PROMPT, "dog", mask, 0.1).args
        return out["samples"], used

    plain, virtual, mode = twice(flow, env)
    assert torch.equal(plain[0], virtual[0]) and torch.equal(plain[1], virtual[1])
    assert 0 < plain[1].mean() < 1, "the blend mask must be used (else the test shows nothing)"
    assert mode.device_of(virtual[0]) == HOST and mode.device_of(virtual[1]) == HOST


def test_attention_capture_and_maps_keep_devices_apart(env):
    import comfy.sample

    def flow(model, mode):
        captured, store = env.cap.AttentionCapture.execute(model, env.clip, PROMPT, "dog, water", "cross", "all", "").args
        noise = place(mode, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
        samples = comfy.sample.sample(captured, noise, 4, 7.5, "euler", "normal", env.encode(PROMPT), env.encode(""),
                                      place(mode, torch.zeros_like(noise)), disable_pbar=True, seed=0)
        grid, mask = env.cap.AttentionMaps.execute(store, {"samples": samples}, "cond", "decoder", 0.5, 16).args
        return grid, mask

    plain, virtual, _ = twice(flow, env)
    assert torch.equal(plain[0], virtual[0]) and torch.equal(plain[1], virtual[1])


def test_attention_maps_of_a_store_kept_on_the_gpu(env):
    """Under --highvram / --gpu-only the host's offload device is the GPU, so the capture keeps its runs there:
    Attention Maps' grid and MASK still come back to the CPU, and the MASK joins a SAM mask in Adaptive Mask."""
    import comfy.sample
    from comfyui_personalize.nodes.masks import AdaptiveMask

    def flow(model, mode):
        if mode is not None:
            model.offload_device = COMPUTE
        captured, store = env.cap.AttentionCapture.execute(model, env.clip, PROMPT, "dog", "cross", "all", "").args
        noise = place(mode, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
        samples = comfy.sample.sample(captured, noise, 4, 7.5, "euler", "normal", env.encode(PROMPT), env.encode(""),
                                      place(mode, torch.zeros_like(noise)), disable_pbar=True, seed=0)
        grid, mask = env.cap.AttentionMaps.execute(store, {"samples": samples}, "cond", "decoder", 0.3, 16).args
        sam = place(mode, (torch.rand(1, 128, 128, generator=torch.Generator().manual_seed(1)) > 0.7).float())
        where = None if mode is None else [mode.device_of(t) for t in (grid, mask)]
        return grid, mask, AdaptiveMask.execute(mask, "or", 0.1, 0.01, True, sam_mask=sam).args[0], where

    plain, virtual, _ = twice(flow, env)
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], virtual[:3]))
    assert virtual[3] == [HOST, HOST]
