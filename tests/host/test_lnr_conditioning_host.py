"""MultiSourceAttnSwap's prompt inputs and MODEL as other nodes hand them over: what its one batch of three paths
cannot honour is refused, never dropped or given to the wrong path."""
import pytest
import torch

Y_R, Y_P = "a photo of a sks dog", "a photo of a sks dog in the water"
STEPS = 4


@pytest.fixture(scope="module")
def inversions(sd1_nodes):
    env = sd1_nodes

    def invert(seed):
        image = env.tiny.smooth_images(torch.Generator().manual_seed(seed), 1, 64, 64).movedim(1, -1)
        with torch.inference_mode():
            return env.inv.NullTextInvert.execute(env.model, env.clip, "", "ddim", STEPS, "normal", 7.5, 10, 1e-2,
                                                  1e-5, "", image=image, vae=env.vae, reconstruct=False).args[0]
    return invert(7), invert(8)


def swap(env, inversions, reference_positive, target_positive, model=None, words="dog", mask=None, negative=None):
    with torch.inference_mode():
        return env.lnr.MultiSourceAttnSwap.execute(model or env.model, *inversions, reference_positive, target_positive,
                                                   negative or env.encode(""), 7.5, 1, 3, "auto", "auto", env.clip, Y_P,
                                                   words, mask, 0.1).args


def controlled(env, text, which=0):
    """``text`` encoded (``which`` 1: the empty negative beside it), with a tiny ControlNet applied by the host's
    ControlNetApplyAdvanced, which controls both."""
    from nodes import ControlNetApplyAdvanced
    from test_gradient_paths_host import tiny_controlnet
    hint = env.tiny.smooth_images(torch.Generator().manual_seed(14), 1, 64, 64).movedim(1, -1)
    with torch.inference_mode():
        return ControlNetApplyAdvanced().apply_controlnet(env.encode(text), env.encode(""), tiny_controlnet(env.model),
                                                          hint, 1.0, 0.0, 1.0)[which]


def hooked(env, text):
    import comfy.hooks
    return comfy.hooks.set_hooks_for_conditioning(env.encode(text), comfy.hooks.HookGroup())


def test_conditioning_the_batch_cannot_honour_is_refused_naming_the_input_and_the_extra(sd1_nodes, inversions):
    """The node kept only each input's first entry and the reference input's extras for all three paths: a
    ControlNet, area, mask or hooks on target_positive changed nothing, one on reference_positive acted on every
    path, and Conditioning Combine(y_p, 'a cat') sampled y_p alone (or 'a cat' alone, the other way round)."""
    from nodes import ConditioningCombine, ConditioningSetArea, ConditioningSetMask, ConditioningSetTimestepRange
    env = sd1_nodes
    y_r, y_p = env.encode(Y_R), env.encode(Y_P)
    corner = torch.zeros(1, 64, 64)
    corner[:, :32, :32] = 1
    cases = [
        (y_r, controlled(env, Y_P), r"'target_positive' carries a ControlNet \(conditioning key \"control\"\)"),
        (controlled(env, Y_R), y_p, r"'reference_positive' carries a ControlNet"),
        (controlled(env, Y_R), controlled(env, Y_P), r"'reference_positive' and 'target_positive' carry a ControlNet"),
        (y_r, ConditioningSetArea().append(y_p, 32, 32, 0, 0, 1.0)[0], r"'target_positive' carries an area"),
        (y_r, ConditioningSetMask().append(y_p, corner, "default", 1.0)[0], r"'target_positive' carries a mask"),
        (y_r, hooked(env, Y_P), r"'target_positive' carries hooks"),
        (ConditioningSetTimestepRange().set_range(y_r, 0.0, 0.5)[0], y_p,
         r"'reference_positive' carries a timestep range"),
        (ConditioningSetTimestepRange().set_range(y_r, 0.0, 0.5)[0],
         ConditioningSetTimestepRange().set_range(y_p, 0.0, 0.5)[0],
         r"'reference_positive' and 'target_positive' carry a timestep range"),
        (y_r, ConditioningCombine().combine(y_p, env.encode("a cat"))[0], r"'target_positive' holds 2 conditionings"),
        (ConditioningCombine().combine(env.encode("a cat"), y_r)[0], y_p, r"'reference_positive' holds 2 conditionings"),
    ]
    for reference_positive, target_positive, said in cases:
        with pytest.raises(ValueError, match=said + r".*(one batch|the whole batch)"):
            swap(env, inversions, reference_positive, target_positive, words="", mask=torch.ones(1, 64, 64))
    # ControlNetApplyAdvanced controls the negative too: wired with plain positives, it would act on every path
    with pytest.raises(ValueError, match=r"'negative' carries a ControlNet .*one batch"):
        swap(env, inversions, y_r, y_p, words="", mask=torch.ones(1, 64, 64), negative=controlled(env, Y_P, which=1))


def test_the_stacked_prompts_keep_what_applies_to_every_path(sd1_nodes):
    """Pooled prompts stack per path like the prompts ([y_r, y_p, y_r]); a plain value equal in both inputs (the
    size conditioning CLIPTextEncodeSDXL adds) applies to the whole batch, so it stays; unequal, it is refused."""
    import node_helpers
    env = sd1_nodes
    sizes = {"width": 1024, "height": 768}
    y_r, y_p = (node_helpers.conditioning_set_values(env.encode(t), sizes) for t in (Y_R, Y_P))
    [[context, extra]] = env.lnr._stack(y_r, y_p)
    (ref, ref_extra), (tgt, tgt_extra) = y_r[0], y_p[0]
    assert torch.equal(context, torch.cat([ref, tgt, ref]))
    assert torch.equal(extra["pooled_output"],
                       torch.cat([ref_extra["pooled_output"], tgt_extra["pooled_output"], ref_extra["pooled_output"]]))
    assert {k: extra[k] for k in sizes} == sizes
    wider = node_helpers.conditioning_set_values(y_p, {"width": 1152})
    with pytest.raises(ValueError, match=r"'reference_positive' and 'target_positive' differ in their \"width\" "
                                         r"\(1024 vs 1152\).*same kind of node and the same settings"):
        env.lnr._stack(y_r, wider)


def test_a_model_through_attention_capture_is_refused_before_anything_is_recorded(sd1_nodes, inversions):
    """The capture took every pass of the node's own loop for a sampler pass: it recorded the 2- and 3-path
    batches (Attention Maps then crashed, or showed the reference path), and with y_r ≠ y_p its prompt check
    refused the node with a message about the prompt typed into the capture."""
    env = sd1_nodes
    with torch.inference_mode():
        captured, store = env.cap.AttentionCapture.execute(env.model, env.clip, Y_P, "dog", "cross", "all", "").args
    for reference_prompt in (Y_R, Y_P):
        with pytest.raises(ValueError, match=r"'model' comes through Attention Capture.*Wire the MODEL from before "
                                             r"Attention Capture.*give 'words'"):
            swap(env, inversions, env.encode(reference_prompt), env.encode(Y_P), model=captured)
    assert not store.runs, "nothing was recorded"
    out, mask = swap(env, inversions, env.encode(Y_R), env.encode(Y_P))     # the MODEL before the capture
    assert torch.isfinite(out["samples"]).all() and mask.max() > 0
