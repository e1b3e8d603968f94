"""Webhook triggers over real HTTP (pytest-django's live server): a signed delivery starts
one run; what does not authenticate, is stale, replayed, too large or not JSON starts
nothing; a rotated secret holds during its overlap; a burst of retries starts one run
per webhook-id. The signature scheme itself is checked on the Standard Webhooks spec's
published test vectors."""

from __future__ import annotations

import base64
import http.client
import json
import random
import re
import socket
import threading
import time
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from lineage.models import LineageEvent
from tasks.models import Run, RunStatus, Trigger
from triggers.models import Firing
from triggers.services import trigger_secret_rotate
from triggers.webhooks import WebhookRefused, webhook_sign, webhook_verify

# The Standard Webhooks spec's reference libraries' test vectors: the repository
# standard-webhooks/standard-webhooks, libraries/python/tests/test_webhooks.py
# (test_sign_function, test_invalid_signature_raises_error, test_multi_sig_payload_is_valid)
# and the same values in libraries/javascript/src/webhook.test.ts.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
VECTOR_WRONG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="
VECTOR_OTHERS = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="

SCHEMA = {
    "type": "object",
    "required": ["invoice"],
    "properties": {"invoice": {"type": "string"}, "amount": {"type": "number"}},
}


def vector_headers(**changes: str) -> dict[str, str]:
    headers = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    return {name: value for name, value in {**headers, **changes}.items() if value is not None}


def vector_verify(headers: dict[str, str], *, secret: str = VECTOR_SECRET, now: float = 0):
    return webhook_verify(
        secrets=[secret],
        headers=headers,
        body=VECTOR_BODY,
        tolerance_seconds=300,
        now=now or VECTOR_TIMESTAMP,
    )


# The scheme, on the spec's vectors ---------------------------------------------------


def test_signing_gives_the_specs_published_signature():
    signed = webhook_sign(
        secret=VECTOR_SECRET, msg_id=VECTOR_ID, timestamp=VECTOR_TIMESTAMP, body=VECTOR_BODY
    )
    assert signed == VECTOR_SIGNATURE


def test_the_specs_signature_verifies_with_and_without_the_prefix():
    assert vector_verify(vector_headers()).id == VECTOR_ID
    assert vector_verify(vector_headers(), secret=VECTOR_SECRET.removeprefix("whsec_"))


def test_one_matching_signature_among_several_versions_is_enough():
    listed = " ".join(
        [VECTOR_OTHERS, VECTOR_OTHERS.replace("v1,", "v2,"), VECTOR_SIGNATURE, VECTOR_OTHERS]
    )
    assert vector_verify(vector_headers(**{"webhook-signature": listed})).timestamp == (
        VECTOR_TIMESTAMP
    )


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"webhook-signature": VECTOR_WRONG}, "no signature matches"),
        ({"webhook-signature": VECTOR_SIGNATURE[:8]}, "no v1,<base64> signature"),
        ({"webhook-signature": "v1,"}, "no signature matches"),
        ({"webhook-signature": "v1,dawfeoifkpqwoekfpqoekf"}, "no v1,<base64> signature"),
        ({"webhook-signature": VECTOR_SIGNATURE.replace("v1,", "v1a,")}, "no v1,<base64>"),
        ({"webhook-signature": None}, "missing the webhook-signature header"),
        ({"webhook-id": None}, "missing the webhook-id header"),
        ({"webhook-timestamp": None}, "missing the webhook-timestamp header"),
        ({"webhook-timestamp": "hello"}, "no signature matches"),
        ({"webhook-id": "msg_other"}, "no signature matches"),
        ({"webhook-signature": " ".join([VECTOR_SIGNATURE] * 17)}, "at most 16 are read"),
    ],
)
def test_a_wrong_or_missing_signature_is_refused_saying_what(changes, said):
    with pytest.raises(WebhookRefused) as refused:
        vector_verify(vector_headers(**changes))
    assert refused.value.reason == "signature"
    assert said in refused.value.message


def test_a_tampered_body_or_another_secret_is_refused():
    with pytest.raises(WebhookRefused, match="no signature matches"):
        webhook_verify(
            secrets=[VECTOR_SECRET],
            headers=vector_headers(),
            body=VECTOR_BODY.replace(b"2", b"3"),
            tolerance_seconds=300,
            now=VECTOR_TIMESTAMP,
        )
    other = "whsec_" + base64.b64encode(b"another secret of 24 bytes").decode()
    with pytest.raises(WebhookRefused, match="no signature matches"):
        vector_verify(vector_headers(), secret=other)


