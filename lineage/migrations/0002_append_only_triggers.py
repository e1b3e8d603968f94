from django.db import migrations


def install(apps, schema_editor):
    from lineage.triggers import triggers_install

    triggers_install(schema_editor.connection)


def remove(apps, schema_editor):
    from lineage.triggers import triggers_remove

    triggers_remove(schema_editor.connection)


class Migration(migrations.Migration):
    dependencies = [("lineage", "0001_initial")]
    operations = [migrations.RunPython(install, remove)]
