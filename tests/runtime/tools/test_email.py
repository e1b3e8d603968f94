"""Email tools, driven through the engine against a real SMTP server (aiosmtpd) started
by each test on 127.0.0.1."""

from __future__ import annotations

import uuid

import pytest
from django.core import mail

from agentops.runtime.engine import Outcome
from agentops.runtime.tools import ToolContext, executor_for_kind
from agentops.runtime.tools.email import EmailExecutor
from approvals.models import ApprovalStatus
from approvals.services import approval_decide
from lineage.models import LineageEvent
from tasks.models import Run, RunStatus, Step, StepStatus, Task, Tool
from tasks.services import run_start
from tests.conftest import run_until_rest
from tests.peers.smtp import free_port, smtp_peer, smtp_settings

ADDRESSES = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
SCHEMA = {
    "type": "object",
    "properties": {
        "to": ADDRESSES,
        "cc": ADDRESSES,
        "subject": {"type": "string"},
        "body": {"type": "string"},
    },
    "required": ["to", "subject", "body"],
    "additionalProperties": False,
}
CONFIG = {
    "allowed_domains": ["example.com", ".example.org"],
    "from": "agentops@example.com",
    "subject_prefix": "[agentops] ",
    "max_recipients": 3,
}
MESSAGE = {"to": "finance@example.com", "subject": "Mismatches", "body": "INV-1003 unpaid."}


def email_tool(*, save: bool = True, **fields) -> Tool:
    tool = Tool(
        **{
            "name": "email_finance",
            "kind": Tool.Kind.EMAIL,
            "side_effect": "irreversible",
            "input_schema": SCHEMA,
            "config": CONFIG,
            "timeout_seconds": 5.0,
            "retry_backoff_seconds": 0.0,  # retries in the tests need not wait
            **fields,
        }
    )
    if save:
        tool.save()
    return tool


def sending_run(make_task, operator, arguments: dict, *, autonomy_level: int = 3) -> Run:
    task: Task = make_task(
        [{"content": "send it", "calls": [("email_finance", arguments)]}, {"content": "done"}],
        tools=["email_finance"],
        autonomy_level=autonomy_level,
    )
    return run_start(task=task, run_input={}, user=operator)


def tool_step(run: Run) -> Step:
    return run.steps.get(kind="tool")


def events(run: Run, kind: str) -> int:
    return LineageEvent.objects.filter(run_uuid=run.pk, kind=kind).count()


# Through the engine ------------------------------------------------------------------


@pytest.mark.django_db
def test_an_allowed_message_reaches_the_smtp_server_with_its_idempotency_key(
    make_task, operator, settings
):
    email_tool()
    with smtp_peer() as peer:
        smtp_settings(settings, peer)
        run = sending_run(
            make_task,
            operator,
            {**MESSAGE, "cc": ["audit@eu.example.org", "example.org@example.com"]},
        )
        assert run_until_rest(run) is Outcome.FINISHED
        received = peer.messages

    assert run.status == RunStatus.SUCCEEDED
    step = tool_step(run)
    assert step.status == StepStatus.SUCCEEDED
    assert len(received) == 1
    mail = received[0]
    assert mail.mail_from == "agentops@example.com"
    assert mail.rcpt_tos == [
        "finance@example.com",
        "audit@eu.example.org",
        "example.org@example.com",
    ]
    assert mail.message["To"] == "finance@example.com"
    assert mail.message["Subject"] == "[agentops] Mismatches"
    assert mail.message.get_content().strip() == "INV-1003 unpaid."
    assert mail.message["X-Agentops-Idempotency-Key"] == step.idempotency_key
    assert step.idempotency_key == f"{run.pk}:{step.number}"
    assert step.result == {
        "sent": 1,
        "to": ["finance@example.com"],
        "cc": ["audit@eu.example.org", "example.org@example.com"],
        "subject": "[agentops] Mismatches",
        "message_id": mail.message["Message-ID"],
    }
    assert mail.message["Message-ID"] == f"<agentops.{run.pk}.{step.number}@example.com>"


