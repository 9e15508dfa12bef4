import contextlib
import copy
import math
import re

import pytest
import torch

from comfyui_personalize.attention.capture import cross_attention_patch, feature_patch
from comfyui_personalize.attention.layers import AttnLayer
from comfyui_personalize.attention.maps import expand_positions
from comfyui_personalize.attention.store import AttentionStore, parse_steps
from transfers import CpuToDevice

HEADS, DH, H, W, CTX = 2, 8, 4, 6, 10
LAYER = AttnLayer("output", 7, 0, "cross", 2, 11, HEADS * DH, HEADS, DH)
SIGMAS = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])


def sdpa(q, k, v, heads, attn_precision=None, transformer_options=None):
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).flatten(2)


def reference_maps(q, k, columns):
    """Slow Â: per item, per head, softmax by exp/sum in float64, word columns summed, heads averaged."""
    out = torch.zeros(q.shape[0], len(columns), H * W, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(HEADS):
            qh, kh = q[b, :, h * DH:(h + 1) * DH].double(), k[b, :, h * DH:(h + 1) * DH].double()
            logits = qh @ kh.T / math.sqrt(DH)
            p = logits.exp() / logits.exp().sum(-1, keepdim=True)
            for w, cols in enumerate(columns):
                out[b, w] += p[:, cols].sum(-1) / HEADS
    lo, hi = out.amin(-1, keepdim=True), out.amax(-1, keepdim=True)
    return ((out - lo) / (hi - lo)).reshape(q.shape[0], len(columns), H, W)


def options(sigma, cond_or_uncond=(1, 0)):
    return {"sigmas": torch.full((2,), sigma), "cond_or_uncond": list(cond_or_uncond), "n_heads": HEADS,
            "attn_precision": None, "activations_shape": [2, HEADS * DH, H, W], "block": ("output", 7), "block_index": 0}


def qkv(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, HEADS * DH, generator=g) for n in (H * W, CTX, CTX)]


def make_store(**kw):
    return AttentionStore(["dog", "hat"], [(2,), (4, 5)], prompt_len=CTX, **kw)


def begin(store, sigmas):
    """A run whose following calls are the sampler's own passes (the host wrapper marks them)."""
    store.begin_run(sigmas)
    store.begin_pass()


def test_recording_keeps_the_output_and_matches_the_reference_per_branch_and_item():
    store = make_store()
    patch = cross_attention_patch(LAYER, store, sdpa)
    q, k, v = qkv(4)                       # 2 chunks (uncond, cond) of 2 items each
    begin(store, SIGMAS)
    out = patch(q, k, v, options(7.0))
    assert torch.equal(out, sdpa(q, k, v, HEADS))
    store.end_run(torch.ones(2, 4, 8, 8))
    run = store.runs[-1]
    ref = reference_maps(q, k, [[2], [4, 5]])
    assert run.steps == [1] and run.sigma(1) == pytest.approx(7.0)
    torch.testing.assert_close(run.maps[(1, LAYER.key, 1)].float(), ref[:2].float(), atol=2e-3, rtol=0)  # fp16 store
    torch.testing.assert_close(run.maps[(1, LAYER.key, 0)].float(), ref[2:].float(), atol=2e-3, rtol=0)
    assert run.maps[(1, LAYER.key, 0)].dtype == torch.float16


def test_passes_not_marked_as_the_samplers_are_not_recorded():
    """SAG's, PAG's and a guidance gradient's extra UNet passes run at the same σ with the same patches."""
    store = make_store()
    patch = cross_attention_patch(LAYER, store, sdpa)
    (q, k, v), (qx, kx, vx) = qkv(2, 1), qkv(2, 2)
    begin(store, SIGMAS)
    patch(q, k, v, options(7.0))
    store.sampler_pass = False
    assert torch.equal(patch(qx, kx, vx, options(7.0)), sdpa(qx, kx, vx, HEADS))
    store.end_run(torch.zeros(1))
    only = reference_maps(q, k, [[2], [4, 5]])
    torch.testing.assert_close(store.runs[-1].maps[(1, LAYER.key, 0)].float(), only[1:].float(), atol=2e-3, rtol=0)


