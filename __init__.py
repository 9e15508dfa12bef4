"""Pick-and-Draw, Layout-and-Retouch and PALP as ComfyUI nodes.

The host imports this folder as a package under whatever name it was cloned into, so every
import inside is relative, and nothing here imports the host until the entry point runs: the
core (``attention/``, ``guidance/``) must stay importable where ComfyUI is absent.
"""


async def comfy_entrypoint():
    from .nodes import PersonalizeExtension

    return PersonalizeExtension()
