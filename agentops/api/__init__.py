"""The JSON API under /api/ (django-ninja): OpenAPI 3.1 at /api/openapi.json, the
interactive docs at /api/docs (ninja's bundled Swagger UI, served as static files).

One module per resource (tasks, runs, approvals, lineage), each a Router added here;
a new resource is a new module and one ``add_router`` line. Every operation needs a
personal API token (agentops.api.auth); every refusal is a problem (agentops.api.errors).
docs/api.md is the guide.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.urls import URLPattern, re_path
from django.views.decorators.csrf import csrf_exempt
from ninja import NinjaAPI
from ninja.openapi.docs import Swagger

from agentops.api import approvals, lineage, runs, tasks, tasks_code
from agentops.api.auth import TokenAuth
from agentops.api.errors import PROBLEM_TYPE, StrictParser, handlers_install, problem_response


class AgentopsAPI(NinjaAPI):
    def get_openapi_schema(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The document, with every 4xx answered as ``application/problem+json`` (what
        the handlers send; ninja would declare the renderer's ``application/json``)."""
        schema = super().get_openapi_schema(*args, **kwargs)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation["responses"] = _responses_merged(operation.get("responses", {}))
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if str(status).startswith("4") and "application/json" in content:
                        response["content"] = {PROBLEM_TYPE: content["application/json"]}
        return schema

    def _get_urls(self) -> list[Any]:
        """ninja's URLs, each answering a method it does not take with a problem (not
        ninja's bare ``text/html`` 405), then one more for every other path under the
        API: a problem 404, not Django's HTML page. A client reads every refusal the
        same way, and nothing under /api/ answers as HTML but the docs page."""
        urls = []
        for url in super()._get_urls():
            if isinstance(url, URLPattern) and url.name == "api-root":
                # ninja's root answers Django's HTML 404; the name stays, ninja reverses it.
                url = URLPattern(url.pattern, _no_such_path, url.default_args, url.name)
            elif isinstance(url, URLPattern) and not iscoroutinefunction(url.callback):
                url = URLPattern(
                    url.pattern, _method_problems(url.callback), url.default_args, url.name
                )
            urls.append(url)
        return [*urls, re_path(r"^.*$", _no_such_path, name="api-no-such-path")]

    def get_openapi_operation_id(self, operation: Any) -> str:
        # The view's own name (runs_start, approvals_approve): unique, as every view
        # is named for its resource.
        return operation.view_func.__name__


def _method_problems(view: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(view)  # keeps csrf_exempt, which ninja sets on its views
    def answered(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        response = view(request, *args, **kwargs)
        if isinstance(response, HttpResponseNotAllowed):
            allowed = response["Allow"]
            return problem_response(
                405,
                "method-not-allowed",
                f"{request.method[:20]} is not an operation here; this path takes {allowed}.",
                headers={"Allow": allowed},
            )
        return response

    return answered


@csrf_exempt
def _no_such_path(request: HttpRequest, **kwargs: Any) -> HttpResponse:
    return problem_response(
        404, "not-found", "No operation of the API is at this path: see /api/docs."
    )


def _responses_merged(responses: dict[Any, Any]) -> dict[str, Any]:
    """ninja keys an operation's responses by int (200) and ``openapi_extra`` by str
    ("200", where the links are): merged into one key each, or the JSON written would
    hold "200" twice, which a strict reader (Swagger UI's) refuses whole and a lenient
    one reads as the last, losing the response's schema."""
    merged: dict[str, Any] = {}
    for status, response in responses.items():
        merged[str(status)] = _deep_merged(merged.get(str(status), {}), response)
    return merged


def _deep_merged(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(into)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merged(out[key], value)
        else:
            out[key] = value
    return out


api = AgentopsAPI(
    title="agentops",
    version="1",
    description="Tasks, runs, approvals and lineage of agentops. Authenticate with a "
    "personal API token (your tokens page: /accounts/tokens/): Authorization: Bearer "
    "<token>. Session cookies are not accepted. See docs/api.md.",
    auth=TokenAuth(),
    parser=StrictParser(),
    # validatorUrl: Swagger UI's default asks validator.swagger.io for a badge, sending
    # it this server's schema URL, from every page view not on localhost; nothing of
    # the docs page may leave the server.
    docs=Swagger(settings={"persistAuthorization": False, "validatorUrl": None}),
    urls_namespace="api",
)
handlers_install(api)
api.add_router("", tasks.router)
api.add_router("", tasks_code.router)
api.add_router("", runs.router)
api.add_router("", approvals.router)
api.add_router("", lineage.router)
