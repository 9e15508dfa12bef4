"""L&R adaptive mask (§3.2) against slow, plainly written references."""
import math
from collections import deque

import pytest
import torch

from comfyui_personalize.guidance.masks import (
    adaptive_mask,
    attention_mask,
    blend_self_attention,
    remove_small_components,
    require_same_aspect,
    resize_mask,
    tokens_from_mask,
)

N = 24  # grid side; min_component 0.01 -> components below 5.76 pixels go


# ---------------------------------------------------------------- slow references
def ref_components(grid):
    """8-connected foreground components by breadth-first search: list of pixel lists."""
    h, w = len(grid), len(grid[0])
    seen, comps = set(), []
    for y in range(h):
        for x in range(w):
            if not grid[y][x] or (y, x) in seen:
                continue
            comp, queue = [], deque([(y, x)])
            seen.add((y, x))
            while queue:
                cy, cx = queue.popleft()
                comp.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and grid[ny][nx] and (ny, nx) not in seen:
                            seen.add((ny, nx))
                            queue.append((ny, nx))
            comps.append(comp)
    return comps


def ref_remove_small(grid, fraction):
    h, w = len(grid), len(grid[0])
    out = [[0] * w for _ in range(h)]
    for comp in ref_components(grid):
        if len(comp) >= fraction * h * w:
            for y, x in comp:
                out[y][x] = 1
    return out


def ref_normalized_distance(grid):
    """Brute-force distance of each foreground pixel to the nearest background pixel,
    min-max mapped onto [0.5, 1] over the foreground; background 0."""
    h, w = len(grid), len(grid[0])
    background = [(y, x) for y in range(h) for x in range(w) if not grid[y][x]]
    dist = {}
    for y in range(h):
        for x in range(w):
            if grid[y][x]:
                dist[(y, x)] = min(math.hypot(y - by, x - bx) for by, bx in background)
    lo, hi = min(dist.values()), max(dist.values())
    out = [[0.0] * w for _ in range(h)]
    for (y, x), d in dist.items():
        out[y][x] = 1.0 if hi == lo else 0.5 + 0.5 * (d - lo) / (hi - lo)
    return out


def ref_adaptive(cross, sam, fraction, combine="or", clean_union=True):
    h, w = len(cross), len(cross[0])
    if combine == "refine":
        cross = [[cross[y][x] and sam[y][x] for x in range(w)] for y in range(h)]
    confident = ref_remove_small(cross, fraction)
    base = confident if clean_union else cross
    union = [[int(base[y][x] or sam[y][x]) for x in range(w)] for y in range(h)]
    dist = ref_normalized_distance(union)
    return [[min(1.0, max(0.0, dist[y][x] + confident[y][x])) for x in range(w)] for y in range(h)]


# ---------------------------------------------------------------- synthetic masks
def disk(cy, cx, r, n=N):
    return [[int((y - cy) ** 2 + (x - cx) ** 2 <= r * r) for x in range(n)] for y in range(n)]


def synthetic_cross():
    """A disk, a 3x3 blob (9 px, kept), isolated noise pixels (dropped) and two 3-pixel
    L-pieces touching only diagonally (6 px together: kept only under 8-connectivity)."""
    g = disk(9, 9, 5)
    for y in range(18, 21):
        for x in range(18, 21):
            g[y][x] = 1
    for y, x in [(1, 22), (22, 1), (15, 21)]:
        g[y][x] = 1
    for y, x in [(1, 1), (1, 2), (2, 2), (3, 3), (3, 4), (4, 3)]:
        g[y][x] = 1
    return g


def synthetic_sam():
    """The object a bit larger and shifted, so the union adds pixels M^c misses."""
    return disk(10, 10, 6)


def as_tensor(*grids):
    return torch.tensor(grids, dtype=torch.float32)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("combine", ["or", "refine"])
@pytest.mark.parametrize("clean_union", [True, False])
def test_adaptive_mask_matches_slow_reference(combine, clean_union):
    cross, sam = synthetic_cross(), synthetic_sam()
    got = adaptive_mask(as_tensor(cross), as_tensor(sam), combine=combine,
                        min_component=0.01, clean_union=clean_union)
    want = as_tensor(ref_adaptive(cross, sam, 0.01, combine, clean_union))
    assert got.shape == (1, N, N)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_adaptive_mask_properties():
    cross, sam = synthetic_cross(), synthetic_sam()
    m = adaptive_mask(as_tensor(cross), as_tensor(sam), min_component=0.01)[0]
    kept = as_tensor(ref_remove_small(cross, 0.01))[0].bool()
    union = kept | as_tensor(sam)[0].bool()
    assert m.min() >= 0 and m.max() <= 1
    assert torch.all(m[~union] == 0)
    assert torch.all((m[union] >= 0.5) & (m[union] <= 1))
    assert torch.all(m[kept] == 1)  # confident region of M^c
    for y, x in [(1, 22), (22, 1), (15, 21)]:  # isolated noise pixels removed
        assert m[y, x] == 0
    assert m[19, 19] == 1 and m[1, 1] == 1 and m[3, 4] == 1  # blob and diagonal pair kept
    sam_only = as_tensor(sam)[0].bool() & ~kept
    assert sam_only.any() and m[sam_only].max() < 1  # the distance ramp shows where only SAM is


