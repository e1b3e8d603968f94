# The rate limit counts per person, all their tokens together (a limit per token was no
# limit for someone who makes many). The table holds only the current minute's counts,
# so it is made anew rather than converted: nothing in it is worth keeping.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agentops", "0001_api_tokens"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.DeleteModel(name="ApiRateWindow"),
        migrations.CreateModel(
            name="ApiRateWindow",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("minute", models.DateTimeField()),
                ("count", models.PositiveIntegerField(default=0)),
                (
                    "user",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(fields=("user", "minute"), name="api_rate_user_minute")
                ],
                "indexes": [models.Index(fields=["minute"], name="api_rate_minute")],
            },
        ),
    ]