def test_separate_cond_and_uncond_calls_land_in_their_branches():
    store = make_store()
    patch = cross_attention_patch(LAYER, store, sdpa)
    (qc, kc, vc), (qu, ku, vu) = qkv(1, 1), qkv(1, 2)
    begin(store, SIGMAS)
    patch(qc, kc, vc, options(3.0, (0,)))
    patch(qu, ku, vu, options(3.0, (1,)))
    store.end_run(torch.zeros(1))
    run = store.runs[-1]
    torch.testing.assert_close(run.maps[(2, LAYER.key, 0)].float(), reference_maps(qc, kc, [[2], [4, 5]]).float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(run.maps[(2, LAYER.key, 1)].float(), reference_maps(qu, ku, [[2], [4, 5]]).float(), atol=2e-3, rtol=0)


def test_live_maps_carry_gradient_equal_to_the_reference():
    store = make_store()
    patch = cross_attention_patch(LAYER, store, sdpa)
    q, k, v = qkv(2)
    q.requires_grad_(True)
    with store.live() as cap:
        out = patch(q, k, v, options(7.0))
    torch.testing.assert_close(out, sdpa(q, k, v, HEADS), atol=1e-5, rtol=1e-5)
    weights = torch.randn(2, 2, H, W, dtype=torch.float64)
    g, = torch.autograd.grad((cap.maps[LAYER.key].double() * weights).sum(), q)
    q_ref = q.detach().double().requires_grad_(True)
    g_ref, = torch.autograd.grad((reference_maps(q_ref, k, [[2], [4, 5]]) * weights).sum(), q_ref)
    assert g.abs().max() > 1e-3
    torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-4)
    assert store.runs == [] and not store.is_live


def test_a_live_pass_of_one_branchs_entries_averages_them_as_a_recorded_pass_does():
    """The prompt combined with itself (or masked over the whole image) runs as two entries of one branch: the live
    maps are their mean, batch 1, as recording files them (they were batch 2, and a batch-1 template crashed the
    loss); a cond/uncond batch stays as it is."""
    store = make_store()
    patch = cross_attention_patch(LAYER, store, sdpa)
    q, k, v = qkv(2)
    with store.live() as cap:
        patch(q, k, v, options(7.0, (0, 0)))
    expected = reference_maps(q, k, [[2], [4, 5]]).mean(0, keepdim=True)
    torch.testing.assert_close(cap.maps[LAYER.key].double(), expected, atol=2e-3, rtol=0)
    with store.live() as cap:
        patch(q, k, v, options(7.0, (1, 0)))
    assert cap.maps[LAYER.key].shape[0] == 2


def test_previous_replace_is_chained_not_clobbered():
    calls = []
    def previous(q, k, v, extra):
        calls.append(extra["block"])
        return torch.zeros_like(q)
    store = make_store()
    patch = cross_attention_patch(LAYER, store, sdpa, previous)
    q, k, v = qkv(2)
    begin(store, SIGMAS)
    assert torch.equal(patch(q, k, v, options(7.0)), torch.zeros_like(q))
    store.abort_run()
    assert patch(q, k, v, options(7.0)).abs().sum() == 0 and len(calls) == 2


def test_steps_rule_sigma_matching_and_denoise_schedules():
    store = make_store(steps=parse_steps("0, 2-3"))
    patch = cross_attention_patch(LAYER, store, sdpa)
    q, k, v = qkv(2)
    begin(store, SIGMAS[2:])            # a denoise < 1 run: the schedule starts at σ = 3
    for sigma in (3.0, 1.0, 5.5):          # 5.5 is not in the schedule: ignored
        patch(q, k, v, options(sigma))
    store.end_run(torch.zeros(1))
    assert store.runs[-1].steps == [0] and store.runs[-1].sigma(0) == 3.0


def test_runs_are_fingerprinted_bounded_and_interrupted_runs_leave_nothing():
    store = make_store()
    patch = cross_attention_patch(LAYER, store, sdpa)
    q, k, v = qkv(2)

    def record(value):
        begin(store, SIGMAS)
        patch(q, k, v, options(7.0))
        store.end_run(torch.full((1, 4, 2, 2), value))
    record(0.0)
    one_run = sum(t.numel() * t.element_size() for t in (*store.runs[0].maps.values(), store.runs[0].output))
    store.keep_bytes = 2 * one_run                                       # room for two runs' maps and outputs
    for i in (1.0, 2.0):
        record(i)
    begin(store, SIGMAS)
    patch(q, k, v, options(7.0))
    store.abort_run()                       # an interrupted run
    assert len(store.runs) == 2
    assert store.run_for(torch.full((1, 4, 2, 2), 2.0)) is store.runs[-1]
    assert store.run_for(torch.full((1, 4, 2, 2), 1.0)) is store.runs[0]
    # a dropped run's LATENT (the host re-ran only the reading node) is told apart from a foreign one
    with pytest.raises(LookupError, match="the maps of the run that made this LATENT are no longer kept"):
        store.run_for(torch.full((1, 4, 2, 2), 0.0))
    with pytest.raises(LookupError, match="not made by a sampler that used this capture"):
        store.run_for(torch.full((1, 4, 2, 2), 5.0))
    store.keep_bytes = 0
    record(3.0)
    assert len(store.runs) == 1, "the newest run is always kept"
    assert copy.deepcopy({"s": store})["s"] is store
    # runs kept on a GPU (--highvram) are memory the host's model management does not see: a smaller bound
    assert make_store().keep_bytes == 512 * 2**20 and make_store(offload_device="meta").keep_bytes == 64 * 2**20


