"""SAMLoader, SAMSegment and AdaptiveMask (Layout-and-Retouch §3.2) in the real host, on a tiny random SAM.

The SAM is built in-process from segment-anything's own classes (64-pixel input, 2 encoder blocks of
width 32, a 1-layer decoder) and saved into the host's models/sams, so the loader's shape detection,
its strict load and the segment node all run on it; Meta's three sizes are detected from state dicts
of their real names and shapes on the meta device (no download).
"""
import asyncio
import functools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

TINY = "tiny_sam.pth"
HEIGHT, WIDTH = 48, 40          # not square: SAM resizes the longest side and pads


@pytest.fixture(scope="module")
def sam_mod(pack):
    return pack("nodes.sam")


@pytest.fixture(scope="module")
def masks_mod(pack):
    return pack("nodes.masks")


@pytest.fixture(scope="module")
def core(pack):
    return pack("guidance.masks")


def tiny_sam():
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                                      out_chans=32, qkv_bias=True,
                                      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      window_size=4, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(64, 64),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(transformer_dim=32,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=8),
                                 num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    # zero-initialised relative positions would hide a wrong window/global split: make them count
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    return sam


@pytest.fixture(scope="module")
def sams_dir(host):
    import folder_paths

    path = os.path.join(folder_paths.models_dir, "sams")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def reference(sams_dir):
    """The tiny SAM, saved into models/sams."""
    sam = tiny_sam()
    torch.save(sam.state_dict(), os.path.join(sams_dir, TINY))
    return sam


@pytest.fixture(scope="module")
def loaded(sam_mod, reference):
    return sam_mod.SAMLoader.execute(TINY, "auto").args[0]


def images(n=1, seed=0):
    """Smooth random RGB images [n, HEIGHT, WIDTH, 3] in [0, 1]."""
    low = torch.rand(n, 3, 6, 5, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False).movedim(1, -1)


def segment(sam_mod, sam, image, mode, points="0.5, 0.5", box="0.1, 0.1, 0.9, 0.9", guide=None, per_side=4):
    return sam_mod.SAMSegment.execute(sam, image, mode, points, box, per_side, 0.0, 0.0, guide=guide).args[0]


def as_uint8(image):
    return (image[0] * 255).round().to(torch.uint8).numpy()


# --- loader ------------------------------------------------------------------------------------


def test_folder_is_registered_and_an_existing_entry_is_not_clobbered(sam_mod, host):
    import folder_paths

    paths, extensions = folder_paths.folder_names_and_paths["sams"]
    assert os.path.join(folder_paths.models_dir, "sams") in paths
    assert folder_paths.supported_pt_extensions <= extensions
    original = folder_paths.folder_names_and_paths["sams"]
    theirs = (["/elsewhere/sams"], {".pth"})
    folder_paths.folder_names_and_paths["sams"] = theirs
    try:
        sam_mod.register_folder()
        assert folder_paths.folder_names_and_paths["sams"] is theirs
        assert theirs == (["/elsewhere/sams"], {".pth"})
    finally:
        folder_paths.folder_names_and_paths["sams"] = original


def test_an_empty_folder_says_where_to_put_which_checkpoint(sam_mod, host, tmp_path, monkeypatch):
    import execution
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sams", ([str(tmp_path)], folder_paths.supported_pt_extensions))
    message = sam_mod.SAMLoader.validate_inputs("sam_vit_b_01ec64.pth")
    assert str(tmp_path) in message and "sam_vit_b_01ec64.pth" in message and "sam_vit_h_4b8939.pth" in message
    with pytest.raises(ValueError, match="no SAM checkpoint found: put"):
        sam_mod.SAMLoader.execute("sam_vit_b_01ec64.pth", "auto")
    # in the host the message replaces the bare "value not in list" of an empty combo
    prompt = {"1": {"class_type": "PersonalizeSAMLoader", "inputs": {"sam_name": "sam_vit_b_01ec64.pth", "device": "auto"}},
              "2": {"class_type": "PersonalizeSAMSegment", "inputs": {"sam": ["1", 0], "image": ["3", 0], "mode": "point",
                                                           "points": "0.5, 0.5", "box": "0, 0, 1, 1",
                                                           "points_per_side": 4, "pred_iou_thresh": 0.0,
                                                           "stability_score_thresh": 0.0}},
              "3": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}}
    _, _, _, node_errors = asyncio.run(execution.validate_prompt("empty", prompt, None))
    assert "no SAM checkpoint found: put" in str(node_errors)


