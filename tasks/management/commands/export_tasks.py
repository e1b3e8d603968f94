"""``manage.py export_tasks [SLUG ...] [--output FILE]``: the tasks (all, or those named)
with their grants, rules, budgets, dial and triggers, as YAML (docs/tasks-as-code.md).
Never a secret: ``import_tasks`` reads the file back with no change."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tasks.as_code import AsCodeError, tasks_export
from tasks.models import Task


class Command(BaseCommand):
    help = "Write tasks (grants, rules, budgets, dial, triggers) as YAML; never a secret."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slugs", nargs="*", help="The tasks to write (all when none).")
        parser.add_argument("--output", "-o", help="Write to this file (default: stdout).")

    def handle(self, *args, slugs: list[str], output: str | None, **options) -> None:
        tasks = Task.objects.all()
        if slugs:
            unknown = sorted(
                set(slugs) - set(tasks.filter(slug__in=slugs).values_list("slug", flat=True))
            )
            if unknown:
                raise CommandError(f"no task with the slug {', '.join(unknown)}")
            tasks = tasks.filter(slug__in=slugs)
        try:
            text = tasks_export(tasks=tasks)
        except AsCodeError as error:
            raise CommandError(f"not exported:\n{error}") from None
        if output:
            Path(output).write_text(text, encoding="utf-8")
            self.stderr.write(f"{tasks.count()} task(s) written to {output}")
        else:
            self.stdout.write(text, ending="")
