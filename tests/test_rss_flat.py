"""A server streams for hours: the resident size of a long stream stays flat, measured raw (no trim by the test)
in a process of its own, so other tests' heap does not count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamt1_engine import StreamT1Engine
from streamt1_engine.memory import HeapTrimmer

REPO = Path(__file__).resolve().parents[1]

# 300 stream_t1 chunks of the embedded model at its smallest frame size (16x16): about 30 s on a 2-core CPU.
LONG_STREAM = """
import json, os, sys, torch
torch.set_num_threads(1)
from streamt1_engine import StreamT1Engine
first, last = 20, 300
page = os.sysconf("SC_PAGE_SIZE")
marks = {}

def progress(done, total):
    if done in (first, last):
        with open("/proc/self/statm") as f:
            marks[done] = int(f.read().split()[1]) * page

engine = StreamT1Engine.from_pretrained("tiny", device="cpu")
for _ in engine.stream("a red circle moving right on a blue background", num_chunks=last, seed=1,
                       search="stream_t1", height=16, width=16, progress=progress):
    pass
print(json.dumps({"first": marks[first], "last": marks[last], "trims": engine._trim_heap.trims}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc (Linux)")
def test_resident_memory_is_flat_over_300_stream_t1_chunks():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", LONG_STREAM], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(rss["last"] / rss["first"] - 1) <= 0.05, rss
    assert rss["trims"] > 0, rss


def test_the_worker_trims_the_heap_at_chunk_boundaries(monkeypatch):
    calls = []
    monkeypatch.setattr(HeapTrimmer, "__call__", lambda self: calls.append(1))
    engine = StreamT1Engine.from_pretrained("random-tiny", device="cpu")
    engine.generate("a red circle", num_chunks=3, search="stream_t1")
    assert len(calls) >= 3  # once after every chunk step (the trimmer itself rate-limits the trims)


def test_the_trimmer_trims_at_most_once_per_interval():
    trimmer = HeapTrimmer(min_interval_s=3600)
    if trimmer._trim is None:
        pytest.skip("not glibc: no malloc_trim")
    trimmer(), trimmer(), trimmer()
    assert trimmer.trims == 1
