"""A small REST service on 127.0.0.1 for the http tool's tests: it records every request
it receives (method, path, query, headers, body) so a test can count what reached it,
and it can answer slowly, in a trickle, too much, with any status, or with a redirect.

Routes (any method):

- ``/items/<id>``: 200, JSON ``{"id", "method", "query", "body"}`` (the body parsed as JSON).
- ``/echo-headers``: 200, JSON of the ``Authorization`` and ``Idempotency-Key`` received.
- ``/echo-encoded/<encoding>``: 200, JSON ``{"echo": ...}``: the ``Authorization`` token
  received (after ``Bearer ``) in one of ``ENCODINGS`` (base64, hex, reversed...), as a
  careless or hostile server might send a credential back.
- ``/status/<code>``: that status, JSON that echoes the ``Authorization`` received
  (and ``?pad=N`` characters of padding).
- ``/slow/<seconds>``: waits, then 200.
- ``/trickle/<seconds>``: 200 with a promised 100,000-byte body sent one byte at a time,
  for about ``seconds``.
- ``/drip-headers/<seconds>``: a status line, then one header line at a time for about
  ``seconds`` (each line quick, the whole slow).
- ``/big/<bytes>``: 200, ``text/plain``, that many bytes.
- ``/big-stream/<bytes>``: the same without a Content-Length, ended by closing.
- ``/text``: 200, ``text/plain; charset=utf-8``.
- ``/redirect``: 302 to ``/items/moved``.
- ``/answer?body=TEXT``: 200, ``application/json``, TEXT verbatim (JSON or not).
- ``/fail-echo/<pad>``: 400, ``text/plain``, ``pad`` characters (``x``, or spaces with
  ``?fill=space``), then the ``Authorization`` token received: a secret at the place
  where an error's excerpt, or the error body itself, is cut.

It runs in a thread of the test process; ``with HttpService() as service:`` starts it
and stops it, releasing any handler still waiting.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

# How /echo-encoded/<encoding> sends a token back.
ENCODINGS = {
    "plain": lambda token: token,
    "base64": lambda token: base64.b64encode(token.encode()).decode(),
    "base64-unpadded": lambda token: base64.b64encode(token.encode()).decode().rstrip("="),
    "base64url": lambda token: base64.urlsafe_b64encode(token.encode()).decode(),
    "base64url-unpadded": lambda token: (
        base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    ),
    "basic-auth": lambda token: base64.b64encode(f"agent:{token}".encode()).decode(),
    "url": lambda token: quote(token, safe=""),
    "url-lower": lambda token: quote(token, safe="").lower(),
    "url-plus": lambda token: quote_plus(token, safe=""),
    "hex": lambda token: token.encode().hex(),
    "hex-upper": lambda token: token.encode().hex().upper(),
    "upper": str.upper,
    "lower": str.lower,
    "swapcase": str.swapcase,
    "reversed": lambda token: token[::-1],
    "reversed-upper": lambda token: token[::-1].upper(),
}


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (a timeout test) is expected here, not a failure


class HttpService:
    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._stopping = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.route()

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

            def route(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                received = Received(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query),
                    headers={name.lower(): value for name, value in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                )
                service._record(received)
                head, _, rest = parts.path.lstrip("/").partition("/")
                if head == "items":
                    body = json.loads(received.body) if received.body else None
                    self.answer_json(
                        200,
                        {"id": rest, "method": self.command, "query": received.query, "body": body},
                    )
                elif head == "echo-headers":
                    self.answer_json(
                        200,
                        {
                            "authorization": self.headers.get("Authorization"),
                            "idempotency_key": self.headers.get("Idempotency-Key"),
                        },
                    )
                elif head == "echo-encoded":
                    token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    self.answer_json(200, {"echo": f"token={ENCODINGS[rest](token)};"})
                elif head == "status":
                    pad = int(received.query.get("pad", ["0"])[0])
                    self.answer_json(
                        int(rest),
                        {
                            "error": f"status {rest}",
                            "auth": self.headers.get("Authorization"),
                            "pad": "p" * pad,
                        },
                    )
                elif head == "slow":
                    service._stopping.wait(float(rest))
                    self.answer_json(200, {"slow": True})
                elif head == "trickle":
                    self.trickle(float(rest))
                elif head == "drip-headers":
                    self.drip_headers(float(rest))
                elif head == "big-stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"x" * int(rest))
                    self.close_connection = True
                elif head == "big":
                    self.answer(200, "text/plain", b"x" * int(rest))
                elif head == "text":
                    self.answer(200, "text/plain; charset=utf-8", "héllo".encode())
                elif head == "answer":
                    # The ``body`` query parameter, verbatim, as JSON: what no encoder
                    # would write (NaN, 1e999, "\\ud800"), as some servers do.
                    body = received.query.get("body", [""])[0]
                    self.answer(200, "application/json", body.encode())
                elif head == "fail-echo":
                    token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                    fill = " " if received.query.get("fill") == ["space"] else "x"
                    self.answer(400, "text/plain", (fill * int(rest) + token).encode())
                elif head == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "/items/moved")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.answer_json(404, {"error": f"no route {parts.path}"})

            def answer_json(self, status: int, body: Any) -> None:
                self.answer(status, "application/json", json.dumps(body).encode())

            def answer(self, status: int, content_type: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":  # the headers a GET would have, no body
                    self.wfile.write(data)

            def trickle(self, seconds: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                stop = time.monotonic() + seconds
                while time.monotonic() < stop and not service._stopping.wait(0.02):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                self.close_connection = True

            def drip_headers(self, seconds: float) -> None:
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                stop = time.monotonic() + seconds
                number = 0
                while time.monotonic() < stop and not service._stopping.wait(0.02):
                    number += 1
                    self.wfile.write(f"X-Drip-{number}: x\r\n".encode())
                    self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        # A short poll keeps stopping quick (shutdown waits for the loop to look up).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def _record(self, received: Received) -> None:
        with self._lock:
            self._received.append(received)

    # What the test reads ---------------------------------------------------------------

    def received(self, path: str | None = None) -> list[Received]:
        """Every request that arrived (at ``path``, or anywhere), in order."""
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def hits(self, path: str | None = None) -> int:
        return len(self.received(path))

    def __enter__(self) -> HttpService:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
