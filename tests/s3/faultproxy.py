"""A loopback HTTP/1.1 proxy that injects S3-style failures in front of a real server (moto).

It understands just enough HTTP to find request and response boundaries (Content-Length, chunked bodies, HEAD,
``Expect: 100-continue``), so every client request is either forwarded whole to the upstream server or answered
with a fault.  Faults, chosen per request with probability ``share`` among requests that ``match``:

* ``"503"``   — ``503 SlowDown`` (S3's throttling answer); the request never reaches the server.
* ``"500"``   — ``500 InternalError``.
* ``"403"``   — ``403 AccessDenied`` (a permanent error, to check that nothing retries it).
* ``"reset"`` — the connection is reset (RST) after the request arrives, without an answer.
* ``"truncate"`` — the request is served, but the answer is cut off by a reset halfway through its body.
* ``"stall"`` — the proxy stops forwarding: it reads no more of the request and never answers, holding the
  connection open until the proxy stops (a hung endpoint or a black-holed network path).

Runs its own event loop on a daemon thread; counters (``requests``, ``injected``, ``max_inflight`` per method)
let tests check what happened.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections import Counter
from typing import Callable

_ERRORS = {
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


class FaultProxy:
    def __init__(self, upstream_port: int, *, seed: int = 1234) -> None:
        self.upstream_port = upstream_port
        self.share = 0.0
        self.faults: tuple[str, ...] = ("503",)
        self.match: Callable[[str, str], bool] = lambda method, target: True
        self.requests: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.ranged_gets = 0
        self.checksum_mode_gets = 0  # ... of which asked the store for the object's checksum (x-amz-checksum-mode)
        self.part_puts = 0  # upload_part requests seen
        self.crc32_part_puts = 0  # ... of which carried an x-amz-checksum-crc32 header
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fault-proxy", daemon=True)
        self.port = 0

    # ------------------------------------------------------------ control

    def start(self) -> "FaultProxy":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(10)

    def configure(self, share: float, faults: tuple[str, ...] = ("503",),
                  match: Callable[[str, str], bool] | None = None) -> None:
        with self._lock:
            self.share, self.faults = share, faults
            self.match = match or (lambda method, target: True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ server

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop_event = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop_event.wait()
        server.close()

    def _choose(self, method: str, target: str) -> str | None:
        with self._lock:
            self.requests[method] += 1
            if self.share and self.match(method, target) and self._rng.random() < self.share:
                fault = self._rng.choice(self.faults)
                self.injected[fault] += 1
                return fault
        return None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, headers = _parse_head(head)
                method, target, _ = request_line.split(" ", 2)
                fault = self._choose(method, target)
                if method == "GET" and "range" in headers:
                    self.ranged_gets += 1
                    self.checksum_mode_gets += headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"
                if method == "PUT" and "partNumber=" in target:
                    self.part_puts += 1
                    self.crc32_part_puts += "x-amz-checksum-crc32" in headers
                expects = headers.get("expect", "").lower() == "100-continue"
                if fault == "stall":
                    await self._stop_event.wait()
                    return
                if fault in _ERRORS:
                    if not expects:  # read the body so the connection stays usable
                        await _read_body(reader, headers)
                    writer.write(_error_response(*_ERRORS[fault], close=expects))
                    await writer.drain()
                    if expects:
                        return _close(writer)
                    continue
                if expects:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                body = await _read_body(reader, headers)
                if fault == "reset":
                    return _reset(writer)
                self.inflight[method] += 1
                self.max_inflight[method] = max(self.max_inflight[method], self.inflight[method])
                try:
                    status_head, response = await self._forward(head, headers, body, method)
                finally:
                    self.inflight[method] -= 1
                if fault == "truncate" and len(response) > 1:
                    writer.write(status_head + response[:len(response) // 2])
                    await writer.drain()
                    return _reset(writer)
                writer.write(status_head + response)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if not writer.is_closing():
                writer.close()

    async def _forward(self, head: bytes, headers: dict[str, str], body: bytes, method: str) -> tuple[bytes, bytes]:
        """Send one request upstream on a fresh connection; return the response head and body."""
        lines = head.decode("latin-1").split("\r\n")
        kept = [ln for ln in lines[1:] if ln and ln.split(":", 1)[0].strip().lower() not in ("connection", "expect")]
        out = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1")
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            up_writer.write(out + body)
            await up_writer.drain()
            resp_head = await up_reader.readuntil(b"\r\n\r\n")
            status_line, resp_headers = _parse_head(resp_head)
            status = int(status_line.split(" ", 2)[1])
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                resp_body = b""
            elif "content-length" in resp_headers or "transfer-encoding" in resp_headers:
                resp_body = await _read_body(up_reader, resp_headers)
            else:
                resp_body = await up_reader.read()
        finally:
            up_writer.close()
        # keep the client's connection alive: drop hop-by-hop headers and give the body a length
        rlines = resp_head.decode("latin-1").split("\r\n")
        drop = ("connection", "keep-alive", "transfer-encoding")
        keep = [ln for ln in rlines[1:] if ln and ln.split(":", 1)[0].strip().lower() not in drop]
        if "transfer-encoding" in resp_headers:
            resp_body = _dechunk(resp_body)
            keep = [ln for ln in keep if ln.split(":", 1)[0].strip().lower() != "content-length"]
            keep.append(f"Content-Length: {len(resp_body)}")
        elif "content-length" not in resp_headers and method != "HEAD":
            keep.append(f"Content-Length: {len(resp_body)}")
        return "\r\n".join([rlines[0], *keep, "", ""]).encode("latin-1"), resp_body


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raw = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    line = await reader.readuntil(b"\r\n")
                    raw += line
                    if line == b"\r\n":
                        return bytes(raw)
            raw += await reader.readexactly(size + 2)
    n = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(n) if n else b""


def _dechunk(raw: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end].split(b";")[0].strip(), 16)
        if size == 0:
            return bytes(out)
        out += raw[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


def _error_response(status: int, reason: str, code: str, message: str, close: bool) -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>FAULT</RequestId></Error>").encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/xml", f"Content-Length: {len(body)}"]
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:  # SO_LINGER 0: close() sends RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
