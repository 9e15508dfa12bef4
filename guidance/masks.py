"""Layout-and-Retouch adaptive mask blending (arXiv 2407.09779, §3.2 "Adaptive mask blending").

All masks are float tensors shaped [B, H, W] with values in [0, 1]; binary masks hold exactly 0
and 1. Connected components and the distance transform run in numpy/scipy: the mask is built
once per image, outside any autograd graph, so nothing here needs to be differentiable.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# 8-connectivity: coarse cross-attention maps (16x16, 32x32) often join an object's parts only
# through a diagonal cell, and 4-connectivity would split them into "small" sets and drop them.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def attention_mask(maps: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """M^c of §3.2: the binary mask of averaged, min-max normalised decoder cross-attention maps.

    ``maps`` [B, h, w] must already be averaged over the object token(s), heads and decoder
    layers and min-max normalised per image (the paper: "averaged and then thresholded").
    A cell is foreground when its value is ``>= threshold``. The paper gives no threshold; the
    default 0.1 is MasaCtrl's auto-mask (the work L&R cites for M^c), which thresholds the same
    kind of map (16x16, decoder) with ``mask >= 0.1``.
    """
    return (maps >= threshold).to(maps.dtype)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a float [B, H, W] mask to ``size`` = (h, w), e.g. to one attention layer's resolution.

    Shrinking (both sides no larger) uses area averaging, so each token gets the mean mask value
    of the pixels it covers, without the aliasing of point sampling; any enlargement uses
    bilinear interpolation (half-pixel centres, ``align_corners=False``), which keeps a soft mask
    smooth and gives a binary one a smooth contour once thresholded at 0.5.
    """
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    shrink = size[0] <= mask.shape[-2] and size[1] <= mask.shape[-1]
    mode = {"mode": "area"} if shrink else {"mode": "bilinear", "align_corners": False}
    return F.interpolate(mask[:, None].float(), size=size, **mode)[:, 0].to(mask.dtype)


def require_same_aspect(mask: torch.Tensor, size: tuple[int, int], what: str, against: str, todo: str) -> None:
    """Refuse a [..., H, W] mask whose aspect ratio is not that of ``size`` = (h, w), named ``against``.

    Every mask here is brought to one size by ``resize_mask``, which would stretch a mask of another
    framing over the wrong pixels without a word. Ratios (w/h) within 0.01 count as one: sides rounded
    to whole pixels or latent cells.
    """
    height, width = mask.shape[-2:]
    if abs(width / height - size[1] / size[0]) > 0.01:
        raise ValueError(f"{what} is {width}×{height} but {against} is {size[1]}×{size[0]}, another aspect ratio "
                         f"(resizing would stretch it): {todo}")


