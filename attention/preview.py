"""Pictures and masks made from a recorded run: P&D Fig. 3-style grids and L&R's cross-attention mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import AttnLayer
from .store import Run

# a perceptually ordered dark-to-bright ramp (black, purple, orange, pale yellow), linearly interpolated
_RAMP = torch.tensor([[0.0, 0.0, 0.02], [0.33, 0.07, 0.43], [0.74, 0.22, 0.33], [0.98, 0.56, 0.04], [0.99, 0.99, 0.75]])


def colorize(values: torch.Tensor) -> torch.Tensor:
    """[..., H, W] in [0, 1] -> [..., H, W, 3] RGB."""
    pos = values.clamp(0, 1) * (len(_RAMP) - 1)
    lo = pos.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (pos - lo).unsqueeze(-1)
    return _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac


def row_order(layers: list[AttnLayer]) -> list[list[AttnLayer]]:
    """Layers grouped by (encoder/middle/decoder, resolution), groups in UNet order."""
    groups: dict = {}
    for layer in sorted(layers, key=lambda l: l.ordinal):
        groups.setdefault((layer.block, layer.scale), []).append(layer)
    return list(groups.values())


def map_grid(run: Run, layers: list[AttnLayer], steps: list[int], word: int, item: int, branch: int = 0,
             cell: int = 64, gap: int = 2, group_gap: int = 8) -> torch.Tensor:
    """One word's maps as an image ``[H, W, 3]``: a row per layer (grouped), a column per step."""
    groups = row_order([l for l in layers if any((s, l.key, branch) in run.maps for s in steps)])
    if not groups or not steps:
        raise ValueError("nothing recorded for these layers and steps: check the capture's layer and step rules.")
    rows = sum(len(g) for g in groups)
    height = rows * (cell + gap) + (len(groups) - 1) * group_gap
    width = len(steps) * (cell + gap)
    canvas = torch.full((height, width, 3), 0.15)
    y = 0
    for group in groups:
        for layer in group:
            for col, step in enumerate(steps):
                maps = run.maps.get((step, layer.key, branch))
                if maps is None:
                    continue
                tile = F.interpolate(maps[item, word][None, None].float(), size=(cell, cell), mode="nearest")[0, 0]
                canvas[y:y + cell, col * (cell + gap):col * (cell + gap) + cell] = colorize(tile)
            y += cell + gap
        y += group_gap
    return canvas


def mean_map(run: Run, layers: list[AttnLayer], steps: list[int], size: tuple[int, int], branch: int = 0) -> torch.Tensor:
    """Mean of the chosen layers' maps over the chosen steps, resized to ``size``, re-normalised: [B, W, H, W]."""
    maps = [run.maps[(s, l.key, branch)].float() for s in steps for l in layers if (s, l.key, branch) in run.maps]
    if not maps:
        raise ValueError("no recorded maps for the chosen mask layers and steps: widen the rule or record those steps.")
    mean = torch.stack([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]).mean(0)
    flat = mean.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo + 1e-8)).reshape(mean.shape)


def attention_mask(mean: torch.Tensor, threshold: float) -> torch.Tensor:
    """Union over words of ``mean ≥ threshold`` ([B, W, H, W] -> [B, H, W]); threshold 0 keeps the soft map."""
    union = mean.amax(dim=1)
    return union if threshold <= 0 else (union >= threshold).float()
