"""A far side for the crash tests: a small HTTP service on 127.0.0.1 that counts the side
effects it is asked for, per ``Idempotency-Key`` header.

- ``POST /effect`` is an idempotent far side (a payment API with idempotency keys): the
  first request with a key makes one effect and its answer is kept; a repeat with the
  same key gets that first answer again and makes no new effect.
- ``POST /effect-unsafe`` is a non-idempotent far side (an SMTP relay, a legacy API):
  every request makes an effect, whatever its key.

It runs in a thread of the test process, so the test reads the counts directly, while
worker processes reach it over real HTTP.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

IDEMPOTENT = "/effect"
UNSAFE = "/effect-unsafe"


@dataclass(frozen=True)
class Effect:
    number: int  # 1, 2, ... in the order the sink made them
    path: str
    key: str
    body: dict


class EffectSink:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._effects: list[Effect] = []
        self._requests: list[tuple[str, str]] = []  # (path, key) of every POST
        self._answers: dict[str, dict] = {}  # the first answer per key on /effect
        self._sent: list[tuple[str, dict]] = []  # (key, answer) of every effect or replay
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError as error:
                    self.answer(400, {"error": f"the body is not JSON: {error.msg}"})
                    return
                key = self.headers.get("Idempotency-Key", "")
                if self.path not in (IDEMPOTENT, UNSAFE):
                    self.answer(404, {"error": f"no route {self.path}"})
                    return
                if self.path == IDEMPOTENT and not key:
                    self.answer(400, {"error": "an Idempotency-Key header is required"})
                    return
                answer, replayed = sink._record(self.path, key, body)
                self.answer(200, answer, replayed=replayed)

            def answer(self, status: int, body: dict, *, replayed: bool = False) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if replayed:
                    self.send_header("Idempotent-Replayed", "true")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _record(self, path: str, key: str, body: dict) -> tuple[dict, bool]:
        """Make the effect, or replay the key's first answer on the idempotent side."""
        with self._lock:
            self._requests.append((path, key))
            if path == IDEMPOTENT and key in self._answers:
                self._sent.append((key, self._answers[key]))
                return self._answers[key], True
            effect = Effect(number=len(self._effects) + 1, path=path, key=key, body=body)
            self._effects.append(effect)
            answer = {"effect": effect.number, "key": key, "text": body.get("text")}
            if path == IDEMPOTENT:
                self._answers[key] = answer
            self._sent.append((key, answer))
            return answer, False

    # What the test reads ---------------------------------------------------------------

    def effects(self, key: str | None = None) -> int:
        """How many effects were made (for ``key``, or in all)."""
        with self._lock:
            return sum(1 for e in self._effects if key is None or e.key == key)

    def requests(self, key: str | None = None) -> int:
        """How many requests arrived (for ``key``, or in all), effects or replays."""
        with self._lock:
            return sum(1 for _, k in self._requests if key is None or k == key)

    def first_answer(self, key: str) -> dict | None:
        """The answer the idempotent side gave, and gives again, for ``key``."""
        with self._lock:
            return self._answers.get(key)

    def answers(self, key: str) -> list[dict]:
        """Every answer sent for ``key``, in order (on the idempotent side, repeats of
        the first)."""
        with self._lock:
            return [answer for k, answer in self._sent if k == key]

    def __enter__(self) -> EffectSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
