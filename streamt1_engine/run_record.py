"""Whether the run behind a run record (``streamt1 generate``'s ``out.json``) finished, said in one line.

``generate`` rewrites the record after every chunk with ``"status": "running"``, the chunks and frames
written so far, the writing process (``pid`` and, on Linux, its start time, which tells a reused pid apart)
and ``updated_at``; it ends with ``complete``, ``interrupted`` or ``failed``. A run killed without warning
(SIGKILL, the OOM killer, a power cut) never writes that last status: its record still says ``running``
while no process of that pid and start time is alive. ``run_state`` tells the two apart (on the machine
that ran it: elsewhere a ``running`` record is reported with the time it was last written).
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .errors import StreamT1Error, require

FINISHED = ("complete",)
ENDED = ("complete", "interrupted", "failed")


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return int(fields[19]) if fields[0] != "Z" else None  # a zombie has exited


def writer_fields() -> dict:
    """What a record says about the process writing it, rewritten with every record."""
    return {"pid": os.getpid(), "pid_start": process_start_time(os.getpid()),
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def writer_alive(record: dict) -> bool | None:
    """True while the record's writer runs, False once it is gone, None where this machine cannot tell."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if record.get("pid_start") is not None and Path("/proc/self/stat").exists():
        return process_start_time(pid) == record["pid_start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that pid
        return True
    except OSError:
        return None
    return True


def run_state(record: dict) -> str:
    """"complete", "interrupted", "failed", "running" (its process is alive), "did not finish" (a ``running``
    record whose process is gone: killed without warning) or "running or killed" (its process cannot be
    checked from here)."""
    status = record.get("status")
    require(isinstance(status, str), "the run record has no status")
    if status in ENDED:
        return status
    require(status == "running", f"the run record has an unknown status {status!r}")
    alive = writer_alive(record)
    return "running" if alive else "did not finish" if alive is False else "running or killed"


def read_record(path) -> tuple[Path, dict]:
    """The record of a video (``out.mp4`` -> ``out.json``) or a record path, read."""
    path = Path(path)
    record_path = path.with_suffix(".json") if path.suffix.lower() == ".mp4" else path
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StreamT1Error(f"no run record {record_path}") from None
    except (OSError, ValueError) as exc:
        raise StreamT1Error(f"cannot read run record {record_path}: {exc}") from None
    require(isinstance(record, dict), f"{record_path} is not a run record")
    return record_path, record


def describe_run(path) -> tuple[str, str]:
    """(state, one line for a person) of the run behind ``path`` (its video or its record)."""
    record_path, record = read_record(path)
    state = run_state(record)
    done = f"{record.get('final_chunks', '?')} of {record.get('num_chunks', '?')} chunks final, " \
           f"{record.get('num_frames', '?')} frames in {record.get('video', 'the video')}"
    if state == "did not finish":
        how = f"did not finish: its process ({record.get('pid')}) ended without a word (killed?) after the last " \
              f"record at {record.get('updated_at', '?')}"
    elif state == "running or killed":
        how = f"unfinished: still running or killed (last record at {record.get('updated_at', '?')}; process " \
              f"{record.get('pid')} cannot be checked from here)"
    elif state == "running":
        how = f"running (process {record.get('pid')}, last record at {record.get('updated_at', '?')})"
    else:
        how = state + (f": {record['error']}" if record.get("error") else "")
    return state, f"{record_path}: {how}; {done}"
