"""AttentionCapture / AttentionMaps in the real host, on the tiny in-process models."""
import copy
import json
import math
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
PROMPT = "a photo of a (sks dog:1.2) on the beach"


@pytest.fixture(scope="module")
def sd1(host):
    import tiny_models
    return tiny_models.tiny_sd1()


@pytest.fixture(scope="module")
def pack(pack):
    pack("nodes.capture")
    return pack()


def encode(clip, text):
    """What CLIPTextEncode puts in a CONDITIONING entry."""
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    return [out["cond"], {"pooled_output": out["pooled_output"]}]


def conds(clip, positive, negative=""):
    return [encode(clip, positive)], [encode(clip, negative)]


def sample(model, pos, neg, batch=1, seed=0, steps=4, denoise=1.0, callback=None, options=None, side=16):
    import comfy.sample
    noise = torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(seed))
    if options:
        model = model.clone()
        model.model_options.update(options)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 7.5, "euler", "normal", pos, neg, torch.zeros_like(noise),
                                   denoise=denoise, callback=callback, disable_pbar=True, seed=seed)


def capture(pack, model, clip, words="dog, beach", layers="cross", steps="all", prompt=PROMPT):
    out = pack.nodes.capture.AttentionCapture.execute(model, clip, prompt, words, layers, steps, "")
    return out.args


def read(pack, store, latent, **kw):
    args = dict(branch="cond", mask_layers="decoder", mask_threshold=0.5, cell=16) | kw
    return pack.nodes.capture.AttentionMaps.execute(store, {"samples": latent}, **args).args


def options_snapshot(model):
    return copy.deepcopy(model.model_options), {k: dict(v) for k, v in model.wrappers.items()}


def test_word_positions_follow_the_host_tokenizer(host, sd1, pack):
    from safetensors.torch import save_file
    save_file({"clip_l": torch.randn(2, 64)}, str(host.embeddings_dir / "tinyemb.safetensors"))
    clip = sd1[1]
    prompt = "a photo of a (sks dog:1.2), embedding:tinyemb on the beach"
    positions, length = pack.nodes.host.prompt_word_positions(clip, prompt, ["dog", "tinyemb", "on the"])
    flat = [t for chunk in clip.tokenize(prompt)["l"] for t in chunk]
    vocab = clip.tokenizer.clip_l.tokenizer.get_vocab()
    assert length == len(flat) == 77
    assert [flat[p][0] for p in positions[0]] == [vocab["dog</w>"]]
    assert len(positions[1]) == 2 and all(isinstance(flat[p][0], torch.Tensor) for p in positions[1])
    assert [flat[p][0] for p in positions[2]] == [vocab["on</w>"], vocab["the</w>"]]
    # a word CLIP splits into several BPE pieces is found whole
    (pieces,), _ = pack.nodes.host.prompt_word_positions(clip, "a photo of a corgisaurus", ["corgisaurus"])
    flat = [t for chunk in clip.tokenize("a photo of a corgisaurus")["l"] for t in chunk]
    inv = {v: k for k, v in vocab.items()}
    assert len(pieces) >= 2 and "".join(inv[flat[p][0]] for p in pieces) == "corgisaurus</w>"
    with pytest.raises(ValueError, match="'cat' is not a word of the prompt.*sks, dog"):
        pack.nodes.host.prompt_word_positions(clip, prompt, ["cat"])


