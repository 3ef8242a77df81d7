"""One stream over a WebSocket: the chunks go out as they are made while the client's messages
(switch_prompt, stop) come in; a client that leaves cancels its stream."""
from __future__ import annotations

import asyncio
import json

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from .frames import jpeg_frames
from .metrics import ServerMetrics
from .refusals import ApiError, classify, outcome_of
from .relay import ChunkRelay
from .schemas import StopStream, SwitchPrompt


async def serve_stream(ws: WebSocket, handle, workers, metrics: ServerMetrics, in_worker, fps: int) -> str:
    """Send the chunks while reading the client's messages; the outcome: finished, stopped, disconnected or
    failed. A client that leaves cancels the stream at once (its pages go back to the pool)."""
    await ws.send_json({"type": "accepted", "request_id": handle.request_id, "fps": fps})
    relay = ChunkRelay(handle, workers, jpeg_frames)

    async def send_chunks():
        while True:
            item = await relay.next()
            if item is None:
                return
            await ws.send_json({"type": "chunk", "index": item.index, "seed": item.seed, "num_frames": item.num_frames,
                                "height": item.height, "width": item.width, "record": item.record})
            for jpeg in item.payload:
                await ws.send_bytes(jpeg)
            metrics.chunk_sent()

    async def read_messages():
        while True:
            try:
                text = await ws.receive_text()
            except WebSocketDisconnect:
                return
            except (KeyError, RuntimeError):  # binary message, or the socket is closed
                if ws.client_state != WebSocketState.CONNECTED:
                    return
                await ws.send_json({"type": "error", "status": 400, "error": "messages must be JSON text"})
                continue
            await client_message(ws, handle, text, in_worker)

    sender, reader = asyncio.create_task(send_chunks()), asyncio.create_task(read_messages())
    try:
        done, _ = await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done:
            sender.result()  # a failed stream raises here
            return handle.status if handle.status in ("finished", "stopped") else "failed"
        await in_worker(handle.cancel)  # the client left before the end
        return "disconnected"
    finally:
        for task in (sender, reader):
            task.cancel()


async def client_message(ws: WebSocket, handle, text: str, in_worker) -> None:
    """switch_prompt / stop; anything else is answered with a (non-fatal) error message."""
    try:
        data = json.loads(text)
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "switch_prompt":
            message = SwitchPrompt.model_validate(data)
            await in_worker(handle.switch_prompt, message.prompt)
            await ws.send_json({"type": "switch_accepted", "prompt": message.prompt})
        elif kind == "stop":
            StopStream.model_validate(data)
            await in_worker(handle.stop)
            await ws.send_json({"type": "stop_accepted"})
        else:
            raise ApiError(422, f"unknown message type {kind!r}; expected switch_prompt or stop")
    except json.JSONDecodeError as exc:
        await ws.send_json({"type": "error", "status": 400, "error": f"message is not valid JSON: {exc}"})
    except Exception as exc:
        err = classify(exc)
        await ws.send_json({"type": "error", "status": err.status, "error": err.message})


async def refuse(ws: WebSocket, metrics: ServerMetrics | None, err: ApiError) -> None:
    if metrics is not None:
        metrics.request("websocket", outcome_of(err.status))
    try:
        await ws.send_json({"type": "error", "status": err.status, "error": err.message})
        await ws.close(code=4000 + err.status, reason=err.message[:120])
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
