"""Every shipped workflow reads well in the web UI: nothing hides anything else, every node sits in its step's group.

The boxes are the ones the frontend (LiteGraph, ComfyUI frontend 1.27) draws from the file: a node's
``pos`` is the top-left corner of its body, its title bar (``LiteGraph.NODE_TITLE_HEIGHT`` = 30 px) is
drawn above it, its ``size`` is the body. A group's title bar is ``font_size`` 24 × 1.4 = 33.6 px
high (``LGraphGroup.titleHeight``). The frontend only ever enlarges a node whose saved size is below
what its slots and widgets need; ``tests/host/test_workflow_sizes_host.py`` holds every saved size to
that minimum (it needs the host's node definitions), so the boxes here are what a user sees.
"""
import itertools
import json
import pathlib
import re

import pytest

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
NODE_TITLE_HEIGHT = 30
GROUP_TITLE_HEIGHT = 24 * 1.4
# a note's textarea (frontend: 11 px monospace-ish text, ~7 px per character, ~15 px per line,
# 6 px padding around); a note that needs more lines than its box shows a scrollbar instead
NOTE_CHAR_WIDTH, NOTE_LINE_HEIGHT, NOTE_PADDING = 7, 15, 12
NOTE_MAX_CHARS = 360
NOTES = {"Note", "MarkdownNote"}


def load(path):
    return json.loads(path.read_text())


def node_box(node):
    """(x0, y0, x1, y1) of a node as drawn: its title bar above ``pos``, its body of ``size`` below."""
    (x, y), (w, h) = node["pos"], node["size"]
    return (x, y - NODE_TITLE_HEIGHT, x + w, y + h)


def group_box(group):
    x, y, w, h = group["bounding"]
    return (x, y, x + w, y + h)


def group_title_box(group):
    x, y, w, _ = group["bounding"]
    return (x, y, x + w, y + GROUP_TITLE_HEIGHT)


def overlap(a, b):
    """Whether two boxes share an area (touching edges do not count)."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def inside(inner, outer):
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def label(node):
    return f"node {node['id']} {node['type']} ({node.get('title', '')!r})"


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 7, [p.name for p in WORKFLOWS]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_no_node_or_note_covers_another(path):
    nodes = load(path)["nodes"]
    clashes = [f"{label(a)} and {label(b)}" for a, b in itertools.combinations(nodes, 2) if overlap(node_box(a), node_box(b))]
    assert not clashes, "overlapping (title bars included):\n" + "\n".join(clashes)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_groups_and_their_titles_stay_clear(path):
    workflow = load(path)
    groups = workflow.get("groups") or []
    assert groups, "every workflow is divided into groups, one per step"
    clashes = [f"group {a['title']!r} and group {b['title']!r}"
               for a, b in itertools.combinations(groups, 2) if overlap(group_box(a), group_box(b))]
    clashes += [f"{label(n)} covers the title of group {g['title']!r}"
                for n in workflow["nodes"] for g in groups if overlap(node_box(n), group_title_box(g))]
    assert not clashes, "\n".join(clashes)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_node_sits_inside_exactly_one_group(path):
    workflow = load(path)
    groups = workflow.get("groups") or []
    stray = []
    for node in workflow["nodes"]:
        homes = [g["title"] for g in groups if inside(node_box(node), group_box(g))]
        if len(homes) != 1:
            stray.append(f"{label(node)}: inside {homes or 'no group'}")
    assert not stray, "every node (notes too) must lie wholly inside the group of its step:\n" + "\n".join(stray)


def plain(title):
    """A title with everything in brackets removed: what must read as plain words."""
    return re.sub(r"\([^)]*\)", "", title)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_titles_are_plain_words_with_the_paper_symbol_in_brackets(path):
    workflow = load(path)
    titles = [n["title"] for n in workflow["nodes"] if n.get("title")] + [g["title"] for g in workflow.get("groups") or []]
    # subscripts (y_p), superscripts (⁻) and Greek letters belong in brackets: "Personal prompt (y_p)"
    notation = [t for t in titles if re.search(r"_|[^\x00-\x7f·—–→×]", plain(t)) or not re.search(r"[A-Za-z]{3}", plain(t))]
    assert not notation, f"titles in paper notation: {notation}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_notes_are_short_and_fit_their_box(path):
    problems = []
    for node in load(path)["nodes"]:
        if node["type"] not in NOTES:
            continue
        text = node["widgets_values"][0]
        width, height = node["size"]
        per_line = max(1, int((width - NOTE_PADDING) // NOTE_CHAR_WIDTH))
        lines = sum(-(-max(1, len(part)) // per_line) for part in text.split("\n"))
        if len(text) > NOTE_MAX_CHARS:
            problems.append(f"{label(node)}: {len(text)} characters (at most {NOTE_MAX_CHARS})")
        if lines * NOTE_LINE_HEIGHT + NOTE_PADDING > height:
            problems.append(f"{label(node)}: ~{lines} lines need {lines * NOTE_LINE_HEIGHT + NOTE_PADDING} px, the box has {height}")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for():
    """Independent cases: a note on a node's title bar, a group title bar over a node's title, containment."""
    node = {"id": 1, "type": "KSampler", "pos": [100, 100], "size": [300, 262]}          # drawn from y 70 to 362
    note_on_title = {"id": 2, "type": "Note", "pos": [100, 40], "size": [300, 40]}      # body ends at y 80
    below = {"id": 3, "type": "Note", "pos": [100, 392], "size": [300, 40]}              # its title starts at 362
    assert overlap(node_box(node), node_box(note_on_title)) and not overlap(node_box(node), node_box(below))
    clear = {"title": "g", "bounding": [80, 30, 400, 400]}                              # title bar down to y 63.6
    assert not overlap(node_box(node), group_title_box(clear)) and inside(node_box(node), group_box(clear))
    low = {"title": "g", "bounding": [80, 45, 400, 400]}                                # title bar down to y 78.6
    assert overlap(node_box(node), group_title_box(low))
    assert plain("Personal prompt (y_p)") == "Personal prompt " and plain("y_p (personal prompt)") == "y_p "
