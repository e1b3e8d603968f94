"""The person's API tokens page (agentops.views_tokens), under /accounts/tokens/."""

from django.urls import path

from agentops import views_tokens

urlpatterns = [path("", views_tokens.api_tokens, name="api_tokens")]
