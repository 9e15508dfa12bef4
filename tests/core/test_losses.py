import math

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from comfyui_personalize.guidance.losses import gaussian_smooth, layout_loss, masked_vectors, uremd_loss


def slow_uremd(ref, gen):
    """Eq. 6–7 written out: every cosine distance, the nearest palette vector per generated one, 1/m."""
    total = 0.0
    for g in gen.tolist():
        costs = [1 - np.dot(r, g) / (np.linalg.norm(r) * np.linalg.norm(g)) for r in ref.tolist()]
        total += min(costs)
    return total / len(gen)


def fd_grad(f, x, h=1e-6):
    """Central finite differences of a scalar function, one coordinate at a time."""
    grad = torch.zeros_like(x)
    flat = x.detach().clone().reshape(-1)
    for k in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[k] += h
        minus[k] -= h
        grad.view(-1)[k] = (f(plus.view_as(x)) - f(minus.view_as(x))) / (2 * h)
    return grad


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def sets():
    g = torch.Generator().manual_seed(0)
    return torch.randn(13, 6, generator=g, dtype=torch.float64), torch.randn(17, 6, generator=g, dtype=torch.float64)


def test_uremd_matches_the_plain_definition(sets):
    ref, gen = sets
    assert uremd_loss(ref, gen).item() == pytest.approx(slow_uremd(ref, gen), rel=1e-12)


def test_uremd_is_one_over_m_and_not_symmetric(sets):
    ref, gen = sets
    assert uremd_loss(ref, gen[:1]).item() == pytest.approx(slow_uremd(ref, gen[:1]), rel=1e-12)
    assert uremd_loss(gen, ref).item() != pytest.approx(uremd_loss(ref, gen).item())
    assert uremd_loss(gen, gen).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 1024])
def test_uremd_chunked_equals_unchunked(sets, chunk):
    ref, gen = (t.clone().requires_grad_(True) for t in sets)
    loss = uremd_loss(ref, gen, chunk=chunk)
    g_ref, g_gen = torch.autograd.grad(loss, (ref, gen))
    ref_w, gen_w = (t.clone().requires_grad_(True) for t in sets)
    loss_w = uremd_loss(ref_w, gen_w, chunk=10 ** 6)
    w_ref, w_gen = torch.autograd.grad(loss_w, (ref_w, gen_w))
    assert torch.allclose(loss, loss_w, rtol=1e-14, atol=0)
    assert torch.allclose(g_ref, w_ref, rtol=1e-12, atol=1e-15)
    assert torch.allclose(g_gen, w_gen, rtol=1e-12, atol=1e-15)


def test_uremd_never_keeps_the_cost_matrix_for_backward():
    ref, gen = torch.randn(64, 2, requires_grad=True), torch.randn(96, 2, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        uremd_loss(ref, gen, chunk=16).backward()
    assert max(saved) <= gen.numel() < 16 * 16     # inputs and per-row results only, not even one block


def test_uremd_gradient_matches_finite_differences(sets):
    ref, gen = sets[0][:7], sets[1][:9]
    gen_var, ref_var = gen.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    g_gen, g_ref = torch.autograd.grad(uremd_loss(ref_var, gen_var, chunk=4), (gen_var, ref_var))
    assert rel_err(g_gen, fd_grad(lambda v: uremd_loss(ref, v).item(), gen)) < 1e-6
    assert rel_err(g_ref, fd_grad(lambda v: uremd_loss(v, gen).item(), ref)) < 1e-6


def test_uremd_empty_sets_give_zero_without_gradient(sets):
    ref, gen = sets
    for a, b in ((ref[:0], gen), (ref, gen[:0])):
        loss = uremd_loss(a, b.clone().requires_grad_(True))
        assert loss.item() == 0.0 and not loss.requires_grad


def test_uremd_fp16_inputs_are_computed_in_fp32(sets):
    ref, gen = sets
    loss = uremd_loss(ref.half(), gen.half())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(slow_uremd(ref.half().double(), gen.half().double()), rel=1e-5)


def test_masked_vectors_reads_both_layouts_row_major():
    feats = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)   # [C, H, W]
    mask = torch.rand(3, 4) > 0.5
    rows = masked_vectors(feats, mask)
    expected = torch.stack([feats[:, h, w] for h in range(3) for w in range(4) if mask[h, w]])
    assert torch.equal(rows, expected)
    tokens = feats.detach().flatten(1).t()                                      # [H*W, C]
    assert torch.equal(masked_vectors(tokens, mask.flatten()), expected.detach())
    rows.sum().backward()
    assert torch.equal(feats.grad, mask.expand(5, 3, 4).double())