def test_a_missing_embedding_file_is_named_and_the_others_keep_their_names(host, sd1, pack):
    """The host drops an ``embedding:`` whose file it cannot find, with only a log line: watching it is refused
    with that reason (not "not a word of the prompt"), and an embedding after it is still found by its own name."""
    from safetensors.torch import save_file
    save_file({"clip_l": torch.randn(3, 64)}, str(host.embeddings_dir / "tinyemb3.safetensors"))
    clip = sd1[1]
    prompt = "a photo of embedding:nosuchfile and embedding:tinyemb3 on the beach"
    for word in ("embedding:nosuchfile", "nosuchfile"):
        with pytest.raises(ValueError, match="embedding:nosuchfile, but the host left it out"):
            pack.nodes.host.prompt_word_positions(clip, prompt, [word])
    (found,), _ = pack.nodes.host.prompt_word_positions(clip, prompt, ["embedding:tinyemb3"])
    flat = [t for chunk in clip.tokenize(prompt)["l"] for t in chunk]
    assert len(found) == 3 and all(isinstance(flat[p][0], torch.Tensor) for p in found)
    # the host looks "tinyemb3." up as written and drops it; the embedding after it keeps its own name
    save_file({"clip_l": torch.randn(2, 64)}, str(host.embeddings_dir / "tinyemb2.safetensors"))
    glued = "a photo of embedding:tinyemb3. embedding:tinyemb2 on the beach"
    with pytest.raises(ValueError, match="embedding:tinyemb3, but the host left it out.*punctuation"):
        pack.nodes.host.prompt_word_positions(clip, glued, ["embedding:tinyemb3"])
    (found,), _ = pack.nodes.host.prompt_word_positions(clip, glued, ["embedding:tinyemb2"])
    flat = [t for chunk in clip.tokenize(glued)["l"] for t in chunk]
    assert len(found) == 2 and all(isinstance(flat[p][0], torch.Tensor) for p in found)
    # two files that begin with the same vector (one copied and extended) are still told apart
    first = torch.randn(64)
    save_file({"clip_l": torch.stack([first, torch.randn(64)])}, str(host.embeddings_dir / "twin_a.safetensors"))
    save_file({"clip_l": torch.stack([first, torch.randn(64), torch.randn(64)])},
              str(host.embeddings_dir / "twin_b.safetensors"))
    twins = "a photo of embedding:twin_a and embedding:twin_b on the beach"
    a, b = pack.nodes.host.prompt_word_positions(clip, twins, ["embedding:twin_a", "embedding:twin_b"])[0]
    assert (len(a), len(b)) == (2, 3) and not set(a) & set(b)


def test_sdxl_encoders_agree_on_positions(host, pack):
    import tiny_models
    clip = tiny_models.tiny_sdxl()[1]
    positions, length = pack.nodes.host.prompt_word_positions(clip, "a watercolor of a corgi puppy", ["corgi", "puppy"])
    tokens = clip.tokenize("a watercolor of a corgi puppy")
    vocab = clip.tokenizer.clip_l.tokenizer.get_vocab()
    for key in ("l", "g"):
        flat = [t for chunk in tokens[key] for t in chunk]
        assert [flat[p][0] for p in positions[0]] == [vocab["corgi</w>"]]
    assert length == 77


def test_capture_leaves_the_image_bit_identical_and_the_model_untouched(sd1, pack):
    model, clip, _ = sd1
    pos, neg = conds(clip, PROMPT)
    before = options_snapshot(model)
    captured, store = capture(pack, model, clip)
    plain, watched = sample(model, pos, neg, batch=2), sample(captured, pos, neg, batch=2)
    assert torch.equal(plain, watched)
    assert repr(options_snapshot(model)) == repr(before)
    run = store.run_for(watched)
    assert run.steps == [0, 1, 2, 3]
    maps = run.maps[(0, store.layers[-1].key, 0)]     # the last decoder layer, latent 1/1
    assert maps.shape == (2, 2, 16, 16)             # batch items × words × h × w
    assert (maps[0] - maps[1]).abs().max() > 0.05, "each batch item must have its own maps"


