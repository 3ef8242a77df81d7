"""The wire format of a generation request and of the POST answer, as pydantic models (FastAPI's OpenAPI
schema is built from them).

The models check only JSON types (strictly: ``"3"`` is not an integer here); every range and choice is
left to the engine's own checks (``SearchConfig``, ``StreamT1Engine.submit``), so the server answers with
the same one-line messages as the CLI. The search options are derived from ``SearchConfig``'s fields, not
typed again."""
from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, create_model

from ..search.config import SearchConfig


def _search_options_model() -> type[BaseModel]:
    """A pydantic model with one optional field per SearchConfig option (None: the engine's default)."""
    hints = typing.get_type_hints(SearchConfig)
    fields: dict[str, Any] = {}
    defaults = SearchConfig()
    for f in dataclasses.fields(SearchConfig):
        if f.name == "strategy":  # required here: SearchConfig's default differs from the request's "none"
            fields[f.name] = (hints[f.name], Field(description="none, best_of_n or stream_t1"))
        else:
            fields[f.name] = (hints[f.name] | None,
                              Field(default=None, description=f"default {getattr(defaults, f.name)!r}"))
    return create_model("SearchOptions", __config__=ConfigDict(strict=True, extra="forbid"), **fields)


SearchOptions = _search_options_model()
SearchOptions.__doc__ = "Search strategy and its options (SearchConfig's fields; unset ones keep its defaults)."


class GenerateRequest(BaseModel):
    """One stream. ``search`` is a strategy name or an object of SearchConfig options."""

    model_config = ConfigDict(strict=True, extra="forbid")

    prompt: str = Field(description="text prompt (not empty)")
    num_chunks: int = Field(default=3, description="final chunks to generate (at most the server's max_chunks)")
    seed: int = Field(default=42, description="seed in [0, 2**62)")
    search: str | SearchOptions = Field(default="none", description="strategy name or SearchConfig options")
    height: int | None = Field(default=None, description="frame height in pixels (default: the model's)")
    width: int | None = Field(default=None, description="frame width in pixels (default: the model's)")
    prompt_schedule: dict[Annotated[int, Strict(False)], str] | None = Field(
        default=None, description='prompt switches {"chunk index": "prompt"}, applied before that chunk '
                                  "(LongLive-style recache of the cached window)")
    stream_preset: str | None = Field(default=None, description="attention layout of this stream (self-forcing, "
                                                                "causvid, longlive, stream-t1; default: the model's)")

    def search_options(self) -> dict[str, Any]:
        """The SearchConfig options the request sets (the strategy at least), not yet checked."""
        if isinstance(self.search, str):
            return {"strategy": self.search}
        return {k: v for k, v in self.search.model_dump().items() if v is not None}

    def search_config(self) -> SearchConfig:
        """The request's SearchConfig; its own checks raise StreamT1Error on a bad choice or range."""
        return SearchConfig(**self.search_options())


class GenerateResponse(BaseModel):
    """The finished stream of ``POST /v1/generate``: the MP4 (base64) and its run record."""

    request_id: str
    status: str = Field(description="finished or stopped")
    num_frames: int
    fps: int
    video_mp4_base64: str = Field(description="the video, an H.264 (or MPEG-4) MP4, base64-encoded")
    record: dict[str, Any] = Field(description="run record: search, seeds, per-chunk records under 'chunks'")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: one line saying what is wrong."""

    error: str
    status: int


class SwitchPrompt(BaseModel):
    """WebSocket message (client to server): switch the stream's prompt at the next chunk boundary."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["switch_prompt"]
    prompt: str


class StopStream(BaseModel):
    """WebSocket message (client to server): finish early, with the final pick over what exists."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["stop"]


__all__ = ["ErrorResponse", "GenerateRequest", "GenerateResponse", "SearchOptions", "StopStream", "SwitchPrompt"]
