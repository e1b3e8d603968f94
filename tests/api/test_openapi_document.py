"""The OpenAPI document as strict readers read it: Swagger UI parses it with js-yaml,
which refuses a key written twice, so the docs page rendered nothing when ninja's
responses (keyed 200) and the links added beside them (keyed "200") were both written."""

from __future__ import annotations

import json

import yaml


def pairs_unique(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    assert not duplicated, f"keys written twice: {duplicated}"
    return dict(pairs)


def test_no_key_is_written_twice_and_links_sit_beside_their_schema(client):
    text = client.get("/api/openapi.json").content.decode()
    document = json.loads(text, object_pairs_hook=pairs_unique)
    # YAML reads it as the same document (what Swagger UI does).
    assert yaml.safe_load(text) == document
    created = document["paths"]["/api/runs"]["post"]["responses"]["201"]
    assert "links" in created and "application/json" in created["content"]