@pytest.mark.parametrize("build, variant, heads, window", [
    ("build_sam_vit_b", "vit_b", 12, 14), ("build_sam_vit_l", "vit_l", 16, 14), ("build_sam_vit_h", "vit_h", 16, 14)])
def test_meta_releases_are_told_apart_by_shapes(sam_mod, host, build, variant, heads, window):
    import segment_anything

    with torch.device("meta"):
        state_dict = getattr(segment_anything, build)().state_dict()
    config = sam_mod.sam_config(state_dict)
    assert (config.variant, config.num_heads, config.window_size, config.img_size) == (variant, heads, window, 1024)
    assert (config.prompt_dim, config.decoder_depth, config.decoder_mlp_dim) == (256, 2, 2048)


def test_the_tiny_sam_is_rebuilt_from_its_shapes(loaded, reference):
    assert loaded.variant == "custom"
    c = loaded.config
    assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads, c.window_size, c.global_attn_indexes) == (
        64, 8, 32, 2, 2, 4, (1,))
    ours, theirs = loaded.sam.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert next(loaded.sam.parameters()).device.type == "cpu" and loaded.device.type == "cpu"   # host runs --cpu


@pytest.mark.parametrize("extra, gone, what", [
    ({"mask_decoder.hf_token.weight": torch.zeros(1, 32)}, None, "SAM-HQ"),
    ({"mask_decoder.compress_vit_feat.0.weight": torch.zeros(1)}, None, "SAM-HQ"),
    ({"image_encoder.layers.0.blocks.0.attn.qkv.weight": torch.zeros(1)}, "image_encoder.blocks.", "MobileSAM"),
    ({"image_encoder.trunk.blocks.0.attn.qkv.weight": torch.zeros(1)}, "image_encoder.", "SAM 2"),
    ({}, "prompt_encoder.", "not a Segment Anything checkpoint"),
])
def test_foreign_checkpoints_are_refused_with_a_message(sam_mod, reference, sams_dir, extra, gone, what):
    state_dict = {k: v for k, v in reference.state_dict().items() if not (gone and k.startswith(gone))}
    name = "foreign.pth"
    torch.save({**state_dict, **extra}, os.path.join(sams_dir, name))
    with pytest.raises(ValueError, match=what) as error:
        sam_mod.SAMLoader.execute(name, "cpu")
    assert "sam_vit_b_01ec64.pth" in str(error.value)


