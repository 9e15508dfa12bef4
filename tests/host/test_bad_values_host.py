"""No silently wrong result (issue 9 §3): NaN/Inf inputs and results, broken inversion files, empty masks and
reads of maps that were never recorded end in a message that says what was wrong and what to do."""
import logging
import os
import types

import pytest
import torch

PROMPT = "a photo of a sks dog on the beach"


@pytest.fixture(scope="module")
def env(host, pack):
    import tiny_models
    model, clip, vae = tiny_models.tiny_sd1()
    return types.SimpleNamespace(inv=pack("nodes.inversion"), cap=pack("nodes.capture"), masks=pack("nodes.masks"),
                                 model=model, clip=clip, vae=vae, tiny=tiny_models, host=host,
                                 encode=lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text)))


def invert(env, save_name="", latent=None, image=None, mode="ddim", lr=1e-2, steps=3):
    with torch.inference_mode():
        return env.inv.NullTextInvert.execute(env.model, env.clip, PROMPT, mode, steps, "ddim_uniform", 7.5, 2, lr,
                                              1e-5, save_name, image=image, vae=env.vae if image is not None else None,
                                              latent=latent, reconstruct=False).args


def saved(env, name):
    return os.path.exists(env.inv.inversion_path(name))


# --- inversions ----------------------------------------------------------------------------------


def test_a_nan_reference_is_refused_and_nothing_is_saved(env):
    image = env.tiny.smooth_images(torch.Generator().manual_seed(1), 1, 64, 64).movedim(1, -1).clone()
    image[0, 3, 5, 1] = float("nan")
    with pytest.raises(ValueError, match=r"the reference IMAGE holds 1 NaN/Inf value \(of 12288\): fix the node"):
        invert(env, "nan image", image=image)
    latent = torch.zeros(1, 4, 8, 8)
    latent[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="the reference LATENT holds 1 NaN/Inf value"):
        invert(env, "nan latent", latent={"samples": latent})
    assert not saved(env, "nan image") and not saved(env, "nan latent")


def test_a_diverging_inversion_is_refused_and_nothing_is_saved(env):
    """A finite latent at float32's edge overflows inside the UNet: the trajectory goes NaN."""
    huge = torch.full((1, 4, 8, 8), 3e38)
    with pytest.raises(ValueError, match="the inversion's .* holds .* NaN/Inf .* it diverged, and nothing was saved"):
        invert(env, "diverged", latent={"samples": huge})
    assert not saved(env, "diverged")


