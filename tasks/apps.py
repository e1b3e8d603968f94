from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = "Tasks and runs"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from tasks.services import tools_sync_on_migrate

        # Like Django's own permissions: registered code tools get their rows after
        # every migrate, so a fresh database can grant them at once.
        post_migrate.connect(tools_sync_on_migrate, sender=self)
