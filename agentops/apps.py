import sys

from django.apps import AppConfig


class AgentopsConfig(AppConfig):
    name = "agentops"
    verbose_name = "agentops"

    def ready(self) -> None:
        from django.utils.module_loading import autodiscover_modules

        # Code tools and scripted models register themselves on import, the way admin
        # modules do: every installed app's agent_tools module is loaded once.
        autodiscover_modules("agent_tools")
        # django-q2's cluster has no hook before it forks its processes (Celery's worker
        # has worker_init, agentops.celery): its command is known by its name here.
        if sys.argv[1:2] == ["qcluster"]:
            from agentops.runtime.dispatch import worker_connections_keep

            worker_connections_keep()
