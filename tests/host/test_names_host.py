"""Node ids and custom type names live in one namespace with every other pack (Impact Pack has its own
``SAMLoader``/``SAM_MODEL``; the host keeps whichever registers last), so every name this pack adds
carries its prefix — except the design card's seven node ids."""
import json
import pathlib

CARD = {"NullTextInvert", "AttentionCapture", "UREMDGuidance", "LayoutGuidance", "StepBlendSampler",
        "MultiSourceAttnSwap", "PALPTrainer"}
NODE_PREFIX, TYPE_PREFIX = "Personalize", "PERSONALIZE_"
WORKFLOWS = pathlib.Path(__file__).resolve().parents[2] / "workflows"


def _pack_nodes(host):
    return {nid: cls for nid, cls in host.nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", "").endswith(host.pack_path.name)}


def _io_types(schema):
    for slot in [*schema.inputs, *schema.outputs]:
        yield slot.io_type if isinstance(slot.io_type, str) else slot.get_io_type()


def test_every_node_id_outside_the_card_carries_the_prefix(host):
    nodes = _pack_nodes(host)
    assert CARD <= set(nodes), f"card nodes missing: {CARD - set(nodes)}"
    bad = [n for n in nodes if n not in CARD and not n.startswith(NODE_PREFIX)]
    assert not bad, f"node ids without the '{NODE_PREFIX}' prefix: {bad}"


def test_every_custom_type_carries_the_prefix(host):
    from comfy_api.latest import io  # importable once the host is loaded

    host_types = {t.io_type for t in vars(io).values() if isinstance(t, type) and hasattr(t, "io_type")}
    custom = {t for cls in _pack_nodes(host).values() for t in _io_types(cls.GET_SCHEMA()) if t not in host_types}
    assert custom, "the pack declares custom types; none were found"
    bad = sorted(t for t in custom if not t.startswith(TYPE_PREFIX))
    assert not bad, f"custom types without the '{TYPE_PREFIX}' prefix: {bad}"


def test_workflows_use_only_registered_pack_names(host):
    nodes = _pack_nodes(host)
    for path in sorted(WORKFLOWS.glob("*.json")):
        graph = json.loads(path.read_text())
        for node in graph["nodes"]:
            kind = node["type"]
            if kind in nodes or kind in ("Note", "MarkdownNote", "PrimitiveNode", "Reroute"):
                continue
            assert kind in host.nodes.NODE_CLASS_MAPPINGS, f"{path.name}: node type {kind} is not registered"
