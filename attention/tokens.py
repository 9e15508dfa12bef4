"""Word -> token positions in a prompt's cross-attention context.

The host tokenizes a prompt into chunks of 77 tokens; its word ids mark weighted segments and
embeddings, not words, so words are rebuilt from the BPE pieces themselves: CLIP's pieces end a
word with ``</w>``. A textual-inversion embedding (``embedding:name``) is one word of one or more
vectors. Positions index the concatenated context the UNet sees (chunk * chunk_len + offset).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

END_OF_WORD = "</w>"
_STRIP = ".,;:!?\"'()[]{}"


@dataclass(frozen=True)
class Token:
    piece: str | None   # BPE piece ("dog</w>"), "embedding:name" for a vector, None for start/end/pad
    segment: int        # the host's word id: 0 for special tokens, else the segment/embedding it came from


@dataclass(frozen=True)
class Word:
    text: str
    positions: tuple[int, ...]


def _normal(text: str) -> str:
    return text.lower().strip(_STRIP)


def split_words(tokens: list[Token]) -> list[Word]:
    """Group token positions into words: BPE pieces up to ``</w>``, each embedding as one word."""
    words, text, positions, segment = [], "", [], None

    def close():
        nonlocal text, positions
        if positions and any(c.isalnum() for c in text):
            words.append(Word(_normal(text), tuple(positions)))
        text, positions = "", []

    for pos, tok in enumerate(tokens):
        vector = tok.piece is not None and tok.piece.startswith("embedding:")
        if tok.piece is None or tok.segment != segment or text.startswith("embedding:") != vector:
            close()
        if tok.piece is None:
            continue
        segment = tok.segment
        positions.append(pos)
        if vector:
            text = tok.piece
            continue
        text += tok.piece.removesuffix(END_OF_WORD)
        if tok.piece.endswith(END_OF_WORD):
            close()
    close()
    return words


def embedding_names(prompt: str) -> list[str]:
    """Names after ``embedding:`` in prompt order (the host's syntax), punctuation trimmed."""
    return [m.rstrip(_STRIP) for m in re.findall(r"(?:^|[\s(,])embedding:([^\s,():]+)", prompt)]


def find_word(words: list[Word], query: str) -> tuple[int, ...]:
    """Positions of every occurrence of ``query`` (one or more words, or ``embedding:name``)."""
    wanted = [_normal(w) for w in query.split() if _normal(w)]
    if not wanted:
        raise ValueError("an empty word was given: name words that occur in the prompt.")
    names = [w.text.removeprefix("embedding:") if w.text.startswith("embedding:") else w.text for w in words]
    wanted = [w.removeprefix("embedding:") for w in wanted]
    found = []
    for start in range(len(words) - len(wanted) + 1):
        if names[start:start + len(wanted)] == wanted:
            found += [p for w in words[start:start + len(wanted)] for p in w.positions]
    if not found:
        listed = ", ".join(dict.fromkeys(w.text for w in words)) or "(none)"
        raise ValueError(f"'{query}' is not a word of the prompt. The prompt's words are: {listed}.")
    return tuple(found)


def word_positions(tokens: list[Token], queries: list[str]) -> list[tuple[int, ...]]:
    """Token positions for each query word, in query order."""
    words = split_words(tokens)
    return [find_word(words, q) for q in queries]


def parse_words(text: str) -> list[str]:
    """A node's comma-separated word list; each entry may be several words ("teddy bear")."""
    queries = [w.strip() for w in text.split(",") if w.strip()]
    if not queries:
        raise ValueError("no words given: list the prompt words to watch, separated by commas (e.g. 'dog, hat').")
    return queries
