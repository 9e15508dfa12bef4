"""Tiny, randomly initialised SD1- and SDXL-shaped models built in-process from the host's own classes.

The stock loaders only accept full-size architectures (model detection needs 320 UNet channels
and a 768-wide CLIP), so the models are assembled from the host's classes directly: a
``comfy.model_base.BaseModel``/``SDXL`` UNet, a ``comfy.sd.CLIP`` with the host's real SD1/SDXL
tokenizers over tiny text towers, and a ``comfy.sd.VAE`` from a TAESD-format state dict.

comfy ops never initialise weights, so every parameter is set from a seeded generator:
N(0, 1/fan_in) weights, unit norm weights, zero biases. A random UNet with that init lets
cross-attention dominate (CFG 7.5 then diverges and methods cannot be told apart), so the
cross-attention output projections and the UNet output conv are scaled x0.1. The VAE is
calibrated so that encoded images are latents with zero mean and unit std per channel in the
model's (``process_latent_in``) space, and decode to mid-grey images with std 0.25.

What such a model can and cannot show: a prompt changes the denoising step ``x - x0`` by about
5% (SD1) / 11% (SDXL) against the empty prompt, but its noise predictions are small (std about
0.06), so sampling from pure noise removes little of it: a txt2img latent keeps a std near
sigma_max (about 15 in model space) and decodes to mostly clipped colours. Compare methods in
latent space, or on tasks that start from encoded images (img2img, inversion).

Models are built under ``torch.inference_mode()``, as the stock loaders' are inside the
executor, so their weights are inference tensors exactly like real ones: call them under
``torch.inference_mode()`` (or route weights through fresh tensors for autograd). Builds are
cached per (family, seed); callers that patch a model must ``clone()`` it first, as with real ones.
"""
from __future__ import annotations

import functools

import torch

import comfy.ldm.modules.attention
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import folder_paths

# The tiny CLIPs keep the real vocabulary (49408 tokens) and 77-token context; only widths and
# depths shrink. SDXL's clip_l uses the penultimate layer, which needs at least 3 layers.
SD1_CLIP_L = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2}
SDXL_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}
SDXL_CLIP_G = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3}

_UNET_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
# SD1: a transformer at every level and in the middle, conv proj_in as SD1.5. Attention layers
# (block, latent downscale): input 1 /1, input 3 /2, input 5 /4, middle /4, output 0-1 /4,
# output 2-3 /2, output 4-5 /1; one BasicTransformerBlock each, 2 heads.
SD1_UNET = {
    **_UNET_COMMON,
    "channel_mult": [1, 1, 2],
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [1, 1, 1],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": SD1_CLIP_L["hidden_size"],
    "adm_in_channels": None,
}
# SDXL: no attention at the first level, depth 1 at /2 and depth 2 at /4 and in the middle (so
# block_index 1 exists), linear proj_in, and the adm vector = pooled clip_g + 6 size embeddings.
# Attention layers: input 3 /2 (depth 1), input 5 /4 (2), middle /4 (2), output 0-1 /4 (2),
# output 2-3 /2 (1); 2 heads.
SDXL_UNET = {
    **_UNET_COMMON,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 2],
    "transformer_depth_output": [0, 0, 1, 1, 2, 2],
    "transformer_depth_middle": 2,
    "use_linear_in_transformer": True,
    "context_dim": SDXL_CLIP_L["hidden_size"] + SDXL_CLIP_G["hidden_size"],
    "num_classes": "sequential",
    "adm_in_channels": SDXL_CLIP_G["hidden_size"] + 6 * 256,
}
# the SDXL refiner's layout: clip_g alone as the text context, its pooled output + 5 size/aesthetic embeddings
SDXL_REFINER_UNET = {**SDXL_UNET, "context_dim": SDXL_CLIP_G["hidden_size"],
                     "adm_in_channels": SDXL_CLIP_G["hidden_size"] + 5 * 256}