@pytest.mark.parametrize(("offset", "ok"), [(-301, False), (-300, True), (300, True), (301, False)])
def test_the_timestamp_holds_within_the_tolerance_either_way(offset, ok):
    now = VECTOR_TIMESTAMP - offset  # the delivery is `offset` seconds off the clock
    if ok:
        assert vector_verify(vector_headers(), now=now)
        return
    with pytest.raises(WebhookRefused) as refused:
        vector_verify(vector_headers(), now=now)
    assert refused.value.reason == "timestamp"
    assert ("301 seconds " + ("far in the future" if offset > 0 else "old")) in str(refused.value)


def test_a_signed_timestamp_that_is_not_seconds_is_refused_as_a_timestamp():
    signature = webhook_sign(
        secret=VECTOR_SECRET, msg_id=VECTOR_ID, timestamp="1614265330.5", body=VECTOR_BODY
    )
    headers = vector_headers(
        **{"webhook-timestamp": "1614265330.5", "webhook-signature": signature}
    )
    with pytest.raises(WebhookRefused, match="not whole seconds since the epoch") as refused:
        vector_verify(headers)
    assert refused.value.reason == "timestamp"


# Over HTTP ---------------------------------------------------------------------------


class Sender:
    """A Standard Webhooks sender for one trigger, on the live server."""

    def __init__(self, base_url: str, trigger: Trigger, secret: str) -> None:
        self.url = f"{base_url}/hooks/{trigger.public_id}/"
        self.secret = secret
        parts = urlsplit(self.url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path

    def headers(
        self, msg_id: str, body: bytes, *, timestamp: int | None = None, secret: str = ""
    ) -> dict[str, str]:
        timestamp = int(time.time()) if timestamp is None else timestamp
        signature = webhook_sign(
            secret=secret or self.secret, msg_id=msg_id, timestamp=timestamp, body=body
        )
        return {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }

    def send(
        self,
        msg_id: str,
        payload: object = None,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        **signing,
    ) -> tuple[int, dict, dict]:
        """Sign and send one delivery on a connection of its own; its status, headers
        and JSON answer."""
        if body is None:
            body = json.dumps(payload if payload is not None else {}).encode()
        headers = headers if headers is not None else self.headers(msg_id, body, **signing)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read()
        finally:
            conn.close()
        return response.status, dict(response.getheaders()), json.loads(answer)


@pytest.fixture
def hook(make_trigger, live_server):
    """``hook(**trigger_fields)``: a webhook trigger with a secret, and its sender."""

    def make(**fields) -> tuple[Trigger, Sender]:
        fields.setdefault("input_mapping", "data")
        fields.setdefault("input_schema", SCHEMA)
        trigger = make_trigger(Trigger.Kind.WEBHOOK, **fields)
        secret = trigger_secret_rotate(trigger=trigger)
        trigger.refresh_from_db()
        return trigger, Sender(live_server.url, trigger, secret)

    return make


def counts() -> tuple[int, int, int]:
    return Run.objects.count(), Firing.objects.count(), LineageEvent.objects.count()


INVOICE = {"type": "invoice.created", "data": {"invoice": "INV-7", "amount": 12.5}}


def test_a_signed_delivery_starts_a_run_with_the_mapped_input(hook, live_server):
    trigger, sender = hook()

    status, _, answer = sender.send("msg_first", INVOICE)

    assert status == 202, answer
    run = Run.objects.get()
    assert answer == {
        "run": str(run.pk),
        "url": live_server.url + reverse("runs:detail", args=[run.pk]),
    }
    assert run.status == RunStatus.QUEUED and run.trigger == trigger
    assert run.input == {"invoice": "INV-7", "amount": 12.5}
    queued = LineageEvent.objects.get(run_uuid=run.pk, kind="run.queued")
    assert queued.actor == f"trigger:{trigger.pk}"
    assert queued.payload["trigger_name"] == trigger.name
    assert queued.payload["firing_key"] == f"{trigger.pk}:msg_first"
    assert queued.payload["firing"] == INVOICE
    firing = Firing.objects.get()
    assert (firing.accepted, firing.key, firing.run) == (True, "msg_first", run)


def test_a_replayed_delivery_is_answered_with_the_first_run_and_starts_nothing(hook):
    _, sender = hook()
    status, _, first = sender.send("msg_once", INVOICE)
    assert status == 202

    # The same bytes again (a replay), and the sender's own retry signed anew.
    body = json.dumps(INVOICE).encode()
    headers = sender.headers("msg_once", body)
    for _ in range(2):
        status, _, again = sender.send("msg_once", body=body, headers=headers)
        assert (status, again) == (200, {**first, "duplicate": True})
    status, _, retried = sender.send("msg_once", INVOICE, timestamp=int(time.time()) + 1)
    assert (status, retried["run"], retried["duplicate"]) == (200, first["run"], True)
    assert Run.objects.count() == 1 and Firing.objects.count() == 1


def test_a_webhook_id_longer_than_the_column_is_still_deduplicated(hook):
    _, sender = hook()
    long_id = "msg_" + "x" * 300
    status, _, first = sender.send(long_id, INVOICE)
    assert status == 202
    status, _, again = sender.send(long_id, INVOICE)
    assert (status, again["run"]) == (200, first["run"])
    assert Firing.objects.get().key.startswith("sha256:")


@pytest.mark.parametrize(
    "spoil",
    ["tampered body", "another secret", "no signature", "no id", "a v1a signature only"],
)
def test_a_delivery_that_does_not_authenticate_is_refused_and_writes_nothing(hook, spoil):
    _, sender = hook()
    body = json.dumps(INVOICE).encode()
    headers = sender.headers("msg_x", body)
    if spoil == "tampered body":
        body = body.replace(b"INV-7", b"INV-8")
    elif spoil == "another secret":
        other = "whsec_" + base64.b64encode(b"x" * 32).decode()
        headers = sender.headers("msg_x", body, secret=other)
    elif spoil == "no signature":
        del headers["webhook-signature"]
    elif spoil == "no id":
        del headers["webhook-id"]
    else:
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v1a,")
    before = counts()

    status, _, answer = sender.send("msg_x", body=body, headers=headers)

    assert status == 401 and answer["reason"] == "signature", answer
    assert answer["error"]
    assert counts() == before


@pytest.mark.parametrize(("offset", "said"), [(-301, "old"), (301, "far in the future")])
def test_a_stale_or_future_timestamp_is_refused(hook, offset, said):
    _, sender = hook(config={"tolerance_seconds": 300})
    before = counts()
    status, _, answer = sender.send("msg_late", INVOICE, timestamp=int(time.time()) + offset)
    assert status == 401 and answer["reason"] == "timestamp", answer
    assert said in answer["error"] and "at most 300 seconds" in answer["error"]
    assert counts() == before


def test_unauthenticated_requests_only_read(hook, client):
    """What does not authenticate sends no INSERT, UPDATE or DELETE (the test client runs
    the view in this thread, so its statements are captured)."""
    _, sender = hook()
    body = json.dumps(INVOICE).encode()
    headers = sender.headers("msg_r", body)
    forged = {**headers, "webhook-signature": "v1," + base64.b64encode(b"0" * 32).decode()}
    stale = sender.headers("msg_r", body, timestamp=int(time.time()) - 3600)

    def meta(headers: dict[str, str]) -> dict[str, str]:
        return {f"HTTP_{name.upper().replace('-', '_')}": v for name, v in headers.items()}

    url, json_type = sender.path, "application/json"
    with CaptureQueriesContext(connection) as captured:
        statuses = [
            client.post(url, body, content_type=json_type, **meta(forged)).status_code,
            client.post(url, body, content_type=json_type, **meta(stale)).status_code,
            client.post(url, b"x" * 300_000, content_type=json_type).status_code,
            client.get(url).status_code,
            client.post("/hooks/not-a-trigger/", body, content_type=json_type).status_code,
        ]
    assert statuses == [401, 401, 413, 405, 404]
    statements = [q["sql"].split(None, 1)[0].upper() for q in captured.captured_queries]
    assert set(statements) <= {"SELECT"}, captured.captured_queries


def test_an_invalid_payload_is_refused_naming_the_field_and_starts_nothing(hook):
    _, sender = hook()
    status, _, answer = sender.send("msg_bad", {"data": {"invoice": 7}})
    assert status == 422 and answer["reason"] == "input", answer
    assert "invoice: 7 is not of type 'string'" in answer["error"]
    assert Run.objects.count() == 0 and LineageEvent.objects.count() == 0
    refused = Firing.objects.get()
    assert (refused.accepted, refused.refusal) == (False, Firing.Refusal.INPUT)

    status, _, answer = sender.send("msg_bad2", {"type": "no data"})
    assert status == 422 and "the mapping gave nothing" in answer["error"]
    # A refusal holds no key: the corrected delivery under the same id starts the run.
    assert sender.send("msg_bad", INVOICE)[0] == 202


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b"not json", "the body is not JSON: Expecting value (line 1, column 1)"),
        (b'{"data": {"invoice": "\xff"}}', "the body is not UTF-8 text: byte 22 is 0xff"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": 1, "a": 2}', 'the key "a" appears twice'),
        (b"[" * 101 + b"]" * 101, "nesting deeper than 100 levels"),
    ],
)
def test_a_body_that_is_not_strict_json_is_refused_saying_why(hook, body, said):
    _, sender = hook()
    before = counts()
    status, _, answer = sender.send("msg_j", body=body)
    assert status == 400 and answer["reason"] == "body", answer
    assert said in answer["error"]
    assert counts() == before


