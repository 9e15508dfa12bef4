"""Test-only custom-node pack: a loader that stands in for the stock model loaders with tiny models.

``harness.rewrite_loaders`` replaces CheckpointLoaderSimple (and the UNET/CLIP/VAE loaders) by
``TinyCheckpointLoader`` so shipped workflows that name real checkpoint files run on CPU in
seconds. ``tiny_models`` is imported by its top-level name (``harness.load_host`` puts
``tests/host`` on ``sys.path``), so the tests and this pack share one model cache.
"""
from comfy_api.latest import ComfyExtension, io

import tiny_models

BUILDERS = {"sd1": tiny_models.tiny_sd1, "sdxl": tiny_models.tiny_sdxl}


class TinyCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TinyCheckpointLoader",
            display_name="Tiny Checkpoint Loader (tests)",
            category="testing",
            inputs=[io.Combo.Input("kind", options=list(BUILDERS))],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, kind):
        model, clip, vae = BUILDERS[kind]()
        # the builds are shared: clones keep one prompt's patches out of the next prompt's model
        return io.NodeOutput(model.clone(), clip.clone(), vae)


class TinyExtension(ComfyExtension):
    async def get_node_list(self):
        return [TinyCheckpointLoader]


async def comfy_entrypoint():
    return TinyExtension()