_TINY_HEADS = {"num_heads": 2, "num_head_channels": -1}
# the real SD1.5 UNet (860M parameters, 8 heads), for speed and memory measurements only
SD15_UNET = {
    **_UNET_COMMON,
    "model_channels": 320,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    # consumed from the end (the UNet pops it): output blocks 0-2, at 1/8, have no attention
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "adm_in_channels": None,
    "num_heads": 8,
    "num_head_channels": -1,
}
# the real SDXL base UNet (2.57B parameters, 64-channel heads), for architecture checks on the meta device
SDXL_BASE_UNET = {
    **_UNET_COMMON,
    "model_channels": 320,
    "channel_mult": [1, 2, 4],
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "num_heads": -1,
    "num_head_channels": 64,
}

CROSS_ATTN_OUT_SCALE = 0.1
UNET_OUT_SCALE = 0.1
PIXEL_STD = 0.25  # std of decoded pixels (in [0, 1]) on the calibration images' latents


class TinySD15(comfy.supported_models.SD15):
    """SD15's conventions (latent format, EPS, CLIP-L layout) for a tiny UNet; never registered for detection."""

    unet_extra_config = _TINY_HEADS


class TinySDXL(comfy.supported_models.SDXL):
    """SDXL's conventions (latent format, adm conditioning) for a tiny UNet; never registered for detection."""

    unet_extra_config = _TINY_HEADS


class TinySDXLRefiner(comfy.supported_models.SDXLRefiner):
    """The SDXL refiner's conventions (clip_g only, aesthetic-score conditioning) for a tiny UNet."""

    unet_extra_config = _TINY_HEADS


class TinySD1Tokenizer(comfy.sd1_clip.SD1Tokenizer):
    """The real SD1 tokenizer, with embedding files checked against the tiny CLIP's width."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(
            embedding_directory=embedding_directory,
            tokenizer_data=tokenizer_data,
            tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=SD1_CLIP_L["hidden_size"]),
        )


class TinySDXLTokenizer(comfy.sdxl_clip.SDXLTokenizer):
    """The real SDXL tokenizers (l and g), with embedding files checked against the tiny towers' widths."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.clip_l.embedding_size = SDXL_CLIP_L["hidden_size"]
        self.clip_g.embedding_size = SDXL_CLIP_G["hidden_size"]


