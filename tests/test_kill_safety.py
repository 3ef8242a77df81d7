"""Nothing lost on a hard kill: the streamed MP4 is fragmented, so it plays after every appended chunk, and the
run record rewritten after every chunk tells a run that was killed (SIGKILL) from one still running."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamt1_engine.cli import main
from streamt1_engine.run_record import run_state, writer_fields
from streamt1_engine.video_io import Mp4StreamWriter, read_video

PROMPT = "a red circle moving right on a blue background"
REPO = Path(__file__).resolve().parents[1]


def decoded_frames(path: Path) -> int:
    """Frames PyAV decodes from ``path`` as it is on disk now (a copy, so a writer still open does not matter)."""
    import av

    copy = path.with_name("copy-" + path.name)
    copy.write_bytes(path.read_bytes())
    try:
        with av.open(str(copy)) as container:
            return sum(1 for _ in container.decode(video=0))
    finally:
        copy.unlink()


@pytest.mark.parametrize("codec", [None, "mpeg4"])
def test_the_streamed_video_plays_after_every_append_without_close(tmp_path, codec):
    rng = np.random.default_rng(0)
    writer = Mp4StreamWriter(tmp_path / "v.mp4", fps=8, codec=codec)
    for chunk in range(1, 5):
        writer.append(rng.integers(0, 255, (3, 16, 24, 3), dtype=np.uint8))
        assert decoded_frames(tmp_path / "v.mp4") == 3 * chunk  # no frame waits in the muxer for the next chunk
    writer.close()
    frames = read_video(tmp_path / "v.mp4")
    assert frames.shape == (12, 16, 24, 3)
    import av

    with av.open(str(tmp_path / "v.mp4")) as container:  # timestamps run on across the chunks' fragments
        times = [float(frame.time) for frame in container.decode(video=0)]
    assert times == pytest.approx([i / 8 for i in range(12)])


def test_run_state_tells_a_killed_run_from_a_running_one():
    alive = {"status": "running", **writer_fields()}
    assert run_state(alive) == "running"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process (or, reused, one with another start time)
    dead = {**alive, "pid": child.pid, "pid_start": alive["pid_start"]}
    assert run_state(dead) == "did not finish"
    assert run_state({**alive, "status": "complete"}) == "complete"


def test_sigkill_leaves_a_playable_video_of_the_written_chunks_and_an_unfinished_record(tmp_path, capsys):
    out = tmp_path / "long.mp4"
    record_path = out.with_suffix(".json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "streamt1_engine.cli", "generate", PROMPT, "-o", str(out),
                             "--chunks", "400", "--no-progress", "--threads", "1", "--height", "16", "--width", "16"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(record_path.read_text())["final_chunks"] >= 15:
                    break
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGSTOP)  # frozen: what is on disk now is what the kill leaves
        record = json.loads(record_path.read_text())
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert record["status"] == "running" and record["pid"] == proc.pid and record["updated_at"]
    assert record["final_chunks"] >= 15 and record["num_frames"] == 3 * record["final_chunks"]
    # the record is rewritten right after each chunk is appended: the video holds its chunks, or one more
    frames = decoded_frames(out)
    assert frames in (record["num_frames"], record["num_frames"] + 3), (frames, record["num_frames"])
    assert run_state(json.loads(record_path.read_text())) == "did not finish"
    assert main(["inspect", str(out)]) == 1
    assert "did not finish" in capsys.readouterr().out
