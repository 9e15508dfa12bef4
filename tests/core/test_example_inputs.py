"""The example input images: every image a shipped workflow loads is shipped, and the shipped files are what the script draws."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

WORKFLOWS = pathlib.Path(__file__).resolve().parents[2] / "workflows"
INPUTS = WORKFLOWS / "inputs"


def make_inputs():
    spec = importlib.util.spec_from_file_location("make_inputs", INPUTS / "make_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loaded_images(path):
    return {n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "LoadImage"}


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
