"""Static files served by the app itself, with DEBUG off.

Django serves static files only with DEBUG on, and DEBUG on prints the settings and the
environment on every error page. WhiteNoise serves them instead, in any mode: from
STATIC_ROOT once ``collectstatic`` has filled it (as a deployment does), and until then
straight from the apps' and STATICFILES_DIRS' files (Django's finders), so a checkout
(``make demo``, ``manage.py serve``) needs no collect step and no DEBUG.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings
from django.http import HttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware


class _SettingsView:
    """The settings as WhiteNoise should read them: without a STATIC_ROOT that was
    never collected (it would warn "No directory at" and serve nothing from it), and
    with the finders in its place."""

    def __init__(self, settings: Any) -> None:
        self._settings = settings
        root = settings.STATIC_ROOT
        self._collected = bool(root) and Path(root).is_dir()

    def __getattr__(self, name: str) -> Any:
        if not self._collected and name == "STATIC_ROOT":
            return None
        if not self._collected and name == "WHITENOISE_USE_FINDERS":
            return True
        return getattr(self._settings, name)


class StaticFilesMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, from STATIC_ROOT if collected, else from the finders."""

    def __init__(self, get_response: Any = None, settings: Any = django_settings) -> None:
        super().__init__(get_response, _SettingsView(settings))

    @staticmethod
    def serve(static_file: Any, request: Any) -> HttpResponse:
        """The file whole, not streamed: under ASGI (``manage.py serve`` runs uvicorn)
        Django streams a file response's synchronous iterator with a warning per file.
        The app's own files are a few kilobytes each."""
        answer = static_file.get_response(request.method, request.META)
        with contextlib.closing(answer.file) if answer.file else contextlib.nullcontext():
            body = answer.file.read() if answer.file else b""
        response = HttpResponse(body, status=int(answer.status))
        del response["Content-Type"]
        for key, value in answer.headers:
            response[key] = value
        return response
