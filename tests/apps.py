from django.apps import AppConfig


class TestsConfig(AppConfig):
    name = "tests"
    label = "agentops_tests"
    verbose_name = "agentops test suite"
