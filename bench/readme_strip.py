"""Redraw the README's frame strip: the README's first command (embedded model, Stream-T1 search, seed 42,
7 chunks), every frame side by side, each pixel drawn 3x3.

    python bench/readme_strip.py                 # writes docs/tiny_stream_t1_strip.png
    python bench/readme_strip.py --out strip.png

Run it whenever the shipped weights or the search defaults change, so the README shows what the command gives.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from streamt1_engine.engine import StreamT1Engine
from streamt1_engine.search.config import SearchConfig

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle moving right on a blue background"  # the README's first command


def strip(frames: torch.Tensor, scale: int = 3) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [H*scale, T*W*scale, 3]."""
    big = frames.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return torch.cat(list(big), dim=1)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tiny_stream_t1_strip.png")
    args = parser.parse_args(argv)
    from PIL import Image

    engine = StreamT1Engine.from_pretrained("tiny", device="cpu")
    result = engine.generate(PROMPT, num_chunks=7, seed=42, search=SearchConfig(strategy="stream_t1"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip(result.frames).numpy()).save(args.out)
    print(f"wrote {args.out} ({result.frames.shape[0]} frames)")
    return args.out


if __name__ == "__main__":
    main()
