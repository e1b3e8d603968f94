"""A hostile or broken model server cannot hold a model call past its deadline, nor fill
the worker's memory: over real HTTP, against a loopback server that trickles its answer
a byte at a time (each byte well within the read timeout) or sends one far too large,
through both the blocking client (``complete``, the inline mode) and the async one
(``acomplete``, the async worker's)."""

from __future__ import annotations

import functools
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable

import pytest

from agentops.runtime.engine import Outcome
from agentops.runtime.models.base import ModelError
from agentops.runtime.models.openai_compatible import OpenAICompatibleClient
from lineage.models import LineageEvent
from tasks.models import RunStatus
from tasks.services import run_start
from tests.conftest import run_coroutine, run_until_rest
from tests.peers.openai_server import completion

MESSAGES = [{"role": "user", "content": "Say hello."}]
DONE = completion("done")
# The first turn's answer in a run: the plan every run drafts first.
PLANNED = completion(None, [("call_plan", "plan_update", {"steps": [{"title": "say done"}]})])
# The client's timeout: every read waits at most this long, and now so does the call.
TIMEOUT = 1.0
# A trickle sends a byte this often, well within TIMEOUT, for this long at most.
TRICKLE_EVERY = 0.2
TRICKLE_SECONDS = 6.0
# The cap on an answer in these tests, and how much the huge answers carry: far more.
CAP = 2**20
HUGE = 64 * 2**20

# An answer writes to the connection with ``send``; it stops early once ``stopped`` is set.
Answer = Callable[[Callable[[bytes], None], threading.Event], None]