def slow_smooth(maps, kernel_size, sigma, mode):
    """Per-pixel reference with scipy: a Gaussian of std σ·√2 (Attend-and-Excite's kernel)."""
    d = np.arange(kernel_size) - (kernel_size - 1) / 2
    w = stats.norm.pdf(d, scale=sigma * math.sqrt(2))
    k = np.outer(w, w) / np.outer(w, w).sum()
    flat = maps.reshape(-1, *maps.shape[-2:]).numpy()
    out = np.stack([ndimage.correlate(m, k, mode=mode) for m in flat])
    return torch.from_numpy(out).reshape(maps.shape)


@pytest.mark.parametrize("kernel_size, sigma", [(3, 0.5), (5, 1.0)])
def test_gaussian_smooth_matches_per_pixel_reference(kernel_size, sigma):
    maps = torch.rand(2, 3, 8, 9, dtype=torch.float64)
    out = gaussian_smooth(maps, kernel_size, sigma)
    assert out.shape == maps.shape
    # scipy's "mirror" is torch's "reflect" (the edge sample is not repeated)
    assert torch.allclose(out, slow_smooth(maps, kernel_size, sigma, "mirror"), rtol=1e-12, atol=1e-14)


def test_gaussian_smooth_replicates_maps_too_small_to_reflect():
    maps = torch.rand(1, 6, dtype=torch.float64)
    assert torch.allclose(gaussian_smooth(maps), slow_smooth(maps, 3, 0.5, "nearest"), rtol=1e-12, atol=1e-14)
    one = torch.rand(4, 1, 1, dtype=torch.float64)
    assert torch.allclose(gaussian_smooth(one), one, rtol=1e-12, atol=0)


def test_gaussian_smooth_rejects_even_kernels():
    with pytest.raises(ValueError):
        gaussian_smooth(torch.rand(4, 4), kernel_size=4)


def layer_maps(batch, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, s, s, generator=g, dtype=torch.float64) for s in sizes]


SIZES = (8, 16, 4, 2)


def test_layout_loss_matches_a_loop_based_frobenius_norm():
    gen, temp = layer_maps(3, SIZES, 1), layer_maps(3, SIZES, 2)
    loss = layout_loss(gen, temp)
    assert loss.shape == (3,)
    for b in range(3):
        norms = []
        for g, t in zip(gen, temp):
            diff = slow_smooth(g[b], 3, 0.5, "mirror") - slow_smooth(t[b], 3, 0.5, "mirror")
            norms.append(math.sqrt(sum(v * v for v in diff.flatten().tolist())))
        assert loss[b].item() == pytest.approx(sum(norms) / len(norms), rel=1e-12)


def test_layout_loss_gradient_matches_finite_differences_per_item():
    gen, temp = layer_maps(2, (4, 3), 3), layer_maps(2, (4, 3), 4)
    variables = [g.clone().requires_grad_(True) for g in gen]
    grads = torch.autograd.grad(layout_loss(variables, temp)[0], variables)
    for k, (g, grad) in enumerate(zip(gen, grads)):
        def f(v, k=k):
            return layout_loss([v if j == k else m for j, m in enumerate(gen)], temp)[0].item()
        assert rel_err(grad, fd_grad(f, g)) < 1e-6
        assert torch.all(grad[1] == 0)       # item 0's loss never reaches item 1's maps


def test_layout_loss_is_zero_with_finite_gradient_at_equal_maps():
    temp = layer_maps(1, SIZES, 5)
    gen = [t.expand(3, -1, -1).clone().requires_grad_(True) for t in temp]   # template of batch 1 broadcast
    loss = layout_loss(gen, temp)
    assert torch.equal(loss, torch.zeros(3, dtype=torch.float64))
    grads = torch.autograd.grad(loss.sum(), gen)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_layout_loss_of_unbatched_maps_is_a_scalar():
    gen, temp = layer_maps(1, SIZES, 6), layer_maps(1, SIZES, 7)
    loss = layout_loss([g[0] for g in gen], [t[0] for t in temp])
    assert loss.shape == () and loss.item() == pytest.approx(layout_loss(gen, temp)[0].item(), rel=1e-14)


def test_layout_loss_rejects_mismatched_layer_lists():
    gen = layer_maps(1, SIZES, 8)
    with pytest.raises(ValueError):
        layout_loss(gen, gen[:-1])