def test_corrupt_file_and_missing_gpu_are_refused(sam_mod, sams_dir, reference):
    with open(os.path.join(sams_dir, "corrupt.pth"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read SAM checkpoint .*corrupt.pth.*download it again"):
        sam_mod.SAMLoader.execute("corrupt.pth", "cpu")
    with pytest.raises(ValueError, match="no GPU"):
        sam_mod.SAMLoader.execute(TINY, "gpu")
    assert "not in" in sam_mod.SAMLoader.validate_inputs("missing.pth")


# --- segment -----------------------------------------------------------------------------------


def test_point_and_box_equal_sams_own_predictor(sam_mod, loaded, reference):
    from segment_anything import SamPredictor

    image = images()
    predictor = SamPredictor(reference)
    predictor.set_image(as_uint8(image))
    masks, scores, _ = predictor.predict(point_coords=np.array([[0.3 * WIDTH, 0.6 * HEIGHT]]),
                                         point_labels=np.ones(1), multimask_output=True)
    boxed, _, _ = predictor.predict(box=np.array([0.1 * WIDTH, 0.2 * HEIGHT, 0.8 * WIDTH, 0.9 * HEIGHT]),
                                    multimask_output=False)
    point = segment(sam_mod, loaded, image, "point", points="0.3, 0.6")
    box = segment(sam_mod, loaded, image, "box", box="0.1, 0.2, 0.8, 0.9")
    print(f"\npoint mask covers {point.mean():.3f} of the image, box mask {box.mean():.3f}")
    assert point.shape == box.shape == (1, HEIGHT, WIDTH)
    assert torch.equal(point[0], torch.from_numpy(masks[scores.argmax()]).float())
    assert torch.equal(box[0], torch.from_numpy(boxed[0]).float())
    assert 0 < box.mean() < 1 and not torch.equal(point, box)


def test_automatic_equals_sams_generator(sam_mod, loaded, reference):
    from segment_anything import SamAutomaticMaskGenerator

    image = images()
    records = SamAutomaticMaskGenerator(reference, points_per_side=4, pred_iou_thresh=0.0,
                                        stability_score_thresh=0.0).generate(as_uint8(image))
    best = max(records, key=lambda r: r["predicted_iou"])
    print(f"\n{len(records)} automatic mask(s) after SAM's box NMS on the random SAM")
    assert torch.equal(segment(sam_mod, loaded, image, "automatic")[0], torch.from_numpy(best["segmentation"]).float())


def test_automatic_keeps_the_most_confident_or_the_best_guided_mask(sam_mod, loaded, monkeypatch):
    # the random SAM's speckled masks all span the frame, so SAM's box NMS leaves one: the choice
    # between several masks is tested on records of known shapes
    import segment_anything

    regions = [(slice(0, 48), slice(0, 40)), (slice(5, 20), slice(5, 15)), (slice(20, 44), slice(10, 36))]
    segmentations = []
    for rows, cols in regions:
        m = np.zeros((HEIGHT, WIDTH), dtype=bool)
        m[rows, cols] = True
        segmentations.append(m)
    records = [{"segmentation": m, "predicted_iou": iou, "stability_score": 0.9, "area": int(m.sum())}
               for m, iou in zip(segmentations, (0.90, 0.97, 0.95))]
    monkeypatch.setattr(segment_anything.SamAutomaticMaskGenerator, "generate", lambda self, image: records)
    target = torch.from_numpy(segmentations[2]).float()
    coarse = F.interpolate(target[None, None] * 0.8, size=(12, 10), mode="area")[0]   # soft, at another size
    unguided = segment(sam_mod, loaded, images(), "automatic")
    guided = segment(sam_mod, loaded, images(), "automatic", guide=coarse)
    assert torch.equal(unguided[0], torch.from_numpy(segmentations[1]).float())
    assert torch.equal(guided[0], target)
    monkeypatch.setattr(segment_anything.SamAutomaticMaskGenerator, "generate", lambda self, image: [])
    with pytest.raises(ValueError, match="found no mask passing the quality thresholds"):
        segment(sam_mod, loaded, images(), "automatic")


@pytest.mark.parametrize("mode", ["automatic", "point", "box"])
def test_batches_give_binary_deterministic_masks_at_image_size(sam_mod, loaded, mode):
    batch = images(2, seed=1)
    out = segment(sam_mod, loaded, batch, mode)
    assert out.shape == (2, HEIGHT, WIDTH) and out.dtype == torch.float32
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out, segment(sam_mod, loaded, batch, mode))
    assert torch.equal(out[1:], segment(sam_mod, loaded, batch[1:], mode))


def test_bad_prompts_are_refused(sam_mod, loaded):
    for points in ("0.5", "1.5, 0.5", "a, b", ""):
        with pytest.raises(ValueError, match="points must be 2 comma-separated fractions"):
            segment(sam_mod, loaded, images(), "point", points=points)
    with pytest.raises(ValueError, match="box must be 4"):
        segment(sam_mod, loaded, images(), "box", box="0, 0, 1")
    with pytest.raises(ValueError, match="box takes one box"):
        segment(sam_mod, loaded, images(), "box", box="0, 0, 1, 1; 0, 0, 0.5, 0.5")
    with pytest.raises(ValueError, match="guide has 3 masks for 2 images"):
        segment(sam_mod, loaded, images(2), "automatic", guide=torch.ones(3, 8, 8))


def test_a_nan_image_is_refused_and_an_empty_mask_is_reported(sam_mod, loaded, monkeypatch, caplog):
    import logging
    bad = images(2).clone()
    bad[1, 4, 4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"the IMAGE holds 1 NaN/Inf value \(of 11520\): fix the node that made it"):
        segment(sam_mod, loaded, bad, "point")
    # SAM finding nothing at the prompt (an all-False mask from its predictor)
    monkeypatch.setattr(sam_mod, "_prompted", lambda predictor, image, *a: np.zeros(image.shape[:2], dtype=bool))
    with caplog.at_level(logging.WARNING):
        out = segment(sam_mod, loaded, images(2), "box")
    assert not out.any()
    assert "SAM Segment: SAM found no object in image(s) [0, 1] of the batch (empty mask); move the box" in caplog.text


# --- adaptive mask ------------------------------------------------------------------------------


def synthetic_masks():
    """A soft 16×16 cross-attention map (object blob plus a noise speck) and a 64×64 SAM disc, batch 2."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((yy - 7) ** 2 + (xx - 6) ** 2) / 8)
    blob[1, 14] = 0.9                                           # one-cell island: C must remove it
    cross = torch.stack([blob, blob.flip(-1)])
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    sam = torch.stack([((y - 30) ** 2 + (x - 26) ** 2 < 15 ** 2).float(), ((y - 30) ** 2 + (x - 38) ** 2 < 12 ** 2).float()])
    return cross, sam


@pytest.mark.parametrize("combine, clean_union", [("or", True), ("refine", True), ("or", False)])
def test_adaptive_mask_node_equals_the_core_function(masks_mod, core, combine, clean_union):
    cross, sam = synthetic_masks()
    out = masks_mod.AdaptiveMask.execute(cross, combine, 0.3, 0.01, clean_union, sam_mask=sam).args[0]
    expected = core.adaptive_mask(core.attention_mask(cross, 0.3), sam, combine=combine, min_component=0.01,
                                  clean_union=clean_union)
    assert out.shape == (2, 64, 64)                             # the SAM mask's size wins
    assert torch.equal(out, expected)
    assert out.min() >= 0 and out.max() <= 1 and (out[sam > 0] >= 0.5).all()
    island = out[0, 4:8, 56:60]                                 # cell (1, 14) of the 16x16 map, outside the disc
    assert island.max() == 0 if clean_union or combine == "refine" else island.max() >= 0.5


def test_adaptive_mask_reconciles_batches_and_works_without_sam(masks_mod, core):
    adaptive_mask, attention_mask = core.adaptive_mask, core.attention_mask
    cross, sam = synthetic_masks()
    one = masks_mod.AdaptiveMask.execute(cross[:1], "or", 0.3, 0.01, True, sam_mask=sam).args[0]
    assert torch.equal(one, adaptive_mask(attention_mask(cross[:1], 0.3).expand(2, -1, -1), sam))
    alone = masks_mod.AdaptiveMask.execute(cross, "or", 0.3, 0.01, True).args[0]
    assert alone.shape == (2, 16, 16) and torch.equal(alone, adaptive_mask(attention_mask(cross, 0.3)))
    with pytest.raises(ValueError, match="cross_mask has 2 masks and sam_mask 3"):
        masks_mod.AdaptiveMask.execute(cross, "or", 0.3, 0.01, True, sam_mask=torch.zeros(3, 64, 64))


def test_adaptive_mask_refuses_masks_of_another_aspect_ratio(masks_mod):
    """A 48×64 SAM mask with a 32×32 M^c was stretched to one frame without a word (Multi-Source Attention Swap
    refuses the same pair); one framing at two sizes is the usual case and still runs."""
    cross = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"'sam_mask' is 48×64 but 'cross_mask' is 32×32, another aspect ratio.*"
                                         r"give two masks of the layout image"):
        masks_mod.AdaptiveMask.execute(cross, "or", 0.1, 0.01, True, sam_mask=torch.ones(1, 64, 48))
    assert masks_mod.AdaptiveMask.execute(cross, "or", 0.1, 0.01, True, sam_mask=torch.ones(1, 64, 64)).args[0].shape \
        == (1, 64, 64)


def test_the_three_nodes_run_in_the_host_executor(host, reference):
    import harness

    prompt = {
        "1": {"class_type": "PersonalizeSAMLoader", "inputs": {"sam_name": TINY, "device": "auto"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 48, "batch_size": 2, "color": 0x336699}},
        "3": {"class_type": "PersonalizeSAMSegment", "inputs": {"sam": ["1", 0], "image": ["2", 0], "mode": "box",
                                                     "points": "0.5, 0.5", "box": "0.1, 0.1, 0.9, 0.9",
                                                     "points_per_side": 4, "pred_iou_thresh": 0.0,
                                                     "stability_score_thresh": 0.0}},
        "4": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 10, "height": 12}},
        "5": {"class_type": "PersonalizeAdaptiveMask", "inputs": {"cross_mask": ["4", 0], "sam_mask": ["3", 0], "combine": "or",
                                                       "threshold": 0.1, "min_component": 0.01, "clean_union": True}},
    }
    outputs = harness.run_prompt(prompt)
    assert outputs["3"][0].shape == (2, 48, 40)
    assert outputs["5"][0].shape == (2, 48, 40) and (outputs["5"][0] == 1).all()   # M^c covers everything
    assert outputs.ui["3"]["images"] and outputs.ui["5"]["images"]