def test_save_inversion_refuses_nan_tensors(env):
    inversion = invert(env, latent={"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))})[0]
    inversion.trajectory = inversion.trajectory.clone()
    inversion.trajectory[1, 0, 0, 0, 0] = float("nan")
    path = env.inv.inversion_path("nan trajectory")
    with pytest.raises(ValueError, match="the inversion's trajectory holds 1 NaN/Inf value .* it is not saved"):
        env.inv.save_inversion(inversion, path)
    assert not os.path.exists(path)


@pytest.fixture(scope="module")
def good_file(env):
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    invert(env, "good", latent=latent)
    with open(env.inv.inversion_path("good"), "rb") as f:
        return f.read()


def write(env, name, data: bytes):
    with open(env.inv.inversion_path(name), "wb") as f:
        f.write(data)
    return name + ".safetensors"


def rewrite(env, name, transform):
    """A copy of the good file with its tensors and metadata changed by ``transform(tensors, metadata)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(env.inv.inversion_path("good"), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    transform(tensors, metadata)
    save_file(tensors, env.inv.inversion_path(name), metadata=metadata)
    return name + ".safetensors"


def nan_trajectory(tensors, metadata):
    tensors["trajectory"][0, 0, 0, 0, 0] = float("nan")


def older_settings(tensors, metadata):
    metadata["settings"] = metadata["settings"].replace('"early_stop"', '"stop"')


def foreign_format(tensors, metadata):
    metadata["format"] = "comfyui-personalize.inversion/0"


def dropped_trajectory(tensors, metadata):
    del tensors["trajectory"]


@pytest.mark.parametrize("make, reason", [
    (lambda env, good: write(env, "empty", b""), r"cannot be read \(.*header too small.*empty, cut short"),
    (lambda env, good: write(env, "truncated", good[:len(good) // 2]), r"cannot be read .*empty, cut short"),
    (lambda env, good: write(env, "garbage", b"\x07" * 64 + good[8:200]), r"cannot be read"),
    (lambda env, good: rewrite(env, "foreign", foreign_format), r"is not an inversion file of this pack's format .*/0"),
    (lambda env, good: rewrite(env, "older", older_settings), r"has the settings .*'stop'.* where this version writes"),
    (lambda env, good: rewrite(env, "no trajectory", dropped_trajectory), r"lacks the tensors trajectory"),
    (lambda env, good: rewrite(env, "nan", nan_trajectory), r"holds NaN/Inf values in its trajectory"),
], ids=["empty", "truncated", "garbage", "foreign-format", "older-settings", "missing-tensor", "nan"])
def test_broken_inversion_files_name_the_file_and_say_make_it_again(env, good_file, make, reason):
    name = make(env, good_file)
    with pytest.raises(ValueError, match=rf"the inversion file .*{name} {reason}.*: make it again with Null-Text Invert"):
        with torch.inference_mode():
            env.inv.LoadInversion.execute(name, env.model)


# --- attention maps and masks --------------------------------------------------------------------


def capture_run(env, cfg=7.5, layers="cross", steps="all"):
    import comfy.sample
    with torch.inference_mode():
        captured, store = env.cap.AttentionCapture.execute(env.model, env.clip, PROMPT, "dog", layers, steps, "").args
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        out = comfy.sample.sample(captured, noise, 3, cfg, "euler", "normal", env.encode(PROMPT), env.encode(""),
                                  torch.zeros_like(noise), disable_pbar=True, seed=0)
    return store, out


def read(env, store, samples, **kw):
    args = dict(branch="cond", mask_layers="decoder", mask_threshold=0.5, cell=8) | kw
    return env.cap.AttentionMaps.execute(store, {"samples": samples}, **args).args


def test_attention_maps_say_why_there_is_nothing_to_show(env, caplog):
    store, out = capture_run(env, cfg=1.0)
    assert read(env, store, out)[1].any()
    with pytest.raises(ValueError, match="no 'uncond' maps were recorded: the sampler ran at CFG 1"):
        read(env, store, out, branch="uncond")

    store, out = capture_run(env, layers="encoder")
    with pytest.raises(ValueError, match=r"mask_layers 'decoder' selects none of the layers this capture recorded "
                                         r"\(input\.1\.0 1/1, .*\): widen Attention Capture's layer rule"):
        read(env, store, out)

    store, out = capture_run(env, steps="5-9")
    with pytest.raises(ValueError, match="the capture recorded no step of this 3-step run"):
        read(env, store, out)

    store, out = capture_run(env)
    with pytest.raises(ValueError, match="the LATENT holds 1 NaN/Inf value .* the sampling run diverged"):
        read(env, store, torch.where(out == out.flatten()[0], torch.nan, out))

    run = store.run_for(out)                   # a word attended uniformly: flat maps, nothing to threshold
    run.maps = {key: torch.zeros_like(maps) for key, maps in run.maps.items()}
    with caplog.at_level(logging.WARNING):
        _, mask = read(env, store, out)
    assert not mask.any() and "Attention Maps: the mask is empty" in caplog.text


def test_adaptive_mask_refuses_nan_and_warns_of_an_empty_mask(env, caplog):
    def adaptive(cross, sam=None, threshold=0.1):
        return env.masks.AdaptiveMask.execute(cross, "or", threshold, 0.01, True, sam_mask=sam).args[0]

    cross = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert adaptive(cross).any()
    with pytest.raises(ValueError, match=r"the cross_mask holds 1 NaN/Inf value .*values in \[0, 1\]"):
        adaptive(torch.where(cross == cross.max(), torch.nan, cross))
    with pytest.raises(ValueError, match="the sam_mask holds 1024 NaN/Inf values"):
        adaptive(cross, torch.full((1, 32, 32), torch.nan))
    with caplog.at_level(logging.WARNING):
        empty = adaptive(cross * 0.05)
    assert not empty.any() and "Adaptive Mask: the mask of item(s) [0] is empty" in caplog.text