def test_a_rotated_secret_is_accepted_during_the_overlap_and_refused_after(hook):
    trigger, sender = hook()
    old = sender.secret
    new = trigger_secret_rotate(trigger=trigger, overlap=timedelta(minutes=5))

    assert sender.send("msg_old", INVOICE, secret=old)[0] == 202
    assert sender.send("msg_new", INVOICE, secret=new)[0] == 202

    Trigger.objects.filter(pk=trigger.pk).update(
        previous_secret_until=timezone.now() - timedelta(seconds=1)
    )
    status, _, answer = sender.send("msg_old2", INVOICE, secret=old)
    assert status == 401 and answer["reason"] == "signature"
    assert sender.send("msg_new2", INVOICE, secret=new)[0] == 202
    assert Run.objects.count() == 3


def test_a_body_over_the_limit_is_refused_with_413(hook):
    _, sender = hook(config={"max_body_bytes": 1024})
    fits = json.dumps({"data": {"invoice": "x" * 980}}).encode()
    assert len(fits) <= 1024 and sender.send("msg_fits", body=fits)[0] == 202
    body = json.dumps({"data": {"invoice": "x" * 1000}}).encode()
    status, _, answer = sender.send("msg_big", body=body)
    assert status == 413 and answer["reason"] == "size", answer
    assert "larger than this webhook's 1024 bytes" in answer["error"]
    assert Run.objects.count() == 1


