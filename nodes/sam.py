"""SAMLoader and SAMSegment: the M^SAM of Layout-and-Retouch §3.2 ("computed by Segment-Anything given a layout image").

Checkpoints live in the host's ``sams`` model folder (``models/sams``) and run through Meta's
``segment-anything`` package, imported only when a node runs so that the rest of the pack loads without it.
The architecture is read from the checkpoint's tensor shapes (:func:`sam_config`), never from its file name.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import numpy as np
import torch
from comfy_api.latest import io, ui

import comfy.model_management
import comfy.utils
import folder_paths

from ..guidance.masks import resize_mask
from .host import require_finite

SamModelType = io.Custom("PERSONALIZE_SAM_MODEL")
log = logging.getLogger(__name__)
CATEGORY = "personalize/masks"
FOLDER = "sams"
AUTO, CPU, GPU = "auto", "cpu", "gpu"
AUTOMATIC, POINT, BOX = "automatic", "point", "box"
# (embed_dim, depth, global attention blocks) of Meta's three releases (segment_anything/build_sam.py)
VARIANTS = {(768, 12, (2, 5, 8, 11)): "vit_b", (1024, 24, (5, 11, 17, 23)): "vit_l", (1280, 32, (7, 15, 23, 31)): "vit_h"}
RELEASE_FILES = ("sam_vit_b_01ec64.pth (375 MB), sam_vit_l_0b3195.pth (1.2 GB) or sam_vit_h_4b8939.pth (2.5 GB) from "
                 "Meta's Segment Anything release (https://github.com/facebookresearch/segment-anything#model-checkpoints)")
# Not in any tensor shape: segment-anything builds every size with these (build_sam.py, sam.py).
DECODER_HEADS = 8
PIXEL_MEAN, PIXEL_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
# Key prefixes of checkpoints the segment-anything package cannot build, and what they are.
FOREIGN = (
    (("mask_decoder.hf_token", "mask_decoder.hf_mlp", "mask_decoder.compress_vit_feat"), "a SAM-HQ checkpoint"),
    (("image_encoder.layers.",), "a MobileSAM checkpoint (TinyViT image encoder)"),
    (("image_encoder.trunk.", "memory_attention."), "a SAM 2 checkpoint"),
)


def register_folder() -> None:
    """Add ``models/sams`` unless the name is registered already (another pack's or extra_model_paths' entry stays as is)."""
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
        # the host creates a new name with no extensions, which lists every file (text files included)
        folder_paths.folder_names_and_paths[FOLDER][1].update(folder_paths.supported_pt_extensions)


register_folder()


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """A SAM architecture (``segment_anything.modeling.Sam``) as its state dict's shapes give it."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    window_size: int
    global_attn_indexes: tuple[int, ...]
    prompt_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    num_multimask_outputs: int
    iou_head_depth: int
    iou_head_hidden_dim: int

    @property
    def variant(self) -> str:
        """vit_b, vit_l or vit_h for Meta's releases; 'custom' for any other size."""
        return VARIANTS.get((self.embed_dim, self.depth, self.global_attn_indexes), "custom")


def _count(state_dict, prefix: str) -> int:
    """How many numbered submodules ``prefix{i}.`` the state dict holds."""
    indices = {key[len(prefix):].split(".", 1)[0] for key in state_dict if key.startswith(prefix)}
    return len({i for i in indices if i.isdigit()})


