"""The JSON API under /api/ (django-ninja): being built (issue 15)."""

from __future__ import annotations

from ninja import NinjaAPI

api = NinjaAPI(title="agentops", version="1")
