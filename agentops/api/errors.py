"""Every refusal of the API as problem details (RFC 9457): ``application/problem+json``
with ``type``, ``title``, ``status``, ``detail``, and for input at fault an ``errors``
list naming each field (where it was, a pointer to it, what was wrong).

ninja's own handlers (validation, HTTP errors, 404) are replaced here, so nothing the
API answers to bad input is ninja's default ``{"detail": ...}`` or Django's HTML page.
An unexpected exception is not caught: a bug must surface as a 500 and in the logs,
not as a refusal that blames the client.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django.core.exceptions import SuspiciousOperation
from django.http import Http404, HttpRequest, HttpResponse
from ninja import Schema
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser

from agentops.strict_json import json_loads_strict

if TYPE_CHECKING:
    from ninja import NinjaAPI

PROBLEM_TYPE = "application/problem+json"
# A problem's ``type``: a URN per kind of problem, each described in docs/api.md.
TYPE_PREFIX = "urn:agentops:problem:"

TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    422: "Invalid input",
    429: "Too many requests",
}


class FieldError(Schema):
    location: str  # body, query, path or header
    pointer: str  # a JSON Pointer into the body ("/input/amount"), else the parameter's name
    detail: str


class ProblemOut(Schema):
    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


class Problem(Exception):
    """Answer the request with a problem: raised anywhere in a view or the auth."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail
        self.errors, self.headers = errors, headers or {}


def problems(*statuses: int) -> dict[int, type[ProblemOut]]:
    """``response={...}`` entries for the problems an operation can answer with."""
    return dict.fromkeys(statuses, ProblemOut)


def field_error(location: str, pointer: str, detail: str) -> dict[str, str]:
    return {"location": location, "pointer": pointer, "detail": detail}


def invalid(errors: list[dict[str, str]], detail: str = "") -> Problem:
    """A 422 for input the request's schema took but a rule of ours refuses."""
    said = detail or "; ".join(f"{e['pointer']}: {e['detail']}" for e in errors)
    return Problem(422, "validation", said, errors=errors)


def problem_response(
    status: int,
    kind: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + kind,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    response = HttpResponse(json.dumps(body), status=status, content_type=PROBLEM_TYPE)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def _pointer(loc: tuple) -> tuple[str, str]:
    """(location, pointer) for a ninja/pydantic error location: ``("body", "body",
    "input", 0)`` -> ("body", "/input/0"); ``("query", "page")`` -> ("query", "page")."""
    source, *rest = (str(part) for part in loc)
    if source == "body":
        if rest and rest[0] == "body":  # every operation names its body parameter "body"
            rest = rest[1:]
        escaped = (part.replace("~", "~0").replace("/", "~1") for part in rest)
        return "body", "/" + "/".join(escaped)
    if source == "header":
        return "header", rest[-1] if rest else ""
    return source, ".".join(rest)


def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    errors = []
    for error in exc.errors:
        location, pointer = _pointer(tuple(error.get("loc", ("body",))))
        message = str(error.get("msg", "invalid"))
        errors.append(field_error(location, pointer, message))
    said = "; ".join(f"{e['location']} {e['pointer']}: {e['detail']}" for e in errors)
    return problem_response(422, "validation", f"The request is not valid: {said}", errors=errors)


def _problem(request: HttpRequest, exc: Problem) -> HttpResponse:
    return problem_response(
        exc.status, exc.kind, exc.detail, errors=exc.errors, headers=exc.headers
    )


def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    if isinstance(exc, AuthenticationError):
        return problem_response(
            401,
            "unauthenticated",
            "Send a valid API token: Authorization: Bearer <token>.",
            headers={"WWW-Authenticate": 'Bearer realm="agentops"'},
        )
    kind = "bad-request" if exc.status_code == 400 else f"http-{exc.status_code}"
    # ninja wraps the parser's refusal in its own "Cannot parse request body"; ours
    # says what and where.
    cause = exc.__cause__
    detail = str(cause) if isinstance(cause, HttpError) else str(exc)
    return problem_response(exc.status_code, kind, detail)


def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return problem_response(404, "not-found", str(exc) or "Nothing here.")


def _suspicious(request: HttpRequest, exc: SuspiciousOperation) -> HttpResponse:
    # Django's own refusals of a request's shape (more than DATA_UPLOAD_MAX_NUMBER_FIELDS
    # parameters, a body past DATA_UPLOAD_MAX_MEMORY_SIZE): a problem like any other,
    # not Django's HTML page.
    return problem_response(400, "bad-request", f"The request is refused: {exc}")


def handlers_install(api: NinjaAPI) -> None:
    api.add_exception_handler(Problem, _problem)
    api.add_exception_handler(ValidationError, _validation_error)
    api.add_exception_handler(HttpError, _http_error)
    api.add_exception_handler(Http404, _not_found)
    api.add_exception_handler(SuspiciousOperation, _suspicious)


class StrictParser(Parser):
    """Bodies read as strict JSON (agentops.strict_json): NaN, 1e999, a key written
    twice, a NUL or a lone surrogate is refused as a 400 that says where, never stored
    or turned into a 500 by the database."""

    def parse_body(self, request: HttpRequest) -> dict[str, Any]:
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise HttpError(400, f"The request body is not UTF-8: {error.reason}.") from None
        try:
            return json_loads_strict(text)
        except json.JSONDecodeError as error:
            raise HttpError(
                400,
                f"The request body is not valid JSON: {error.msg} "
                f"(line {error.lineno}, column {error.colno}).",
            ) from None
        except RecursionError:
            raise HttpError(400, "The request body nests too deeply.") from None