def tiny_sd1(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(MODEL, CLIP, VAE)`` of a tiny SD1.x-shaped model; same seed, same weights (``dtype``: the UNet's)."""
    return _build("sd1", seed, dtype)


def tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(MODEL, CLIP, VAE)`` of a tiny SDXL-shaped model (two text towers, adm conditioning; ``dtype``: the UNet's)."""
    return _build("sdxl", seed, dtype)


def tiny_sdxl_refiner(seed: int = 0):
    """``(MODEL, CLIP, VAE)`` of a tiny SDXL-refiner-shaped model: its CLIP tokenizes for clip_l and clip_g (the
    host's SDXLTokenizer) but encodes with clip_g only."""
    return _build("sdxl_refiner", seed)


@functools.cache
def sd15_sized(dtype: torch.dtype = torch.float32, seed: int = 0):
    """``(MODEL, CLIP, VAE)`` the size of SD1.5 (the real UNet and CLIP-L shapes, random weights; TAESD).

    For speed and memory measurements: its pictures mean nothing. ``dtype`` is the UNet's (fp16 on a GPU).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        model = _unet(comfy.model_base.BaseModel, comfy.supported_models.SD15(SD15_UNET), gen, dtype)
        clip = _clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {}, gen)
        vae = _vae(model.model.latent_format.scale_factor, gen)
    return model, clip, vae


@functools.cache
def _build(kind: str, seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        if kind == "sd1":
            model = _unet(comfy.model_base.BaseModel, TinySD15(SD1_UNET), gen, dtype)
            clip = _clip(TinySD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": SD1_CLIP_L}, gen)
        elif kind == "sdxl_refiner":
            model = _unet(comfy.model_base.SDXLRefiner, TinySDXLRefiner(SDXL_REFINER_UNET), gen, dtype)
            clip = _clip(TinySDXLTokenizer, comfy.sdxl_clip.SDXLRefinerClipModel,
                         {"clip_g_model_config": SDXL_CLIP_G}, gen)
        else:
            model = _unet(comfy.model_base.SDXL, TinySDXL(SDXL_UNET), gen, dtype)
            clip = _clip(
                TinySDXLTokenizer,
                comfy.sdxl_clip.SDXLClipModel,
                {"clip_l_model_config": SDXL_CLIP_L, "clip_g_model_config": SDXL_CLIP_G},
                gen,
            )
        vae = _vae(model.model.latent_format.scale_factor, gen)
    return model, clip, vae


def init_weights(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Set every parameter of ``module``: N(0, 1/fan_in) weights, unit norm weights, zero biases."""
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if isinstance(sub, norms):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                param.zero_()
            elif param.ndim >= 2:
                param.normal_(0.0, (param[0].numel()) ** -0.5, generator=gen)
            else:
                raise ValueError(f"no init rule for parameter {name} {tuple(param.shape)} of {type(sub).__name__}")


def _unet(model_class, config, gen, dtype=torch.float32):
    config.set_inference_dtype(dtype, None)
    # built on the CPU (the seeded generator is a CPU one); the host moves it to its device to sample
    model = model_class(config, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    unet = model.diffusion_model
    init_weights(unet, gen)
    for sub in unet.modules():
        if isinstance(sub, comfy.ldm.modules.attention.BasicTransformerBlock):
            sub.attn2.to_out[0].weight.mul_(CROSS_ATTN_OUT_SCALE)
    unet.out[-1].weight.mul_(UNET_OUT_SCALE)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device()
    )


def _clip(tokenizer, clip_model, model_options, gen):
    target = comfy.supported_models_base.ClipTarget(tokenizer, clip_model)
    # the host defaults text encoders to fp16 on CPU; fp32 keeps the tiny model exact and fast
    clip = comfy.sd.CLIP(
        target,
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        model_options={**model_options, "dtype": torch.float32},
    )
    for tower in clip.cond_stage_model.children():
        # only the transformer is uninitialised: the tower's logit_scale (CLIP's contrastive
        # temperature, unused for conditioning) is created with its value
        init_weights(tower.transformer, gen)
    return clip


def _vae(scale_factor: float, gen: torch.Generator):
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    init_weights(taesd.taesd_encoder, gen)
    init_weights(taesd.taesd_decoder, gen)
    pixels = smooth_images(gen)
    # TAESD.encode(x) = taesd_encoder(pixels) / vae_scale + vae_shift is the raw latent a LATENT
    # carries; the UNet sees raw * scale_factor, so a unit-std encoder output with
    # vae_scale = scale_factor makes model-space latents unit-std
    _standardise(taesd.taesd_encoder[-1], taesd.taesd_encoder(pixels), mean=0.0, std=1.0)
    taesd.vae_scale.fill_(scale_factor)
    taesd.vae_shift.fill_(0.0)
    latents = taesd.encode(pixels * 2 - 1)
    # the decoder's output is already pixel space [0, 1] (decode() maps it to [-1, 1] and VAE
    # maps that back), so centring it on mid-grey keeps decoded images mostly unclipped
    _standardise(taesd.taesd_decoder[-1], taesd.taesd_decoder(latents * scale_factor), mean=0.5, std=PIXEL_STD)
    return comfy.sd.VAE(sd=taesd.state_dict())


def _standardise(conv: torch.nn.Conv2d, out: torch.Tensor, mean: float, std: float) -> None:
    """Rescale ``conv`` (whose output was ``out``) so each output channel has the given mean and std."""
    mu = out.mean(dim=(0, 2, 3))
    sigma = out.std(dim=(0, 2, 3))
    gain = std / sigma
    conv.weight.mul_(gain[:, None, None, None])
    conv.bias.copy_((conv.bias - mu) * gain + mean)


def smooth_images(gen: torch.Generator, n: int = 8, height: int = 64, width: int = 64) -> torch.Tensor:
    """Smooth random colour fields in [0, 1], ``[n, 3, height, width]``: image-like low-frequency content."""
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)

