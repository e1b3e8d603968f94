from django.db import migrations

NAME = "agentops: reap runs"


def schedule_add(apps, schema_editor):
    """Every minute, django-q2 runs the reaper (agentops.runtime.scheduler.runs_reap)."""
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.update_or_create(
        name=NAME,
        defaults={
            "func": "agentops.runtime.dispatch.runs_reap_job",
            "schedule_type": "I",
            "minutes": 1,
            "repeats": -1,
        },
    )


def schedule_remove(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0002_unknown_outcome_and_queued_at"),
        ("django_q", "0018_task_success_index"),
    ]
    operations = [migrations.RunPython(schedule_add, schedule_remove)]
