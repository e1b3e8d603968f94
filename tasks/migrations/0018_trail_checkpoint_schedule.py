from django.db import migrations

NAME = "agentops: checkpoint the trail"


def schedule_add(apps, schema_editor):
    """Every five minutes, django-q2 signs the lineage chains that grew since their last
    checkpoint (agentops.runtime.dispatch.trail_checkpoint_job); a run's end signs its
    own chain at once."""
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.update_or_create(
        name=NAME,
        defaults={
            "func": "agentops.runtime.dispatch.trail_checkpoint_job",
            "schedule_type": "I",
            "minutes": 5,
            "repeats": -1,
        },
    )


def schedule_remove(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0017_approver_group_protected"),
        ("django_q", "0018_task_success_index"),
    ]
    operations = [migrations.RunPython(schedule_add, schedule_remove)]
