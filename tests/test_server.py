"""`streamt1 serve` over loopback: real uvicorn, real httpx / websockets clients, the embedded tiny model."""
from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("uvicorn", reason='needs the serve extra: pip install -e ".[serve]"')
httpx = pytest.importorskip("httpx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("websockets", reason='needs the serve extra: pip install -e ".[serve]"')

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from streamt1_engine import SearchConfig, StreamT1Engine, StreamT1Error  # noqa: E402
from streamt1_engine.search.beam_search import BeamSearch  # noqa: E402
from streamt1_engine.serving.app import create_app  # noqa: E402
from streamt1_engine.serving.limits import ServerLimits  # noqa: E402
from streamt1_engine.serving.schemas import GenerateRequest  # noqa: E402

from server_helpers import LoopbackServer, metric_value, tiny_engine_one_thread, wait_until  # noqa: E402

PROMPT = "a red circle moving right on a blue background"
LIMITS = ServerLimits(max_streams=6, max_chunks=40, max_candidates=8, max_body_bytes=4096)


@pytest.fixture(scope="module")
def engine():
    with tiny_engine_one_thread(max_streams=4, max_queue=8) as engine:
        yield engine


def decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


async def ws_stream(url: str, request: dict, on_chunk=None) -> dict:
    """Run one stream over the WebSocket: the chunk messages, their decoded frames, the final message."""
    chunks, frames, messages = [], [], []
    async with connect(url + "/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps(request))
        accepted = json.loads(await ws.recv())
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosed:  # after a refusal
                break
            assert isinstance(message, str), "a binary frame arrived outside a chunk"
            data = json.loads(message)
            if data["type"] != "chunk":
                messages.append(data)
                if data["type"] == "done":
                    break
                continue
            chunks.append(data)
            for _ in range(data["num_frames"]):
                image = await ws.recv()
                assert isinstance(image, bytes)
                frames.append(decode_jpeg(image))
            if on_chunk is not None:
                await on_chunk(ws, data)
    return {"accepted": accepted, "chunks": chunks, "frames": np.stack(frames) if frames else None,
            "messages": messages, "done": messages[-1] if messages else None}


def close_to(frames: np.ndarray, reference) -> float:
    """Mean absolute difference in uint8 levels (the wire's JPEG is lossy)."""
    return float(np.abs(frames.astype(np.float32) - np.asarray(reference, dtype=np.float32)).mean())


def test_four_concurrent_streams_bad_requests_and_a_disconnect(engine):
    requests = [dict(prompt=PROMPT, num_chunks=3, seed=1),
                dict(prompt="a green square on a black background", num_chunks=3, seed=2,
                     search={"strategy": "best_of_n", "num_candidates": 2}),
                dict(prompt=PROMPT, num_chunks=3, seed=3, search={"strategy": "stream_t1", "beam_size": 2, "top_k": 2}),
                dict(prompt="a yellow triangle", num_chunks=3, seed=4, search="none")]
    references = [engine.generate(r["prompt"], num_chunks=3, seed=r["seed"],
                                  search=GenerateRequest.model_validate(r).search_config()) for r in requests]
    app = create_app(engine, LIMITS)
    with LoopbackServer(app) as server:

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                post = client.post("/v1/generate", json=requests[3])
                return await asyncio.gather(*(ws_stream(server.ws_url, r) for r in requests[:3]), post)

        *streamed, posted = asyncio.run(main())
        for request, result, reference in zip(requests, streamed, references):
            assert result["accepted"]["type"] == "accepted"
            assert [c["index"] for c in result["chunks"]] == [0, 1, 2]
            assert [c["seed"] for c in result["chunks"]] == reference.info["chunk_seeds"]
            assert result["frames"].shape == tuple(reference.frames.shape)
            assert close_to(result["frames"], reference.frames) < 4.0
            for got, want in zip([c["record"] for c in result["chunks"]], reference.chunks):
                assert same_record(got, want.to_dict())
            done = result["done"]
            assert done["type"] == "done" and done["status"] == "finished"
            assert len(done["record"]["chunks"]) == 3
            assert done["record"]["search"]["strategy"] == GenerateRequest.model_validate(request).search_config().strategy
        assert posted.status_code == 200, posted.text
        body = posted.json()
        assert body["status"] == "finished" and body["num_frames"] == reference_frames(references[3])
        video = read_mp4(base64.b64decode(body["video_mp4_base64"]))
        assert video.shape[0] == references[3].frames.shape[0]
        assert close_to(video, references[3].frames) < 12.0
        assert [c["candidate_seeds"] for c in body["record"]["chunks"]] == \
            [r.candidate_seeds for r in references[3].chunks]

        bad = {
            "empty prompt": (dict(prompt="  ", num_chunks=2), 422, "prompt is empty"),
            "too many chunks": (dict(prompt=PROMPT, num_chunks=41), 422, "limit of 40"),
            "unknown search": (dict(prompt=PROMPT, search="beam"), 422, "unknown search strategy 'beam'"),
            "too many candidates": (dict(prompt=PROMPT, search={"strategy": "best_of_n", "num_candidates": 9}), 422,
                                    "limit of 8"),
            "a string for an integer": (dict(prompt=PROMPT, num_chunks="3"), 422, "num_chunks"),
            "unknown stream preset": (dict(prompt=PROMPT, stream_preset="wide"), 422, "unknown stream preset 'wide'"),
        }
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for name, (payload, status, text) in bad.items():
                answer = client.post("/v1/generate", json=payload)
                assert answer.status_code == status, (name, answer.text)
                assert text in answer.json()["error"] and "\n" not in answer.json()["error"], (name, answer.text)
            answer = client.post("/v1/generate", content=b'{"prompt": "a red', headers={"content-type": "application/json"})
            assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"], answer.text
            answer = client.post("/v1/generate", json=dict(prompt="x" * 5000))
            assert answer.status_code == 413 and "4096" in answer.json()["error"], answer.text

            def chunked():  # no Content-Length: counted as it arrives
                yield b'{"prompt": "'
                for _ in range(10):
                    yield b"y" * 1000
                yield b'"}'

            answer = client.post("/v1/generate", content=chunked(), headers={"content-type": "application/json"})
            assert answer.status_code == 413, answer.text

        cancelled_before = engine.stats()["streams_cancelled"]

        async def leave_after_first_chunk():
            async with connect(server.ws_url + "/v1/stream") as ws:
                await ws.send(json.dumps(dict(prompt=PROMPT, num_chunks=40, seed=5)))
                assert json.loads(await ws.recv())["type"] == "accepted"
                first = json.loads(await ws.recv())
                assert first["type"] == "chunk" and first["index"] == 0
            # the context manager closed the connection mid-stream

        asyncio.run(leave_after_first_chunk())
        assert wait_until(lambda: engine.stats()["streams_cancelled"] > cancelled_before, 10)
        assert wait_until(lambda: engine.stats()["pages_in_use"] == 0, 10), engine.stats()
        with pytest.raises(httpx.ReadTimeout):  # a POST client that gives up waiting
            httpx.post(server.url + "/v1/generate", json=dict(prompt=PROMPT, num_chunks=40, seed=8),
                       timeout=httpx.Timeout(10, read=0.3))
        assert wait_until(lambda: engine.stats()["streams_cancelled"] > cancelled_before + 1, 10)
        assert wait_until(lambda: engine.stats()["pages_in_use"] == 0, 10), engine.stats()
        assert engine.stats()["running"] == 0 and engine.stats()["queued"] == 0

        metrics = httpx.get(server.url + "/metrics").text
        assert metric_value(metrics, "streamt1_requests_total", transport="websocket", outcome="finished") == 3
        assert metric_value(metrics, "streamt1_requests_total", transport="http", outcome="finished") == 1
        assert metric_value(metrics, "streamt1_requests_total", transport="http", outcome="invalid") == len(bad) + 3
        for transport in ("websocket", "http"):
            assert wait_until(lambda: metric_value(httpx.get(server.url + "/metrics").text, "streamt1_requests_total",
                                                   transport=transport, outcome="disconnected") == 1, 5), transport
        assert metric_value(metrics, "streamt1_kv_pages_in_use") == 0
        assert metric_value(metrics, "streamt1_streams_in_flight") == 0
        assert metric_value(metrics, "streamt1_chunks_sent_total") >= 4 * 3 + 1
        assert metric_value(metrics, "streamt1_chunks_per_second") > 0
        assert metric_value(metrics, "streamt1_engine_chunks_total") >= 4 * 3
        assert "# TYPE streamt1_queue_length gauge" in metrics
        assert httpx.get(server.url + "/health").json()["status"] == "ok"


def same_record(got: dict, want: dict) -> bool:
    """Same seeds and decisions; scores equal up to float noise (candidates batch with other streams')."""
    assert set(got) == set(want)
    for key, value in want.items():
        if key.endswith("_scores") and value is not None:
            assert np.allclose(got[key], value, atol=1e-4), (key, got[key], value)
        elif key == "hybrid_weight" and value is not None:
            assert abs(got[key] - value) < 1e-4
        else:
            assert got[key] == json.loads(json.dumps(value)), key
    return True


def reference_frames(result) -> int:
    return int(result.frames.shape[0])


def read_mp4(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_busy_server_answers_429_and_websocket_refusals(engine):
    app = create_app(engine, ServerLimits(max_streams=1, max_chunks=40, max_body_bytes=1024))
    with LoopbackServer(app) as server:

        async def main():
            async with connect(server.ws_url + "/v1/stream") as holder:  # holds the one slot, reads slowly
                await holder.send(json.dumps(dict(prompt=PROMPT, num_chunks=40, seed=6)))
                assert json.loads(await holder.recv())["type"] == "accepted"
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                    busy = await client.post("/v1/generate", json=dict(prompt=PROMPT, num_chunks=2))
                async with connect(server.ws_url + "/v1/stream") as second:
                    await second.send(json.dumps(dict(prompt=PROMPT, num_chunks=2)))
                    refused = json.loads(await second.recv())
                    with pytest.raises(ConnectionClosed) as closed:
                        await second.recv()
            return busy, refused, closed.value

        busy, refused, closed = asyncio.run(main())
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
        assert refused == {"type": "error", "status": 429, "error": refused["error"]} and "busy" in refused["error"]
        assert closed.rcvd.code == 4429
        # the holder's slot comes back once the server has seen it leave
        assert wait_until(lambda: httpx.get(server.url + "/health").json()["streams_in_flight"] == 0, 10)

        async def refusal(message):
            async with connect(server.ws_url + "/v1/stream") as ws:
                await ws.send(message)
                answer = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                return answer, closed.value.rcvd.code

        assert asyncio.run(refusal('{"prompt": ')) [1] == 4400
        answer, code = asyncio.run(refusal(json.dumps(dict(prompt=""))))
        assert (answer["status"], code) == (422, 4422) and answer["error"] == "prompt is empty"
        answer, code = asyncio.run(refusal(json.dumps(dict(prompt="z" * 2000))))
        assert (answer["status"], code) == (413, 4413)
        answer, code = asyncio.run(refusal(json.dumps(dict(prompt=PROMPT, colour="red"))))
        assert (answer["status"], code) == (422, 4422) and "colour" in answer["error"]
        assert wait_until(lambda: engine.stats()["pages_in_use"] == 0, 10), engine.stats()
        metrics = httpx.get(server.url + "/metrics").text
        assert metric_value(metrics, "streamt1_requests_total", transport="http", outcome="rejected") == 1
        assert metric_value(metrics, "streamt1_requests_total", transport="websocket", outcome="rejected") == 1
        assert metric_value(metrics, "streamt1_requests_total", transport="websocket", outcome="invalid") == 4


def test_concurrent_arrivals_fill_the_engine_slots_and_queue_then_503():
    """Engine at max_streams 2, max_queue 2: four WebSockets arriving at once are all accepted (two run, two
    wait), the fifth is refused with the one-line "queue is full"; repeated, since the fault was a race."""
    small = StreamT1Engine.from_pretrained("tiny", max_streams=2, max_queue=2)
    app = create_app(small, ServerLimits(max_streams=8, max_chunks=40))
    try:
        with LoopbackServer(app) as server:
            async def arrive(ws):
                await ws.send(json.dumps(dict(prompt=PROMPT, num_chunks=40)))
                return json.loads(await ws.recv())

            async def main():
                sockets = [connect(server.ws_url + "/v1/stream") for _ in range(5)]
                opened = [await s.__aenter__() for s in sockets]
                try:
                    first = await asyncio.gather(*(arrive(ws) for ws in opened[:4]))  # neither reads on after this
                    fifth = await arrive(opened[4])
                    return first, fifth
                finally:
                    for s in sockets:
                        await s.__aexit__(None, None, None)

            for _ in range(3):
                first, fifth = asyncio.run(main())
                assert [m["type"] for m in first] == ["accepted"] * 4, first
                assert fifth["type"] == "error" and fifth["status"] == 503 and "queue is full" in fifth["error"], fifth
                assert wait_until(lambda: small.stats()["pages_in_use"] == 0 and small.stats()["running"] == 0, 20)
    finally:
        small.close()


def test_full_engine_queue_answers_503():
    small = StreamT1Engine.from_pretrained("tiny", max_streams=1, max_queue=1)
    app = create_app(small, ServerLimits(max_streams=4, max_chunks=40))
    try:
        with LoopbackServer(app) as server:
            async def main():
                async with connect(server.ws_url + "/v1/stream") as running, \
                        connect(server.ws_url + "/v1/stream") as queued:  # neither reads: both stay in the engine
                    for ws in (running, queued):
                        await ws.send(json.dumps(dict(prompt=PROMPT, num_chunks=40)))
                        assert json.loads(await ws.recv())["type"] == "accepted"
                    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                        return await client.post("/v1/generate", json=dict(prompt=PROMPT, num_chunks=2))

            answer = asyncio.run(main())
            assert answer.status_code == 503 and "queue is full" in answer.json()["error"], answer.text
            assert wait_until(lambda: small.stats()["pages_in_use"] == 0 and small.stats()["running"] == 0, 10)
    finally:
        small.close()


@pytest.mark.skipif(not hasattr(BeamSearch, "switch_prompt"),
                    reason="this build has no prompt switching core (BeamSearch.switch_prompt)")
def test_prompt_schedule_and_switch_message_reach_the_stream(engine):
    other = "a green square on a black background"
    plain = engine.generate(PROMPT, num_chunks=4, seed=7)
    app = create_app(engine, LIMITS)
    with LoopbackServer(app) as server:
        scheduled = asyncio.run(ws_stream(server.ws_url, dict(prompt=PROMPT, num_chunks=4, seed=7,
                                                              prompt_schedule={"2": other})))
        per_chunk = plain.frames.shape[0] // 4
        assert scheduled["done"]["status"] == "finished"
        assert close_to(scheduled["frames"][:2 * per_chunk], plain.frames[:2 * per_chunk]) < 4.0
        assert close_to(scheduled["frames"][2 * per_chunk:], plain.frames[2 * per_chunk:]) > 12.0
        [switch] = scheduled["done"]["record"]["prompt_switches"]
        assert (switch["chunk"], switch["prompt"]) == (2, other) and switch["recached_chunks"]

        async def switch_once(ws, chunk):
            if chunk["index"] == 0:
                await ws.send(json.dumps({"type": "switch_prompt", "prompt": "   "}))  # refused, the stream goes on
                await ws.send(json.dumps({"type": "rewind"}))
                await ws.send(json.dumps({"type": "switch_prompt", "prompt": other}))

        plain8 = engine.generate(PROMPT, num_chunks=8, seed=7)
        switched = asyncio.run(ws_stream(server.ws_url, dict(prompt=PROMPT, num_chunks=8, seed=7), switch_once))
        kinds = [(m["type"], m.get("status")) for m in switched["messages"]]
        assert kinds == [("error", 422), ("error", 422), ("switch_accepted", None), ("done", "finished")], kinds
        assert switched["done"]["status"] == "finished"
        [switch] = switched["done"]["record"]["prompt_switches"]
        assert switch["prompt"] == other and 1 <= switch["chunk"] <= 4  # within the chunks buffered ahead
        # the switch lands within the few chunks the stream may run ahead of its client
        tail = slice(-2 * per_chunk, None)
        assert close_to(switched["frames"][tail], plain8.frames[tail]) > 12.0
        assert close_to(switched["frames"][:per_chunk], plain8.frames[:per_chunk]) < 4.0


def test_stop_message_finishes_the_stream_early(engine):
    app = create_app(engine, LIMITS)
    with LoopbackServer(app) as server:
        async def stop_at_first_chunk(ws, chunk):
            if chunk["index"] == 0:
                await ws.send(json.dumps({"type": "stop"}))

        result = asyncio.run(ws_stream(server.ws_url, dict(prompt=PROMPT, num_chunks=40, seed=9), stop_at_first_chunk))
        assert [m["type"] for m in result["messages"]] == ["stop_accepted", "done"]
        assert result["done"]["status"] == "stopped"
        sent = [c["index"] for c in result["chunks"]]
        assert sent == list(range(len(sent))) and 1 <= len(sent) < 40
        assert len(result["done"]["record"]["chunks"]) == len(sent)
        metrics = httpx.get(server.url + "/metrics").text
        assert metric_value(metrics, "streamt1_requests_total", transport="websocket", outcome="stopped") == 1
    assert engine.stats()["pages_in_use"] == 0


def test_openapi_schema_matches_the_routes_and_request_models(engine):
    from fastapi.routing import APIRoute

    from streamt1_engine.serving.schemas import GenerateResponse, SearchOptions

    app = create_app(engine, LIMITS)
    with LoopbackServer(app) as server:
        schema = httpx.get(server.url + "/openapi.json").json()
        page = httpx.get(server.url + "/")
    routes = {(r.path, m) for r in app.routes if isinstance(r, APIRoute) for m in r.methods}
    documented = {(path, m.upper()) for path, ops in schema["paths"].items() for m in ops}
    assert routes == documented == {("/", "GET"), ("/health", "GET"), ("/metrics", "GET"), ("/v1/generate", "POST")}
    post = schema["paths"]["/v1/generate"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/GenerateRequest"
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"] == \
        "#/components/schemas/GenerateResponse"
    for code in ("400", "413", "422", "429", "503", "500"):
        assert post["responses"][code]["content"]["application/json"]["schema"]["$ref"] == \
            "#/components/schemas/ErrorResponse"
    components = schema["components"]["schemas"]
    assert set(components["GenerateRequest"]["properties"]) == set(GenerateRequest.model_fields)
    assert components["GenerateRequest"]["required"] == ["prompt"]
    assert components["GenerateRequest"]["additionalProperties"] is False
    assert set(components["SearchOptions"]["properties"]) == set(SearchConfig.__dataclass_fields__)
    assert set(components["GenerateResponse"]["properties"]) == set(GenerateResponse.model_fields)
    assert set(SearchOptions.model_fields) == set(SearchConfig.__dataclass_fields__)
    ws = schema["x-websockets"]["/v1/stream"]
    refs = [ws["first_message"]["$ref"]] + [m["$ref"] for m in ws["client_messages"]]
    for ref in refs:
        assert ref.rsplit("/", 1)[1] in components
    assert components["SwitchPrompt"]["properties"]["type"]["const"] == "switch_prompt"
    assert page.status_code == 200 and "/v1/stream" in page.text


def test_records_travel_as_strict_json():
    import math

    import torch

    from streamt1_engine.serving.frames import json_safe

    record = {"scores": torch.tensor([0.5, float("nan")]), "weight": np.float32(0.25), "seeds": (np.int64(3), 4),
              "cap": math.inf, "ok": True, "flags": ["EMA"]}
    safe = json_safe(record)
    assert safe == {"scores": [0.5, None], "weight": 0.25, "seeds": [3, 4], "cap": None, "ok": True, "flags": ["EMA"]}
    json.dumps(safe, allow_nan=False)


def test_server_limits_are_checked():
    with pytest.raises(StreamT1Error, match="max_streams"):
        ServerLimits(max_streams=0)
    with pytest.raises(StreamT1Error, match="max_chunks must be an integer"):
        ServerLimits(max_chunks=2.5)
    from streamt1_engine.cli import main

    assert main(["serve", "--max-chunks", "0", "--port", "1"]) == 2  # refused before any model loads
