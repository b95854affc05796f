"""The web inspector in a real headless Chromium: live rows, the detail pane, replay.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the ``playwright`` Python package; the test
skips without them. Playwright's own browser download is not used: it launches Debian's build.

The proxy is stood in for by ``Service.through_proxy``, which records an Exchange around a real
request to a tiny local HTTP service, and by a replay function that really re-sends the recorded
request to that service (the end-to-end version through ``burrow http`` lives elsewhere)."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from burrow.http.inspector import ExchangeStore, Inspector
from burrow.http.record import Exchange

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/inspector.png")
HOP_BY_HOP = {"host", "connection", "content-length", "transfer-encoding", "keep-alive"}

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
    ),
]
playwright_api = pytest.importorskip(
    "playwright.async_api", reason="needs the playwright package (pip install playwright)"
)


class _Handler(BaseHTTPRequestHandler):
    server: _ServiceServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.partition("?")[0]
        with self.server.lock:
            self.server.counts[path] += 1
            self.server.bodies.append(body)
            count = self.server.counts[path]
        if path == "/missing":
            status, ctype, payload = 404, "text/plain", b"not here\n"
        elif path == "/logo.png":
            status, ctype, payload = 200, "image/png", b"\x89PNG\r\n\x1a\n" + bytes(range(64))
        else:
            status, ctype = 200, "application/json"
            answer = {"ok": True, "path": path, "count": count, "items": [1, 2, 3]}
            payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ServiceServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.bodies: list[bytes] = []


class Service:
    """The local web service behind the tunnel, and a stand-in for the proxy in front of it."""

    def __init__(self, store: ExchangeStore) -> None:
        self.store = store
        self.server = _ServiceServer()
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    async def through_proxy(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        replay_of: str | None = None,
    ) -> Exchange:
        """Record an Exchange around a real request to the service, as the proxy would."""
        request_headers = headers or [("Host", "web-abc.burrow.test"), ("User-Agent", "test")]
        if body and not any(k.lower() == "content-type" for k, _ in request_headers):
            request_headers = [*request_headers, ("Content-Type", "application/json")]
        exchange = Exchange(
            tunnel="web",
            method=method,
            target=target,
            http_version="1.1",
            request_headers=request_headers,
            client="198.51.100.23:40112",
            replay_of=replay_of,
        )
        exchange.add_request_body(body)
        self.store.begin(exchange)
        start = time.monotonic()
        forwarded = {k: v for k, v in request_headers if k.lower() not in HOP_BY_HOP}

        def send() -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request(method, target, body=body or None, headers=forwarded)
                response = conn.getresponse()
                return response.status, response.reason, response.getheaders(), response.read()
            finally:
                conn.close()

        try:
            status, reason, response_headers, response_body = await asyncio.to_thread(send)
        except OSError as err:
            exchange.error = str(err)
        else:
            exchange.status, exchange.reason = status, reason
            exchange.response_headers = response_headers
            exchange.add_response_body(response_body)
        exchange.duration = time.monotonic() - start
        self.store.end(exchange)
        return exchange

    async def replay(self, exchange: Exchange) -> Exchange:
        return await self.through_proxy(
            exchange.method,
            exchange.target,
            bytes(exchange.request_body),
            exchange.request_headers,
            replay_of=exchange.id,
        )


class Harness:
    def __init__(self) -> None:
        self.store = ExchangeStore()
        self.service = Service(self.store)
        self.inspector = Inspector(self.store, self.tunnels, self.service.replay)

    def tunnels(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "web",
                "public_url": "https://web-abc.burrow.test",
                "local": f"127.0.0.1:{self.service.port}",
                "kind": "http",
            }
        ]


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    harness = Harness()
    await harness.inspector.start(port=0)
    try:
        yield harness
    finally:
        await harness.inspector.close()
        harness.service.close()


class Browser:
    """Headless Chromium pages on the inspector, collecting console errors, page errors and
    dialogs; the test fails if any show up (a CSP violation is a console error)."""

    def __init__(self, browser: Any, url: str) -> None:
        self.browser = browser
        self.url = url
        self.problems: list[str] = []

    async def open(self, init_script: str | None = None, live: bool = True) -> Any:
        page = await self.browser.new_page(viewport={"width": 1400, "height": 820})
        page.set_default_timeout(15_000)
        problems = self.problems
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))
        if init_script is not None:
            await page.add_init_script(init_script)
        await page.goto(self.url)
        if live:
            await page.wait_for_selector("#live.on")  # the event stream is connected
        return page


@pytest.fixture
async def browser(harness: Harness) -> AsyncIterator[Browser]:
    async with playwright_api.async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            session = Browser(chromium, harness.inspector.url)
            yield session
        finally:
            await chromium.close()
    assert session.problems == []


@pytest.fixture
async def page(browser: Browser) -> Any:
    return await browser.open()


async def test_live_rows_detail_and_replay(harness: Harness, page: Any) -> None:
    service = harness.service
    assert await page.text_content("#tunnels") == (
        f"webhttps://web-abc.burrow.test\u2192127.0.0.1:{service.port}"
    )
    assert await page.is_visible("#empty")

    await service.through_proxy("GET", "/")
    await service.through_proxy("GET", "/missing")
    order = {"item": "book", "qty": 2, "gift": False}
    original = await service.through_proxy(
        "POST", "/api/orders?source=web", json.dumps(order).encode()
    )
    assert service.server.counts["/api/orders"] == 1

    # The row appears live (no reload), newest first, with its status.
    row = await page.wait_for_selector(f'.request-row[data-id="{original.id}"]')
    assert await row.eval_on_selector(".status", "e => e.textContent") == "200"
    ids = await page.eval_on_selector_all(".request-row", "rows => rows.map(r => r.dataset.id)")
    assert ids[0] == original.id and len(ids) == 3
    missing = page.locator(".request-row").nth(1)
    assert await missing.locator(".status").text_content() == "404"
    assert not await page.is_visible("#empty")

    # Its details: method, path, status and the JSON bodies pretty-printed.
    await row.click()
    await page.wait_for_selector(f'#detail[data-id="{original.id}"]')
    assert await page.text_content("#detail-method") == "POST"
    assert await page.text_content("#detail-path") == "/api/orders?source=web"
    assert await page.text_content("#detail-status") == "200 OK"
    request_json = await page.text_content("#request-body pre.json")
    assert request_json == json.dumps(order, indent=2)
    response_json = await page.text_content("#response-body pre.json")
    expected = {"ok": True, "path": "/api/orders", "count": 1, "items": [1, 2, 3]}
    assert response_json == json.dumps(expected, indent=2)
    assert "Content-Type" in (await page.text_content("#response-headers") or "")

    # Replay: the service gets the request again, and a new row marked as a replay shows up,
    # highlighted and opened.
    await page.click("#replay")
    replayed = await page.wait_for_selector(
        f'.request-row.replay.highlight[data-replay-of="{original.id}"]'
    )
    assert service.server.counts["/api/orders"] == 2
    assert service.server.bodies[-1] == json.dumps(order).encode()
    new_id = await replayed.get_attribute("data-id")
    assert new_id and new_id != original.id
    assert await replayed.eval_on_selector(".status", "e => e.textContent") == "200"
    assert await replayed.eval_on_selector(".badge", "e => e.textContent") == "replay"
    await page.wait_for_selector(f'#detail[data-id="{new_id}"]')
    assert '"count": 2' in (await page.text_content("#response-body pre.json") or "")
    assert await page.text_content("#replay-message") == "replayed"
    assert len(harness.store) == 4

    await page.screenshot(path=str(SCREENSHOT))


async def test_hostile_content_is_shown_as_text(harness: Harness, page: Any) -> None:
    """Visitors control paths, headers and bodies: none of it may become markup."""
    service = harness.service
    evil_path = '/<img src=x onerror="alert(1)">'
    evil = Exchange(
        tunnel="web",
        method="POST",
        target=evil_path,
        http_version="1.1",
        request_headers=[("Host", "x"), ("X-Evil", "<b onmouseover=alert(3)>hi</b>")],
        client="198.51.100.23:40112",
    )
    evil.add_request_body(b"<script>alert(2)</script>")
    harness.store.begin(evil)
    evil.status, evil.duration = 200, 0.001
    harness.store.end(evil)
    logo = await service.through_proxy("GET", "/logo.png")

    row = await page.wait_for_selector(f'.request-row[data-id="{evil.id}"]')
    assert await row.eval_on_selector("td.path", "e => e.firstChild.textContent") == evil_path
    await row.click()
    await page.wait_for_selector(f'#detail[data-id="{evil.id}"]')
    assert await page.text_content("#request-body pre.text") == "<script>alert(2)</script>"
    assert "<b onmouseover=alert(3)>hi</b>" in (await page.text_content("#request-headers") or "")
    assert await page.locator("#rows img, #detail img, #detail script, #detail b").count() == 0

    # Binary bodies: size and a hex dump.
    await page.click(f'.request-row[data-id="{logo.id}"]')
    await page.wait_for_selector(f'#detail[data-id="{logo.id}"]')
    meta = await page.text_content("#response-body .body-meta")
    assert meta is not None and meta.startswith("binary, 72 B")
    dump = await page.text_content("#response-body pre.hex") or ""
    assert dump.startswith("00000000  89 50 4e 47 0d 0a 1a 0a 00 01")
    assert "|.PNG" in dump


async def test_polls_when_event_source_is_unavailable(harness: Harness, browser: Browser) -> None:
    """Without EventSource (or while it is down) the page polls the list every 2 s."""
    page = await browser.open(init_script="delete window.EventSource;", live=False)
    first = await harness.service.through_proxy("GET", "/")
    await page.wait_for_selector(f'.request-row[data-id="{first.id}"]', timeout=10_000)
    assert not await page.is_visible("#live.on")
    second = await harness.service.through_proxy("GET", "/missing")
    row = await page.wait_for_selector(f'.request-row[data-id="{second.id}"]', timeout=10_000)
    assert await row.eval_on_selector(".status", "e => e.textContent") == "404"
    ids = await page.eval_on_selector_all(".request-row", "rows => rows.map(r => r.dataset.id)")
    assert ids == [second.id, first.id]
