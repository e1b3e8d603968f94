"""The approval inbox's decided list and a task's track record read approvals latest
decision first (manage.py bench_pages, docs/benchmarks.md)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("approvals", "0006_reminders"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="approval",
            index=models.Index(fields=["-decided_at"], name="approval_decided"),
        ),
    ]
