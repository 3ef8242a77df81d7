"""The player page at ``/``: a prompt and search form, the stream drawn frame by frame as it arrives, the
per-chunk scores and routing decisions beside it, and a prompt-switch box. One static file, no build step."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def _template() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def page_html(stream_path: str) -> str:
    return _template().replace("{{STREAM_PATH}}", stream_path)