def reference_maps(model, pos, neg, columns, seed=0):
    """Â from q, k caught by forward hooks on every attn2's projections, computed independently.

    Returns the maps per attn2 module name and the batch's branch order (``cond_or_uncond``).
    """
    unet = model.get_model_object("diffusion_model")
    caught, order, hooks = [], [], []

    def note_order(apply_model, args):
        order.append(args["cond_or_uncond"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            heads = module.heads
            hooks.append(module.to_q.register_forward_hook(lambda m, i, o, n=name, h=heads: caught.append((n, "q", h, o))))
            hooks.append(module.to_k.register_forward_hook(lambda m, i, o, n=name: caught.append((n, "k", None, o))))
    try:
        sample(model, pos, neg, steps=1, seed=seed, options={"model_function_wrapper": note_order})
    finally:
        for h in hooks:
            h.remove()
    maps = {}
    for (name, _, heads, q), (_, _, _, k) in zip(caught[0::2], caught[1::2]):
        d = q.shape[-1] // heads
        qh = q.double().reshape(q.shape[0], q.shape[1], heads, d).permute(0, 2, 1, 3)
        kh = k.double().reshape(k.shape[0], k.shape[1], heads, d).permute(0, 2, 1, 3)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), -1)
        word = probs[..., columns].sum(-1).mean(1)
        lo, hi = word.amin(-1, keepdim=True), word.amax(-1, keepdim=True)
        maps[name] = (word - lo) / (hi - lo)
    assert len(order) == 1, "one batched UNet call expected"
    return maps, order[0]


def test_recorded_maps_equal_an_independent_hook_reference(sd1, pack):
    model, clip, _ = sd1
    pos, neg = conds(clip, PROMPT)
    captured, store = capture(pack, model, clip, words="dog")
    out = sample(captured, pos, neg, steps=1)
    run = store.run_for(out)
    ref, order = reference_maps(model, pos, neg, list(store.positions[0]))
    by_block = {}
    for name, value in ref.items():
        parts = name.split(".")  # input_blocks.1.1.transformer_blocks.0.attn2
        block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
        number = 0 if block == "middle" else int(parts[1])
        by_block[(block, number, int(parts[-2]))] = value
    assert set(by_block) == {l.key for l in store.layers}
    for key, value in by_block.items():
        recorded = torch.cat([run.maps[(0, key, branch)] for branch in order]).flatten(1).float()
        assert (recorded - value.float()).abs().max() < 2e-3, key


def split_calls(args):
    """A sampler_calc_cond_batch_function running cond and uncond as separate UNet calls.

    The others are passed as None so each keeps its index, as when the host splits a batch for memory.
    """
    import comfy.samplers
    conds = args["conds"]
    return [comfy.samplers.calc_cond_batch(args["model"], [c if j == i else None for j in range(len(conds))],
                                           args["input"], args["sigma"], args["model_options"])[i]
            for i, c in enumerate(conds)]


def test_cond_and_uncond_in_one_batch_or_separate_calls_give_the_same_maps(sd1, pack):
    model, clip, _ = sd1
    pos, neg = conds(clip, PROMPT)
    captured, store = capture(pack, model, clip)
    batched = sample(captured, pos, neg)
    split = sample(captured, pos, neg, options={"sampler_calc_cond_batch_function": split_calls})
    torch.testing.assert_close(batched, split, atol=1e-4, rtol=1e-4)
    a, b = store.runs[-2:]
    assert set(a.maps) == set(b.maps)
    for key in a.maps:
        torch.testing.assert_close(a.maps[key].float(), b.maps[key].float(), atol=2e-3, rtol=0)


def test_another_attn2_replace_is_chained(sd1, pack):
    from comfy.ldm.modules.attention import optimized_attention
    model, clip, _ = sd1
    pos, neg = conds(clip, PROMPT)
    calls = []

    def halved(q, k, v, extra):
        calls.append(extra["block"])
        return optimized_attention(q, k, v * 0.5, extra["n_heads"])

    other = model.clone()
    for layer in pack.nodes.host.unet_layers(model):
        if layer.kind == "cross":
            other.set_model_attn2_replace(halved, layer.block, layer.number)     # 2-tuple key, as some packs use
    alone = sample(other, pos, neg)
    calls.clear()
    captured, store = capture(pack, other, clip)
    both = sample(captured, pos, neg)
    assert torch.equal(alone, both) and len(calls) > 0
    assert not torch.equal(alone, sample(model, pos, neg))


