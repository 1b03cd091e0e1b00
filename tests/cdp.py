"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, already a dependency
of MLflow), for UI tests that must click: ``chromium --dump-dom`` only loads a page.

    with Page(CHROMIUM) as page:
        page.goto(url); page.wait_text("Show diff only"); page.click('button[aria-label="…"]')
        page.text(); page.screenshot(path)
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """One tab of a fresh headless Chromium (own profile, 1600×1000), closed on exit."""

    def __init__(self, chromium: str, width: int = 1600, height: int = 1000):
        self.chromium, self.size = chromium, (width, height)

    def __enter__(self) -> "Page":
        self.profile = tempfile.mkdtemp(prefix="cdp-")
        port = _free_port()
        self.proc = subprocess.Popen([self.chromium, *FLAGS, f"--remote-debugging-port={port}",
                                      f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while True:
            try:
                tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                ws_url = next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.time() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("chromium's DevTools endpoint did not come up in 60 s")
                time.sleep(0.3)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._connect(ws_url))
        self._id = 0
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)
        return self

    async def _connect(self, ws_url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=0)

    def __exit__(self, *exc) -> None:
        if getattr(self, "loop", None) is not None:
            async def close():
                await self.ws.close()
                await self.session.close()
            self.loop.run_until_complete(close())
            self.loop.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def send(self, method: str, **params):
        self._id += 1
        mid = self._id

        async def call():
            await self.ws.send_json({"id": mid, "method": method, "params": params})
            while True:
                msg = await self.ws.receive_json()
                if msg.get("id") == mid:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg["result"]

        return self.loop.run_until_complete(asyncio.wait_for(call(), 60))

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:200]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_text(self, *texts: str, timeout: float = 90) -> str:
        """The page's text once it contains every one of ``texts``; AssertionError with the text if not."""
        deadline = time.time() + timeout
        while True:
            text = self.text()
            if all(t in text for t in texts):
                return text
            if time.time() > deadline:
                raise AssertionError(f"{[t for t in texts if t not in text]} not on the page after {timeout} s; "
                                     f"it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def click(self, selector: str) -> None:
        """Click the first element matching the CSS ``selector`` (AssertionError when there is none)."""
        found = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                        f"if (!e) return false; e.scrollIntoView({{block: 'center'}}); e.click(); return true; }})()")
        assert found, f"nothing matches {selector}"

    def screenshot(self, path: Path) -> Path:
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return Path(path)
