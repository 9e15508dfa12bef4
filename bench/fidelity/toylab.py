"""The efficacy lab's shared machinery: the toy world's model in the host, an exact stand-in VAE, the
personalized (DreamBooth-style) baseline, the oracle's scores and the pictures.

Everything a method does here goes through the pack's own nodes (``execute`` of the node classes, as
the host tier calls them); this module only builds the inputs a user's graph would build (MODEL, CLIP,
CONDITIONING, LATENT, IMAGE) and scores the outputs. Used by ``run.py`` and by
``tests/host/test_efficacy_host.py``; it imports the host, so load the host first.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import pathlib
import sys
import types

import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "bench" / "out"           # gitignored: the fine-tuned weights cache
LATENT_SCALE_SD1 = 0.18215              # host LATENT × this = the world's model-space latent


def find_toyworld() -> pathlib.Path | None:
    """``$TOYWORLD``, else ``shared/toyworld`` in, beside or above the repo (CI keeps shared/ at ../shared)."""
    candidates = [os.environ.get("TOYWORLD")] + [str(p / "shared" / "toyworld") for p in (ROOT, *ROOT.parents[:2])]
    for c in candidates:
        if c and (pathlib.Path(c) / "world.py").is_file() and (pathlib.Path(c) / "unet.safetensors").is_file():
            return pathlib.Path(c)
    return None


@functools.lru_cache(None)
def world():
    path = find_toyworld()
    if path is None:
        raise FileNotFoundError("the toy world (shared/toyworld) is not beside the repo: set TOYWORLD=<folder>.")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import world as w
    return w


# --- the host objects -----------------------------------------------------------------------------


def load_model(state_dict=None):
    """MODEL: the host's SD1.5 config (EPS, SD1 latents) around the toy UNet (``check_host.py``'s recipe)."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    from safetensors.torch import load_file
    w = world()
    config = comfy.supported_models.SD15(dict(w.UNET_CFG))
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    sd = state_dict if state_dict is not None else load_file(os.path.join(w.HERE, "unet.safetensors"))
    model.diffusion_model.load_state_dict(sd, strict=True)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                           offload_device=comfy.model_management.unet_offload_device())


