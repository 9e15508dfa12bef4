import pytest
import torch.nn as nn

from comfyui_personalize.attention.layers import UnsupportedModelError, enumerate_layers, select_layers

from fake_unet import fake_unet

# host notes §1.6: SD1.5 block -> latent downsample factor
SD15 = {("input", 1): 1, ("input", 2): 1, ("input", 4): 2, ("input", 5): 2, ("input", 7): 4, ("input", 8): 4,
        ("middle", 0): 8, ("output", 3): 4, ("output", 4): 4, ("output", 5): 4, ("output", 6): 2,
        ("output", 7): 2, ("output", 8): 2, ("output", 9): 1, ("output", 10): 1, ("output", 11): 1}


def test_sd15_structure_matches_the_reference_table():
    layers = enumerate_layers(fake_unet())
    cross = [l for l in layers if l.kind == "cross"]
    assert len(cross) == 16 and len(layers) == 32
    assert {(l.block, l.number): l.scale for l in cross} == SD15
    assert [l.ordinal for l in cross] == list(range(16))
    assert all(l.index == 0 for l in cross)


def test_sdxl_structure_has_70_blocks_with_depth_indices():
    layers = enumerate_layers(fake_unet((320, 640, 1280), (0, 2, 10), 10))
    cross = [l for l in layers if l.kind == "cross"]
    assert len(cross) == 70
    scales = {}
    for l in cross:
        scales.setdefault((l.block, l.number), set()).add(l.scale)
    assert scales == {("input", 4): {2}, ("input", 5): {2}, ("input", 7): {4}, ("input", 8): {4}, ("middle", 0): {4},
                      ("output", 0): {4}, ("output", 1): {4}, ("output", 2): {4},
                      ("output", 3): {2}, ("output", 4): {2}, ("output", 5): {2}}
    assert max(l.index for l in cross if l.block == "input" and l.number == 7) == 9


@pytest.mark.parametrize("rule, expected", [
    ("decoder cross 1/2", {("output", 6), ("output", 7), ("output", 8)}),   # P&D's 32×32 at 512²
    ("#10-15", {("output", n) for n in range(6, 12)}),                       # MasaCtrl layers 10–15
    ("output.6-11", {("output", n) for n in range(6, 12)}),
    ("middle; input.4", {("middle", 0), ("input", 4)}),
    ("all", set(SD15)),
])
def test_rules_select_the_expected_blocks(rule, expected):
    chosen = select_layers(enumerate_layers(fake_unet()), rule, kind="cross")
    assert {(l.block, l.number) for l in chosen} == expected


def test_depth_range_in_block_rule():
    chosen = select_layers(enumerate_layers(fake_unet((320, 640, 1280), (0, 2, 10), 10)), "input.7.2-4", kind="self")
    assert [(l.number, l.index) for l in chosen] == [(7, 2), (7, 3), (7, 4)]


def test_bad_rule_and_empty_match_explain_themselves():
    layers = enumerate_layers(fake_unet())
    with pytest.raises(ValueError, match="'sideways' is not understood.*decoder cross 1/2"):
        select_layers(layers, "sideways")
    with pytest.raises(ValueError, match="no cross-attention layer matches.*output.6 1/2"):
        select_layers(layers, "1/16", kind="cross")


def test_dit_is_refused_with_a_message_naming_what_is_supported():
    class DiT(nn.Module):
        pass
    with pytest.raises(UnsupportedModelError, match="SD1.x, SD2.x and SDXL"):
        enumerate_layers(DiT())