@pytest.mark.parametrize(
    ("length", "status", "said"),
    [
        ("10000000", 413, "larger than this webhook's 262144 bytes"),
        ("9" * 40, 413, "larger than"),
        ("ten", 400, "Content-Length: 'ten' is not a number"),
    ],
)
def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(
    hook, length, status, said
):
    """The answer comes while the rest of the declared body is still unsent."""
    _, sender = hook()
    with socket.create_connection((sender.host, sender.port), timeout=30) as raw:
        raw.sendall(
            f"POST {sender.path} HTTP/1.1\r\nHost: {sender.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{".encode()
        )
        response = http.client.HTTPResponse(raw)
        response.begin()
        answer = json.loads(response.read(response.length))
    assert response.status == status and said in answer["error"], answer


@pytest.mark.parametrize("method", ["GET", "PUT", "HEAD"])
def test_only_post_is_accepted(hook, method):
    _, sender = hook()
    conn = http.client.HTTPConnection(sender.host, sender.port, timeout=30)
    conn.request(method, sender.path)
    response = conn.getresponse()
    answer = response.read()
    conn.close()
    assert response.status == 405 and response.getheader("Allow") == "POST"
    if method != "HEAD":
        assert json.loads(answer)["reason"] == "method"


def test_an_address_that_is_no_webhook_is_404_whichever_way(hook, make_trigger, live_server):
    _, sender = hook()
    cron = make_trigger(Trigger.Kind.CRON, config={"expression": "* * * * *"})
    no_secret = make_trigger(Trigger.Kind.WEBHOOK)
    answers = set()
    for public_id in (
        "x" * 32,
        cron.public_id,
        no_secret.public_id,
        "bad%00id",
        "y" * 300,
    ):
        other = Sender(live_server.url, no_secret, sender.secret)
        other.path = f"/hooks/{public_id}/"
        status, _, answer = other.send("msg_404", INVOICE)
        answers.add((status, json.dumps(answer)))
    assert answers == {
        (404, json.dumps({"error": "no webhook at this address", "reason": "unknown"}))
    }
    # Without the slash the address works too: a sender does not follow redirects.
    sender.path = sender.path.rstrip("/")
    assert sender.send("msg_bare", INVOICE)[0] == 202


