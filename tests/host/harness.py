"""Run the real ComfyUI host in-process on CPU and execute prompts and UI workflows through it.

The host is a set of module-level singletons (``folder_paths``, ``nodes.NODE_CLASS_MAPPINGS``,
``comfy.model_management``), so it is loaded at most once per process: :func:`load_host` is
idempotent and returns the first :class:`Host`. Nothing here imports the host at import time,
so this module stays importable where ComfyUI is absent.

A shipped workflow runs through :func:`run_workflow` when it is saved in UI format without
group nodes or subgraphs, loads models only through the loaders in ``LOADER_REWRITES`` with
literal file names (one that mentions "xl" gets the tiny SDXL, any other the tiny SD1; LoRA and
ControlNet files are not stood in for), reads images only via LoadImage from files a test puts
in ``Host.input_dir``, and has at least one output node.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import pathlib
import sys
import uuid

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
TINYPACK_DIR = HERE / "tinypack"
PACK_FOLDER_NAME = "comfyui-personalize-under-test"
TINY_LOADER = "TinyCheckpointLoader"

# Which output of TinyCheckpointLoader (MODEL, CLIP, VAE) stands in for each output of a stock
# loader; the model family comes from the loader's literal inputs (see infer_kind).
LOADER_REWRITES = {
    "CheckpointLoaderSimple": (0, 1, 2),
    "CheckpointLoader": (0, 1, 2),
    "UNETLoader": (0,),
    "CLIPLoader": (1,),
    "DualCLIPLoader": (1,),
    "VAELoader": (2,),
}

_HOST: Host | None = None


@dataclasses.dataclass(frozen=True)
class Host:
    """The loaded host: where it lives, where it writes, and whether the packs imported."""

    root: pathlib.Path
    base_dir: pathlib.Path
    input_dir: pathlib.Path
    output_dir: pathlib.Path
    temp_dir: pathlib.Path
    user_dir: pathlib.Path
    embeddings_dir: pathlib.Path
    custom_nodes_dir: pathlib.Path
    pack_path: pathlib.Path
    pack_loaded: bool
    pack_log: str
    tinypack_loaded: bool
    tinypack_log: str

    @property
    def nodes(self):
        """The host's ``nodes`` module (``NODE_CLASS_MAPPINGS`` lives there)."""
        import nodes

        return nodes


DEVICE_VARIABLE = "PERSONALIZE_HOST_DEVICE"


def load_host(base_dir, comfyui_path=None, device=None) -> Host:
    """Import the host from ``comfyui_path`` (default ``$COMFYUI_PATH``) once per process, on the CPU (the
    host's ``--cpu``) unless ``device`` (default ``$PERSONALIZE_HOST_DEVICE``) is ``cuda``: then on the host's
    own choice of GPU, for the benchmarks and the workflow tests on a GPU machine.

    Every folder the host writes to or scans (output, temp, input, user, models, embeddings,
    custom_nodes) is placed under ``base_dir``. Built-in extra nodes are registered, then this
    repo is loaded as a custom node from a symlink named ``comfyui-personalize-under-test`` (so
    the pack is proven to work under an arbitrary folder name) and the test-only ``tinypack``
    the same way. The host only logs a pack that fails to import; ``Host.pack_loaded`` records
    what the host's loader returned and ``Host.pack_log`` the warnings it logged meanwhile (the
    traceback, if any); callers must check the pack's nodes are registered.
    """
    global _HOST
    if _HOST is not None:
        return _HOST
    root = pathlib.Path(comfyui_path or os.environ["COMFYUI_PATH"]).resolve()
    base = pathlib.Path(base_dir).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if str(HERE) not in sys.path:
        # the tiny pack imports tiny_models by its top-level name, as the tests do, so both
        # share one module and one model cache
        sys.path.insert(0, str(HERE))
    if "comfy.model_management" in sys.modules:
        raise RuntimeError("comfy.model_management was imported before load_host(): --cpu can no longer take effect")

    import comfy.cli_args

    device = device or os.environ.get(DEVICE_VARIABLE, "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_VARIABLE}={device!r}: give cpu or cuda")
    comfy.cli_args.args.cpu = device == "cpu"
    # folder_paths derives every default folder from this at import time and creates the
    # input folder on import; without it those land in the host checkout
    comfy.cli_args.args.base_directory = str(base)

    # must precede `import nodes`: otherwise comfy/utils.py shadows the host's top-level utils package
    import utils.extra_config  # noqa: F401
    import folder_paths

    dirs = {name: base / name for name in ("input", "output", "temp", "user", "custom_nodes")}
    dirs["embeddings"] = base / "models" / "embeddings"
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.set_user_directory(str(dirs["user"]))
    folder_paths.folder_names_and_paths["embeddings"] = ([str(dirs["embeddings"])], folder_paths.supported_pt_extensions)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(dirs["custom_nodes"])], set())

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    builtin = set(nodes.NODE_CLASS_MAPPINGS)
    pack_path = _link(dirs["custom_nodes"] / PACK_FOLDER_NAME, REPO_ROOT)
    pack_loaded, pack_log = _load_custom_node(nodes, pack_path, builtin)
    tinypack_loaded, tinypack_log = _load_custom_node(nodes, _link(dirs["custom_nodes"] / TINYPACK_DIR.name, TINYPACK_DIR), builtin)
    _HOST = Host(
        root=root,
        base_dir=base,
        input_dir=dirs["input"],
        output_dir=dirs["output"],
        temp_dir=dirs["temp"],
        user_dir=dirs["user"],
        embeddings_dir=dirs["embeddings"],
        custom_nodes_dir=dirs["custom_nodes"],
        pack_path=pack_path,
        pack_loaded=pack_loaded,
        pack_log=pack_log,
        tinypack_loaded=tinypack_loaded,
        tinypack_log=tinypack_log,
    )
    return _HOST


