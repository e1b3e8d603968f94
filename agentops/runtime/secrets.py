"""Credentials, named in a tool's config as ``secret:NAME`` (a whole value) or
``{secret:NAME}`` (inside a string, e.g. ``"Bearer {secret:API_TOKEN}"``), and read from
the environment at call time. Never stored in the database, never sent to the model, never
written to lineage: every value a call resolved is redacted from what it returns, in the
encodings a far side is likely to echo it in (``secret_forms``). Redaction is a net for
accidents, not a guarantee against a far side that means to leak: it can always encode
further. The guarantee is the fence below.

The fence: a tool may read only the variables the deployment gives tools, those whose
name starts with ``TOOL_SECRET_`` and those listed in ``AGENTOPS_TOOL_SECRETS``, and never
one of agentops' own (``SECRET_KEY``, ``DATABASE_URL``, ``AGENTOPS_*``...: see
``agentops.config.platform_secret``), even if listed. A worker's environment holds the
keys to the trail, the approvals and the database; the right to write a tool's config
must not be the right to read them. Any other name is refused when the tool is saved
(``secret_errors``) and again when it is called (``config_resolve``), naming it.
"""

from __future__ import annotations

import base64
import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from agentops.config import TOOL_SECRET_PREFIX, platform_secret

PREFIX = "secret:"
EMBEDDED = re.compile(r"\{secret:([A-Za-z_][A-Za-z0-9_]*)\}")
# Encoded forms are redacted only for a value at least this long: a shorter one's
# reversed or base64 form would match ordinary text too often to be worth hiding.
ENCODED_MINIMUM = 8


class SecretMissing(LookupError):
    """A secret a tool names cannot be read: it is not set in the worker's environment,
    or it is not one a tool may read (``SecretRefused``)."""


class SecretRefused(SecretMissing):
    """A tool names a variable that is not one of the deployment's tool secrets."""


def secret_refusal(name: str) -> str:
    """Why a tool may not read the variable ``name`` (a sentence naming it), or ""."""
    if platform_secret(name):
        return (
            f"the secret {name} is one of agentops' own settings, which no tool may read; "
            f"give the tool a variable of its own, named {TOOL_SECRET_PREFIX}…"
        )
    if name.startswith(TOOL_SECRET_PREFIX) or name in settings.AGENTOPS_TOOL_SECRETS:
        return ""
    return (
        f"the secret {name} is not one a tool may read: name the variable "
        f"{TOOL_SECRET_PREFIX}… or list it in AGENTOPS_TOOL_SECRETS"
    )


def secret_names(config: Any) -> set[str]:
    """Every NAME a config refers to as ``secret:NAME``, at any depth."""
    if isinstance(config, str):
        if config.startswith(PREFIX):
            return {config[len(PREFIX) :]}
        return set(EMBEDDED.findall(config))
    if isinstance(config, dict):
        return set().union(*(secret_names(value) for value in config.values()))
    if isinstance(config, list):
        return set().union(*(secret_names(value) for value in config))
    return set()


def secret_errors(config: Any, *, refusal: Callable[[str], str] = secret_refusal) -> list[str]:
    """One sentence for each secret a config names that no tool may read (for the
    checks that run when a tool is saved, and again before it is called); ``refusal``
    draws another fence (a trigger's: triggers.config.trigger_secret_refusal)."""
    return [said for name in sorted(secret_names(config)) if (said := refusal(name))]


def config_resolve(
    config: Any, *, refusal: Callable[[str], str] = secret_refusal
) -> tuple[Any, dict[str, str]]:
    """The config with each ``secret:NAME`` replaced by the environment's value, and the
    values used (by name), for redaction. Raises ``SecretRefused`` for a name outside
    the fence (before reading anything), ``SecretMissing`` for one that is not set."""
    refusals = secret_errors(config, refusal=refusal)
    if refusals:
        raise SecretRefused("; ".join(refusals))
    used: dict[str, str] = {}

    def lookup(name: str) -> str:
        if not os.environ.get(name):
            raise SecretMissing(f"the secret {name} is not set in the worker's environment")
        used[name] = os.environ[name]
        return used[name]

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(PREFIX):
            return lookup(value[len(PREFIX) :])
        if isinstance(value, str):
            return EMBEDDED.sub(lambda match: lookup(match.group(1)), value)
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [resolve(item) for item in value]
        return value

    return resolve(config), used


