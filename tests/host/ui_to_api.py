"""Convert a UI-format workflow (the frontend's saved ``nodes``/``links`` JSON) into an API-format prompt.

The backend has no such converter: the frontend builds the prompt from its live graph
(``graphToPrompt``). This module reproduces what it sends, from the saved JSON plus the host's
node definitions (``INPUT_TYPES()``, which V1 and V3 nodes both provide):

* ``widgets_values`` is positional over the node's widget inputs, required then optional. Link
  types (MODEL, IMAGE, ...) and ``forceInput`` inputs are sockets, not widgets; a widget
  converted to a socket keeps its slot. The frontend serialises extra widgets it adds itself:
  a ``control_after_generate`` value after an INT widget named ``seed``/``noise_seed`` or whose
  options say ``control_after_generate`` (explicit ``False`` wins over the name), or after a
  FLOAT that says so; a COMBO that says so gets that control plus a filter-list value; and a
  node whose required inputs include a media-upload COMBO (``image_upload``, ``video_upload``,
  ``animated_image_upload``) gets one ``upload`` value after its required widgets (LoadImage's
  ``"image"``).
* Note and MarkdownNote are dropped; Reroute links are followed to their origin; a link from a
  PrimitiveNode becomes the primitive's value.
* Muted nodes (mode 2) are dropped and so are inputs linked to them. A bypassed node (mode 4) is
  dropped and a consumer of its output is wired to what feeds one of its inputs, picked as the
  frontend does (``ExecutableNodeDTO._getBypassSlotIndex``): the input at the output's index if
  its type fits both the output and the consumer, else the first input of exactly the
  consumer's type, else the first that fits both (wildcards, comma unions). Without such an
  input, or when it is unconnected, the consumer's input is dropped.

Group nodes and subgraphs are not supported and raise :class:`UnsupportedWorkflow`.
"""
from __future__ import annotations

import dataclasses

MODE_MUTED = 2
MODE_BYPASSED = 4
DROPPED_TYPES = {"Note", "MarkdownNote"}
REROUTE = "Reroute"
PRIMITIVE = "PrimitiveNode"
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
WILDCARDS = {"*", ""}
MEDIA_UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")


class UnsupportedWorkflow(ValueError):
    """The workflow uses a feature this converter does not reproduce."""


@dataclasses.dataclass(frozen=True)
class _Link:
    origin_id: int
    origin_slot: int


def convert(workflow: dict, node_classes: dict | None = None) -> dict:
    """The API prompt ``{node_id: {"class_type", "inputs"}}`` the frontend would queue for ``workflow``.

    ``node_classes`` maps class names to node classes; default: the loaded host's
    ``nodes.NODE_CLASS_MAPPINGS``.
    """
    if node_classes is None:
        import nodes

        node_classes = nodes.NODE_CLASS_MAPPINGS
    _reject_unsupported(workflow)
    graph = _Graph(workflow)
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in DROPPED_TYPES | {REROUTE, PRIMITIVE} or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        if node["type"] not in node_classes:
            raise UnsupportedWorkflow(f"node {node['id']}: unknown node type {node['type']!r}")
        inputs = _widget_inputs(node, node_classes[node["type"]])
        for socket in node.get("inputs") or []:
            if socket.get("link") is None:
                continue
            source = graph.resolve(socket["link"], socket["type"])
            if source is None:
                inputs.pop(socket["name"], None)
            else:
                inputs[socket["name"]] = source
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def widget_names(node_class) -> list[str | None]:
    """The node's widget slots in ``widgets_values`` order; None marks a frontend-only value (control, filter list, upload)."""
    spec = node_class.INPUT_TYPES()
    slots = []
    for section in ("required", "optional"):
        has_upload = False
        for name, input_spec in (spec.get(section) or {}).items():
            kind = input_spec[0]
            options = (input_spec[1] if len(input_spec) > 1 else None) or {}
            is_combo = isinstance(kind, list) or kind == "COMBO"
            if options.get("forceInput") or not (is_combo or kind in WIDGET_TYPES):
                continue
            slots.append(name)
            slots.extend([None] * _control_slots(name, kind, is_combo, options))
            has_upload = has_upload or (is_combo and any(options.get(o) for o in MEDIA_UPLOAD_OPTIONS))
        if section == "required" and has_upload:
            slots.append(None)
    return slots


