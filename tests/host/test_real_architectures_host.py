"""Layer addressing and the 'auto' layer defaults on the real SD1.5 and SDXL base UNets.

The tiny models have other depths, so the defaults the papers name (MasaCtrl's layers 10–15 of SD1.5,
P&D's 32×32 decoder layers) are checked here on the real architectures, built by the host's own
classes on the meta device: every module and shape, no weights, no memory.
"""
import pytest
import torch

REAL = {  # family: (UNet config in tiny_models, host model classes, UNet parameters, transformer blocks)
    "sd15": ("SD15_UNET", "SD15", "BaseModel", 859_520_964, 16),
    "sdxl": ("SDXL_BASE_UNET", "SDXL", "SDXL", 2_567_463_684, 70),
}


@pytest.fixture(scope="module", params=list(REAL))
def real(request, host, tiny):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    config_name, supported, base_class, params, blocks = REAL[request.param]
    config = getattr(comfy.supported_models, supported)(dict(getattr(tiny, config_name)))
    config.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        base = getattr(comfy.model_base, base_class)(config, device=torch.device("meta"))
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return request.param, model, params, blocks


def test_the_meta_models_are_the_real_architectures(real):
    _, model, params, _ = real
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) == params


def test_every_transformer_block_has_a_self_and_a_cross_layer(pack, real):
    _, model, _, blocks = real
    layers = pack("nodes.host").unet_layers(model)
    assert [l.ordinal for l in layers if l.kind == "self"] == list(range(blocks))
    assert [l.ordinal for l in layers if l.kind == "cross"] == list(range(blocks))


def test_auto_swap_layers_are_masactrls(pack, real):
    family, model, _, blocks = real
    layers = pack("nodes.host").unet_layers(model)
    swap = pack("nodes.lnr")._swap_layers(layers, "auto")
    assert all(l.kind == "self" for l in swap)
    if family == "sd15":    # MasaCtrl: layers 10-15 = output blocks 6-11, the decoder at 1/2 and 1/1
        assert [l.key for l in swap] == [("output", n, 0) for n in range(6, 12)]
        assert {l.scale for l in swap} == {1, 2}
    else:                   # MasaCtrl's SDXL start layer 44 of 70
        assert [l.ordinal for l in swap] == list(range(44, 70))


def test_auto_appearance_layers_are_the_32x32_decoder_layers(pack, real):
    family, model, _, _ = real
    layers = pack("nodes.host").unet_layers(model)
    chosen = pack("nodes.pnd")._appearance_layers(layers, "auto")
    assert all(l.kind == "cross" and l.block == "output" for l in chosen)
    if family == "sd15":    # 64×64 latent at 512²: the 1/2 level is 32×32
        assert [l.key for l in chosen] == [("output", n, 0) for n in (6, 7, 8)] and {l.scale for l in chosen} == {2}
    else:                   # 128×128 latent at 1024²: the 1/4 level, 10 blocks deep
        assert [l.key for l in chosen] == [("output", n, i) for n in (0, 1, 2) for i in range(10)]
        assert {l.scale for l in chosen} == {4}


def test_palp_trains_every_attention_projection(pack, real):
    _, model, _, blocks = real
    names = [name for name, _ in pack("nodes.palp").attention_projections(model)]
    assert len(names) == blocks * 2 * 4 == len(set(names))
