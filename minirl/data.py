"""Prompt datasets: `PromptDataset` reads prompts, tokenizes them once, drops over-long ones, and hands
out batches in a seeded order whose position (epoch, index) is saved in checkpoints for an exact resume.
"""

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from minirl.tokenizer import Tokenizer


def read_records(path: str) -> list[dict]:
    """Rows of a .jsonl (or .parquet, when pyarrow is installed) file. Every problem is one ValueError
    naming the file, and the line for bad JSON or for text that is not UTF-8 (UTF-16, latin-1, binary)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a data file (.jsonl, or .parquet with pyarrow)")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors do not name the file
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    rows = []
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                rows += _json_line(raw, path, lineno)
    except OSError as e:  # unreadable: permissions, an I/O error
        raise ValueError(f"cannot read {path} ({e.strerror or e})") from None
    return rows


def _json_line(raw: bytes, path: str, lineno: int) -> list[dict]:
    """The JSON object on one line of a .jsonl file ([] for a blank line)."""
    try:  # decoded here, line by line, so that an error can say where (a UTF-8 BOM may open the file)
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                         f"JSON lines must be UTF-8") from None
    if not line.strip():
        return []
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return [row]


@dataclass
class Prompt:
    index: int  # row in the file: a stable id for seeding and logs
    text: str | list  # the prompt as given (string or chat messages)
    token_ids: list[int]
    answer: str


class PromptDataset:
    """Tokenized prompts served in a seeded, epoch-wise shuffled order, the same on every rank.

    Every row needs a prompt: a string, or a list of chat messages when `chat`. A row without an answer
    gets "" (`missing_answers` counts them, for the caller to warn about); with `need_answers`, a file
    where no row has `answer_field` is an error (a misspelt field would train a whole run at reward 0).
    """

    def __init__(self, path, tokenizer: Tokenizer, prompt_field="prompt", answer_field="answer",
                 chat=True, max_prompt_len=1024, seed=0, need_answers=True):
        rows = read_records(path)
        self.prompts, self.dropped, self.missing_answers = [], 0, 0
        for i, row in enumerate(rows):
            if prompt_field not in row:
                raise ValueError(f"{path}: row {i + 1} has no field {prompt_field!r} (fields: {sorted(row)})")
            try:
                ids = tokenizer.encode_prompt(row[prompt_field], chat=chat)
            except (TypeError, ValueError) as e:  # not a string or a list of messages
                raise ValueError(f"{path}: row {i + 1}, field {prompt_field!r}: {e}") from None
            if not ids or row[prompt_field] in ("", []):  # nothing to generate from: a gap in the data
                raise ValueError(f"{path}: row {i + 1}, field {prompt_field!r}: the prompt is empty")
            answer = row.get(answer_field)
            self.missing_answers += answer is None
            if len(ids) > max_prompt_len:
                self.dropped += 1
                continue
            self.prompts.append(Prompt(i, row[prompt_field], ids, "" if answer is None else str(answer)))
        if need_answers and rows and self.missing_answers == len(rows):
            raise ValueError(f"{path}: no row has the answer field {answer_field!r} (fields of row 1: "
                             f"{sorted(rows[0])}); set --answer-field")
        if not self.prompts:
            raise ValueError(f"{path}: no usable prompts ({len(rows)} rows, {self.dropped} longer than "
                             f"{max_prompt_len})")
        self.seed, self.epoch, self.pos = seed, 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.prompts), generator=g).tolist()

    def next_batch(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            out.append(self.prompts[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def fingerprint(self) -> str:
        """A digest of the prompts as served (file row, token ids, answer), whatever the file's name: a
        resumed run must draw from the same ones, or its saved position means other prompts."""
        rows = [(p.index, p.token_ids, p.answer) for p in self.prompts]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    def load_state_dict(self, state: dict):
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle(self.epoch)
