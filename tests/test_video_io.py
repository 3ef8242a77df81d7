import numpy as np
import pytest
import torch

from streamt1_engine.errors import StreamT1Error
from streamt1_engine.video_io import read_video, save_frame_strip, to_uint8_frames, write_mp4


def smooth_video(frames=8, height=32, width=48):
    """A slowly moving colour gradient: easy for a lossy codec, so read-back pixels stay close."""
    t = np.linspace(0, 1, frames)[:, None, None, None]
    y = np.linspace(0, 1, height)[None, :, None, None]
    x = np.linspace(0, 1, width)[None, None, :, None]
    colour = np.array([1.0, 0.6, 0.3])
    return ((0.5 + 0.4 * np.sin(3 * x + 2 * y + 2 * t) * colour) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("codec", [None, "mpeg4"])
def test_write_and_read_back(tmp_path, codec):
    import av

    video = smooth_video()
    target = write_mp4(tmp_path / "clip.mp4", video, fps=16, codec=codec)
    back = read_video(target)
    assert back.shape == video.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - video).mean() < 3
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    with av.open(str(target)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 16
        assert stream.codec_context.name == ("mpeg4" if codec else "h264")


def test_torch_input_and_odd_sizes_are_edge_padded(tmp_path):
    video = smooth_video(frames=5, height=31, width=45)
    back = read_video(write_mp4(tmp_path / "nested" / "odd.mp4", torch.from_numpy(video)))
    assert back.shape == (5, 32, 46, 3)
    assert np.abs(back[:, :31, :45].astype(int) - video).mean() < 3
    # The extra row/column repeats the edge, it is not black.
    assert np.abs(back[:, 31, :45].astype(int) - video[:, 30]).mean() < 6
    assert np.abs(back[:, :31, 45].astype(int) - video[:, :, 44]).mean() < 6


@pytest.mark.parametrize("bad", [np.zeros((4, 8, 8), np.uint8), np.zeros((4, 8, 8, 4), np.uint8),
                                 np.zeros((4, 8, 8, 3), np.float32), np.zeros((0, 8, 8, 3), np.uint8)])
def test_bad_frames_are_errors(tmp_path, bad):
    with pytest.raises(StreamT1Error, match="frames"):
        write_mp4(tmp_path / "bad.mp4", bad)
    with pytest.raises(StreamT1Error, match="frames"):
        save_frame_strip(tmp_path / "bad.png", bad)
    assert list(tmp_path.iterdir()) == []


def test_bad_fps_and_missing_file(tmp_path):
    with pytest.raises(StreamT1Error, match="fps"):
        write_mp4(tmp_path / "x.mp4", smooth_video(), fps=0)
    with pytest.raises(StreamT1Error, match="codec"):
        write_mp4(tmp_path / "x.mp4", smooth_video(), codec="prores")
    with pytest.raises(StreamT1Error, match="not found"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(StreamT1Error, match="cannot read"):
        read_video(tmp_path / "junk.mp4")


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    import av

    target = tmp_path / "clip.mp4"
    write_mp4(target, smooth_video(frames=3))
    before = target.read_bytes()
    original = av.VideoFrame.from_ndarray
    calls = []

    def failing_from_ndarray(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing_from_ndarray)
    with pytest.raises(KeyboardInterrupt):
        write_mp4(target, smooth_video(frames=6))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_frame_strip(tmp_path):
    from PIL import Image

    video = smooth_video(frames=9, height=6, width=5)
    save_frame_strip(tmp_path / "strip.png", video, every=4)
    strip = np.asarray(Image.open(tmp_path / "strip.png"))
    assert strip.shape == (6, 15, 3)  # frames 0, 4 and 8 side by side, lossless
    assert np.array_equal(strip[:, 5:10], video[4])
    with pytest.raises(StreamT1Error, match="every"):
        save_frame_strip(tmp_path / "strip.png", video, every=0)


def test_to_uint8_frames():
    frames = torch.tensor([0.0, 0.5, 1.0, 2.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    out = to_uint8_frames(frames)
    assert out.shape == (4, 2, 2, 3) and out.dtype == np.uint8
    assert out[:, 0, 0, 0].tolist() == [0, 128, 255, 255]
    with pytest.raises(StreamT1Error, match="T, 3, H, W"):
        to_uint8_frames(torch.zeros(4, 2, 2, 3))