def test_each_webhook_has_an_unguessable_address_and_one_webhooks_secret_opens_no_other(
    hook, live_server
):
    """192 random bits per trigger (32 URL-safe characters); a delivery signed for one
    webhook, sent to another's address, is refused there and starts nothing."""
    first, first_sender = hook()
    second, _ = hook()
    for trigger in (first, second):
        assert len(trigger.public_id) == 32 and re.fullmatch(r"[A-Za-z0-9_-]+", trigger.public_id)
    assert first.public_id != second.public_id and first.secret != second.secret

    misdirected = Sender(live_server.url, second, first_sender.secret)
    status, _, answer = misdirected.send("msg_cross", INVOICE)

    assert (status, answer["reason"]) == (401, "signature"), answer
    assert Run.objects.count() == 0 and Firing.objects.count() == 0
    assert first_sender.send("msg_cross", INVOICE)[0] == 202


def test_a_disabled_trigger_answers_409_and_records_it(hook):
    _, sender = hook(enabled=False)
    status, _, answer = sender.send("msg_off", INVOICE)
    assert status == 409 and answer["reason"] == "disabled", answer
    assert Run.objects.count() == 0
    assert Firing.objects.get().refusal == Firing.Refusal.DISABLED


def test_over_the_rate_limit_is_429_with_retry_after_and_recorded(hook):
    _, sender = hook(max_per_minute=2)
    assert [sender.send(f"msg_{n}", INVOICE)[0] for n in range(2)] == [202, 202]
    status, headers, answer = sender.send("msg_over", INVOICE)
    assert status == 429 and answer["reason"] == "rate", answer
    assert "at most 2 per minute" in answer["error"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    refused = Firing.objects.get(key="msg_over")
    assert (refused.accepted, refused.refusal, refused.run) == (False, Firing.Refusal.RATE, None)
    assert Run.objects.count() == 2


def test_over_the_tasks_live_runs_is_429(hook):
    trigger, sender = hook()
    trigger.task.max_live_runs = 1
    trigger.task.save(update_fields=["max_live_runs"])
    assert sender.send("msg_a", INVOICE)[0] == 202
    status, headers, answer = sender.send("msg_b", INVOICE)
    assert (status, answer["reason"], headers["Retry-After"]) == (429, "live", "30")


def test_a_burst_of_a_thousand_retries_of_a_hundred_ids_starts_a_hundred_runs(hook):
    """Each id delivered ten times, in a shuffled order, from eight clients at once."""
    trigger, sender = hook()
    ids = [f"msg_burst_{n:03d}" for n in range(100)]
    deliveries = [msg_id for msg_id in ids for _ in range(10)]
    random.Random(13).shuffle(deliveries)
    bodies = {msg_id: json.dumps({"data": {"invoice": msg_id}}).encode() for msg_id in ids}
    answers: list[tuple[str, int, str]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    pending = iter(deliveries)

    def client() -> None:
        # A connection per delivery, as many senders do (and as the bench does: see
        # bench_triggers.Sender.send for the kept-alive connection's 40 ms stall).
        try:
            while True:
                with lock:
                    msg_id = next(pending, None)
                if msg_id is None:
                    return
                status, _, answer = sender.send(msg_id, body=bodies[msg_id])
                with lock:
                    answers.append((msg_id, status, answer.get("run", "")))
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    assert len(answers) == 1000

    assert Run.objects.filter(trigger=trigger).count() == 100
    assert Firing.objects.filter(trigger=trigger).count() == 100
    statuses = [status for _, status, _ in answers]
    assert (statuses.count(202), statuses.count(200)) == (100, 900)
    runs_of = {}
    for msg_id, _, run in answers:
        runs_of.setdefault(msg_id, set()).add(run)
    assert all(len(runs) == 1 for runs in runs_of.values())
    started = dict(Run.objects.filter(trigger=trigger).values_list("firing__key", "pk"))
    assert {msg_id: runs.pop() for msg_id, runs in runs_of.items()} == {
        key: str(pk) for key, pk in started.items()
    }
