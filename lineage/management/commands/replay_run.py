"""``manage.py replay_run RUN``: drive the engine again over a run's record, with
nothing fired, and say whether it reaches the same decisions (agentops.runtime.replay).

Exit status 0 when it does, 1 when a decision differs (the report names the first);
a run that cannot be replayed is a CommandError (exit status 1 too, said on stderr)."""

from __future__ import annotations

import json
import uuid

from django.core.management.base import BaseCommand, CommandError

from agentops.runtime.replay import ReplayRefused, ReplayReport, quoted, run_replay
from tasks.models import Run

EXIT_DIFFERS = 1


class Command(BaseCommand):
    help = (
        "Replay a run that has ended: the engine works a copy of it, answered from the "
        "run's recorded model turns, tool results and decisions, fires nothing and keeps "
        "nothing; report whether it proposes the same calls, meets the same gates and "
        "ends the same way, or the first step where it does not. Exit status 0 when the "
        "same, 1 when it differs."
    )

    def add_arguments(self, parser):
        parser.add_argument("run", help="the run's UUID")
        parser.add_argument(
            "--json", action="store_true", help="print the report as one JSON object"
        )

    def handle(self, *args, **options):
        run = run_named(options["run"])
        try:
            report = run_replay(run=run)
        except ReplayRefused as refusal:
            raise CommandError(str(refusal)) from None
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), sort_keys=True))
        else:
            self.stdout.write(report_said(report))
        if not report.same:
            raise SystemExit(EXIT_DIFFERS)


def run_named(text: str) -> Run:
    try:
        run_id = uuid.UUID(text.strip())
    except ValueError:
        raise CommandError(f"{quoted(text)!r} is not a run's UUID") from None
    run = Run.objects.select_related("task", "task_version").filter(pk=run_id).first()
    if run is None:
        raise CommandError(f"there is no run {run_id}")
    return run


def report_said(report: ReplayReport) -> str:
    """The report for a person: what was replayed, and the verdict."""
    lines = [
        f"Run {report.run} (task {quoted(report.task)}, version {report.task_version}), "
        f"replayed over its record with nothing fired."
    ]
    if report.same:
        lines.append(
            f"Same decisions: all {report.compared} match (every call proposed, every "
            f"gate, and the end: {end_said(report.original_end)})."
        )
    else:
        difference = report.difference
        lines.append(f"Differs at {difference.at} (decision {report.compared}):")
        lines.append(f"  original: {difference.original or '(nothing: the original ended before)'}")
        lines.append(f"  replay:   {difference.replay or '(nothing: the replay ended before)'}")
        lines.append(f"The original ended {end_said(report.original_end)};")
        lines.append(f"the replay ended {end_said(report.replay_end)}.")
    lines.extend(f"Note: {quoted(note)}" for note in report.notes)
    return "\n".join(lines)


def end_said(end: dict[str, str]) -> str:
    return end["status"] + (f" ({quoted(end['reason'])})" if end["reason"] else "")
