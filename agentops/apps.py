from django.apps import AppConfig


class AgentopsConfig(AppConfig):
    name = "agentops"
    verbose_name = "agentops"

    def ready(self) -> None:
        from django.utils.module_loading import autodiscover_modules

        # Code tools and scripted models register themselves on import, the way admin
        # modules do: every installed app's agent_tools module is loaded once.
        autodiscover_modules("agent_tools")