def _control_slots(name: str, kind, is_combo: bool, options: dict) -> int:
    control = options.get("control_after_generate")
    if kind == "INT":
        return int(bool(name in SEED_NAMES if control is None else control))
    if kind == "FLOAT":
        return int(bool(control))
    return 2 * int(is_combo and bool(control))


def _widget_inputs(node: dict, node_class) -> dict:
    values = node.get("widgets_values") or []
    names = widget_names(node_class)
    if len(values) != len(names):
        raise UnsupportedWorkflow(
            f"node {node['id']} ({node['type']}): {len(values)} widgets_values {values!r} "
            f"for widget slots {names!r} (None = frontend-only value)"
        )
    return {name: value for name, value in zip(names, values) if name is not None}


def _reject_unsupported(workflow: dict) -> None:
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs") or []}
    group_nodes = set((workflow.get("extra") or {}).get("groupNodes") or {})
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in subgraphs or kind in group_nodes or kind.startswith(("workflow>", "workflow/")):
            raise UnsupportedWorkflow(f"node {node['id']}: group nodes and subgraphs ({kind!r}) are not supported")


class _Graph:
    def __init__(self, workflow: dict):
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        self.links = {}
        for link in workflow.get("links") or []:
            if isinstance(link, dict):
                self.links[link["id"]] = _Link(link["origin_id"], link["origin_slot"])
            else:
                link_id, origin_id, origin_slot = link[:3]
                self.links[link_id] = _Link(origin_id, origin_slot)

    def resolve(self, link_id: int, socket_type: str):
        """What a socket of ``socket_type`` linked by ``link_id`` receives: ``[node_id, slot]``, a primitive's value, or None."""
        link = self.links[link_id]
        while True:
            source = self.nodes[link.origin_id]
            if source["type"] == PRIMITIVE:
                return source["widgets_values"][0]
            if source["type"] == REROUTE:
                upstream = source["inputs"][0].get("link")
            elif source.get("mode", 0) == MODE_BYPASSED:
                upstream = self._bypass_input(source, link.origin_slot, socket_type)
            elif source.get("mode", 0) == MODE_MUTED:
                return None
            else:
                return [str(source["id"]), link.origin_slot]
            if upstream is None:
                return None
            link = self.links[upstream]

    @staticmethod
    def _bypass_input(node: dict, output_slot: int, socket_type: str):
        """The link into the bypassed ``node`` that stands in for its output ``output_slot``, as the frontend picks it."""
        inputs = node.get("inputs") or []
        if not inputs:
            return None
        if socket_type in WILDCARDS:
            return inputs[output_slot if output_slot < len(inputs) else 0].get("link")
        output_type = node["outputs"][output_slot]["type"]
        fits = [_connects(i["type"], output_type) and _connects(i["type"], socket_type) for i in inputs]
        if output_slot < len(inputs) and fits[output_slot]:
            return inputs[output_slot].get("link")
        exact = [i["type"] == socket_type for i in inputs]
        for candidates in (exact, fits):
            if any(candidates):
                return inputs[candidates.index(True)].get("link")
        return None


def _connects(a: str, b: str) -> bool:
    """LiteGraph's ``isValidConnection``: equal, a wildcard, or overlapping comma-separated unions (case-insensitive)."""
    if a in WILDCARDS or b in WILDCARDS:
        return True
    return bool(set(a.lower().split(",")) & set(b.lower().split(",")))
