from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from demo.crm import crm_create
from demo.helpdesk import helpdesk_create
from demo.ledger import ledger_create
from demo.triggers import (
    DEMO_WEBHOOK_BODY,
    DEMO_WEBHOOK_SECRET,
    demo_triggers_create,
    webhook_curl,
)
from demo.workflows import WORKFLOWS, Loaded, workflow_load
from tasks.models import Task, Tool, ToolGrant, Trigger
from tasks.services import task_version_current, tools_sync
from triggers.selectors import webhook_path

DEMO_SLUG = "reconcile-invoices"
# The hosts of a machine's own loopback ("testserver": Django's test client).
LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1", "testserver"}


class Command(BaseCommand):
    help = (
        "Load the demo: the sample ledger, helpdesk and CRM; the three workflows' tasks "
        "(reconcile invoices, triage support email, enrich and route leads) with their "
        "triggers; and a demo login."
    )

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", default="demo-password")
        parser.add_argument(
            "--base-url",
            default="http://127.0.0.1:8000",
            help="Where the demo is served, for the webhook's curl line.",
        )
        parser.add_argument(
            "--allow-public",
            action="store_true",
            help="Load the demo (a superuser demo / demo-password, webhooks signed with "
            "secrets printed in the docs) on a deployment that answers hosts other than "
            "this machine's loopback.",
        )

    @transaction.atomic
    def handle(self, *args, **options):
        # The demo's login and its webhooks' secrets are public: on a deployment others
        # can reach they would be anyone's way in.
        public = [host for host in settings.ALLOWED_HOSTS if host not in LOCAL_HOSTS]
        if public and not options["allow_public"]:
            raise CommandError(
                f"this deployment answers {', '.join(public)} (ALLOWED_HOSTS); the demo "
                "makes a superuser with a known password and webhooks signed with public "
                "secrets: not loaded (--allow-public to load it anyway)"
            )
        ledger = ledger_create()
        # The sample systems are rebuilt, as the ledger is: the demo starts from its data.
        stores = [helpdesk_create(), crm_create()]
        tools_sync()
        # Created once; after that the task is the operator's: an edit, or a turn of its
        # dial (recorded in the task's trail), is never undone behind their back.
        task, created = Task.objects.get_or_create(
            slug=DEMO_SLUG,
            defaults={
                "name": "Reconcile invoices",
                "description": "Reconcile a month's invoices against the payments received "
                "and email finance the mismatches. Runs offline on a scripted model.",
                "objective_template": "Reconcile the invoices of batch {batch} against the "
                "payments received, and email finance@example.com a summary of every mismatch.",
                "instructions": "Amounts are in cents. Report every unpaid, short or double "
                "payment. Emailing is irreversible: send one summary only.",
                "input_schema": {
                    "type": "object",
                    "properties": {
                        "batch": {
                            "type": "string",
                            "pattern": "^[0-9]{4}-[0-9]{2}$",
                            "description": "the month, YYYY-MM",
                        }
                    },
                    "required": ["batch"],
                    "additionalProperties": False,
                },
                "example_input": {"batch": "2026-11"},
                "model": "scripted:invoice-reconcile",
                "max_steps": 20,
                "autonomy_level": 1,
                "max_live_runs": 3,
            },
        )
        if created:
            for name in ("ledger_invoices", "ledger_payments", "email_send"):
                ToolGrant.objects.create(task=task, tool=Tool.objects.get(name=name))
        # The triggers come with the task, or once to a task an earlier load_demo made
        # before there were triggers; a task with any trigger is left as it is.
        triggers_made = not task.triggers.exists()
        if triggers_made:
            demo_triggers_create(task)
        version = task_version_current(task=task)

        User = get_user_model()
        user, _ = User.objects.get_or_create(username=options["username"])
        user.is_staff = True
        user.is_superuser = True
        user.set_password(options["password"])
        user.save()

        self.stdout.write(f"Sample ledger: {ledger}")
        self.stdout.write(
            f"Task: {task.name} ({task.slug}) v{version.number}"
            + ("" if created else ", as it was: an existing task is left as it is")
        )
        self.stdout.write(f"Login: {user.username} / {options['password']}")
        self.triggers_said(task, made=triggers_made, base_url=options["base_url"])
        for workflow in WORKFLOWS:
            self.workflow_said(workflow_load(workflow), base_url=options["base_url"])
        for store in stores:
            self.stdout.write(f"Sample store: {store}")

    def workflow_said(self, loaded: Loaded, *, base_url: str) -> None:
        task = loaded.task
        version = task_version_current(task=task)
        self.stdout.write(
            f"Task: {task.name} ({task.slug}) v{version.number}"
            + ("" if loaded.created else ", as it was: an existing task is left as it is")
        )
        for trigger in task.triggers.order_by("name", "pk"):
            self.stdout.write(
                f"Trigger: {trigger.name} ({trigger.get_kind_display()}"
                f"{'' if trigger.enabled else ', disabled'})"
            )
        if not loaded.triggers_made:
            self.stdout.write("  (the task had triggers: they are left as they are)")
        if loaded.hint:
            # A hint may name the site, as the port make demo was given.
            self.stdout.write("  " + loaded.hint.format(base_url=base_url.rstrip("/")))

    def triggers_said(self, task: Task, *, made: bool, base_url: str) -> None:
        triggers = list(task.triggers.order_by("name", "pk"))
        for trigger in triggers:
            self.stdout.write(
                f"Trigger: {trigger.name} ({trigger.get_kind_display()}"
                f"{'' if trigger.enabled else ', disabled'})"
            )
        if triggers and not made:
            self.stdout.write("  (the task had triggers: they are left as they are)")
        webhook = next((t for t in triggers if t.kind == Trigger.Kind.WEBHOOK and t.enabled), None)
        if webhook is None:
            return
        url = base_url.rstrip("/") + webhook_path(webhook)
        if webhook.secret != DEMO_WEBHOOK_SECRET:
            self.stdout.write(
                f"Webhook: POST to {url}, signed with its secret (rotated: not the demo's)."
            )
            return
        self.stdout.write(
            "Start a run with a signed webhook (the demo's secret, known to all: demo only):"
        )
        self.stdout.write(webhook_curl(url=url, secret=webhook.secret, body=DEMO_WEBHOOK_BODY))
