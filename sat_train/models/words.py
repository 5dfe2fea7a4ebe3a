"""CLIP tokenizers built from a vocabulary, and where chosen words sit in a caption's token ids (CAC's
picks, from the model's own tokenizer)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch


def clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], **kwargs):
    """A ``CLIPTokenizer`` from a vocabulary and BPE merges, on transformers 4 and 5 alike.

    Through files, the one form both take (4's tokenizer reads ``vocab_file``/``merges_file`` only, 5's
    drops them): kohya-ss/sd-scripts pins transformers 4.54, where the drop-in must work too.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
        Path(folder, "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, **kwargs)


def word_token_ids(tokenizer, words: list[str]) -> list[tuple[int, ...]]:
    """Each word's token ids as the model's tokenizer writes it inside a caption (one or more BPE tokens)."""
    found = []
    for word in words:
        ids = tuple(tokenizer(word, add_special_tokens=False).input_ids)
        if ids and ids not in found:
            found.append(ids)
    return found


def word_token_positions(tokenizer, input_ids, word_ids: list[tuple[int, ...]]) -> list[int]:
    """Sorted positions in ``input_ids`` of every token of every whole-word occurrence of ``word_ids``.

    A match must start a word: CLIP's BPE marks word ends with ``</w>``, so the token before the
    match must end a word (or be a special token); "hand" then does not match inside "thand".
    """
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    positions: set[int] = set()
    for word in word_ids:
        n = len(word)
        marks_word_ends = tokenizer.convert_ids_to_tokens([word[-1]])[0].endswith("</w>")
        for p in range(len(ids) - n + 1):
            if tuple(ids[p:p + n]) != word:
                continue
            if marks_word_ends and p > 0 and ids[p - 1] not in special and not tokens[p - 1].endswith("</w>"):
                continue  # the match continues an earlier word
            positions.update(range(p, p + n))
    return sorted(positions)


def pad_token_positions(rows: list[torch.Tensor]) -> torch.Tensor:
    """(B, S) long, each row's positions then -1 padding (S >= 1, so a batch without words is all -1)."""
    width = max([1] + [len(r) for r in rows])
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
