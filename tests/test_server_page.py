"""The player page at / in a real headless Chromium, driven over the DevTools protocol: it must draw the
frames of a stream as they arrive and list the per-chunk records."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

pytest.importorskip("fastapi", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("uvicorn", reason='needs the serve extra: pip install -e ".[serve]"')
httpx = pytest.importorskip("httpx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("websockets", reason='needs the serve extra: pip install -e ".[serve]"')

from websockets.sync.client import connect  # noqa: E402

from streamt1_engine.search.beam_search import BeamSearch  # noqa: E402
from streamt1_engine.serving.app import create_app  # noqa: E402
from streamt1_engine.serving.limits import ServerLimits  # noqa: E402
from streamt1_engine.serving.security import AccessPolicy  # noqa: E402

from server_helpers import LoopbackServer, tiny_engine_one_thread  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """A minimal Chrome DevTools protocol client on one page target."""

    def __init__(self, ws_url: str):
        self.ws = connect(ws_url, max_size=None).__enter__()
        self.last_id = 0

    def call(self, method: str, **params):
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == self.last_id:  # events of other domains are skipped
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        return self.evaluate(expression)

    def close(self):
        self.ws.__exit__(None, None, None)


@pytest.fixture()
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    profile = tmp_path / "profile"
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the browser's own process group, started above
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def engine():
    with tiny_engine_one_thread(max_streams=2, max_queue=2) as engine:
        yield engine


def test_page_renders_the_form_and_the_stream_path(engine):
    app = create_app(engine, ServerLimits(max_streams=2))
    with LoopbackServer(app) as server:
        page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="strategy"', 'id="player"', 'id="records"', 'id="new-prompt"', '"/v1/stream"'):
        assert element in page.text
    assert "{{" not in page.text


KEY = "page-Token_7"


@pytest.mark.parametrize("api_key", [None, KEY], ids=["open", "with-api-key"])
def test_page_plays_a_stream_in_headless_chromium(engine, browser, tmp_path, api_key):
    # with a key the page is opened at /?token=KEY and passes it on to its WebSocket (a browser sets no header)
    app = create_app(engine, ServerLimits(max_streams=2), access=AccessPolicy(api_key=api_key))
    with LoopbackServer(app) as server:
        if api_key is not None:
            assert httpx.get(server.url + "/").status_code == 401
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=server.url + "/" + (f"?token={api_key}" if api_key else ""))
        assert browser.wait_for("document.readyState === 'complete' && !!document.getElementById('start')", 20)
        browser.evaluate("""(() => {
            document.getElementById('prompt').value = 'a red circle moving right on a blue background';
            document.getElementById('num_chunks').value = '3';
            document.getElementById('strategy').value = 'stream_t1';
            document.getElementById('start').click();
        })()""")
        frames = "+document.getElementById('player').dataset.framesShown"
        assert browser.wait_for(f"{frames} >= 1", 30), "no frame of the stream was drawn on the page"
        assert browser.wait_for(f"{frames} >= 9", 30), browser.evaluate(frames)  # 3 chunks x 3 frames
        assert browser.wait_for("document.getElementById('status').textContent.startsWith('done: finished')", 10)
        rows = browser.evaluate("Array.from(document.querySelectorAll('#records tbody tr'))"
                                ".map(r => Array.from(r.cells).map(c => c.textContent))")
        assert [r[0] for r in rows] == ["0", "1", "2"]
        assert all(r[3] != "-" and r[6] for r in rows), rows  # stream_t1: scores and survivors per chunk
        # the canvas shows a picture (the tiny model's blue background), not the empty black canvas
        blue = browser.evaluate("""(() => {
            const d = document.getElementById('player').getContext('2d').getImageData(0, 0, 256, 256).data;
            let b = 0; for (let i = 0; i < d.length; i += 4) b += d[i + 2]; return b / (d.length / 4);
        })()""")
        assert blue > 100, blue
        shot = browser.call("Page.captureScreenshot", format="png")
        (tmp_path / "page.png").write_bytes(__import__("base64").b64decode(shot["data"]))

        # the switch box: a prompt switch mid-stream reaches the server, whose answer the page shows
        browser.evaluate("document.getElementById('num_chunks').value = '30'; document.getElementById('strategy').value = 'none';"
                         "document.getElementById('start').click()")
        assert browser.wait_for("!document.getElementById('switch').disabled", 30)  # enabled once accepted
        browser.evaluate("document.getElementById('switch').click()")
        log = "Array.from(document.querySelectorAll('#log li')).map(li => li.textContent).join('|')"
        assert browser.wait_for(f"({log}).includes('done: finished')", 30), browser.evaluate(log)
        if hasattr(BeamSearch, "switch_prompt"):
            assert "switch accepted: a green square on a black background" in browser.evaluate(log)
        else:  # the page shows the server's answer either way
            assert "error 422: prompt switching is not available" in browser.evaluate(log)
