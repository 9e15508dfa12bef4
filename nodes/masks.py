"""AdaptiveMask (Layout-and-Retouch §3.2, adaptive mask blending), beside the SAM nodes that make its M^SAM.

The maths is ``guidance/masks.adaptive_mask``; this node only thresholds a soft M^c, reconciles batch
sizes and previews the result.
"""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..guidance.masks import adaptive_mask, attention_mask, require_same_aspect
from .host import require_finite
from .sam import CATEGORY
from .sam import NODES as SAM_NODES

OR, REFINE = "or", "refine"
log = logging.getLogger(__name__)


def _match_batch(cross, sam):
    """Expand a batch-1 mask to the other's batch; refuse two different batch sizes."""
    if sam is None or cross.shape[0] == sam.shape[0]:
        return cross, sam
    if 1 not in (cross.shape[0], sam.shape[0]):
        raise ValueError(f"cross_mask has {cross.shape[0]} masks and sam_mask {sam.shape[0]}: give the same number, "
                         "or one of either.")
    count = max(cross.shape[0], sam.shape[0])
    return cross.expand(count, -1, -1), sam.expand(count, -1, -1)


class AdaptiveMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeAdaptiveMask",
            display_name="Adaptive Mask",
            category=CATEGORY,
            description="Layout-and-Retouch's adaptive blending mask (§3.2): M = clamp(Normalize(D_l2(M^k)) + C(M^c), "
                        "0, 1) with M^k = OR(Resize(M^c), M^SAM). Confident cross-attention cells are 1, the rest of "
                        "the object ramps from 0.5 at its edge to 1 at its centre, the background is 0. Output at "
                        "the SAM mask's size (the image's), else at the cross-attention mask's.",
            inputs=[
                io.Mask.Input("cross_mask",
                              tooltip="M^c: the object word's averaged decoder cross-attention map, e.g. Attention "
                                      "Maps' mask (binary, or soft with its threshold 0; thresholded here then)."),
                io.Mask.Input("sam_mask", optional=True,
                              tooltip="M^SAM: the object segmented on the layout image (SAM Segment), of cross_mask's "
                                      "aspect ratio (another is refused). Without it the mask is built from M^c alone."),
                io.Combo.Input("combine", options=[OR, REFINE], default=OR,
                               tooltip="or: the paper's formula, M^k = M^c OR M^SAM. refine: the paper's prose "
                                       "('discard noisy regions of M^c based on M^SAM'): M^c is first cut to the SAM "
                                       "object, so M^k = M^SAM. The same without a SAM mask."),
                io.Float.Input("threshold", default=0.1, min=0.01, max=1.0, step=0.01,
                               tooltip="A cross_mask cell counts as object when >= this (no effect on a binary mask). "
                                       "The paper gives none; 0.1 is MasaCtrl's, whose mask L&R uses."),
                io.Float.Input("min_component", default=0.01, min=0.0, max=1.0, step=0.001,
                               tooltip="C: connected pieces of M^c smaller than this fraction of the mask's area are "
                                       "noise and dropped (the paper's 'volume threshold', value not given)."),
                io.Boolean.Input("clean_union", default=True,
                                 tooltip="Also drop those pieces from M^k, so noise is not blended at weight >= 0.5 "
                                         "(off: the literal formula, where only the confident term is cleaned)."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="M, in [0, 1], for the blending of the retouch step.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, cross_mask, combine, threshold, min_component, clean_union, sam_mask=None) -> io.NodeOutput:
        for name, given in (("cross_mask", cross_mask), ("sam_mask", sam_mask)):
            require_finite(given, f"the {name}", "fix the node that made it; a mask must hold values in [0, 1].")
        if sam_mask is not None:
            require_same_aspect(sam_mask, cross_mask.shape[-2:], "'sam_mask'", "'cross_mask'",
                                "give two masks of the layout image (Attention Maps' MASK of the run that made it, "
                                "SAM Segment of the decoded image), or crop one to the other's framing.")
        cross, sam = _match_batch(attention_mask(cross_mask.float(), threshold), sam_mask)
        mask = adaptive_mask(cross, sam, combine=combine, min_component=min_component, clean_union=clean_union)
        empty = [i for i in range(mask.shape[0]) if not mask[i].any()]
        if empty:
            log.warning("Adaptive Mask: the mask of item(s) %s is empty (no cross_mask cell reaches threshold %g%s%s), "
                        "so blending with it changes nothing; lower the threshold or min_component.", empty, threshold,
                        f", none survives min_component {min_component}" if min_component > 0 else "",
                        "" if sam_mask is None else " and the SAM mask is empty")
        return io.NodeOutput(mask, ui=ui.PreviewMask(mask, cls=cls))


NODES = [*SAM_NODES, AdaptiveMask]
