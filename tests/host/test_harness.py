"""The host-tier harness itself: tiny models, UI-to-API conversion, prompt execution, pack registration."""
import copy
import json
import pathlib

import pytest
import torch
from PIL import Image

import harness
import ui_to_api

DATA = pathlib.Path(__file__).resolve().parent / "data"


def load(name):
    return json.loads((DATA / name).read_text())


def test_repo_pack_registers_its_nodes(host):
    assert host.pack_loaded, f"the host could not import the pack at {host.pack_path}:\n{host.pack_log}"
    node = host.nodes.NODE_CLASS_MAPPINGS.get("AttentionCapture")
    assert node is not None, "AttentionCapture is not registered: the pack imported but did not list it"
    assert node.RELATIVE_PYTHON_MODULE == f"custom_nodes.{harness.PACK_FOLDER_NAME}"


# --- tiny models -----------------------------------------------------------------------------


def _x0(model, clip, text, x, sigma):
    """The model's x0 prediction for ``text``, as the sampler computes it (SDXL adm from pooled + size)."""
    base = model.model
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    batch = x.shape[0]
    extra = {}
    if base.adm_channels:
        height, width = (8 * s for s in x.shape[-2:])
        extra["y"] = base.encode_adm(pooled_output=out["pooled_output"].repeat(batch, 1), width=width, height=height)
    return base.apply_model(x, torch.full((batch,), sigma), c_crossattn=out["cond"].repeat(batch, 1, 1), **extra)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@torch.inference_mode()
def test_tiny_model_is_not_degenerate(tiny, kind):
    model, clip, vae = getattr(tiny, f"tiny_{kind}")()
    gen = torch.Generator().manual_seed(123)
    pixels = tiny.smooth_images(gen, n=2, height=128, width=128).movedim(1, -1)
    latents = model.model.process_latent_in(vae.encode(pixels))
    # the VAE is calibrated on other images; fresh ones must still give unit-scale latents
    print(f"{kind}: model-space latent mean {latents.mean():.3f} std {latents.std():.3f}")
    assert abs(latents.mean()) < 0.3 and 0.7 < latents.std() < 1.3
    for sigma in (1.0, 5.0):
        x = latents + sigma * torch.randn(latents.shape, generator=gen)
        cond = _x0(model, clip, "a watercolour painting of a red fox", x, sigma)
        uncond = _x0(model, clip, "", x, sigma)
        assert torch.isfinite(cond).all() and torch.isfinite(uncond).all()
        # x0 is dominated by x itself; what the prompt must change is the denoising step x - x0
        rel = ((cond - uncond).norm() / (x - uncond).norm()).item()
        print(f"{kind} sigma={sigma}: |x0_c - x0_u| / |x - x0_u| = {rel:.4f}")
        assert rel > 0.02


@torch.inference_mode()
def test_tiny_models_are_deterministic_from_the_seed(tiny):
    cached = tiny.tiny_sd1(0)[0].model.state_dict()
    rebuilt = tiny._build.__wrapped__("sd1", 0)[0].model.state_dict()
    other = tiny._build.__wrapped__("sd1", 1)[0].model.state_dict()
    assert all(torch.equal(cached[k], rebuilt[k]) for k in cached)
    matrices = [k for k, v in cached.items() if v.dim() >= 2]
    assert not any(torch.equal(cached[k], other[k]) for k in matrices)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@torch.inference_mode()
def test_embedding_prompts_use_the_harness_embeddings_folder(host, tiny, kind):
    import safetensors.torch

    _, clip, _ = getattr(tiny, f"tiny_{kind}")()
    gen = torch.Generator().manual_seed(5)
    widths = {"clip_l": (tiny.SD1_CLIP_L if kind == "sd1" else tiny.SDXL_CLIP_L)["hidden_size"], "clip_g": tiny.SDXL_CLIP_G["hidden_size"]}
    vectors = {key: torch.randn(2, width, generator=gen) for key, width in widths.items()}
    safetensors.torch.save_file(vectors, str(host.embeddings_dir / f"tinytoken_{kind}.safetensors"))
    tokens = clip.tokenize(f"a photo of embedding:tinytoken_{kind}", return_word_ids=True)
    for tower, ids in tokens.items():
        spliced = [t for t in ids[0] if torch.is_tensor(t[0])]
        assert len(spliced) == 2, f"clip_{tower}: {len(spliced)} embedding vectors spliced, expected 2"
        # word ids count prompt segments, not words: "a photo of" is 1, the embedding 2
        assert {t[2] for t in spliced} == {2}
    with_embedding = clip.encode_from_tokens(tokens)
    without = clip.encode_from_tokens(clip.tokenize("a photo of"))
    assert with_embedding.shape == without.shape
    assert (with_embedding - without).abs().max() > 0.1


# --- UI -> API conversion --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["converter_features", "converter_edge_cases"])
def test_convert_matches_the_hand_written_api_prompt(host, name):
    workflow = load(f"{name}.json")
    expected = load(f"{name}.api.json")
    assert ui_to_api.convert(workflow) == expected
    # the same graph in the frontend's object-style link format
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow["links"] = [dict(zip(keys, link)) for link in workflow["links"]]
    assert ui_to_api.convert(workflow) == expected


