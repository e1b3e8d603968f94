"""The JSON API under /api/ (django-ninja): OpenAPI 3.1 at /api/openapi.json, the
interactive docs at /api/docs (ninja's bundled Swagger UI, served as static files).

One module per resource (tasks, runs, approvals, lineage), each a Router added here;
a new resource is a new module and one ``add_router`` line. Every operation needs a
personal API token (agentops.api.auth); every refusal is a problem (agentops.api.errors).
docs/api.md is the guide.
"""

from __future__ import annotations

from typing import Any

from ninja import NinjaAPI
from ninja.openapi.docs import Swagger

from agentops.api import approvals, lineage, runs, tasks, tasks_code
from agentops.api.auth import TokenAuth
from agentops.api.errors import PROBLEM_TYPE, StrictParser, handlers_install


class AgentopsAPI(NinjaAPI):
    def get_openapi_schema(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The document, with every 4xx answered as ``application/problem+json`` (what
        the handlers send; ninja would declare the renderer's ``application/json``)."""
        schema = super().get_openapi_schema(*args, **kwargs)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if str(status).startswith("4") and "application/json" in content:
                        response["content"] = {PROBLEM_TYPE: content["application/json"]}
        return schema

    def get_openapi_operation_id(self, operation: Any) -> str:
        # The view's own name (runs_start, approvals_approve): unique, as every view
        # is named for its resource.
        return operation.view_func.__name__


api = AgentopsAPI(
    title="agentops",
    version="1",
    description="Tasks, runs, approvals and lineage of agentops. Authenticate with a "
    "personal API token (your tokens page: /accounts/tokens/): Authorization: Bearer "
    "<token>. Session cookies are not accepted. See docs/api.md.",
    auth=TokenAuth(),
    parser=StrictParser(),
    docs=Swagger(settings={"persistAuthorization": False}),
    urls_namespace="api",
)
handlers_install(api)
api.add_router("", tasks.router)
api.add_router("", tasks_code.router)
api.add_router("", runs.router)
api.add_router("", approvals.router)
api.add_router("", lineage.router)