def encoded_cores(
    data: bytes, encode: Callable[[bytes], bytes], block: int, bits: int
) -> list[str]:
    """The text of ``data`` in a block encoding (base64: 3 bytes, 6 bits a character;
    base32: 5 bytes, 5 bits) wherever it sits in a longer encoded string: for each
    alignment, the characters that depend on ``data`` alone (the padding, and the
    characters shared with the bytes around it, left out)."""
    cores = []
    for offset in range(block):
        encoded = encode(b"\0" * offset + data).decode()
        start = -(-8 * offset // bits)  # the first character made only of data's bits
        end = 8 * (offset + len(data)) // bits
        cores.append(encoded[start:end])
    return cores


def base64_cores(data: bytes) -> list[str]:
    return encoded_cores(data, base64.b64encode, 3, 6)


# How a JSON string writes the characters it must escape, and the HTML names of some.
JSON_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
HTML_NAMES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"}
# The most characters one character of a secret takes in any form char_pattern matches
# (a character beyond the BMP as a JSON surrogate pair, \ud83d\ude00, or as four
# percent-encoded bytes): the margin that can hold part of a secret at a cut.
MAX_CHARS_PER_CHARACTER = 12


def char_pattern(char: str) -> str:
    """A regex (to be matched in any case) for one character of a secret as text may
    carry it: itself; JSON-escaped (``\\u0041``, a surrogate pair, ``\\"``); an HTML
    character reference (``&#65;``, ``&#x41;``, ``&amp;``); its UTF-8 bytes
    percent-encoded (``%41``), or ``+`` for a space. Each character independently, so a
    text that escapes only some of them matches too."""
    code = ord(char)
    if code > 0xFFFF:
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        json_form = f"\\u{high:04x}\\u{low:04x}"
    else:
        json_form = f"\\u{code:04x}"
    forms = [char, json_form, f"&#{code};", f"&#x{code:x};"]
    forms += [JSON_ESCAPES[char]] if char in JSON_ESCAPES else []
    forms += [HTML_NAMES[char]] if char in HTML_NAMES else []
    forms.append("".join(f"%{byte:02x}" for byte in char.encode("utf-8", "surrogatepass")))
    forms += ["+"] if char == " " else []
    return "(?:" + "|".join(re.escape(form) for form in dict.fromkeys(forms)) + ")"


def text_pattern(text: str) -> str:
    return "".join(char_pattern(char) for char in text)


@dataclass(frozen=True)
class Form:
    """One way a far side may write a secret: a ``pattern`` (a regex over each
    character, ``char_pattern``) or a fixed ``text``; ``length`` is how long the text
    it stands for is (longer forms are redacted first, so none is cut by a shorter one
    inside it)."""

    name: str
    length: int
    any_case: bool
    text: str = ""
    pattern: str = ""


def secret_forms(name: str, secret: str) -> list[Form]:
    """The texts a far side may echo ``secret`` as: as it is, or reversed, in any case,
    each character as it is or escaped for JSON, HTML or a URL (``char_pattern``); hex,
    in any case; base64 (standard and URL-safe, with and without padding, and inside a
    longer base64 text); base32, in any case (with and without padding, and inside a
    longer base32 text). A value shorter than ``ENCODED_MINIMUM`` only as it is, in any
    case: its encodings would match ordinary text too often."""
    if len(secret) < ENCODED_MINIMUM:
        return [Form(name, len(secret), True, text=secret)]
    data = secret.encode("utf-8", "surrogatepass")
    padded = base64.b64encode(data).decode()
    fixed = {data.hex(): True, padded: False, padded.rstrip("="): False}
    for core in base64_cores(data):
        fixed.update({core: False, core.replace("+", "-").replace("/", "_"): False})
    padded32 = base64.b32encode(data).decode()
    fixed.update({padded32: True, padded32.rstrip("="): True})
    fixed.update(dict.fromkeys(encoded_cores(data, base64.b32encode, 5, 5), True))
    return [
        Form(name, len(secret), True, pattern=text_pattern(secret)),
        Form(name, len(secret), True, pattern=text_pattern(secret[::-1])),
        *(Form(name, len(text), any_case, text=text) for text, any_case in fixed.items()),
    ]


@functools.lru_cache(maxsize=64)
def redaction_passes(
    items: tuple[tuple[str, str], ...],
) -> list[tuple[re.Pattern, Callable[[re.Match], str]]]:
    """The passes that redact every form of every secret, longest first: each
    character-pattern form on its own, and each run of fixed forms as one alternation
    (what ``re`` scans fastest; one alternation of every form took about three times
    as long on a 10 MB body: docs/decisions.md)."""
    forms = sorted(
        (form for name, secret in items if secret for form in secret_forms(name, secret)),
        key=lambda form: -form.length,
    )
    passes: list[tuple[re.Pattern, Callable[[re.Match], str]]] = []
    run: list[Form] = []

    def run_close() -> None:
        if not run:
            return
        names: dict[str, str] = {}
        for form in run:
            names.setdefault(form.text.lower() if form.any_case else form.text, form.name)
        pattern = re.compile(
            "|".join(
                f"(?i:{re.escape(form.text)})" if form.any_case else re.escape(form.text)
                for form in run
            )
        )

        def replacement(match: re.Match, names: dict[str, str] = names) -> str:
            text = match.group(0)
            return f"[{PREFIX}{names.get(text) or names.get(text.lower()) or '?'}]"

        passes.append((pattern, replacement))
        run.clear()

    for form in forms:
        if form.text:
            run.append(form)
            continue
        run_close()
        label = f"[{PREFIX}{form.name}]"
        passes.append((re.compile(form.pattern, re.IGNORECASE), lambda _, label=label: label))
    run_close()
    return passes


def redact(value: Any, secrets: dict[str, str]) -> Any:
    """``value`` with every occurrence of a secret's value, in any of its usual encodings
    (``secret_forms``), replaced by ``[secret:NAME]``, at any depth."""
    if not secrets:
        return value
    passes = redaction_passes(tuple(sorted(secrets.items())))
    if not passes:
        return value

    def clean(text: str) -> str:
        for pattern, replacement in passes:
            text = pattern.sub(replacement, text)
        return text

    return strings_map(value, clean)


def strings_map(value: Any, change: Callable[[str], str]) -> Any:
    """A copy of ``value`` (JSON-like: dicts, lists, scalars) with ``change`` applied to
    every string in it, dict keys too. Iterative, not recursive: a far side's answer or a
    model's arguments may nest deeper than Python's recursion limit (json.loads alone
    reaches 600 levels, a value built in code any depth), and redaction must not fail
    where it matters most. A container met twice is copied once, so a shared part stays
    shared and a cycle ends."""
    copies: dict[int, Any] = {}
    pending: list[tuple[Any, Any]] = []

    def copy(item: Any) -> Any:
        if isinstance(item, str):
            return change(item)
        if not isinstance(item, dict | list):
            return item
        if id(item) not in copies:
            copies[id(item)] = {} if isinstance(item, dict) else []
            pending.append((item, copies[id(item)]))
        return copies[id(item)]

    result = copy(value)
    while pending:
        source, target = pending.pop()
        if isinstance(source, dict):
            for key, inner in source.items():
                target[copy(key)] = copy(inner)
        else:
            target.extend(copy(inner) for inner in source)
    return result


def cut_margin(secrets: dict[str, str]) -> int:
    """How many characters next to a cut may hold the first (or last) part of a secret
    in one of its forms."""
    return max((MAX_CHARS_PER_CHARACTER * len(secret) for secret in secrets.values()), default=0)


def excerpt_redacted(
    text: str, secrets: dict[str, str], *, limit: int, from_end: bool = False, cut: bool = False
) -> str:
    """At most ``limit`` characters of what a far side sent, whitespace collapsed: its
    start (its end with ``from_end``), marked with "…" where it was cut. Secrets are
    redacted before the cut, so none straddles it half shown. If ``text`` is itself a
    piece cut from a longer answer (``cut``: at its end, or at its start with
    ``from_end``), the characters next to that edge that may hold part of a secret are
    dropped too (``cut_margin``)."""
    margin = cut_margin(secrets) if cut else 0
    if margin:
        text = text[margin:] if from_end else text[:-margin]
    text = " ".join(redact(text, secrets).split())
    if len(text) > limit:
        return "…" + text[-limit:] if from_end else text[:limit] + "…"
    if cut and text:
        return "…" + text if from_end else text + "…"
    return text


def config_secrets(config: Any) -> dict[str, str]:
    """The values of the secrets a config names that are set now and a tool may read
    (for redaction: a name no tool may read was never resolved, so it is not read here
    either)."""
    return {
        name: os.environ[name]
        for name in secret_names(config)
        if not secret_refusal(name) and os.environ.get(name)
    }