def test_a_later_pass_at_a_steps_sigma_replaces_an_earlier_one_and_calls_of_one_pass_average():
    """heun's corrector evaluates step i+1's σ at a guessed latent before step i+1's own pass: the own pass (the
    later one) is the step's maps. The calls of one pass at one σ (several cond entries) are averaged."""
    store = make_store()
    patch = cross_attention_patch(LAYER, store, sdpa)
    a, b = qkv(2, 1), qkv(2, 2)

    def maps_of(*passes):
        """Step 1's cond maps of a run whose passes (each a list of calls) all come at step 1's σ."""
        store.begin_run(SIGMAS)
        for calls in passes:
            store.begin_pass()
            for call in calls:
                patch(*call, options(7.0))
        store.end_run(torch.full((1,), float(len(store.runs))))
        return store.runs[-1].maps[(1, LAYER.key, 0)].float()
    only_a, only_b = maps_of([a]), maps_of([b])
    assert not torch.equal(only_a, only_b)
    assert torch.equal(maps_of([a], [b]), only_b), "the later pass replaces the earlier"
    torch.testing.assert_close(maps_of([a, b]), (only_a + only_b) / 2, atol=2e-3, rtol=0)


def test_features_are_recorded_only_on_chosen_layers():
    store = make_store()
    patch = feature_patch([LAYER], store)
    n = torch.randn(4, H * W, 16)
    with store.live() as cap:
        out = patch(n, "ctx", "val", options(7.0))
        patch(n, None, None, {**options(7.0), "block": ("output", 8)})
    assert out[0] is n and out[1:] == ("ctx", "val")
    assert list(cap.features) == [LAYER.key]
    assert torch.equal(cap.features[LAYER.key], n.reshape(4, H, W, 16))


def test_context_repetition_and_mismatch():
    assert expand_positions((2, 5), 154, 77) == [2, 5, 79, 82]
    with pytest.raises(ValueError, match="same prompt text"):
        expand_positions((80,), 77, 154)


@pytest.mark.parametrize("rule, message", [
    ("every", "'every' is not understood; 'every N' needs a whole number"),
    ("every x", "'every x' is not understood; 'every N' needs a whole number"),
    ("every 0", "'every 0' is not understood"),
    ("every 5 steps", "'every 5 steps' is not understood"),
    ("0-", "'0-' is not understood"),
    ("9-2", "the range '9-2' runs backwards; write it '2-9'"),
    ("1,,3", "has an empty entry between commas"),
    ("first 5", "'first5' is not understood"),
])
def test_step_rule_typos_are_refused_with_a_message(rule, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_steps(rule)


def test_step_rules_pick_their_steps():
    assert [s for s in range(12) if parse_steps("every 5")(s, 12)] == [0, 5, 10]
    assert [s for s in range(12) if parse_steps("every5")(s, 12)] == [0, 5, 10]
    assert [s for s in range(12) if parse_steps(" 0-2, 7 ")(s, 12)] == [0, 1, 2, 7]
    assert all(parse_steps("all")(s, 12) for s in range(12))


def test_capturing_copies_nothing_from_the_cpu_after_the_first_pass():
    # on a GPU each such copy waits for the device's queue: a stall per layer and pass (issue 11, capture time)
    for live in (False, True):
        store = make_store()
        patch = cross_attention_patch(LAYER, store, sdpa)
        q, k, v = (t.to("meta") for t in qkv(2))
        opts = options(7.0)             # the host's sigmas: read once per forward, not per layer
        begin(store, SIGMAS)
        with store.live() if live else contextlib.nullcontext():
            patch(q, k, v, opts)        # the first pass may make its index tensors
            with CpuToDevice() as seen:
                patch(q, k, v, opts)
        assert seen.seen == []


def test_index_cached_in_a_sampler_pass_serves_a_later_gradient_pass():
    store = make_store()
    patch = cross_attention_patch(LAYER, store, sdpa)
    q, k, v = qkv(2)
    with torch.inference_mode():          # the executor's mode: the first pass caches the word columns
        begin(store, SIGMAS)
        patch(q, k, v, options(7.0))
    q = q.clone().requires_grad_(True)
    with store.live() as live:
        patch(q, k, v, options(7.0))
        live.maps[LAYER.key].sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
