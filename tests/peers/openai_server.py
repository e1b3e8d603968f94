"""A small OpenAI-compatible HTTP server on 127.0.0.1 for the tests: it answers
``POST /v1/chat/completions`` with the replies queued on it and keeps every request,
so the real openai package is exercised over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def completion(
    content: str | None = None,
    tool_calls: list[tuple[str, str, dict]] = (),
    *,
    prompt_tokens: int = 11,
    completion_tokens: int = 7,
) -> dict:
    """A Chat Completions response body; tool_calls are (id, name, arguments)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
            for call_id, name, arguments in tool_calls
        ]
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if tool_calls else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class OpenAICompatibleServer:
    def __init__(self) -> None:
        self.replies: list[tuple[int, dict]] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        # When each request arrived (time.monotonic()), to measure the waits between them.
        self.arrivals: list[float] = []
        # Headers to send with a queued reply, keyed by the reply body's id().
        self.reply_headers: dict[int, dict[str, str]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.arrivals.append(time.monotonic())
                server.requests.append({"path": self.path, "body": body})
                server.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    status, reply = 404, {"error": {"message": f"no route {self.path}"}}
                elif server.replies:
                    status, reply = server.replies.pop(0)
                else:
                    status, reply = 500, {"error": {"message": "the test queued no reply"}}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in server.reply_headers.pop(id(reply), {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def reply(self, body: dict, status: int = 200) -> None:
        self.replies.append((status, body))

    def reply_busy(
        self, retry_after: str, *, status: int = 429, message: str = "slow down"
    ) -> None:
        """Queue one refusal (429, or 503) that carries ``Retry-After: retry_after``:
        seconds, or an HTTP date."""
        body = {"error": {"message": message}}
        self.reply(body, status)
        self.reply_headers[id(body)] = {"Retry-After": retry_after}

    def __enter__(self) -> OpenAICompatibleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
