"""The only part of the pack that talks to the host: thin V3 nodes over ``attention/`` and ``guidance/``."""
from comfy_api.latest import ComfyExtension

from .capture import NODES as CAPTURE_NODES
from .inversion import NODES as INVERSION_NODES
from .lnr import NODES as LNR_NODES
from .masks import NODES as MASK_NODES
from .palp import NODES as PALP_NODES
from .pnd import NODES as PND_NODES


class PersonalizeExtension(ComfyExtension):
    async def get_node_list(self):
        return [*CAPTURE_NODES, *PND_NODES, *INVERSION_NODES, *LNR_NODES, *MASK_NODES, *PALP_NODES]