def head(length: int, *extra: str) -> bytes:
    lines = [
        "HTTP/1.1 200 OK",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer_plain(body: bytes) -> Answer:
    def answer(send: Callable[[bytes], None], stopped: threading.Event) -> None:
        send(head(len(body)) + body)

    return answer


def answer_trickling_body(body: bytes) -> Answer:
    """The headers at once, then the body led by whitespace (valid JSON) sent a byte
    every TRICKLE_EVERY seconds for TRICKLE_SECONDS, then the rest."""
    lead = b" " * int(TRICKLE_SECONDS / TRICKLE_EVERY)

    def answer(send: Callable[[bytes], None], stopped: threading.Event) -> None:
        send(head(len(lead) + len(body)))
        for byte in lead:
            if stopped.wait(TRICKLE_EVERY):
                return
            send(bytes([byte]))
        send(body)

    return answer


def answer_trickling_head(body: bytes) -> Answer:
    """The status line, then a header whose value comes a byte every TRICKLE_EVERY
    seconds for TRICKLE_SECONDS: the call never gets as far as a body."""
    padding = b"a" * int(TRICKLE_SECONDS / TRICKLE_EVERY)

    def answer(send: Callable[[bytes], None], stopped: threading.Event) -> None:
        send(b"HTTP/1.1 200 OK\r\nX-Padding: ")
        for byte in padding:
            if stopped.wait(TRICKLE_EVERY):
                return
            send(bytes([byte]))
        send(b"\r\n" + head(len(body)).split(b"\r\n", 1)[1] + body)

    return answer


def answer_huge(body: bytes) -> Answer:
    """HUGE bytes of whitespace before the body, as fast as the client takes them."""
    chunk = b" " * 2**20

    def answer(send: Callable[[bytes], None], stopped: threading.Event) -> None:
        send(head(HUGE + len(body)))
        for _ in range(HUGE // len(chunk)):
            if stopped.is_set():
                return
            send(chunk)
        send(body)

    return answer


def body_of(reply: dict) -> bytes:
    return json.dumps(reply).encode()


@functools.cache
def bomb(body: bytes) -> bytes:
    return gzip.compress(b" " * HUGE + body, compresslevel=9)


def answer_bomb(body: bytes) -> Answer:
    """A small gzip answer (about 64 KiB on the wire) that inflates to HUGE bytes."""
    packed = bomb(body)

    def answer(send: Callable[[bytes], None], stopped: threading.Event) -> None:
        send(head(len(packed), "Content-Encoding: gzip") + packed)

    return answer


def answer_bomb_trailing(body: bytes) -> Answer:
    """A small gzip answer followed by HUGE bytes that are no part of it: a decoder
    ignores them (zlib keeps them aside), so only counting the wire sees them."""
    packed = gzip.compress(body)
    trailing = b"\0" * 2**20

    def answer(send: Callable[[bytes], None], stopped: threading.Event) -> None:
        send(head(len(packed) + HUGE, "Content-Encoding: gzip") + packed)
        for _ in range(HUGE // len(trailing)):
            if stopped.is_set():
                return
            send(trailing)

    return answer


class HostileServer:
    """A model server on 127.0.0.1 that answers each connection (one request each) with
    the next answer queued on it, or a plain completion when none is. ``sent``: the bytes
    each answer got out before it ended or the client hung up."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.base_url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.answers: list[Answer] = []
        self.sent: list[int] = []
        self.stopped = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self.serve, daemon=True)

    def queue(self, make: Callable[[bytes], Answer], reply: dict = DONE) -> None:
        """Answer the next connection with ``make``, around ``reply`` as its body."""
        self.answers.append(make(body_of(reply)))

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            answer = self.answers.pop(0) if self.answers else answer_plain(body_of(DONE))
            thread = threading.Thread(target=self.answer, args=(connection, answer), daemon=True)
            self.threads.append(thread)
            thread.start()

    def answer(self, connection: socket.socket, answer: Answer) -> None:
        sent = 0

        def send(data: bytes) -> None:
            nonlocal sent
            connection.sendall(data)
            sent += len(data)

        with connection:
            connection.settimeout(10)
            try:
                request_read(connection)
                answer(send, self.stopped)
            except OSError:
                pass  # the client hung up: what it took is in ``sent``
            finally:
                self.sent.append(sent)

    def __enter__(self) -> HostileServer:
        self.accepting.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.accepting.join(5)
        for thread in self.threads:
            thread.join(10)
        self.listener.close()


def request_read(connection: socket.socket) -> None:
    """Read one request whole (its head, then Content-Length bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionResetError("the client closed before its request ended")
        data += chunk
    request_head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in request_head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionResetError("the client closed before its request ended")
        body += chunk


def client_of(server: HostileServer) -> OpenAICompatibleClient:
    return OpenAICompatibleClient(
        model="test-model", api_key="test", base_url=server.base_url, timeout=TIMEOUT
    )


def call_sync(client: OpenAICompatibleClient) -> object:
    return client.complete(messages=MESSAGES, tools=[])


def call_async(client: OpenAICompatibleClient) -> object:
    return run_coroutine(client.acomplete(messages=MESSAGES, tools=[]))


PATHS = pytest.mark.parametrize("call", [call_sync, call_async], ids=["sync", "async"])


# A trickle meets the call's deadline ---------------------------------------------------


@PATHS
@pytest.mark.parametrize(
    "trickle", [answer_trickling_body, answer_trickling_head], ids=["body", "head"]
)
def test_an_answer_trickled_within_the_read_timeout_still_ends_at_the_deadline(call, trickle):
    with HostileServer() as server:
        server.queue(trickle)
        started = time.monotonic()
        with pytest.raises(ModelError) as caught:
            call(client_of(server))
        elapsed = time.monotonic() - started

    # Every byte came well within the read timeout; only a total deadline stops it.
    assert elapsed < TIMEOUT + 1.5, f"the call took {elapsed:.1f} s"
    assert caught.value.transient is True
    assert f"no whole answer within {TIMEOUT:g} s" in str(caught.value)


@PATHS
def test_the_deadline_is_the_calls_own_timeout_where_it_gives_one(call):
    """The engine passes each call its timeout (shorter when the run's time budget is
    nearly spent): that is the call's deadline, not the client's."""
    with HostileServer() as server:
        server.queue(answer_trickling_body)
        client = client_of(server)
        client.timeout = 30.0
        started = time.monotonic()
        with pytest.raises(ModelError) as caught:
            if call is call_sync:
                client.complete(messages=MESSAGES, tools=[], timeout=TIMEOUT)
            else:
                run_coroutine(client.acomplete(messages=MESSAGES, tools=[], timeout=TIMEOUT))
        elapsed = time.monotonic() - started

    assert elapsed < TIMEOUT + 1.5, f"the call took {elapsed:.1f} s"
    assert caught.value.transient is True


# A huge answer is stopped while it is read -------------------------------------------


@PATHS
def test_an_answer_over_the_cap_is_refused_before_it_is_read_whole(call, settings):
    settings.AGENTOPS_MODEL_MAX_ANSWER_BYTES = CAP
    with HostileServer() as server:
        server.queue(answer_huge)
        with pytest.raises(ModelError) as caught:
            call(client_of(server))

    assert caught.value.transient is True
    assert f"more than {CAP} bytes" in str(caught.value)
    assert "AGENTOPS_MODEL_MAX_ANSWER_BYTES" in str(caught.value)
    # The client hung up early: the rest never left the server (what did sits in the
    # sockets' buffers, a few MiB at most on loopback).
    assert server.sent and server.sent[0] < HUGE // 2


@PATHS
def test_a_compressed_answer_is_capped_as_it_inflates_not_as_it_travels(call, settings):
    settings.AGENTOPS_MODEL_MAX_ANSWER_BYTES = CAP
    with HostileServer() as server:
        server.queue(answer_bomb)
        with pytest.raises(ModelError) as caught:
            call(client_of(server))

    assert len(bomb(body_of(DONE))) < CAP  # small on the wire
    assert caught.value.transient is True
    assert f"more than {CAP} bytes" in str(caught.value)


@PATHS
def test_bytes_sent_past_a_compressed_answers_end_count_against_the_cap(call, settings):
    settings.AGENTOPS_MODEL_MAX_ANSWER_BYTES = CAP
    with HostileServer() as server:
        server.queue(answer_bomb_trailing)
        with pytest.raises(ModelError) as caught:
            call(client_of(server))

    assert caught.value.transient is True
    assert f"more than {CAP} bytes" in str(caught.value)
    assert server.sent and server.sent[0] < HUGE // 2


@PATHS
def test_an_answer_within_the_cap_and_the_deadline_is_read_as_before(call, settings):
    settings.AGENTOPS_MODEL_MAX_ANSWER_BYTES = CAP
    with HostileServer() as server:
        server.queue(answer_plain)
        turn = call(client_of(server))

    assert turn.content == "done"


def test_the_blocking_call_keeps_its_deadline_where_a_loop_already_runs():
    """``complete`` from a thread that runs an event loop (as a test harness's may) runs
    its own loop on a thread of its own, deadline and all."""

    async def blocking_inside_a_loop(client: OpenAICompatibleClient) -> None:
        client.complete(messages=MESSAGES, tools=[])

    with HostileServer() as server:
        server.queue(answer_trickling_body)
        started = time.monotonic()
        with pytest.raises(ModelError) as caught:
            run_coroutine(blocking_inside_a_loop(client_of(server)))
        elapsed = time.monotonic() - started

    assert elapsed < TIMEOUT + 1.5, f"the call took {elapsed:.1f} s"
    assert "no whole answer within" in str(caught.value)


# The engine retries them -------------------------------------------------------------


def served_run(make_task, operator, settings, server: HostileServer):
    settings.OPENAI_BASE_URL = server.base_url
    settings.OPENAI_API_KEY = "test"
    settings.AGENTOPS_MODEL_TIMEOUT = TIMEOUT
    settings.AGENTOPS_MODEL_MAX_ANSWER_BYTES = CAP
    settings.AGENTOPS_MODEL_BACKOFF_SECONDS = 0.01
    task = make_task([], self_check=False)
    task.model = "test-model"
    task.save()
    return run_start(task=task, run_input={}, user=operator)


def retry_errors(run) -> list[str]:
    events = LineageEvent.objects.filter(run_uuid=run.pk, kind="model.retrying").order_by("seq")
    return [event.payload["error"] for event in events]


@pytest.mark.django_db
def test_the_engine_retries_a_trickled_and_a_huge_answer_and_then_finishes(
    make_task, operator, settings
):
    with HostileServer() as server:
        run = served_run(make_task, operator, settings, server)
        server.queue(answer_trickling_body, PLANNED)
        server.queue(answer_huge, PLANNED)
        server.queue(answer_plain, PLANNED)
        server.queue(answer_plain, DONE)
        assert run_until_rest(run) is Outcome.FINISHED

    assert run.status == RunStatus.SUCCEEDED, run.reason
    trickled, huge = retry_errors(run)
    assert "no whole answer within" in trickled
    assert f"more than {CAP} bytes" in huge