def test_adaptive_mask_without_sam_and_batched():
    a, b = synthetic_cross(), disk(12, 12, 7)
    got = adaptive_mask(as_tensor(a, b))
    empty = [[0] * N for _ in range(N)]
    for i, g in enumerate((a, b)):
        torch.testing.assert_close(got[i], as_tensor(ref_adaptive(g, empty, 0.01))[0],
                                   rtol=0, atol=1e-6)
    assert torch.equal(got, adaptive_mask(as_tensor(a, b)))  # deterministic


def test_adaptive_mask_resizes_cross_mask_to_sam_size():
    cross_small = as_tensor(disk(6, 6, 3.5, n=12))  # latent-size M^c, half the SAM size
    sam = as_tensor(synthetic_sam())
    got = adaptive_mask(cross_small, sam)
    up = (resize_mask(cross_small, (N, N)) > 0.5).int()[0].tolist()
    want = as_tensor(ref_adaptive(up, synthetic_sam(), 0.01))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_masks_of_another_aspect_ratio_are_refused_not_stretched():
    """Resizing a 48×64 mask to 32×32 would stretch it; a size rounded to whole pixels is the same framing."""
    require_same_aspect(torch.zeros(1, 64, 48), (24, 18), "'a'", "'b'", "fix it.")
    require_same_aspect(torch.zeros(1, 667, 1000), (83, 125), "'a'", "'b'", "fix it.")
    with pytest.raises(ValueError, match=r"^'a' is 48×64 but 'b' is 32×32, another aspect ratio \(resizing would "
                                         r"stretch it\): fix it\.$"):
        require_same_aspect(torch.zeros(1, 64, 48), (32, 32), "'a'", "'b'", "fix it.")


def test_remove_small_components_counts_fraction_of_area():
    g = as_tensor(synthetic_cross())
    assert torch.equal(remove_small_components(g, 0.0), g)
    assert remove_small_components(g, 1.0).sum() == 0


def test_attention_mask_threshold_is_inclusive():
    maps = torch.tensor([[[0.0, 0.1], [0.09, 1.0]]])
    assert attention_mask(maps, 0.1).tolist() == [[[0.0, 1.0], [0.0, 1.0]]]


def test_resize_area_downsample_is_block_mean():
    m = torch.rand(2, 8, 12, generator=torch.Generator().manual_seed(0))
    got = resize_mask(m, (4, 3))
    want = torch.tensor([[[sum(m[b, 2 * i + dy, 4 * j + dx].item()
                               for dy in range(2) for dx in range(4)) / 8
                           for j in range(3)] for i in range(4)] for b in range(2)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_resize_bilinear_upsample_matches_half_pixel_reference():
    m = torch.rand(1, 3, 4, generator=torch.Generator().manual_seed(1))
    h, w = 7, 9

    def sample(src, y, x):  # bilinear with half-pixel centres, edges clamped
        y = min(max(y, 0.0), src.shape[0] - 1.0)
        x = min(max(x, 0.0), src.shape[1] - 1.0)
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        y1, x1 = min(y0 + 1, src.shape[0] - 1), min(x0 + 1, src.shape[1] - 1)
        fy, fx = y - y0, x - x0
        top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
        bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
        return (top * (1 - fy) + bottom * fy).item()

    want = torch.tensor([[[sample(m[0], (i + 0.5) * 3 / h - 0.5, (j + 0.5) * 4 / w - 0.5)
                           for j in range(w)] for i in range(h)]])
    torch.testing.assert_close(resize_mask(m, (h, w)), want, rtol=0, atol=1e-6)


def test_tokens_are_row_major():
    m = torch.zeros(1, 4, 6)
    m[0, 2, 5] = 1
    tokens = tokens_from_mask(m, (4, 6))
    assert tokens.shape == (1, 24, 1)
    assert tokens[0, :, 0].nonzero().item() == 2 * 6 + 5


def test_blend_extremes_are_exact_and_mix_is_linear():
    g = torch.Generator().manual_seed(2)
    phi_t, phi_o = torch.randn(2, 12, 5, generator=g), torch.randn(2, 12, 5, generator=g)
    ones, zeros = torch.ones(2, 12, 1), torch.zeros(2, 12, 1)
    assert torch.equal(blend_self_attention(phi_t, phi_o, ones), phi_t)
    assert torch.equal(blend_self_attention(phi_t, phi_o, zeros), phi_o)
    m = torch.rand(1, 12, 1, generator=g)  # batch 1 broadcasts over both copies
    got = blend_self_attention(phi_t, phi_o, m)
    for b in range(2):
        for n in range(12):
            for c in range(5):
                want = m[0, n, 0] * phi_t[b, n, c] + (1 - m[0, n, 0]) * phi_o[b, n, c]
                assert abs(got[b, n, c] - want) < 1e-6