def tokens_from_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a [B, H, W] mask to a layer's (h, w) and flatten it row-major to [B, h*w, 1].

    Row-major order matches the tokens of an attention layer (token index = row * w + col).
    """
    return resize_mask(mask, size).flatten(1)[..., None]


def blend_self_attention(
    phi_target: torch.Tensor, phi_layout: torch.Tensor, mask_tokens: torch.Tensor
) -> torch.Tensor:
    """φ* = M ⊙ φ_t + (1 − M) ⊙ φ_o (§3.2 / Algorithm 1, line 12) on [B, N, C] token features.

    ``mask_tokens`` is [B, N, 1] (see ``tokens_from_mask``) or anything that broadcasts to the
    features, e.g. batch 1 for every cond/uncond copy. Written as two products rather than
    ``torch.lerp`` so that M = 1 returns φ_t and M = 0 returns φ_o bit for bit.
    """
    m = mask_tokens.to(phi_target.dtype)
    return m * phi_target + (1 - m) * phi_layout


def remove_small_components(mask: torch.Tensor, min_component: float) -> torch.Tensor:
    """C of §3.2: drop 8-connected foreground sets smaller than ``min_component`` of the area.

    ``min_component`` is a fraction of H·W (the paper's "volume threshold" is unstated; a
    fraction keeps the rule the same at every mask resolution). A set survives when its pixel
    count is ``>= min_component * H * W``.
    """
    min_pixels = min_component * mask.shape[-2] * mask.shape[-1]
    return _per_image(mask, lambda m: _keep_large(m, min_pixels))


def adaptive_mask(
    cross_mask: torch.Tensor,
    sam_mask: torch.Tensor | None = None,
    *,
    size: tuple[int, int] | None = None,
    combine: str = "or",
    min_component: float = 0.01,
    clean_union: bool = True,
) -> torch.Tensor:
    """M = clamp(Normalize(D_l2(M^k)) + C(M^c), 0, 1) of §3.2, batched [B, H, W].

    Steps, with the choices the paper leaves open:

    1. Both masks are brought to ``size`` (default: the SAM mask's size, else M^c's) with
       ``resize_mask`` and re-binarised at > 0.5. The paper resizes M^c to the image size H x W;
       the caller may pick a smaller common size, since every layer receives a resized M anyway.
    2. ``combine="or"`` (default) is the paper's formula M^k = OR(Resize(M^c), M^SAM).
       ``combine="refine"`` is the prose reading ("discard noisy regions of M^c based on
       M^SAM"): M^c is first cut to M^c ∧ M^SAM, so M^k = M^SAM and only the part of M^c inside
       the SAM object is added as confident region. Without a SAM mask both give M^k = M^c.
    3. C (``remove_small_components``, ``min_component`` a fraction of the area, default 1 %)
       cleans M^c only: it is the paper's C(M^c), and SAM masks are clean already, so a small
       SAM part (an ear, a tail) is real object. With ``clean_union=True`` (default) the cleaned
       M^c also enters M^k, because a noise island kept in M^k would still be blended at weight
       >= 0.5, which defeats C's stated purpose; ``clean_union=False`` is the literal formula.
    4. D_l2 is the Euclidean distance of each M^k pixel to the nearest background pixel
       (image borders are not background: an object cut by the frame continues past it).
       Normalize maps it min-max, per image, onto [0.5, 1.0] inside M^k (edge 0.5, deepest
       pixel 1.0); background stays 0. A foreground of one distance value (or no background at
       all) maps to 1.0.
    5. The cleaned M^c (binary) is added and the sum clamped to [0, 1], so confident cells are 1.
    """
    if combine not in ("or", "refine"):
        raise ValueError(f"combine must be 'or' or 'refine', got {combine!r}")
    size = tuple(size or (sam_mask if sam_mask is not None else cross_mask).shape[-2:])
    cross = _binary(cross_mask, size)
    sam = None if sam_mask is None else _binary(sam_mask.to(cross.device), size)
    if combine == "refine" and sam is not None:
        cross = cross * sam
    confident = remove_small_components(cross, min_component)
    union = confident if clean_union else cross
    if sam is not None:
        union = torch.maximum(union, sam)
    return (normalized_distance(union) + confident).clamp(0, 1)


def normalized_distance(mask: torch.Tensor) -> torch.Tensor:
    """Normalize(D_l2(mask)) of §3.2: min-max of the Euclidean distance transform onto [0.5, 1].

    Background pixels stay 0; see ``adaptive_mask`` step 4 for the exact rule.
    """
    return _per_image(mask, _normalized_edt)


def _binary(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return (resize_mask(mask.float(), size) > 0.5).float()


def _per_image(mask: torch.Tensor, fn) -> torch.Tensor:
    """Apply a numpy [H, W] bool -> float map to each image of a [B, H, W] mask."""
    images = (mask > 0.5).cpu().numpy()
    out = np.stack([fn(m) for m in images]).astype(np.float32)
    return torch.from_numpy(out).to(device=mask.device)


def _keep_large(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    labels, _ = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _normalized_edt(mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, dtype=np.float64)
    if not mask.any():
        return out
    # scipy's transform is undefined without any zero pixel: the whole frame is object then.
    dist = ndimage.distance_transform_edt(mask) if not mask.all() else np.ones(mask.shape)
    inside = dist[mask]
    lo, span = inside.min(), inside.max() - inside.min()
    out[mask] = 1.0 if span == 0 else 0.5 + 0.5 * (inside - lo) / span
    return out