def load_clip(embedding_directory=None):
    """CLIP: the host's SD1ClipModel with the world's 0-layer config and the real SD1 tokenizer (64 wide)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from safetensors.torch import load_file
    w = world()

    class ToyTokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, embedding_size=64))

    target = comfy.supported_models_base.ClipTarget(ToyTokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory,
                         model_options={"clip_l_model_config": w.CLIP_L_CONFIG, "dtype": torch.float32})
    clip.cond_stage_model.load_state_dict(load_file(os.path.join(w.HERE, "clip_l0.safetensors")), strict=True)
    return clip


class ToyVAE:
    """An exact stand-in VAE for the toy world (it has none): 4×h×w latents ↔ 8h×8w×3 images.

    Latent channel k (model space) fills quadrant (k // 2, k % 2) of every 8×8 pixel block, all three
    colours, through the affine map v ↦ 0.5 + v / (2·RANGE); encoding averages the quadrant back. Exactly
    invertible (up to float rounding) for model-space values within ±RANGE, which every world latent is.
    It answers what the pack's nodes call on a VAE: ``encode``, ``decode``, the compression ratios, and a
    ``patcher`` (the host's ModelPatcher over a module holding RANGE, so PALP can fingerprint it).
    """

    RANGE = 4.0
    downscale_ratio = upscale_ratio = 8
    latent_channels = 4

    def __init__(self):
        import comfy.model_patcher

        module = torch.nn.Module()
        module.register_buffer("range", torch.tensor([self.RANGE]))
        self.patcher = comfy.model_patcher.ModelPatcher(module, load_device=torch.device("cpu"),
                                                        offload_device=torch.device("cpu"))

    def spacial_compression_encode(self):
        return 8

    def spacial_compression_decode(self):
        return 8

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = pixels.shape
        p = pixels[..., :3].movedim(-1, 1).float().reshape(b, 3, h // 8, 2, 4, w // 8, 2, 4)
        v = p.mean((1, 4, 7)).permute(0, 2, 4, 1, 3).reshape(b, 4, h // 8, w // 8)
        return (v - 0.5) * 2 * self.RANGE / LATENT_SCALE_SD1

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        b, _, h, w = samples.shape
        v = (samples.float() * LATENT_SCALE_SD1 / (2 * self.RANGE) + 0.5).clamp(0, 1)
        q = v.reshape(b, 2, 2, h, w).permute(0, 3, 1, 4, 2)                 # b, h, qy, w, qx
        q = q[:, None, :, :, None, :, :, None].expand(b, 3, h, 2, 4, w, 2, 4)
        return q.reshape(b, 3, 8 * h, 8 * w).movedim(1, -1).contiguous()


def encoder(clip):
    return lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))


def schedule(model, steps):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", steps)


def noise_for(seed, latent):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
    return Noise_RandomNoise(seed)


def sample(model, sampler, sigmas, positive, negative, latent, seed, cfg):
    """One SamplerCustom call (batch = seeds): the noise of ``seed`` for the whole batch, as the host draws it."""
    import comfy.sample
    with torch.inference_mode():
        noise = noise_for(seed, latent).generate_noise({"samples": latent})
        return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent, seed=seed,
                                          disable_pbar=True)


def euler():
    import comfy.samplers
    return comfy.samplers.sampler_object("euler")     # Euler in σ = DDIM (η 0) on the ddim_uniform schedule


def subject_latents(n=4, context="city", seed=11):
    """The sks dog's training latents (host LATENT units), all in one context, as ``personalize.py`` drew them."""
    w = world()
    gen = torch.Generator().manual_seed(seed)
    ctx = w.CONTEXTS.index(context)
    x, _, _, _, _ = w.make_batch(n, gen, cls_idx=torch.zeros(n, dtype=torch.long), ctx_idx=torch.full((n,), ctx),
                                 subject=torch.ones(n, dtype=torch.bool))
    return x / LATENT_SCALE_SD1


# --- the personalized baseline (DreamBooth-style full fine-tune) ------------------------------------


def finetune(clip, steps=600, lr=1e-3, context="city", seed=11, log=print, cache=True):
    """The "personalized model" of all three papers, overfit on purpose: the whole toy UNet fine-tuned on 4
    latents of the sks dog in one context, captions "a photo of a sks dog in the <context>" / "a photo of a sks
    dog", no prior preservation (the gate of ``toyworld/training/personalize.py``, redone on the host's model).
    Cached under bench/out/ by its settings (``cache``). Returns a MODEL."""
    from safetensors.torch import load_file, save_file
    w = world()
    key = hashlib.sha256(repr((steps, lr, context, seed, "v1")).encode()).hexdigest()[:12]
    path = OUT / f"toy_finetune_{key}.safetensors"
    if cache and path.exists():
        return load_model(load_file(str(path)))
    import time
    start = time.time()
    model = load_model()
    unet = model.model.diffusion_model
    sampling = model.get_model_object("model_sampling")
    alphas = 1 / (1 + sampling.sigmas.float() ** 2)                     # ᾱ_t of the host's discrete schedule
    xs = subject_latents(4, context, seed) * LATENT_SCALE_SD1
    with torch.inference_mode(False), torch.enable_grad():
        caps = torch.cat([clip.encode_from_tokens(clip.tokenize(t)) for t in
                          (f"a photo of a sks dog {w.PREP[context]}", "a photo of a sks dog")]).clone()
        gen = torch.Generator().manual_seed(seed)
        unet.train()
        params = list(unet.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for _ in range(steps):
            c = caps[torch.randint(0, 2, (4,), generator=gen)]
            t = torch.randint(0, 1000, (4,), generator=gen)
            noise = torch.randn(xs.shape, generator=gen)
            a = alphas[t][:, None, None, None]
            eps = unet(a.sqrt() * xs + (1 - a).sqrt() * noise, timesteps=t.float(), context=c)
            loss = (eps - noise).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        unet.eval()
        for p in params:
            p.requires_grad_(False)
    if not cache:
        return model
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, str(path))
    log(f"fine-tuned the personalized baseline: {steps} steps in {time.time() - start:.0f} s -> {path.name}")
    return model


# --- scoring ------------------------------------------------------------------------------------------


@functools.lru_cache(None)
def oracle():
    return world().load_oracle()


def score(samples: torch.Tensor, context: int) -> dict:
    """Per-sample oracle scores of host LATENT ``samples`` ([B,4,16,16]) for the target context index.

    identity: 1 when the mean latent colour inside the oracle's object mask is nearer SUBJECT_COLOR than every
    class colour (README's colour identity); cos: its cosine to SUBJECT_COLOR (a continuous identity);
    context / dog: the oracle's context and class agree with the prompt; mask [B,16,16] bool; cx, cy, area.
    An empty mask (no object found) scores identity 0 and cos 0.
    """
    w = world()
    x = samples.float() * LATENT_SCALE_SD1
    with torch.no_grad():
        lc, lx, lm = oracle()(x)
    mask = lm.sigmoid() > 0.5
    m = mask.float()
    area = m.sum((1, 2))
    inside = (x / w.LATENT_SCALE * m[:, None]).sum((2, 3)) / area.clamp_min(1)[:, None]
    cands = torch.cat([w.SUBJECT_COLOR[None], w.CLS_COLOR])
    found = area >= 3
    identity = ((inside[:, None] - cands[None]).norm(dim=2).argmin(1) == 0) & found
    cos = torch.where(found, F.cosine_similarity(inside, w.SUBJECT_COLOR[None].expand_as(inside), dim=1),
                      torch.zeros_like(area))
    ys, xs = torch.meshgrid(torch.arange(16.0) + 0.5, torch.arange(16.0) + 0.5, indexing="ij")
    cx = (m * xs).sum((1, 2)) / area.clamp_min(1)
    cy = (m * ys).sum((1, 2)) / area.clamp_min(1)
    return {"identity": identity.float(), "cos": cos, "context": (lx.argmax(1) == context).float(),
            "dog": (lc.argmax(1) == 0).float(), "found": found.float(), "mask": mask, "cx": cx, "cy": cy, "area": area}


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    return (a & b).sum(1) / (a | b).sum(1).clamp_min(1)


def mean_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.float().flatten()
    return v.mean().item(), (v.std(unbiased=True) / math.sqrt(v.numel())).item() if v.numel() > 1 else 0.0


def spread(s: dict) -> torch.Tensor:
    """Diversity of a set of samples: the RMS distance (px) of object centroids from their mean, per sample
    (so its mean ± SE is the spread and its uncertainty). Objects only."""
    f = s["found"].bool()
    c = torch.stack([s["cx"][f], s["cy"][f]], 1)
    return (c - c.mean(0)).norm(dim=1)


def fmt(v, digits=2) -> str:
    m, e = mean_se(v)
    return f"{m:.{digits}f} ± {e:.{digits}f}"


# --- pictures -----------------------------------------------------------------------------------------


@functools.lru_cache(None)
def _projection():
    """A fixed 4→3 colour projection: the world's palette's top-3 principal axes, scaled into [0, 1]."""
    w = world()
    palette = torch.cat([w.BG_COLOR, w.CLS_COLOR, w.SUBJECT_COLOR[None]]) * w.LATENT_SCALE
    mean = palette.mean(0)
    _, _, v = torch.linalg.svd(palette - mean, full_matrices=False)
    proj = (palette - mean) @ v[:3].T
    lo, hi = proj.amin(0), proj.amax(0)
    return mean, v[:3], lo, hi


def render(samples: torch.Tensor, masks: torch.Tensor | None = None, px: int = 3) -> torch.Tensor:
    """Host LATENTs as RGB [B,3,16px,16px] in [0,1] (the palette projection), the oracle mask outlined in white."""
    mean, axes, lo, hi = _projection()
    x = samples.float() * LATENT_SCALE_SD1
    rgb = torch.einsum("bchw,kc->bkhw", x - mean[None, :, None, None], axes)
    rgb = ((rgb - lo[None, :, None, None]) / (hi - lo)[None, :, None, None] * 0.8 + 0.1).clamp(0, 1)
    rgb = F.interpolate(rgb, scale_factor=px, mode="nearest")
    if masks is not None:
        m = F.interpolate(masks.float()[:, None], scale_factor=px, mode="nearest")
        edge = (F.max_pool2d(m, 3, 1, 1) - m) > 0
        rgb = torch.where(edge, torch.ones_like(rgb), rgb)
    return rgb


def save_grid(path: pathlib.Path, rows: list[tuple[str, torch.Tensor, torch.Tensor | None]], ncol: int = 8, px: int = 3):
    """A PNG: one labelled row per condition, ``ncol`` samples each (the same seeds in every row)."""
    from PIL import Image, ImageDraw
    tile, label_w, pad = 16 * px, 150, 2
    img = Image.new("RGB", (label_w + ncol * (tile + pad), len(rows) * (tile + pad)), "white")
    draw = ImageDraw.Draw(img)
    for r, (label, samples, masks) in enumerate(rows):
        pics = render(samples[:ncol], None if masks is None else masks[:ncol], px)
        for c in range(pics.shape[0]):
            arr = (pics[c].permute(1, 2, 0).numpy() * 255).astype("uint8")
            img.paste(Image.fromarray(arr), (label_w + c * (tile + pad), r * (tile + pad)))
        # the default bitmap font has no glyphs beyond ASCII (e.g. "⁻", "§")
        draw.text((2, r * (tile + pad) + tile // 2 - 6), label.encode("ascii", "replace").decode()[:24], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def setup(nodes: types.SimpleNamespace, finetune_steps=600, log=print) -> types.SimpleNamespace:
    """The lab: vanilla and personalized MODELs, the CLIP, the stand-in VAE, the encoder and the node modules."""
    torch.set_num_threads(1)
    clip = load_clip()
    vanilla = load_model()
    personalized = finetune(clip, steps=finetune_steps, log=log)
    return types.SimpleNamespace(world=world(), clip=clip, vanilla=vanilla, personalized=personalized, vae=ToyVAE(),
                                 encode=encoder(clip), nodes=nodes)


# --- the pack's nodes, driven as a graph would wire them ---------------------------------------------


def prompts(context: str):
    """(personal prompt y_p, class prompt y_p⁻) for a context word."""
    prep = world().PREP[context]
    return f"a photo of a sks dog {prep}", f"a photo of a dog {prep}"


def invert(lab, model, latent, prompt, steps):
    """NullTextInvert in plain DDIM mode, no reconstruction (P&D's palette reads only the pivots; L&R needs
    exactly this), from a LATENT (the toy world has no VAE to need)."""
    with torch.inference_mode():
        return lab.nodes.inversion.NullTextInvert.execute(model, lab.clip, prompt, "ddim", steps, "ddim_uniform", 5.0, 10,
                                                          1e-2, 1e-5, "", latent={"samples": latent},
                                                          reconstruct=False).args[0]


def plain(lab, model, prompt, batch, seed, steps, cfg):
    """The method-free sample: the host's Euler (= DDIM) from the seed's noise."""
    latent = torch.zeros(batch, 4, 16, 16)
    return sample(model, euler(), schedule(model, steps), lab.encode(prompt), lab.encode(""), latent, seed, cfg)


def pick_and_draw(lab, model, context, batch, seed, steps, cfg, reference=None, appearance=True, layout=True, eta=0.1,
                  tau=0.5, app_weight=1.0, lay_weight=1.0, personal=True, subject="dog", layout_layers="cross",
                  app_window=(0.2, 0.4), lay_window=(0.0, 0.2)):
    """UREMDGuidance (palette from ``reference``, an inversion made with ``model``) + LayoutGuidance (the vanilla
    model's template from the same noise) + PickAndDrawSampler, sampled by SamplerCustom."""
    p = lab.nodes.pnd
    prompt, template = prompts(context)
    prompt = prompt if personal else template
    latent = torch.zeros(batch, 4, 16, 16)
    sigmas = schedule(model, steps)
    with torch.inference_mode():
        app = p.UREMDGuidance.execute(model, reference, lab.clip, subject, tau, "auto", *app_window,
                                      app_weight).args[0] if appearance else None
        lay = p.LayoutGuidance.execute(lab.vanilla, lab.clip, template, subject, lab.encode(template), lab.encode(""), cfg,
                                       noise_for(seed, latent), sigmas, {"samples": latent}, layout_layers, *lay_window, lay_weight,
                                       3, 0.5).args[0] if layout else None
        prepared, sampler = p.PickAndDrawSampler.execute(model, lab.clip, prompt, subject, eta, True, app, lay).args
    return sample(prepared, sampler, sigmas, lab.encode(prompt), lab.encode(""), latent, seed, cfg)


def step_blend(lab, context, batch, seed, steps, cfg, lambda1):
    """StepBlendSampler (L&R stage 1): λ1 vanilla steps with y_p⁻, the rest personalized with y_p."""
    prompt, template = prompts(context)
    with torch.inference_mode():
        return lab.nodes.lnr.StepBlendSampler.execute(
            lab.vanilla, lab.personalized, lab.encode(template), lab.encode(""), lab.encode(prompt), lab.encode(""),
            {"samples": torch.zeros(batch, 4, 16, 16)}, seed, steps, cfg, "ddim", "ddim_uniform", lambda1).args[0]["samples"]


def swap_options(lab) -> dict[str, list]:
    """The pinned / free-running source-path inputs of MultiSourceAttnSwap, if this version of the node has them
    (combos with a 'pinned' option, e.g. reference_path / layout_path): ``{input id: options}``, empty when absent."""
    from comfy_api.latest import io
    schema = lab.nodes.lnr.MultiSourceAttnSwap.define_schema()
    return {inp.id: list(inp.options) for inp in schema.inputs
            if isinstance(inp, io.Combo.Input) and any("pin" in str(o).lower() for o in inp.options)}


def retouch(lab, context, stage1, reference, steps, cfg, lambda2=-1, blend_start=-1, masks=None, **extra):
    """MultiSourceAttnSwap (L&R stage 2) on every layout of ``stage1`` (one call each: the node takes one layout),
    each layout DDIM-inverted by NullTextInvert with the empty prompt, the MASK = the oracle's mask of the layout
    (standing in for SAM's, which needs a real image), upsampled to the image size."""
    prompt, _ = prompts(context)
    y_r = "a photo of a sks dog"
    if masks is None:
        masks = score(stage1, 0)["mask"]
    outs = []
    for i in range(stage1.shape[0]):
        layout = invert(lab, lab.personalized, stage1[i:i + 1], "", steps)
        mask = F.interpolate(masks[i:i + 1, None].float(), scale_factor=8, mode="nearest")[:, 0]
        with torch.inference_mode():
            out, _ = lab.nodes.lnr.MultiSourceAttnSwap.execute(
                lab.personalized, reference, layout, lab.encode(y_r), lab.encode(prompt), lab.encode(""), cfg, lambda2,
                blend_start, "auto", "auto", None, "", "", mask, 0.1, **extra).args
        outs.append(out["samples"])
    return torch.cat(outs)


def palp_train(lab, name, steps, alignment_weight, alpha=7.5, beta=1.0, lr=1e-3, rank=4, seed=0, context="city",
               target="a photo of a dog in the snow"):
    """PALPTrainer on the vanilla model: the sks dog's 4 training latents as IMAGEs through the stand-in VAE,
    y_P = "a photo of a [V]", y_c = ``target``. Returns (MODEL, CLIP) as the node outputs them."""
    images = lab.vae.decode(subject_latents(4, context))
    with torch.inference_mode():
        model, clip, _ = lab.nodes.palp.PALPTrainer.execute(
            lab.vanilla, lab.clip, lab.vae, images, "[V]", "dog", "a photo of a [V]", target, steps, lr, 4, 1, rank,
            alpha, beta, alignment_weight, True, True, 0.0, 1.0, 128, "fp32", False, seed, name, True, False, 0).args
    return model, clip