def test_runs_are_kept_apart_and_an_interrupted_run_leaves_nothing(sd1, pack):
    import comfy.model_management
    model, clip, _ = sd1
    pos, neg = conds(clip, PROMPT)
    captured, store = capture(pack, model, clip)
    first, second = sample(captured, pos, neg, seed=1), sample(captured, pos, neg, seed=2)
    grid1, mask1 = read(pack, store, first)
    grid2, mask2 = read(pack, store, second)
    assert (grid1 - grid2).abs().max() > 0.05

    def cancel(step, *_):
        if step == 2:
            raise comfy.model_management.InterruptProcessingException()
    kept = list(store.runs)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(captured, pos, neg, seed=3, callback=cancel)
    assert store.runs == kept and store._run is None
    third = sample(captured, pos, neg, seed=3)
    assert store.run_for(third).steps == [0, 1, 2, 3]
    with pytest.raises(LookupError, match="not made by a sampler that used this capture"):
        read(pack, store, torch.zeros_like(third))


@pytest.mark.parametrize("entries", ["full + area", "area only", "negative area"])
def test_an_area_conds_passes_on_a_crop_are_not_filed(sd1, pack, entries):
    """The host runs an area cond's (Conditioning Set Area) pass on a crop of the latent, whose maps are smaller:
    filed beside the whole latent's, they broke the sampler at the end of its run ("stack expects each tensor to
    be equal size"). Only passes over the whole latent are recorded; with no such cond pass, Attention Maps says
    the branch holds nothing. A negative's area, which the host copies into the positive with the negative's
    text, is not taken for another positive prompt (the capture refused the run)."""
    model, clip, _ = sd1
    pos, neg = conds(clip, PROMPT)
    with_area = lambda c: [[c[0][0], {**c[0][1], "area": (8, 8, 0, 0), "strength": 1.0, "set_area_to_bounds": False}]]
    positive = {"full + area": pos + with_area(pos), "area only": with_area(pos), "negative area": pos}[entries]
    negative = with_area(neg) if entries == "negative area" else neg
    captured, store = capture(pack, model, clip)
    out = sample(captured, positive, negative)
    run = store.run_for(out)
    scale = {layer.key: layer.scale for layer in store.layers}
    assert run.maps and all(m.shape[-2:] == (16 // scale[k[1]],) * 2 for k, m in run.maps.items())
    if entries != "area only":
        read(pack, store, out)
        assert {k[2] for k in run.maps} == ({0, 1} if entries == "full + area" else {0})
    else:
        assert {k[2] for k in run.maps} == {1}
        with pytest.raises(ValueError, match="cond"):
            read(pack, store, out)


def test_one_item_of_a_sampled_batch_is_told_apart_from_a_foreign_latent(sd1, pack):
    """LatentFromBatch of a captured batch: the refusal says to wire the whole batch (it said 'not made by a sampler
    that used this capture')."""
    model, clip, _ = sd1
    pos, neg = conds(clip, PROMPT)
    captured, store = capture(pack, model, clip)
    batch = sample(captured, pos, neg, batch=3, seed=4)
    with pytest.raises(LookupError, match="part of a batch .* wire the sampler's whole LATENT"):
        read(pack, store, batch[1:2])


def test_denoise_below_one_records_steps_by_sigma(sd1, pack):
    import comfy.samplers
    model, clip, _ = sd1
    pos, neg = conds(clip, PROMPT)
    captured, store = capture(pack, model, clip, steps="0, 1")
    out = sample(captured, pos, neg, steps=8, denoise=0.5)
    run = store.run_for(out)
    full = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 16)[-9:]
    assert run.steps == [0, 1]
    assert [round(run.sigma(s), 4) for s in run.steps] == [round(float(s), 4) for s in full[:2]]


def test_sdxl_capture_records_every_depth(host, pack):
    import tiny_models
    model, clip, _ = tiny_models.tiny_sdxl()
    captured, store = capture(pack, model, clip, prompt="a corgi", words="corgi")
    pos, neg = conds(clip, "a corgi")
    plain, watched = sample(model, pos, neg, steps=2), sample(captured, pos, neg, steps=2)
    assert torch.equal(plain, watched)
    keys = {k[1] for k in store.run_for(watched).maps}
    assert {k[2] for k in keys} >= {0, 1} and keys == {l.key for l in store.layers}


def test_bad_inputs_give_messages(sd1, pack):
    model, clip, _ = sd1
    with pytest.raises(ValueError, match="'cat' is not a word of the prompt"):
        capture(pack, model, clip, words="cat")
    with pytest.raises(ValueError, match="no cross-attention layer matches the rule '1/16'"):
        capture(pack, model, clip, layers="1/16")
    with pytest.raises(ValueError, match="steps: 'x' is not understood"):
        capture(pack, model, clip, steps="x")


def test_capture_workflow_runs_in_the_host_executor(host):
    import harness
    out = harness.run_workflow(REPO / "workflows" / "attention_capture_txt2img.json", latent_side=128)
    maps_id = "10"                                              # the AttentionMaps node of the shipped graph
    grid, mask = out[maps_id]
    assert grid.shape[0] == 2 and grid.shape[-1] == 3          # one grid per word ('dog', 'beach')
    assert grid.shape[2] == 50 * (64 + 2)                      # a column per step of the 50-step KSampler
    assert mask.shape == (1, 128, 128) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert out.ui[maps_id]["images"], "the node shows its grid as a preview"


def test_a_seed_grid_on_one_capture_re_queued_with_one_threshold_changed(host):
    """One capture feeding five samplers (a seed grid), each read by its own Attention Maps; the graph queued
    again with one Attention Maps' threshold changed: the host re-runs only that node, which must still find
    the first sampler's run (a capture kept 4 runs, so it had been dropped)."""
    import harness
    import ui_to_api
    workflow = json.loads((REPO / "workflows" / "attention_capture_txt2img.json").read_text())
    prompt = harness.shrink_latents(harness.rewrite_loaders(ui_to_api.convert(workflow)), 64)
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    maps = next(k for k, v in prompt.items() if v["class_type"] == "PersonalizeAttentionMaps")
    prompt[sampler]["inputs"]["steps"] = 4
    for i in range(1, 5):
        prompt[f"{sampler}_{i}"] = copy.deepcopy(prompt[sampler])
        prompt[f"{sampler}_{i}"]["inputs"]["seed"] += i
        prompt[f"{maps}_{i}"] = copy.deepcopy(prompt[maps])
        prompt[f"{maps}_{i}"]["inputs"]["latent"] = [f"{sampler}_{i}", 0]
    executor = harness.new_executor()
    # the first sampler alone first, so that its run is the oldest (the host orders a graph's outputs by hash)
    alone = {k: v for k, v in prompt.items() if not k.endswith(tuple(f"_{i}" for i in range(1, 5)))}
    first = harness.run_prompt(alone, executor=executor)
    harness.run_prompt(prompt, executor=executor)                   # the other four samplers: four more runs
    prompt[maps]["inputs"]["mask_threshold"] = 0.3
    again = harness.run_prompt(prompt, executor=executor)
    assert maps in again.executed and not {sampler, f"{sampler}_1"} & set(again.executed), \
        "the changed node (and what reads it) runs again, the samplers come from the cache"
    assert torch.equal(again[maps][0], first[maps][0])          # the same run's maps: the same grid
