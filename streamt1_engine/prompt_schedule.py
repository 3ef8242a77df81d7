"""Prompt schedules: which prompt a stream switches to before which chunk (LongLive's interactive mode).

A schedule is a sorted list of ``(chunk index, prompt)``; each prompt is used from its chunk on, and an entry
at chunk 0 is the starting prompt. Accepted input forms (also as a JSON text, e.g. one line of a JSONL file):

- ``{chunk_index: prompt}`` (JSON object keys are strings of digits);
- ``[(chunk_index, prompt), ...]``;
- a LongLive-style line ``{"prompts": [p0, p1, ...], "switch_chunk_indices": [c1, ...]}`` or, with LongLive's
  own ``"switch_frame_indices"`` (latent frames), the switch at the first chunk that starts at or after the
  frame, as LongLive's loop switches (it compares the chunk's start frame with the index).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .errors import StreamT1Error, require

Schedule = list[tuple[int, str]]
_LINE_KEYS = {"prompts", "switch_chunk_indices", "switch_frame_indices"}


def parse_prompt_schedule(spec, *, num_chunks: int, chunk_frames: int | None = None) -> Schedule:
    """Validate ``spec`` (any form above, or None for no schedule) against a stream of ``num_chunks`` chunks
    of ``chunk_frames`` latent frames (needed only for ``switch_frame_indices``)."""
    if spec is None:
        return []
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StreamT1Error(f"prompt schedule is not valid JSON: {exc}") from None
    if isinstance(spec, Mapping) and "prompts" in spec:
        entries = _longlive_entries(spec, chunk_frames)
    elif isinstance(spec, Mapping):
        entries = [(_chunk_index(k, "chunk index"), p) for k, p in spec.items()]
        entries.sort(key=lambda e: e[0])
    elif isinstance(spec, (list, tuple)):
        entries = []
        for item in spec:
            require(isinstance(item, (list, tuple)) and len(item) == 2,
                    f"prompt schedule entries must be (chunk index, prompt) pairs, got {item!r}")
            entries.append((_chunk_index(item[0], "chunk index"), item[1]))
    else:
        raise StreamT1Error("prompt schedule must be {chunk index: prompt}, a list of (chunk index, prompt) pairs "
                            f"or a LongLive line {{\"prompts\": [...], \"switch_chunk_indices\": [...]}}, got "
                            f"{type(spec).__name__}")
    require(isinstance(num_chunks, int) and num_chunks >= 1,
            f"num_chunks must be a positive integer, got {num_chunks!r}")
    previous = None
    for chunk, prompt in entries:
        require(isinstance(prompt, str) and prompt.strip() != "",
                f"prompt schedule: the prompt at chunk {chunk} is empty or not text ({prompt!r})")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise StreamT1Error(f"prompt schedule: the prompt at chunk {chunk} is not valid UTF-8 text") from None
        require(chunk < num_chunks, f"prompt schedule: chunk index {chunk} is out of range for a stream of "
                                    f"{num_chunks} chunks (0..{num_chunks - 1})")
        require(previous is None or chunk > previous,
                f"prompt schedule: chunk indices must be strictly increasing, got {chunk} after {previous}")
        previous = chunk
    return [(chunk, prompt) for chunk, prompt in entries]


def _chunk_index(value, what: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            f"prompt schedule: {what} must be a non-negative integer, got {value!r}")
    return value


def _longlive_entries(line: Mapping, chunk_frames: int | None) -> Schedule:
    unknown = sorted(set(line) - _LINE_KEYS)
    require(not unknown, f"prompt schedule: unknown keys {unknown} (expected {sorted(_LINE_KEYS)})")
    prompts = line["prompts"]
    require(isinstance(prompts, list) and len(prompts) >= 1, "prompt schedule: 'prompts' must be a non-empty list")
    by_chunk, by_frame = line.get("switch_chunk_indices"), line.get("switch_frame_indices")
    require(by_chunk is None or by_frame is None,
            "prompt schedule: give switch_chunk_indices or switch_frame_indices, not both")
    indices = by_chunk if by_chunk is not None else by_frame
    if indices is None:
        indices = []
    if isinstance(indices, str):  # LongLive's config writes them comma separated
        indices = [x.strip() for x in indices.split(",") if x.strip()]
    require(isinstance(indices, list), "prompt schedule: switch indices must be a list")
    require(len(indices) == len(prompts) - 1,
            f"prompt schedule: {len(prompts)} prompts need {len(prompts) - 1} switch indices, got {len(indices)}")
    if by_frame is not None:
        require(isinstance(chunk_frames, int) and chunk_frames >= 1,
                "prompt schedule: switch_frame_indices need the stream's frames per chunk")
        frames = [_chunk_index(f, "switch frame index") for f in indices]
        chunks = [-(-f // chunk_frames) for f in frames]  # first chunk starting at or after the frame
        for (f0, c0), (f1, c1) in zip(zip(frames, chunks), zip(frames[1:], chunks[1:])):
            require(c1 > c0, f"prompt schedule: switch frames {f0} and {f1} must fall in increasing chunks "
                             f"({chunk_frames} frames each), got chunks {c0} and {c1}")
    else:
        chunks = [_chunk_index(c, "switch chunk index") for c in indices]
    require(not chunks or chunks[0] >= 1,
            "prompt schedule: the first switch must come after chunk 0 (prompts[0] is the starting prompt)")
    return list(zip([0] + chunks, prompts))


def load_prompt_schedule(path, *, num_chunks: int, chunk_frames: int | None = None, line: int = 0) -> Schedule:
    """A schedule from a file: one JSON value, or a JSONL file with one LongLive line per video (``line``
    picks one, counting non-empty lines from 0)."""
    return parse_prompt_schedule(read_prompt_schedule(path, line), num_chunks=num_chunks, chunk_frames=chunk_frames)


def read_prompt_schedule(path, line: int = 0):
    """The JSON value of a schedule file (its ``line``-th non-empty line for a JSONL file), not yet checked
    against a stream: read before a model loads, so a missing file or line fails before any work. A ``line``
    the file does not have is an error, never the first line instead."""
    require(isinstance(line, int) and not isinstance(line, bool) and line >= 0,
            f"prompt schedule line must be a non-negative integer, got {line!r}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StreamT1Error(f"cannot read prompt schedule {path}: {exc}") from None
    lines = [x for x in text.splitlines() if x.strip()]
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        pass
    else:
        if line == 0:
            return whole
        require(len(lines) != 1, f"prompt schedule {path} has 1 line, no line {line}")
        raise StreamT1Error(f"prompt schedule {path} is one JSON value over {len(lines)} lines, not one schedule "
                            f"per line: no line {line} to pick")
    require(line < len(lines), f"prompt schedule {path} has {len(lines)} line{'s' if len(lines) != 1 else ''}, "
                               f"no line {line}")
    try:
        return json.loads(lines[line])
    except json.JSONDecodeError as exc:
        raise StreamT1Error(f"prompt schedule {path} line {line} is not valid JSON: {exc}") from None


def split_schedule(schedule: Schedule, prompt: str | None = None) -> tuple[str, Schedule]:
    """(starting prompt, switches at chunks >= 1). A chunk-0 entry is the starting prompt; a ``prompt`` given
    beside a different chunk-0 entry is refused rather than one of them silently ignored."""
    switches = [(c, p) for c, p in schedule if c > 0]
    first = [p for c, p in schedule if c == 0]
    if first:
        require(prompt is None or prompt == first[0],
                f"prompt {prompt!r} and the schedule's chunk-0 prompt {first[0]!r} differ: give one of them")
        return first[0], switches
    require(prompt is not None and prompt.strip() != "", "prompt is empty (and the schedule has no chunk-0 prompt)")
    return prompt, switches


def switch_before(schedule: Schedule, chunk: int) -> str | None:
    """The prompt to switch to before making ``chunk``, or None (no switch there)."""
    for c, prompt in schedule:
        if c == chunk:
            return prompt
    return None
