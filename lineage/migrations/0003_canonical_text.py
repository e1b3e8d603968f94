"""Each event keeps the exact text its hash covers (hash version 1); events written
before keep version 0 and are verified as they were hashed. SQLite rebuilds the table to
add a column, which drops its triggers: they are installed again, with the new one that
refuses REPLACE and UPSERT."""

from django.db import migrations, models


def install(apps, schema_editor):
    from lineage.triggers import triggers_install

    triggers_install(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [("lineage", "0002_append_only_triggers")]
    operations = [
        # Reversed last: the rebuilt table gets its triggers back.
        migrations.RunPython(migrations.RunPython.noop, install),
        migrations.AddField(
            model_name="lineageevent",
            name="canonical",
            field=models.TextField(blank=True, default=""),
        ),
        migrations.AddField(
            model_name="lineageevent",
            name="hash_version",
            field=models.PositiveSmallIntegerField(default=0),
        ),
        migrations.RunPython(install, migrations.RunPython.noop),
    ]