@pytest.mark.django_db
def test_a_recipient_outside_the_allowed_domains_is_refused_and_nothing_is_sent(
    make_task, operator, settings
):
    email_tool()
    with smtp_peer() as peer:
        smtp_settings(settings, peer)
        run = sending_run(make_task, operator, {**MESSAGE, "cc": "leak@example.net"})
        assert run_until_rest(run) is Outcome.FINISHED
        received = peer.messages

    step = tool_step(run)
    assert step.status == StepStatus.REFUSED
    assert "cc: leak@example.net is outside the allowed domains (example.com, .example.org)" in (
        step.error
    )
    assert received == []
    assert events(run, "tool.refused") == 1 and events(run, "tool.started") == 0
    assert run.status == RunStatus.SUCCEEDED  # the model saw the refusal and answered


@pytest.mark.django_db
def test_at_supervised_the_send_waits_for_approval_then_goes_once(make_task, operator, settings):
    email_tool()
    with smtp_peer() as peer:
        smtp_settings(settings, peer)
        run = sending_run(make_task, operator, MESSAGE, autonomy_level=1)
        assert run_until_rest(run) is Outcome.WAITING
        approval = run.approvals.get(status=ApprovalStatus.PENDING)
        assert approval.tool_name == "email_finance"
        assert "irreversible call waits for a person" in approval.gate
        assert peer.messages == []  # nothing sent before a person approves

        approval_decide(approval=approval, user=operator, approve=True)
        assert run_until_rest(run) is Outcome.FINISHED
        received = peer.messages

    assert run.status == RunStatus.SUCCEEDED
    assert tool_step(run).status == StepStatus.SUCCEEDED
    assert [m.rcpt_tos for m in received] == [["finance@example.com"]]


@pytest.mark.django_db
def test_a_server_that_refuses_the_recipient_fails_the_step_in_its_words_without_retrying(
    make_task, operator, settings
):
    email_tool()
    refuse = {"finance@example.com": "550 5.1.1 finance: no such mailbox here"}
    with smtp_peer(refuse=refuse) as peer:
        smtp_settings(settings, peer)
        run = sending_run(make_task, operator, MESSAGE)
        assert run_until_rest(run) is Outcome.FINISHED
        received = peer.messages

    step = tool_step(run)
    assert step.status == StepStatus.FAILED
    assert "550 5.1.1 finance: no such mailbox here" in step.error
    assert "nothing was sent" in step.error and "tried" not in step.error
    assert events(run, "tool.retrying") == 0
    assert received == []


@pytest.mark.django_db
def test_a_recipient_refused_among_others_is_reported_while_the_others_get_it(
    make_task, operator, settings
):
    email_tool()
    refuse = {"gone@example.com": "550 5.1.1 gone: no such mailbox"}
    with smtp_peer(refuse=refuse) as peer:
        smtp_settings(settings, peer)
        run = sending_run(
            make_task, operator, {**MESSAGE, "to": ["finance@example.com", "gone@example.com"]}
        )
        assert run_until_rest(run) is Outcome.FINISHED
        received = peer.messages

    step = tool_step(run)
    assert step.status == StepStatus.SUCCEEDED
    assert step.result["refused"] == {"gone@example.com": "550 5.1.1 gone: no such mailbox"}
    assert [m.rcpt_tos for m in received] == [["finance@example.com"]]


@pytest.mark.django_db
def test_a_temporary_refusal_is_retried_then_fails_with_the_servers_words(
    make_task, operator, settings
):
    email_tool()
    refuse = {"finance@example.com": "450 4.2.1 mailbox busy, try later"}
    with smtp_peer(refuse=refuse) as peer:
        smtp_settings(settings, peer)
        run = sending_run(make_task, operator, MESSAGE)
        assert run_until_rest(run) is Outcome.FINISHED
        received = peer.messages

    step = tool_step(run)
    assert step.status == StepStatus.FAILED
    assert "450 4.2.1 mailbox busy, try later" in step.error
    assert step.error.endswith("(tried 3 times)")
    assert events(run, "tool.retrying") == 2
    assert received == []


