"""The combined workflow (PALP → Layout-and-Retouch → Pick-and-Draw) runs in the host's executor on the tiny SD1 model."""
import json
import pathlib

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
SIDE = 64          # pixels: an 8×8 latent
STEPS = 10         # every sampler and inversion (the file keeps 50)


def test_palp_layout_retouch_pick_and_draw_workflow_runs_in_the_host_executor(host):
    import harness
    from PIL import Image
    # the shipped example photo, at the test's size (the layout and the reference must match in size)
    photo = Image.open(REPO / "workflows" / "inputs" / "reference_dog.png").resize((SIDE, SIDE), Image.LANCZOS)
    photo.save(host.input_dir / "reference_dog.png")
    workflow = json.loads((REPO / "workflows" / "palp_layout_retouch_pick_and_draw.json").read_text())
    for node in workflow["nodes"]:      # test-only: a few tiny steps (the file keeps the papers' settings)
        values = node.get("widgets_values")
        if node["type"] == "PALPTrainer":
            values[4], values[7], values[8], values[16] = 3, 1, 4, SIDE   # steps, accumulation, rank, resolution
        if node["type"] in ("StepBlendSampler", "NullTextInvert"):
            values[2] = STEPS
        if node["type"] == "BasicScheduler":
            values[1] = STEPS
    out = harness.run_workflow(workflow, latent_side=SIDE)
    by_title = {n.get("title", n["type"]): str(n["id"]) for n in workflow["nodes"]}
    by_type = {n["type"]: str(n["id"]) for n in workflow["nodes"]}

    # 1 · PALP wrote the LoRA and the token the later prompts call embedding:palp_dog
    assert (host.base_dir / "models" / "loras" / "palp_dog.safetensors").exists()
    assert (host.embeddings_dir / "palp_dog.safetensors").exists()
    # 2 · the layout, then 3 · the retouch: the object word (the PALP token) was found in the prompt,
    # so the adaptive mask ramps the object into [0.5, 1]
    layout = out[by_type["StepBlendSampler"]][0]["samples"]
    retouched, mask = out[by_type["MultiSourceAttnSwap"]]
    assert layout.shape == retouched["samples"].shape == (1, 4, SIDE // 8, SIDE // 8)
    assert torch.isfinite(retouched["samples"]).all()
    assert mask.shape == (1, SIDE, SIDE) and mask.min() >= 0 and 0.5 <= mask.max() <= 1
    # 4 · the photo DDIM-inverted with the PALP model (the palette needs only the pivots, issue 10);
    # 5 · the guided second image
    inversion = out[by_title["Invert the subject photo (DDIM)"]][0]
    assert inversion.mode == "ddim" and torch.isfinite(inversion.trajectory).all()
    second = out[by_type["SamplerCustomAdvanced"]][0]["samples"]
    assert second.shape == (1, 4, SIDE // 8, SIDE // 8) and torch.isfinite(second).all()
    saved = [i for ui in out.ui.values() for i in ui.get("images", []) if i.get("type") == "output"]
    assert sorted(i["filename"].rsplit("_", 2)[0] for i in saved) == ["palp_layout_retouch", "palp_pick_and_draw"], saved
    for image in saved:
        pixels = np.asarray(Image.open(host.output_dir / image["subfolder"] / image["filename"]))
        assert pixels.shape == (SIDE, SIDE, 3) and pixels.std() > 0
