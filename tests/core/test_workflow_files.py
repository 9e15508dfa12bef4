"""Every file a shipped workflow needs is named in the README's "Models and inputs"; every image it loads is shipped, as the script draws it."""
import importlib.util
import json
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
INPUTS = WORKFLOWS / "inputs"


def make_inputs():
    spec = importlib.util.spec_from_file_location("make_inputs", INPUTS / "make_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loaded_images(path):
    return {n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "LoadImage"}


def files_named(path):
    """Model and image files in the workflow's widgets, and the embeddings its prompts call (notes aside)."""
    names = set()
    for node in json.loads(path.read_text())["nodes"]:
        for value in node.get("widgets_values") if node["type"] != "Note" else []:
            if isinstance(value, str):
                names |= set(re.findall(r"[\w.-]+\.(?:safetensors|ckpt|pth|pt|png|jpg)\b", value))
                names |= set(re.findall(r"embedding:(\w+)", value))
    return names


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_the_readme_names_every_file_a_workflow_needs(path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Models and inputs", 1)[1].split("\n## ", 1)[0]
    assert path.name in section, "the workflow has a row in the table"
    assert files_named(path), "the workflow names its files"
    missing = sorted(name for name in files_named(path) if name not in section)
    assert not missing, f"not in the README's 'Models and inputs': {missing}"


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")), ids=lambda p: p.stem)
def test_every_image_a_workflow_loads_is_shipped(path):
    assert loaded_images(path) <= {p.name for p in INPUTS.glob("*.png")}


@pytest.mark.parametrize("name", ["reference_dog.png", "subject.png", "art.png"])
def test_shipped_images_are_the_scripts_drawings(name):
    module = make_inputs()
    shipped = module.decode_png((INPUTS / name).read_bytes())
    drawn = module.IMAGES[name]()
    assert shipped.shape == drawn.shape == (512, 512, 3)
    # a float ulp on another platform may flip a rounding: at most 1 level anywhere
    assert np.abs(shipped.astype(int) - drawn.astype(int)).max() <= 1
    assert shipped.std() > 20, "an image, not a flat colour"


def test_png_round_trip():
    module = make_inputs()
    pixels = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    assert np.array_equal(module.decode_png(module.encode_png(pixels)), pixels)
