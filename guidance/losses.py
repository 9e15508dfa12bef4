"""Pick-and-Draw's two energy terms: appearance picking (§3.2, Eq. 3–7) and layout drawing (§3.3, Eq. 8)."""
import torch
import torch.nn.functional as F


def masked_vectors(features, mask):
    """P&D Eq. 3: the feature set V_l = {rows of M_l ⊙ Ψ_l inside the mask} of one image and one layer.

    ``features`` is one image's dense feature map, either channel-first ``[C, H, W]`` or token rows
    ``[H*W, C]`` (row-major, the layout of the host's attention hidden states); there is no batch
    dimension, index the batch item first. ``mask`` is boolean ``[H, W]`` or ``[H*W]`` (``M_l``,
    e.g. ``maps >= tau``). Rather than zeroing the rows outside the mask, they are dropped, which is
    the paper's "extract the non-zero channels". Returns ``[n, C]``, differentiable w.r.t. ``features``.
    """
    rows = features.flatten(1).t() if features.dim() == 3 else features
    return rows[mask.reshape(-1)]


def uremd_loss(ref, gen, chunk=1024):
    """P&D Eq. 6–7: UREMD(V_ref, V_gen) = (1/m) Σ_j min_i (1 − cos(V_ref_i, V_gen_j)).

    ``ref`` ``[n, C]`` is the palette, ``gen`` ``[m, C]`` the generated set; each generated vector is
    charged the cosine distance to its nearest palette vector. Normalisation: the paper's literal Eq. 5
    (constraint Σ_i T_ij = 1/n) gives a 1/n factor in Eq. 6; this uses 1/m, the mean over generated
    vectors, so that the loss lies in [0, 2] whatever the palette's and the subject's sizes and a
    guidance weight means the same for a large and a small palette (the two differ by the factor m/n).

    Memory: the n×m cost matrix is built in ``chunk``×``chunk`` blocks and reduced to a per-row
    maximum of cosine similarity at once; ``max`` keeps only the winning indices for backward, so
    no block outlives its reduction. Differentiable w.r.t. ``gen`` and ``ref`` (the gradient reaches
    the nearest palette vector). Computed in at least fp32.

    An empty palette or empty generated set (mask below τ everywhere) returns a zero tensor that
    requires no gradient; the caller should warn and skip that term.
    """
    dtype = torch.promote_types(torch.promote_types(ref.dtype, gen.dtype), torch.float32)
    if ref.shape[0] == 0 or gen.shape[0] == 0:
        return torch.zeros((), dtype=dtype, device=gen.device)
    ref = F.normalize(ref.to(dtype), dim=-1)     # on gen's device: the caller moves a stored palette once per layer
    gen = F.normalize(gen.to(dtype), dim=-1)
    nearest = torch.cat([_max_similarity(ref, g, chunk) for g in gen.split(chunk)])
    return (1 - nearest).mean()


def _max_similarity(ref, gen, chunk):
    per_block = [(gen @ r.t()).max(dim=1).values for r in ref.split(chunk)]
    return torch.stack(per_block, dim=1).max(dim=1).values


def gaussian_smooth(maps, kernel_size=3, sigma=0.5):
    """The Gaussian kernel G of P&D Eq. 8, as Attend-and-Excite (Chefer et al. 2023) builds it.

    Smooths every ``[H, W]`` map of ``[..., H, W]`` independently (a depthwise convolution).
    The kernel is Attend-and-Excite's: weights ∝ exp(−(d / 2σ)²), normalised to sum 1 — a Gaussian of
    standard deviation σ·√2, kept so that their defaults (kernel 3, σ 0.5) give their kernel.
    ``kernel_size`` must be odd. Padding: reflect, as Attend-and-Excite pads; maps too small to
    reflect (side ≤ kernel_size // 2) are padded by replication instead. Output has the input's shape.
    """
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    h, w = maps.shape[-2:]
    pad = kernel_size // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    padded = F.pad(maps.reshape(-1, 1, h, w), (pad,) * 4, mode=mode)
    return F.conv2d(padded, _kernel(kernel_size, sigma, maps)).reshape(maps.shape)


def _kernel(size, sigma, like):
    d = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    w = torch.exp(-(d / (2 * sigma)) ** 2)
    k = torch.outer(w, w)
    return (k / k.sum())[None, None]


def safe_frobenius(x):
    """‖x‖_F over the last two dimensions whose gradient at x = 0 is 0 instead of NaN.

    Exact elsewhere. The double ``where`` keeps the square root away from 0 in the masked branch, so
    its infinite derivative is never multiplied into the graph (sqrt(Σx²) written plainly gives NaN
    when the generated and template maps coincide, as they do on vanilla SD).
    """
    sq = x.square().sum(dim=(-2, -1))
    nonzero = sq > 0
    return torch.where(nonzero, torch.where(nonzero, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def layout_loss(gen_maps, template_maps, kernel_size=3, sigma=0.5):
    """P&D Eq. 8: ℓ_lay = (1/L) Σ_l ‖G(Â_gen_l) − G(Â_temp_l)‖_F.

    ``gen_maps`` and ``template_maps`` are sequences of L per-layer maps, each ``[B, H, W]`` (or
    ``[H, W]``); layers may differ in resolution, and a template may have batch 1 to serve every
    item. Returns the per-item losses ``[B]`` (a scalar for ``[H, W]`` maps), so that each item's
    gradient comes from its own maps only. G is linear, so G(a) − G(b) is computed as G(a − b).
    The norm is ``safe_frobenius``: at exactly equal maps the loss is 0 with gradient 0.
    """
    if len(gen_maps) == 0 or len(gen_maps) != len(template_maps):
        raise ValueError(f"need equally many generated and template layers, got {len(gen_maps)} and "
                         f"{len(template_maps)}")
    per_layer = [safe_frobenius(gaussian_smooth(g - t, kernel_size, sigma)) for g, t in zip(gen_maps, template_maps)]
    return torch.stack(per_layer).mean(dim=0)