def sam_config(state_dict) -> SamConfig:
    """Read a SAM's architecture from its state dict; refuse SAM-HQ, MobileSAM, SAM 2 and non-SAM files.

    The encoder's grid comes from ``pos_embed`` and its patch from the patch conv; heads from the
    relative-position tables (one row per head dimension); a block attends globally when its
    table spans the whole grid (2·grid − 1 rows) and within windows otherwise (2·window − 1).
    """
    for prefixes, what in FOREIGN:
        if any(key.startswith(prefixes) for key in state_dict):
            raise ValueError(f"this is {what}; only Meta's original SAM is supported: use {RELEASE_FILES}.")
    try:
        width, _, patch, _ = state_dict["image_encoder.patch_embed.proj.weight"].shape
        grid = state_dict["image_encoder.pos_embed"].shape[1]
        depth = _count(state_dict, "image_encoder.blocks.")
        spans = [state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        windows = {rows for rows, _ in spans if rows != 2 * grid - 1}
        prompt_dim = state_dict["prompt_encoder.no_mask_embed.weight"].shape[1]
        config = SamConfig(
            img_size=grid * patch,
            patch_size=patch,
            embed_dim=width,
            depth=depth,
            num_heads=width // spans[0][1],
            mlp_ratio=state_dict["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / width,
            window_size=(max(windows) + 1) // 2 if windows else 0,
            global_attn_indexes=tuple(i for i, (rows, _) in enumerate(spans) if rows == 2 * grid - 1),
            prompt_dim=prompt_dim,
            mask_in_chans=state_dict["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            decoder_depth=_count(state_dict, "mask_decoder.transformer.layers."),
            decoder_mlp_dim=state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            num_multimask_outputs=state_dict["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=_count(state_dict, "mask_decoder.iou_prediction_head.layers."),
            iou_head_hidden_dim=state_dict["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        )
    except (KeyError, IndexError) as e:
        raise ValueError(f"this is not a Segment Anything checkpoint (no tensor {e}); use {RELEASE_FILES}.") from None
    if len(windows) > 1:
        raise ValueError(f"the image encoder's windowed blocks disagree on the window size ({sorted(windows)} "
                         f"relative positions); this is not a Segment Anything checkpoint: use {RELEASE_FILES}.")
    return config


def build_sam(config: SamConfig):
    """An untrained ``segment_anything`` Sam of this architecture (the layer classes of build_sam.py)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = config.img_size // config.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim, depth=config.depth,
            num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, out_chans=config.prompt_dim, qkv_bias=True,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            window_size=config.window_size, global_attn_indexes=config.global_attn_indexes),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_dim, image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size), mask_in_chans=config.mask_in_chans),
        mask_decoder=MaskDecoder(
            transformer_dim=config.prompt_dim,
            transformer=TwoWayTransformer(depth=config.decoder_depth, embedding_dim=config.prompt_dim,
                                          mlp_dim=config.decoder_mlp_dim, num_heads=DECODER_HEADS),
            num_multimask_outputs=config.num_multimask_outputs, iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    ).eval()


@dataclasses.dataclass
class SamModel:
    """What a SAM_MODEL wire carries: the network (kept on the CPU between runs), its size and where it runs."""

    sam: torch.nn.Module = dataclasses.field(repr=False)
    config: SamConfig = dataclasses.field(repr=False)
    name: str
    device: torch.device

    @property
    def variant(self) -> str:
        return self.config.variant

    def memory_required(self) -> int:
        """Bytes to free on the device: the weights plus two global attention matrices (fp32 scores and softmax)."""
        tokens = (self.config.img_size // self.config.patch_size) ** 2
        return comfy.model_management.module_size(self.sam) + 2 * self.config.num_heads * tokens**2 * 4


def missing_checkpoint_message(sam_name: str) -> str | None:
    """Why ``sam_name`` cannot be loaded (no checkpoint at all, or not this one), or None when it exists."""
    if folder_paths.get_full_path(FOLDER, sam_name) is not None:
        return None
    folders = " or ".join(folder_paths.get_folder_paths(FOLDER))
    if not folder_paths.get_filename_list(FOLDER):
        return f"no SAM checkpoint found: put {RELEASE_FILES} in {folders}, then refresh the page."
    return f"SAM checkpoint '{sam_name}' is not in {folders}; pick one of the listed files (refresh the page after adding one)."


def resolve_device(choice: str) -> torch.device:
    """auto: the host's compute device (the CPU when ComfyUI runs with --cpu); gpu: the same, refused without one."""
    device = torch.device("cpu") if choice == CPU else comfy.model_management.get_torch_device()
    if choice == GPU and device.type == "cpu":
        raise ValueError("device is 'gpu' but ComfyUI has no GPU (it runs on the CPU, e.g. with --cpu): choose 'auto' or 'cpu'.")
    return device


def load_sam(path: str, device: torch.device) -> SamModel:
    """Read a checkpoint onto the CPU, detect its architecture from the shapes and build it (strict load)."""
    try:
        state_dict = comfy.utils.load_torch_file(path, safe_load=True, device=torch.device("cpu"))
    except Exception as e:  # torch and safetensors raise many kinds for a truncated or foreign file
        # only the first line: torch's weights-only refusal goes on to suggest an unsafe reload
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        raise ValueError(f"could not read SAM checkpoint {path} ({reason}). The file is missing, incomplete or not "
                         f"a plain PyTorch/safetensors state dict: download it again ({RELEASE_FILES}).") from e
    config = sam_config(state_dict)
    sam = build_sam(config)
    try:
        sam.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f"{path} has SAM's tensor names but not a layout segment-anything can build ({e}); "
                         f"use {RELEASE_FILES}.") from None
    return SamModel(sam, config, os.path.basename(path), device)


class SAMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSAMLoader",
            display_name="SAM Loader",
            category=CATEGORY,
            description="Loads a Segment Anything checkpoint (vit_b, vit_l or vit_h, told apart by its tensor shapes) "
                        "from models/sams for SAM Segment, which makes Layout-and-Retouch's M^SAM (§3.2). SAM-HQ, "
                        "MobileSAM and SAM 2 files are refused.",
            inputs=[
                io.Combo.Input("sam_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A checkpoint in models/sams: sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or "
                                       "sam_vit_h_4b8939.pth from Meta's release (refresh the page after adding one)."),
                io.Combo.Input("device", options=[AUTO, CPU, GPU], default=AUTO,
                               tooltip="Where SAM runs. auto: ComfyUI's compute device; gpu: the same, an error without "
                                       "one; cpu: always the CPU. Between runs SAM waits on the CPU, so it holds no "
                                       "GPU memory the sampler needs."),
            ],
            outputs=[SamModelType.Output(display_name="sam", tooltip="The loaded SAM, for SAM Segment.")],
        )

    @classmethod
    def validate_inputs(cls, sam_name):
        # runs instead of the host's list check, so an empty folder is answered with where to put a file
        return missing_checkpoint_message(sam_name) or True

    @classmethod
    def execute(cls, sam_name, device) -> io.NodeOutput:
        message = missing_checkpoint_message(sam_name)
        if message:
            raise ValueError(message)
        return io.NodeOutput(load_sam(folder_paths.get_full_path(FOLDER, sam_name), resolve_device(device)))


def parse_fractions(text: str, per_group: int, what: str) -> np.ndarray:
    """``"x, y; x, y"`` → [n, per_group] floats, each a fraction in [0, 1] of the image's width or height."""
    groups = [g for g in text.replace("\n", ";").split(";") if g.strip()]
    try:
        values = np.array([[float(v) for v in g.split(",")] for g in groups], dtype=np.float64)
    except ValueError:
        values = np.empty((0, 0))
    if not groups or values.ndim != 2 or values.shape[1] != per_group or ((values < 0) | (values > 1)).any():
        raise ValueError(f"{what} must be {per_group} comma-separated fractions of the image's width and height "
                         f"(0 to 1; 0.5, 0.5 is the centre), got {text!r}.")
    return values


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ min / Σ max: the IoU of binary masks, and its fuzzy extension when one mask is soft."""
    union = torch.maximum(a, b).sum()
    return float(torch.minimum(a, b).sum() / union) if union > 0 else 0.0


def _automatic(generator, image: np.ndarray, guide: torch.Tensor | None) -> np.ndarray:
    records = generator.generate(image)
    if not records:
        raise ValueError("SAM's automatic mode found no mask passing the quality thresholds: lower pred_iou_thresh "
                         "or stability_score_thresh, or use a point or box prompt.")
    if guide is None:
        key = lambda r: (r["predicted_iou"], r["stability_score"], r["area"])
    else:
        key = lambda r: soft_iou(torch.from_numpy(r["segmentation"]).float(), guide)
    return max(records, key=key)["segmentation"]


def _prompted(predictor, image: np.ndarray, mode: str, points: np.ndarray, box: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    predictor.set_image(image)
    if mode == POINT:
        # one click is ambiguous (part, object, group): SAM's advice is three masks, keep the best-scored
        masks, scores, _ = predictor.predict(point_coords=points * (width, height), point_labels=np.ones(len(points)),
                                             multimask_output=True)
        return masks[scores.argmax()]
    masks, _, _ = predictor.predict(box=box[0] * (width, height, width, height), multimask_output=False)
    return masks[0]


def _overlay(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The image with the mask tinted red, for the preview."""
    red = torch.tensor([1.0, 0.0, 0.0])
    m = masks[..., None]
    return images[..., :3] * (1 - 0.5 * m) + 0.5 * m * red


class SAMSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSAMSegment",
            display_name="SAM Segment",
            category=CATEGORY,
            description="Segments the subject of an image with Segment Anything: Layout-and-Retouch's M^SAM, computed "
                        "on the layout image (§3.2; the paper does not say how SAM was prompted). One binary mask "
                        "per image of the batch, at the image's size.",
            inputs=[
                SamModelType.Input("sam", tooltip="From SAM Loader."),
                io.Image.Input("image", tooltip="The layout image (a batch gives one mask per image)."),
                io.Combo.Input("mode", options=[AUTOMATIC, POINT, BOX], default=AUTOMATIC,
                               tooltip="automatic: SAM's automatic mask generator, keeping the mask that best overlaps "
                                       "'guide' (wire Attention Maps' mask there to pick the prompt's subject) or, "
                                       "without a guide, the most confident mask (it can be a part or the background). "
                                       "point: the best of SAM's three masks for the click(s) in 'points'. box: SAM's "
                                       "mask for the box in 'box'."),
                io.String.Input("points", default="0.5, 0.5",
                                tooltip="point mode: foreground clicks as 'x, y' fractions of width and height, several "
                                        "separated by ';' (0.5, 0.5 is the centre, where subjects usually are)."),
                io.String.Input("box", default="0.1, 0.1, 0.9, 0.9",
                                tooltip="box mode: 'left, top, right, bottom' as fractions of width and height."),
                io.Int.Input("points_per_side", default=32, min=1, max=64,
                             tooltip="automatic mode: the generator's grid of prompt points per side (SAM's default 32; "
                                     "fewer is faster and misses small objects)."),
                io.Float.Input("pred_iou_thresh", default=0.88, min=0.0, max=1.0, step=0.01,
                               tooltip="automatic mode: drop masks whose predicted quality is lower (SAM's default)."),
                io.Float.Input("stability_score_thresh", default=0.95, min=0.0, max=1.0, step=0.01,
                               tooltip="automatic mode: drop masks that change more than this when the logit "
                                       "threshold moves (SAM's default)."),
                io.Mask.Input("guide", optional=True,
                              tooltip="automatic mode: a rough mask of the subject (soft or binary, any size, batch 1 "
                                      "or one per image), e.g. the cross-attention mask M^c from Attention Maps."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="M^SAM: 1 on the object, 0 elsewhere.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, sam, image, mode, points, box, points_per_side, pred_iou_thresh, stability_score_thresh,
                guide=None) -> io.NodeOutput:
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor

        count, height, width = image.shape[:3]
        require_finite(image, "the IMAGE", "fix the node that made it (e.g. a VAE overflowing in fp16) before "
                                           "segmenting it.")
        if guide is not None and guide.shape[0] not in (1, count):
            raise ValueError(f"guide has {guide.shape[0]} masks for {count} images: give one mask, or one per image.")
        point_array = parse_fractions(points, 2, "points") if mode == POINT else None
        box_array = parse_fractions(box, 4, "box") if mode == BOX else None
        if box_array is not None and len(box_array) > 1:
            raise ValueError(f"box takes one box (SAM's predictor prompts with at most one), got {len(box_array)}.")
        guides = None if guide is None else resize_mask(guide.float().cpu(), (height, width)).expand(count, -1, -1)
        pixels = (image[..., :3].float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        device = sam.device
        if device.type != "cpu":
            comfy.model_management.free_memory(sam.memory_required(), device)
        sam.sam.to(device)
        try:
            if mode == AUTOMATIC:
                generator = SamAutomaticMaskGenerator(sam.sam, points_per_side=points_per_side,
                                                      pred_iou_thresh=pred_iou_thresh,
                                                      stability_score_thresh=stability_score_thresh)
                masks = [_automatic(generator, p, None if guides is None else guides[i]) for i, p in enumerate(pixels)]
            else:
                predictor = SamPredictor(sam.sam)
                masks = [_prompted(predictor, p, mode, point_array, box_array) for p in pixels]
        finally:
            sam.sam.to("cpu")
        mask = torch.from_numpy(np.stack(masks)).float()
        empty = [i for i in range(count) if not mask[i].any()]
        if empty:
            log.warning("SAM Segment: SAM found no object in image(s) %s of the batch (empty mask); move the %s.",
                        empty, {AUTOMATIC: "guide or lower the thresholds", POINT: "points onto the subject",
                                BOX: "box around the subject"}[mode])
        return io.NodeOutput(mask, ui=ui.PreviewImage(_overlay(image.float().cpu(), mask), cls=cls))


NODES = [SAMLoader, SAMSegment]