@pytest.mark.django_db
def test_a_closed_port_is_a_transient_failure_retried_then_failed(make_task, operator, settings):
    email_tool()
    smtp_settings(settings, free_port())  # nobody listens there
    run = sending_run(make_task, operator, MESSAGE)
    assert run_until_rest(run) is Outcome.FINISHED

    step = tool_step(run)
    assert step.status == StepStatus.FAILED
    assert "could not reach the mail server at 127.0.0.1:" in step.error
    assert "ConnectionRefusedError" in step.error and "nothing was sent" in step.error
    assert step.error.endswith("(tried 3 times)")
    assert events(run, "tool.retrying") == 2
    assert run.status == RunStatus.SUCCEEDED  # the model was told, and gave its answer


@pytest.mark.django_db
def test_a_connection_dropped_before_the_data_is_retried_as_nothing_was_sent(
    make_task, operator, settings
):
    email_tool()
    with smtp_peer(hang_up={"finance@example.com"}) as peer:
        smtp_settings(settings, peer)
        run = sending_run(make_task, operator, MESSAGE)
        assert run_until_rest(run) is Outcome.FINISHED
        received = peer.messages

    step = tool_step(run)
    assert step.status == StepStatus.FAILED
    assert "before the message was handed over; nothing was sent" in step.error
    assert events(run, "tool.retrying") == 2
    assert received == []


@pytest.mark.django_db
def test_no_answer_after_the_data_is_not_retried_and_says_it_may_have_been_sent(
    make_task, operator, settings
):
    email_tool(timeout_seconds=0.5)
    with smtp_peer(reply_delay=5.0) as peer:
        smtp_settings(settings, peer)
        run = sending_run(make_task, operator, MESSAGE)
        assert run_until_rest(run) is Outcome.FINISHED
        received = peer.messages

    step = tool_step(run)
    assert step.status == StepStatus.FAILED
    assert "no answer within 0.5 seconds" in step.error
    assert "it may have been sent" in step.error
    assert events(run, "tool.retrying") == 0
    assert len(received) == 1  # indeed it was: only the server's answer was lost


@pytest.mark.django_db
def test_a_domain_removed_while_the_call_waited_for_approval_is_not_sent_to(
    make_task, operator, settings
):
    tool = email_tool()
    with smtp_peer() as peer:
        smtp_settings(settings, peer)
        run = sending_run(make_task, operator, MESSAGE, autonomy_level=1)
        assert run_until_rest(run) is Outcome.WAITING
        tool.config = {**CONFIG, "allowed_domains": [".example.org"]}
        tool.save(update_fields=["config"])
        approval_decide(approval=run.approvals.get(), user=operator, approve=True)
        assert run_until_rest(run) is Outcome.FINISHED
        received = peer.messages

    step = tool_step(run)
    assert step.status == StepStatus.FAILED
    assert step.error.startswith("not sent: to: finance@example.com is outside the allowed")
    assert received == []


# The executor alone ------------------------------------------------------------------


def test_other_backends_send_too_with_the_same_headers(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    context = ToolContext(run_id=uuid.uuid4(), step_number=4, idempotency_key="run-1:4")
    result = EmailExecutor().execute(email_tool(save=False), MESSAGE, context)
    assert result.ok, result.error
    assert result.value["message_id"] == "<agentops.run-1.4@example.com>"
    (sent,) = mail.outbox
    assert sent.to == ["finance@example.com"] and sent.subject == "[agentops] Mismatches"
    assert sent.extra_headers["X-Agentops-Idempotency-Key"] == "run-1:4"


def test_the_email_kind_has_its_executor():
    assert isinstance(executor_for_kind("email"), EmailExecutor)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, ["allowed_domains is required"]),
        ({"allowed_domains": []}, ["allowed_domains must be a non-empty list of domains"]),
        ({"allowed_domains": "example.com"}, ["allowed_domains must be a non-empty list"]),
        ({"allowed_domains": [7]}, ["allowed_domains[0]: 7 is not a string"]),
        ({"allowed_domains": ["*"]}, ["allowed_domains[0]: '*' is not a domain"]),
        ({"allowed_domains": ["a@example.com"]}, ["'a@example.com' is not a domain"]),
        (
            {"allowed_domains": ["example.com"], "from": "not an address"},
            ["from: 'not an address' is not a valid email address"],
        ),
        ({"allowed_domains": ["example.com"], "from": ""}, ["from: give an address"]),
        (
            {"allowed_domains": ["example.com"], "reply_to": "x@example.com"},
            ["unknown key 'reply_to'"],
        ),
        (
            {"allowed_domains": ["example.com"], "max_recipients": 0},
            ["max_recipients: 0 is not a positive whole number"],
        ),
        (
            {"allowed_domains": ["example.com"], "max_recipients": "5"},
            ["max_recipients: '5' is not a positive whole number"],
        ),
        (
            {"allowed_domains": ["example.com"], "max_recipients": True},
            ["max_recipients: True is not a positive whole number"],
        ),
        ({"allowed_domains": ["example.com"], "subject_prefix": 3}, ["subject_prefix: 3 is"]),
        (
            {"allowed_domains": [], "from": "x", "colour": "red"},
            ["unknown key 'colour'", "allowed_domains must be", "from: 'x' is not"],
        ),
    ],
)
def test_config_errors_name_each_problem(config, expected):
    errors = EmailExecutor().config_errors(config)
    assert len(errors) == len(expected), errors
    for error, fragment in zip(errors, expected, strict=True):
        assert fragment in error


