"""``manage.py run_task SLUG``: start a run from the shell, as the web's Run button does,
and optionally follow it until it ends or waits for a person.

Exit codes with ``--wait``: 0 succeeded, 1 failed / halted / cancelled, 2 gave up waiting
(``--timeout``), 3 waits for a person. Bad input is a CommandError (1) and starts nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.urls import reverse

from agentops import states
from agentops.runtime.engine import Outcome, advance
from agentops.strict_json import json_loads_strict
from tasks.models import Run, RunStatus, Step, StepKind, StepStatus, Task, Trigger
from tasks.services import RunStartError, run_start

POLL_SECONDS = 0.2
EXIT_FAILED = 1
EXIT_TIMED_OUT = 2
EXIT_WAITING = 3
EXIT_INTERRUPTED = 130
WAITING_PREFIX = "waiting for a person: "


def input_parse(raw: str) -> dict[str, Any]:
    """The --input text as a JSON object, or a CommandError saying what is wrong with it."""
    try:
        value = json_loads_strict(raw)
    except json.JSONDecodeError as error:
        raise CommandError(
            f"--input is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
        ) from None
    if not isinstance(value, dict):
        raise CommandError(
            f'--input must be a JSON object, like {{"batch": "2026-11"}}, '
            f"not {type(value).__name__} {raw.strip()[:40]}"
        )
    return value


def task_for_slug(slug: str) -> Task:
    task = Task.objects.filter(slug=slug).first()
    if task is not None:
        return task
    known = list(Task.objects.order_by("slug").values_list("slug", flat=True)[:11])
    if not known:
        hint = "there are no tasks yet (`manage.py load_demo` loads the demo task)"
    else:
        hint = "tasks: " + ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
    raise CommandError(f"no task has the slug {slug!r} ({hint})")


def shorten(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def at_rest(status: str) -> bool:
    """The run needs nobody but a person now: it waits, or it has ended."""
    return status == RunStatus.WAITING or states.RUN.terminal(status)


class RunProgress:
    """What the shell has been shown of one run, so that each look at the database
    prints one line per change: the run's status, and each step as it appears or moves.

    Steps are read from the record, never inferred, so a step that came and settled
    between two looks is still shown, in order."""

    def __init__(self, run: Run, write: Callable[[str], None]) -> None:
        self.run_id = run.pk
        self.step_limit = run.step_limit
        self.write = write
        self.status = ""
        self.unsettled_from = 1  # every step numbered below this has reached a final status
        self.shown: dict[int, str] = {}  # step number -> the status last printed
        self.tokens_in = 0
        self.tokens_out = 0

    def report(self) -> Run:
        """Print what changed since the last look; return the run as it is now."""
        # The run before its steps: a run seen at rest then has every step it came to
        # rest with visible, so the last look misses none.
        run = Run.objects.select_related("task_version").get(pk=self.run_id)
        self.step_limit = run.step_limit  # people may grant more steps on the way
        steps = Step.objects.filter(run_id=self.run_id, number__gte=self.unsettled_from)
        step_lines = []
        for step in steps.order_by("number"):
            if self.shown.get(step.number) == step.status:
                continue
            if step.number not in self.shown:  # a step's tokens are recorded with it
                self.tokens_in += step.tokens_in
                self.tokens_out += step.tokens_out
            self.shown[step.number] = step.status
            step_lines.append(self.step_line(step))
        while self.shown.get(self.unsettled_from) is not None and states.STEP.terminal(
            self.shown[self.unsettled_from]
        ):
            self.unsettled_from += 1
        status_lines = []
        if run.status != self.status:
            self.status = run.status
            status_lines.append(f"  run {run.status}")
        # A run that comes to rest does so because of its last steps: show them first.
        lines = step_lines + status_lines if at_rest(run.status) else status_lines + step_lines
        for line in lines:
            self.write(line)
        return run

    def step_line(self, step: Step) -> str:
        where = f"  step {step.number}/{self.step_limit}"
        if step.kind == StepKind.MODEL:
            calls = ", ".join(call["name"] for call in step.tool_calls)
            what = f"calls {calls}" if calls else "answers"
            tokens = f"tokens so far {self.tokens_in} in / {self.tokens_out} out"
            return f"{where}  model {step.status}: {what}  ({tokens})"
        line = f"{where}  {step.kind}"
        if step.tool_name:
            line += f" {step.tool_name}"
        line += f" {step.status}"
        confidence = step.result.get("confidence") if isinstance(step.result, dict) else None
        if step.status == StepStatus.PROPOSED and step.gate:
            line += f": held, {shorten(step.gate)}"
        elif step.status == StepStatus.SIMULATED:
            line += ": recorded, not made (Shadow)"
        elif step.error:
            line += f": {shorten(step.error)}"
        elif isinstance(confidence, int | float):
            line += f": confidence {confidence:.2f}"
        return line


class Command(BaseCommand):
    help = (
        "Start a run of a task from the shell; with --wait, follow it until it ends or waits "
        "for a person (exit 0 succeeded, 1 failed/halted/cancelled, 2 timed out, 3 waiting)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="the task's slug")
        parser.add_argument(
            "--input",
            default="{}",
            help="the run's input, a JSON object matching the task's schema "
            '(default {}), like \'{"batch": "2026-11"}\'',
        )
        parser.add_argument(
            "--wait",
            action="store_true",
            help="show the run's progress until it ends or waits for a person",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=600.0,
            help="with --wait: give up waiting after this many seconds (default 600)",
        )
        parser.add_argument(
            "--inline",
            action="store_true",
            help="advance the run in this process instead of leaving it to the queue's "
            "workers (for use without a worker); implies --wait",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        timeout = options["timeout"]
        if not timeout > 0:
            raise CommandError(f"--timeout must be a positive number of seconds, not {timeout:g}")
        task = task_for_slug(options["slug"])
        run_input = input_parse(options["input"])
        # The command says itself that the run is queued; django-q2's own INFO line
        # ("Enqueued …") would only repeat it on standard error.
        queue_log = logging.getLogger("django-q")
        level = queue_log.level
        queue_log.setLevel(max(level, logging.WARNING))
        try:
            run = run_start(
                task=task, run_input=run_input, user=None, trigger_kind=Trigger.Kind.MANUAL
            )
        except RunStartError as error:
            raise CommandError(f"the run of {task.slug} did not start: {error}") from None
        finally:
            queue_log.setLevel(level)
        self.say(f"Run {run.pk} of {task.slug} queued: {run_path(run)}")
        if not (options["wait"] or options["inline"]):
            return

        progress = RunProgress(run, self.say)
        deadline = time.monotonic() + timeout
        try:
            run = progress.report()
            if options["inline"]:
                run = self.advance_inline(progress, deadline)
            run = self.follow(progress, deadline)
        except KeyboardInterrupt:
            self.stderr.write(
                f"interrupted: the run goes on without this command; follow it at "
                f"{run_path(run)} (a run advanced --inline is handed to a worker once its "
                f"lease expires)"
            )
            raise SystemExit(EXIT_INTERRUPTED) from None
        if not at_rest(run.status):
            self.stderr.write(
                f"gave up waiting after {timeout:g} s: the run is {run.status} and goes on "
                f"without this command; follow it at {run_path(run)}"
            )
            raise SystemExit(EXIT_TIMED_OUT)
        self.conclude(run)

    def say(self, line: str) -> None:
        # Flushed line by line, so progress shows live through a pipe too.
        self.stdout.write(line)
        self.stdout.flush()

    def advance_inline(self, progress: RunProgress, deadline: float) -> Run:
        """Work the run here, slice after slice, as a worker would. A worker of the queue
        may hold it too (the queue still got its message): the lease lets one of us in,
        and ``follow`` then watches the other."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return progress.report()
            # A slice ends at the deadline at the latest; the run is then queued again.
            outcome = advance(
                progress.run_id,
                max_seconds=max(0.1, min(settings.AGENTOPS_SLICE_SECONDS, remaining)),
            )
            run = progress.report()
            if outcome is not Outcome.YIELDED:
                return run

    def follow(self, progress: RunProgress, deadline: float) -> Run:
        """Look at the run every POLL_SECONDS until it is at rest or the deadline passes."""
        run = progress.report()
        while not at_rest(run.status) and time.monotonic() < deadline:
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            run = progress.report()
        return run

    def conclude(self, run: Run) -> None:
        """Say how the run came to rest, and exit with the code that says it too."""
        if run.status == RunStatus.SUCCEEDED:
            self.say(
                self.style.SUCCESS(
                    f"succeeded in {run.steps_used} steps "
                    f"(tokens {run.tokens_in} in / {run.tokens_out} out):"
                )
            )
            self.say(run.outcome or "(the agent gave no final answer)")
            return
        if run.status == RunStatus.WAITING:
            why = run.reason.removeprefix(WAITING_PREFIX) or "a decision"
            self.say(
                self.style.WARNING(
                    f"waiting for a person: {why} — decide at {reverse('approvals:inbox')}"
                )
            )
            raise SystemExit(EXIT_WAITING)
        self.stderr.write(f"{run.status}: {run.reason or 'no reason was recorded'}")
        raise SystemExit(EXIT_FAILED)


def run_path(run: Run) -> str:
    return reverse("runs:detail", args=[run.pk])