def _load_custom_node(nodes, path: pathlib.Path, builtin: set) -> tuple[bool, str]:
    """Load a pack as ``init_external_custom_nodes`` does (built-in names win); return the host's verdict and its warnings."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        loaded = asyncio.run(nodes.load_custom_node(str(path), ignore=builtin))
    finally:
        root.removeHandler(handler)
    return loaded, "\n".join(record.getMessage() for record in records)


def _link(link: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    if not link.is_symlink():
        link.symlink_to(target, target_is_directory=True)
    return link


class _StubServer:
    """The attributes ``PromptExecutor`` and the progress handlers read from ``PromptServer``.

    ``client_id`` stays None, so the executor only forwards broadcast events; they are recorded.
    """

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))


class Outputs(dict):
    """``{node_id: (value per output slot, ...)}`` for every node of the prompt that ran.

    A slot holds the value downstream nodes receive: the host keeps a list per slot (one entry
    per call of a node mapped over list inputs); a single entry is unwrapped, a list output
    (``OUTPUT_IS_LIST``) or a multi-call result stays a list. ``ui`` holds the host's UI results
    per node (e.g. SaveImage's file names), ``messages`` the executor's status messages, ``executed`` the
    nodes that ran (the others came from the executor's cache).
    """

    ui: dict
    messages: list
    executed: list


def new_executor():
    """A ``PromptExecutor`` to pass to several :func:`run_prompt` calls: the server keeps one across queued prompts,
    so its cache decides which nodes a re-queued graph runs again."""
    import execution
    return execution.PromptExecutor(_StubServer(), cache_type=execution.CacheType.CLASSIC)


def run_prompt(api_prompt: dict, extra_data: dict | None = None, executor=None) -> Outputs:
    """Validate ``api_prompt`` with the host's ``validate_prompt`` and execute it with a fresh ``PromptExecutor``.

    ``extra_data`` is what the frontend sends beside the prompt (``extra_pnginfo``, read by
    nodes with the hidden EXTRA_PNGINFO input such as SaveImage).

    Raises AssertionError with the host's validation report (node_errors included) when any
    output fails validation, and with the exception type, message and traceback of the failing
    node when execution fails. A fresh executor (``executor`` None) means nothing is cached between calls;
    one from :func:`new_executor`, passed again, caches as the server does (``Outputs.executed``: the nodes
    that ran this time).
    """
    import execution

    loaded_host()
    prompt_id = str(uuid.uuid4())
    ok, error, good_outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, api_prompt, None))
    # the host runs whatever outputs validated and only reports the others; a test must not
    assert ok and not node_errors, "prompt failed validation:\n" + json.dumps(
        {"error": error, "node_errors": node_errors}, indent=2, default=str
    )
    executor = executor or new_executor()
    executor.server.last_prompt_id = prompt_id
    executor.execute(api_prompt, prompt_id, extra_data or {}, good_outputs)
    # ExecutionList.stage_node_execution errors (e.g. a dependency cycle) break out of the loop
    # without clearing executor.success (execution.py L689-692), so the messages are the truth
    failures = [data for event, data in executor.status_messages if event in ("execution_error", "execution_interrupted")]
    assert executor.success and not failures, "prompt failed during execution:\n" + "\n".join(
        _format_failure(data) for data in failures
    )
    outputs = Outputs()
    for node_id in api_prompt:
        raw = executor.caches.outputs.get(node_id)
        if raw is not None:
            is_list = _output_is_list(api_prompt[node_id], len(raw))
            outputs[node_id] = tuple(_unwrap(slot, listed) for slot, listed in zip(raw, is_list))
    outputs.ui = executor.history_result["outputs"]
    outputs.messages = executor.status_messages
    cached = {node for event, data in executor.status_messages if event == "execution_cached" for node in data["nodes"]}
    outputs.executed = [node for node in outputs if node not in cached]
    return outputs


def loaded_host() -> Host:
    """The loaded host; fails clearly when :func:`load_host` has not run in this process."""
    assert _HOST is not None, "load_host() must run first (the `host` fixture does it)"
    return _HOST


def _output_is_list(node: dict, n: int):
    import nodes

    return getattr(nodes.NODE_CLASS_MAPPINGS[node["class_type"]], "OUTPUT_IS_LIST", None) or (False,) * n


def _unwrap(slot: list, is_list: bool):
    return slot if is_list or len(slot) != 1 else slot[0]


def _format_failure(data: dict) -> str:
    if "exception_type" not in data:
        return f"node {data.get('node_id')} ({data.get('node_type')}): interrupted"
    return (
        f"node {data['node_id']} ({data['node_type']}): {data['exception_type']}: {data['exception_message']}\n"
        + "".join(data["traceback"])
    )


def infer_kind(loader_inputs: dict) -> str:
    """The tiny family that stands in for a stock loader: ``"sdxl"`` when any of its literal inputs
    (file names, DualCLIPLoader's ``type``) mentions XL, else ``"sd1"``."""
    return "sdxl" if any(isinstance(v, str) and "xl" in v.lower() for v in loader_inputs.values()) else "sd1"


def rewrite_loaders(api_prompt: dict, kind: str | None = None) -> dict:
    """Replace every stock model loader (``LOADER_REWRITES``) by ``TinyCheckpointLoader``.

    Consumers are re-pointed to the tiny loader's output that matches the stock one's (a
    VAELoader's VAE is the tiny loader's slot 2). ``kind`` forces the model family; by default
    each loader's inputs decide (:func:`infer_kind`). Returns a new prompt.
    """
    prompt = copy.deepcopy(api_prompt)
    slot_maps = {}
    for node_id, node in prompt.items():
        slot_map = LOADER_REWRITES.get(node["class_type"])
        if slot_map is not None:
            prompt[node_id] = {"class_type": TINY_LOADER, "inputs": {"kind": kind or infer_kind(node["inputs"])}}
            slot_maps[node_id] = slot_map
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in slot_maps:
                node["inputs"][name] = [value[0], slot_maps[value[0]][value[1]]]
    return prompt


def shrink_latents(api_prompt: dict, side: int) -> dict:
    """Test-only rewrite: every ``EmptyLatentImage`` makes ``side``×``side`` pixels.

    Shipped workflows keep the settings a user runs (512², 50 steps); on the tiny CPU models a
    512² latent costs ~90 s per graph, so the host tier runs them smaller, all else unchanged.
    """
    prompt = json.loads(json.dumps(api_prompt))
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=side, height=side)
    return prompt


def run_workflow(workflow, kind: str | None = None, latent_side: int | None = None) -> Outputs:
    """Run a UI-format workflow (a path to its JSON, or the parsed dict) on the tiny models.

    The workflow is converted with the host's node definitions (``ui_to_api``), its loaders are
    rewritten (:func:`rewrite_loaders`), empty latents optionally shrunk (:func:`shrink_latents`),
    and the prompt runs through :func:`run_prompt` with the workflow as PNG metadata, as the
    frontend sends it; the returned outputs are keyed by the workflow's node ids (as strings).
    """
    import ui_to_api

    if not isinstance(workflow, dict):
        workflow = json.loads(pathlib.Path(workflow).read_text())
    loaded_host()
    prompt = rewrite_loaders(ui_to_api.convert(workflow), kind)
    if latent_side is not None:
        prompt = shrink_latents(prompt, latent_side)
    return run_prompt(prompt, {"extra_pnginfo": {"workflow": workflow}})
