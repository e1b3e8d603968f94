from django.db import migrations

NAME = "agentops: tick the schedules"


def schedule_add(apps, schema_editor):
    """Every minute, django-q2 ticks the cron triggers (triggers.cron.cron_tick_job).
    The listeners' process ticks them more often; a slot fires once whichever comes
    first."""
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.update_or_create(
        name=NAME,
        defaults={
            "func": "triggers.cron.cron_tick_job",
            "schedule_type": "I",
            "minutes": 1,
            "repeats": -1,
        },
    )


def schedule_remove(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("triggers", "0001_initial"),
        ("django_q", "0018_task_success_index"),
    ]
    operations = [migrations.RunPython(schedule_add, schedule_remove)]
