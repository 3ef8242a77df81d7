"""The HTTP/WebSocket server over one multi-stream engine: ``create_app(engine)`` is a FastAPI app.

Routes: ``GET /`` the player page, ``GET /health``, ``GET /metrics`` (Prometheus text), ``POST /v1/generate``
(the finished MP4 and run record), ``WS /v1/stream`` (each final chunk as it is made). Every refusal is one
JSON line ``{"error": ..., "status": ...}``: 400 a body that is not JSON, 413 a body over the size limit,
422 a field the engine's checks (or the server's chunk/candidate limits) refuse, 429 the server's stream
limit reached, 503 the engine's queue full; before any route, 400 a Host that does not name the server, 403 a
page of a foreign Origin, 401 a missing or wrong API key (``security``)."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.websockets import WebSocketDisconnect

from .frames import Mp4Bytes, run_record
from .limits import BodyLimit, ServerLimits, StreamSlots
from .metrics import ServerMetrics
from .page import page_html
from .refusals import ERROR_RESPONSES, ApiError, classify, outcome_of, validation_message
from .relay import ChunkRelay
from .schemas import GenerateRequest, GenerateResponse, StopStream, SwitchPrompt
from .security import AccessGuard, AccessPolicy
from .websocket import refuse, serve_stream

log = logging.getLogger("streamt1.serve")
STREAM_PATH = "/v1/stream"
GENERATE_PATH = "/v1/generate"


def create_app(engine, limits: ServerLimits | None = None, *, submit_options: dict | None = None,
               instance: str | None = None, close_engine: bool = False,
               access: AccessPolicy | None = None) -> FastAPI:
    """``submit_options``: passed to every ``engine.submit`` (the rewards: ``short_reward``, ``long_reward``,
    ``final_reward``; chosen by whoever starts the server, since a reward name can load a checkpoint).
    ``instance``: a name /health and the run records report (e.g. the Ray replica). ``close_engine``: close
    it when the app shuts down. ``access``: which Host, Origin and token a request must bring (``security``;
    default: loopback names or IP addresses, the server's own origin, no token)."""
    limits = limits or ServerLimits()
    access = access if access is not None else AccessPolicy()
    submit_options = dict(submit_options or {})
    metrics = ServerMetrics()
    slots = StreamSlots(limits.max_streams)
    # one blocking chunk reader per stream in flight, plus cancels and submits
    workers = ThreadPoolExecutor(max_workers=2 * limits.max_streams + 2, thread_name_prefix="streamt1-serve")

    @asynccontextmanager
    async def lifespan(app):
        yield
        workers.shutdown(wait=False, cancel_futures=True)
        if close_engine:
            engine.close()

    app = FastAPI(title="streamt1-engine", version=_version(), lifespan=lifespan, description=(
        __doc__ + "\n\nWebSocket `" + STREAM_PATH + "`: send a GenerateRequest as the first text message; the server "
        "answers `accepted`, then per final chunk a `chunk` text message (index, seed, record) followed by its frames "
        "as binary JPEG messages, then `done` (status, run record). During the stream the client may send "
        "SwitchPrompt or StopStream. A refusal is an `error` message, then a close with code 4000 + HTTP status."))
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes,
                       on_reject=lambda scope: metrics.request("http", "invalid"))
    # outermost (added last): no route, body parsing or size check runs for a request the policy refuses
    app.add_middleware(AccessGuard, policy=access, on_refuse=lambda scope: metrics.request(
        "websocket" if scope["type"] == "websocket" else "http", "forbidden"))
    app.state.engine, app.state.limits, app.state.metrics, app.state.slots = engine, limits, metrics, slots
    app.state.access = access

    def error_response(request: Request, err: ApiError) -> JSONResponse:
        if request.url.path.startswith("/v1/") and not err.counted:
            metrics.request("http", outcome_of(err.status))
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        return JSONResponse({"error": err.message, "status": err.status}, status_code=err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        bad_json = [e for e in errors if e.get("type") == "json_invalid"]
        if bad_json:
            detail = (bad_json[0].get("ctx") or {}).get("error", "")
            return error_response(request, ApiError(400, f"body is not valid JSON{': ' + detail if detail else ''}"))
        return error_response(request, ApiError(422, validation_message(errors)))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        return error_response(request, ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(request, exc)

    async def in_worker(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(workers, fn, *args)

    def checked_search(req: GenerateRequest):
        """The request's numbers against the limits first, then its SearchConfig (whose own checks are bounded
        too); run in a worker, so that no check, however slow, holds the event loop."""
        limits.check_requested(req.num_chunks, req.search_options())
        search = req.search_config()
        limits.check(req.num_chunks, search)
        return search

    async def start(req: GenerateRequest):
        """Checks, a slot, then ``engine.submit``; any refusal raises ApiError (the slot is given back)."""
        try:
            search = await in_worker(checked_search, req)
            slots.take()
        except Exception as exc:
            raise classify(exc) from None
        try:
            return await in_worker(lambda: engine.submit(
                req.prompt, num_chunks=req.num_chunks, seed=req.seed, search=search, height=req.height,
                width=req.width, prompt_schedule=req.prompt_schedule, stream_preset=req.stream_preset,
                max_buffered_chunks=limits.buffered_chunks,
                **submit_options))
        except Exception as exc:
            slots.give_back()
            raise classify(exc) from None

    async def final_record(handle) -> dict:
        record = await in_worker(run_record, handle)
        if instance is not None:
            record["served_by"] = instance
        return record

    @app.get("/", response_class=HTMLResponse, summary="the player page")
    async def index():
        return HTMLResponse(page_html(STREAM_PATH))

    @app.get("/health", summary="liveness and load")
    async def health() -> dict:
        return {"status": "ok", "model": getattr(engine, "name", None), "instance": instance,
                "streams_in_flight": slots.used, "max_streams_in_flight": limits.max_streams}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats(), slots.used),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post(GENERATE_PATH, response_model=GenerateResponse, responses=ERROR_RESPONSES,
              summary="generate a whole video: the MP4 and its run record")
    async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
        handle = await start(body)
        outcome, video = "failed", None
        gone = asyncio.create_task(_client_gone(request))
        try:
            video = Mp4Bytes(getattr(engine, "fps", 16))
            relay = ChunkRelay(handle, workers, video.append)
            while True:
                step = asyncio.create_task(relay.next())
                done, _ = await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:  # the client left: drop the stream and its pages now
                    outcome = "disconnected"
                    await in_worker(handle.cancel)
                    step.cancel()
                    raise ApiError(499, "client disconnected", counted=True)
                item = step.result()
                if item is None:
                    break
                metrics.chunk_sent()
            if handle.status not in ("finished", "stopped"):
                raise ApiError(500, f"stream ended {handle.status}", counted=True)
            data = await in_worker(video.finish)
            record = await final_record(handle)
            outcome = handle.status
            return GenerateResponse(request_id=handle.request_id, status=handle.status,
                                    num_frames=video.writer.frames_written, fps=getattr(engine, "fps", 16),
                                    video_mp4_base64=base64.b64encode(data).decode("ascii"), record=record)
        except ApiError:
            raise
        except Exception as exc:
            log.exception("stream %s failed", handle.request_id)
            raise ApiError(500, f"stream failed: {exc}", counted=True) from None
        finally:
            gone.cancel()
            if video is not None:
                video.abort()
            if handle.status in ("queued", "running"):
                await in_worker(handle.cancel)
            slots.give_back()
            metrics.request("http", outcome)

    @app.websocket(STREAM_PATH)
    async def stream(ws: WebSocket):
        await ws.accept()
        try:
            text = await ws.receive_text()
        except WebSocketDisconnect:
            return
        except (KeyError, RuntimeError):  # a binary first message
            await refuse(ws, metrics, ApiError(400, "the first message must be a JSON text message"))
            return
        try:
            limits.check_size(len(text.encode("utf-8")))
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ApiError(400, f"message is not valid JSON: {exc}") from None
            req = GenerateRequest.model_validate(data)
            handle = await start(req)
        except Exception as exc:
            await refuse(ws, metrics, classify(exc))
            return
        outcome = "failed"
        try:
            outcome = await serve_stream(ws, handle, workers, metrics, in_worker, getattr(engine, "fps", 16))
            if outcome in ("finished", "stopped"):
                await ws.send_json({"type": "done", "status": outcome, "record": await final_record(handle)})
                await ws.close(1000)
            elif outcome == "failed":
                await refuse(ws, None, ApiError(500, f"stream ended {handle.status}"))
        except (WebSocketDisconnect, RuntimeError, OSError):
            outcome = "disconnected"
        except Exception as exc:
            log.exception("stream %s failed", handle.request_id)
            await refuse(ws, None, ApiError(500, f"stream failed: {exc}"))
        finally:
            if handle.status in ("queued", "running"):
                await in_worker(handle.cancel)
            slots.give_back()
            metrics.request("websocket", outcome)

    _add_websocket_schemas(app)
    return app


async def _client_gone(request: Request) -> None:
    """Returns when the HTTP client disconnects (the body has been read, so the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _add_websocket_schemas(app: FastAPI) -> None:
    """FastAPI leaves WebSocket routes out of OpenAPI: the stream's messages are added as components and the
    route under ``x-websockets``, so the schema still names everything the server accepts."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (GenerateRequest, SwitchPrompt, StopStream):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in model_schema.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components.setdefault(model.__name__, model_schema)
            schema["x-websockets"] = {STREAM_PATH: {
                "first_message": {"$ref": "#/components/schemas/GenerateRequest"},
                "client_messages": [{"$ref": "#/components/schemas/SwitchPrompt"},
                                    {"$ref": "#/components/schemas/StopStream"}],
                "server_messages": ["accepted", "chunk (then one binary JPEG message per frame)", "switch_accepted",
                                    "stop_accepted", "error", "done"]}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _version() -> str:
    from .. import __version__

    return __version__


__all__ = ["create_app"]