def test_a_good_config_has_no_errors():
    assert EmailExecutor().config_errors(CONFIG) == []
    assert EmailExecutor().config_errors({"allowed_domains": ["example.com"]}) == []
    assert (
        EmailExecutor().config_errors(
            {"allowed_domains": ["bücher.example"], "from": "Agentops <agentops@example.com>"}
        )
        == []
    )


def test_not_an_object_is_a_config_error():
    assert EmailExecutor().config_errors(["example.com"]) == ["the config must be a JSON object"]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (MESSAGE, []),
        ({**MESSAGE, "to": ["FINANCE@Example.COM", "x@deep.sub.example.org"]}, []),
        ({**MESSAGE, "to": "someone@example.org"}, []),  # .example.org admits the domain too
        (
            {**MESSAGE, "to": "x@notexample.com"},
            ["to: x@notexample.com is outside the allowed domains"],
        ),
        (
            {**MESSAGE, "to": "x@example.com.evil.test"},
            ["to: x@example.com.evil.test is outside the allowed domains"],
        ),
        ({**MESSAGE, "to": "x@sub.example.com"}, ["is outside the allowed domains"]),
        ({**MESSAGE, "to": "not-an-address"}, ["to: 'not-an-address' is not a valid email"]),
        (
            {**MESSAGE, "to": "Ann <ann@example.com>"},
            ["to: 'Ann <ann@example.com>' is not a valid email address"],
        ),
        (
            {
                **MESSAGE,
                "to": ["a@example.com", "b@example.com"],
                "cc": ["c@example.com", "d@example.com"],
            },
            ["the call names 4 recipients (to and cc); this tool allows 3"],
        ),
        ({**MESSAGE, "to": 5}, ["to: 5 is not valid under any of the given schemas"]),
        ({"to": "a@example.com", "subject": "hi"}, ["'body' is a required property"]),
    ],
)
def test_validate_checks_the_recipients_against_the_policy(arguments, expected):
    tool = email_tool(save=False)
    errors = EmailExecutor().validate(tool, arguments)
    assert len(errors) == len(expected), errors
    for error, fragment in zip(errors, expected, strict=True):
        assert fragment in error


def test_without_a_schema_the_message_shape_is_still_checked():
    tool = email_tool(save=False, input_schema={})
    errors = EmailExecutor().validate(tool, {"to": [1], "subject": "a\nBcc: x@evil.test"})
    assert errors == [
        "to: must be an address or a list of addresses, not [1]",
        "body: required: a string",
        "subject: must be one line",
    ]
    assert EmailExecutor().validate(tool, {"to": [], "subject": "s", "body": "b"}) == [
        "to: name at least one recipient"
    ]


def test_a_tool_with_a_broken_config_refuses_every_call():
    tool = email_tool(save=False, config={"allowed_domains": []})
    errors = EmailExecutor().validate(tool, MESSAGE)
    assert errors == [
        "the tool's config is invalid: allowed_domains must be a non-empty list of domains, not []"
    ]