def test_widget_slots_follow_the_frontend(host):
    class Synthetic:
        @classmethod
        def INPUT_TYPES(cls):
            return {
                "required": {
                    "model": ("MODEL",),
                    "image": (["a.png", "b.png"], {"image_upload": True}),
                    "seed": ("INT", {"default": 0}),
                    "strength": ("FLOAT", {"control_after_generate": True}),
                    "mode": ("COMBO", {"options": ["x", "y"], "control_after_generate": True}),
                    "count": ("INT", {"forceInput": True}),
                },
                "optional": {"noise_seed": ("INT", {"control_after_generate": False}), "label": ("STRING", {})},
                "hidden": {"unique_id": "UNIQUE_ID"},
            }

    # seed by name +1, FLOAT control +1, COMBO control + filter list +2, upload after the
    # required widgets; an explicit False beats the seed name; sockets and forceInput take no slot
    assert ui_to_api.widget_names(Synthetic) == [
        "image", "seed", None, "strength", None, "mode", None, None, None, "noise_seed", "label"
    ]


def test_convert_rejects_what_it_cannot_reproduce(host):
    workflow = load("txt2img_sd1.json")
    subgraph = copy.deepcopy(workflow)
    subgraph["definitions"] = {"subgraphs": [{"id": "0d3c4e7a-subgraph"}]}
    subgraph["nodes"][0]["type"] = "0d3c4e7a-subgraph"
    with pytest.raises(ui_to_api.UnsupportedWorkflow, match="subgraphs"):
        ui_to_api.convert(subgraph)
    stale = copy.deepcopy(workflow)
    next(n for n in stale["nodes"] if n["type"] == "KSampler")["widgets_values"].pop(1)
    with pytest.raises(ui_to_api.UnsupportedWorkflow, match=r"6 widgets_values .* for widget slots"):
        ui_to_api.convert(stale)


def test_rewrite_loaders_points_consumers_at_the_matching_tiny_output():
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "sd_xl_base.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors", "type": "sdxl"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
        "5": {"class_type": "Consumer", "inputs": {"model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0], "vae_sd1": ["4", 2], "n": 3}},
    }
    assert harness.rewrite_loaders(prompt) == {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sdxl"}},
        "2": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sdxl"}},
        "3": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sdxl"}},
        "4": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd1"}},
        "5": {"class_type": "Consumer", "inputs": {"model": ["1", 0], "clip": ["2", 1], "vae": ["3", 2], "vae_sd1": ["4", 2], "n": 3}},
    }
    assert {n["inputs"].get("kind") for n in harness.rewrite_loaders(prompt, kind="sd1").values()} == {"sd1", None}


# --- running prompts and workflows -----------------------------------------------------------


def test_txt2img_workflow_runs_on_the_tiny_model(host):
    workflow = load("txt2img_sd1.json")
    first = harness.run_workflow(workflow)
    image = first["8"][0]
    assert tuple(image.shape) == (1, 128, 128, 3)
    print(f"txt2img: image mean {image.mean():.3f} std {image.std():.3f}")
    assert image.std() > 0.05
    saved = first.ui["9"]["images"][0]
    with Image.open(host.output_dir / saved["subfolder"] / saved["filename"]) as png:
        assert png.size == (128, 128)
    assert torch.equal(harness.run_workflow(workflow)["8"][0], image)
    next(n for n in workflow["nodes"] if n["type"] == "KSampler")["widgets_values"][0] += 1
    other_seed = harness.run_workflow(workflow)["8"][0]
    assert (other_seed - image).abs().mean() > 0.01


def test_features_workflow_runs_with_its_bypass_honoured(host, tiny):
    pixels = tiny.smooth_images(torch.Generator().manual_seed(7), n=1, height=80, width=96)
    array = (pixels[0].movedim(0, -1) * 255).round().byte().numpy()
    Image.fromarray(array).save(host.input_dir / "fox.png")
    image = harness.run_workflow(load("converter_features.json"))["10"][0]
    # the bypassed ImageScale would have made it 128x128
    assert tuple(image.shape) == (1, 80, 96, 3)


def test_run_prompt_reports_validation_errors(host):
    prompt = harness.rewrite_loaders(ui_to_api.convert(load("txt2img_sd1.json")))
    prompt["3"]["inputs"]["steps"] = 0
    with pytest.raises(AssertionError, match=r"(?s)node_errors.*steps"):
        harness.run_prompt(prompt)


def test_run_prompt_reports_execution_errors(host):
    # a 16-channel latent validates (it is a LATENT) but cannot enter the 4-channel VAE
    prompt = {
        "1": {"class_type": "TinyCheckpointLoader", "inputs": {"kind": "sd1"}},
        "2": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    with pytest.raises(AssertionError, match=r"(?s)node 3 \(VAEDecode\): RuntimeError: .*16 channels.*File "):
        harness.run_prompt(prompt)
