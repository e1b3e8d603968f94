"""An OpenAI-compatible model server on loopback whose every answer takes a set time, so
that many model calls are out at once: the async worker's tests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agentops.runtime.builtins import PLAN_TOOL
from tests.peers.openai_server import completion


class PacedModel:
    """Answers every turn after ``latency`` seconds: the first with a plan, then one call
    per turn (``tool`` with ``{"text": ...}``, ``calls`` times; or the calls ``script``
    gives: (tool, arguments) a turn), then a final answer. Keeps how many requests were
    out at once, as the most.

    With ``gather``, every request is held (for at most ``gather_seconds``) until that
    many have been out at once: a test of "N calls out together" then does not depend on
    how quickly the worker under test hands the N runs over, only on whether it can."""

    def __init__(
        self,
        latency: float,
        *,
        tool: str = "",
        calls: int = 0,
        script: list[tuple[str, dict]] | None = None,
        gather: int = 0,
        gather_seconds: float = 30.0,
    ) -> None:
        self.latency = latency
        self.gather, self.gather_seconds = gather, gather_seconds
        self.script = script or [(tool, {"text": f"call {turn}"}) for turn in range(1, calls + 1)]
        self.in_flight = self.peak = self.served = 0
        self.lock = threading.Condition()
        model = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with model.lock:
                    model.in_flight += 1
                    model.peak = max(model.peak, model.in_flight)
                    model.lock.notify_all()
                    model.lock.wait_for(
                        lambda: model.peak >= model.gather, timeout=model.gather_seconds
                    )
                time.sleep(model.latency)
                data = json.dumps(model.answer(body["messages"])).encode()
                with model.lock:
                    model.in_flight -= 1
                    model.served += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, messages: list[dict]) -> dict:
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if turn == 0:
            plan = {"steps": [{"title": "do the thing"}], "_confidence": 0.9}
            return completion(None, [(f"plan-{turn}", PLAN_TOOL, plan)])
        if turn <= len(self.script):
            tool, arguments = self.script[turn - 1]
            return completion(None, [(f"call-{turn}", tool, {**arguments, "_confidence": 0.9})])
        return completion("done")

    def __enter__(self) -> PacedModel:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
