"""``manage.py import_tasks FILE [--apply --user USERNAME]``: show what a tasks file
(``export_tasks``'s format, docs/tasks-as-code.md) would change against what is live;
with ``--apply``, apply it as USERNAME through the admin's governed path: what widens
what runs without a person waits for a second person, named with its change's id.

An invalid file is refused whole, each fault with its line, column and field, and
nothing changes. Exit status: 0 applied or nothing to do, 1 refused (CommandError)."""

from __future__ import annotations

import sys

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tasks.as_code import MAX_BYTES, AsCodeError, tasks_import_apply, tasks_import_plan


class Command(BaseCommand):
    help = "Show what a tasks YAML file changes; apply it (governed) with --apply --user."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="The YAML file, or - for stdin.")
        parser.add_argument("--apply", action="store_true", help="Apply the changes.")
        parser.add_argument(
            "--user", help="Who applies it (required with --apply): their permissions apply."
        )

    def handle(self, *args, file: str, apply: bool, user: str | None, **options) -> None:
        if apply and not user:
            raise CommandError("--apply needs --user USERNAME: a change is made by a person")
        person = None
        if user:
            person = (
                get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: user}).first()
            )
            if person is None:
                raise CommandError(f"no user {user!r}")
        text = self.text_read(file)
        try:
            plan = tasks_import_plan(text=text, user=person)
        except AsCodeError as error:
            raise CommandError(
                f"{file} is refused, and nothing changed:\n"
                + "\n".join(f"  {p}" for p in error.problems)
            ) from None
        except PermissionDenied as error:
            raise CommandError(f"refused, and nothing changed: {error}") from None
        for line in plan.diff:
            self.stdout.write(line)
        if not plan.has_changes:
            return
        if not apply:
            self.stdout.write(
                "Nothing applied: run again with --apply --user USERNAME to apply it."
            )
            return
        try:
            result = tasks_import_apply(plan=plan, user=person)
        except AsCodeError as error:
            raise CommandError(
                "refused, and nothing changed:\n" + "\n".join(f"  {p}" for p in error.problems)
            ) from None
        except PermissionDenied as error:
            raise CommandError(f"refused, and nothing changed: {error}") from None
        self.stdout.write(f"Applied ({len(result.applied)}):")
        for line in result.applied:
            self.stdout.write(f"  {line}")
        for pending in result.pending:
            what = "change" if pending.kind == "config" else "autonomy change"
            self.stdout.write(
                f"Pending: {pending.task}: {what} #{pending.id} waits for a second person: "
                + "; ".join(pending.lines)
            )
        for note in result.notes:
            self.stdout.write(f"Note: {note}")

    def text_read(self, file: str) -> str:
        try:
            if file == "-":
                raw = sys.stdin.buffer.read(MAX_BYTES + 1)
            else:
                with open(file, "rb") as handle:
                    raw = handle.read(MAX_BYTES + 1)
        except OSError as error:
            raise CommandError(f"cannot read {file}: {error.strerror}") from None
        if len(raw) > MAX_BYTES:
            raise CommandError(
                f"{file} is refused, and nothing changed: larger than {MAX_BYTES:,} bytes"
            )
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise CommandError(
                f"{file} is refused, and nothing changed: line {line}: not UTF-8"
            ) from None
