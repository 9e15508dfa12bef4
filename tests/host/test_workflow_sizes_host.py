"""Every node of every shipped workflow is saved at least as tall as the web frontend draws it.

The frontend (ComfyUI frontend 1.27, LiteGraph's ``LGraphNode.computeSize``) enlarges a node whose
saved height is below what its slots and widgets need, and then it may cover its neighbours, which
``tests/core/test_workflow_geometry.py`` cannot see from the file alone. The needed height follows
from the host's node definitions: one 20 px row per socket (inputs that are not widgets) or output,
whichever are more (at least one row), 6 px, then each widget's height + 4 px and 8 px after the
last — 20 px per widget (control-after-generate and upload buttons are widgets too), 50 px for a
multiline text box (the DOM textarea's minimum). Measured in Chromium on frontend 1.27.10 for every
node type the workflows use, this equals ``node.computeSize()[1]``.
"""
import json
import pathlib

import pytest

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT, WIDGET_GAP, BODY_TOP, BODY_BOTTOM = 20, 20, 50, 4, 6, 8
NOTES = {"Note", "MarkdownNote"}


def needed_height(sockets: int, outputs: int, widgets: list[bool]) -> int:
    """The frontend's minimum body height; ``widgets`` says per widget whether it is a multiline text box."""
    height = max(sockets, outputs, 1) * SLOT_HEIGHT + BODY_TOP
    if widgets:
        height += sum((MULTILINE_HEIGHT if multiline else WIDGET_HEIGHT) + WIDGET_GAP for multiline in widgets) + BODY_BOTTOM
    return height


def input_specs(node_class) -> dict:
    spec = node_class.INPUT_TYPES()
    return {name: s for section in ("required", "optional") for name, s in (spec.get(section) or {}).items()}


def is_multiline(input_spec) -> bool:
    return input_spec[0] == "STRING" and bool((input_spec[1] if len(input_spec) > 1 else {}).get("multiline"))


def node_needs(node: dict, workflow: dict, node_classes: dict) -> int:
    import ui_to_api

    if node["type"] in NOTES:
        return needed_height(0, 0, [True])
    if node["type"] == "Reroute":           # a frontend-only dot: one input, one output, no widgets
        return needed_height(1, 1, [])
    if node["type"] == "PrimitiveNode":
        # its widget is a copy of the input it feeds (plus a control after a number)
        link = next(link for link in workflow["links"] if link[1] == node["id"])
        target = next(n for n in workflow["nodes"] if n["id"] == link[3])
        target_input = next(i for i in target["inputs"] if i.get("link") == link[0])
        spec = input_specs(node_classes[target["type"]])[target_input.get("widget", {}).get("name", target_input["name"])]
        widgets = [is_multiline(spec)] + [False] * (spec[0] in ("INT", "FLOAT"))
        return needed_height(0, 1, widgets)
    node_class = node_classes[node["type"]]
    specs = input_specs(node_class)
    names = ui_to_api.widget_names(node_class)
    widgets = [name is not None and is_multiline(specs[name]) for name in names]
    sockets = len(specs) - len({name for name in names if name is not None})
    return needed_height(sockets, len(node_class.RETURN_TYPES), widgets)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_saved_heights_hold_every_slot_and_widget(host, path):
    workflow = json.loads(path.read_text())
    short = []
    for node in workflow["nodes"]:
        needed = node_needs(node, workflow, host.nodes.NODE_CLASS_MAPPINGS)
        if node["size"][1] < needed:
            short.append(f"node {node['id']} {node['type']}: saved {node['size'][1]} px, the frontend draws {needed} px")
    assert not short, "the frontend would enlarge these nodes over their neighbours:\n" + "\n".join(short)


def test_needed_height_matches_the_frontend_measurements(host):
    """``node.computeSize()[1]`` as Chromium measured it on frontend 1.27.10 (independent numbers)."""
    classes = host.nodes.NODE_CLASS_MAPPINGS
    measured = {"KSampler": 262, "VAEDecode": 46, "SaveImage": 58, "LoadImage": 102, "CLIPTextEncode": 88,
                "EmptyLatentImage": 106, "CheckpointLoaderSimple": 98, "SamplerCustomAdvanced": 106}
    for name, height in measured.items():
        assert node_needs({"type": name}, {}, classes) == height, name
    assert needed_height(0, 0, [True]) == 88                  # a Note
