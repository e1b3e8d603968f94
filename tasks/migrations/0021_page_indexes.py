"""The indexes the operator's pages read by at scale (measured by manage.py bench_pages,
docs/benchmarks.md): the runs list newest first, and a tool's latest calls with their
outcomes and latency (tool steps only, so a model turn's step writes no entry)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0020_triggers"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="run",
            index=models.Index(fields=["-created_at"], name="run_created"),
        ),
        migrations.AddIndex(
            model_name="step",
            index=models.Index(
                condition=models.Q(("tool__isnull", False)),
                fields=["tool", "-created_at"],
                include=("id", "status", "duration_ms"),
                name="step_tool_created",
            ),
        ),
    ]
