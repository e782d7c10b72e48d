"""Check a custom resource offline against a vendored CRD schema (infra/crds/), strictly.

    errors = validate_against_crd(manifest, ROOT / "infra/crds/trainer.kubeflow.org_trainjob_v1alpha1.json")
    assert errors == [], errors        # ["spec.trainer: unknown field 'numNode' (did you mean 'numNodes'?)"]

Plain JSON Schema lets an object that lists `properties` carry any other key too, so a typo such as
`numNode` passes; the API server instead drops such fields (or rejects them under kubectl's default
strict field validation). So every object schema that lists `properties` is closed, unless the CRD marks
it `x-kubernetes-preserve-unknown-fields: true` or it already says what extra keys may hold (a map's
`additionalProperties`). Not checked (the API server does these): CEL rules (`x-kubernetes-validations`),
`format`, the contents of `metadata`, defaulting.
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

_INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def _close(node: Any) -> Any:
    """Make a structural schema strict in place. Only the skeleton (properties, items,
    additionalProperties) is walked: anyOf/allOf/oneOf/not are value checks in Kubernetes, not shapes."""
    if not isinstance(node, dict):
        return node
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        node["anyOf"] = _INT_OR_STRING  # the published CRDs spell this out; a hand-written one may not
    if ("properties" in node and "additionalProperties" not in node
            and node.get("x-kubernetes-preserve-unknown-fields") is not True):
        node["additionalProperties"] = False
    for child in node.get("properties", {}).values():
        _close(child)  # below a preserve-unknown node, declared children are still pruned by Kubernetes
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _close(node[key])
    return node


@functools.lru_cache(maxsize=8)
def _validator(schema_path: str) -> jsonschema.Draft7Validator:
    schema = _close(json.loads(Path(schema_path).read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _drop_nulls(obj: Any) -> Any:
    """The API server prunes nulls of non-nullable fields before validating (none of ours are nullable)."""
    if isinstance(obj, dict):
        return {k: _drop_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_nulls(v) for v in obj]
    return obj


def _kind_of(schema_path: Path) -> tuple[str, str] | None:
    """(apiVersion, lower-case kind) from a file named `<group>_<kind>_<version>.json`, else None."""
    parts = schema_path.stem.split("_")
    return (f"{parts[0]}/{parts[2]}", parts[1]) if len(parts) == 3 else None


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        notes = []
        for key in sorted(k for k in error.instance if k not in known):
            close = difflib.get_close_matches(key, known, n=1)
            notes.append(f"unknown field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return "; ".join(notes)
    return error.message if len(error.message) <= 300 else error.message[:297] + "..."


def validate_against_crd(obj: dict[str, Any], schema_path: Path) -> list[str]:
    """Human-readable errors of `obj` against the CRD schema at `schema_path` (strict); [] when valid."""
    schema_path = Path(schema_path)
    errors = []
    expected = _kind_of(schema_path)
    if expected and (obj.get("apiVersion"), str(obj.get("kind", "")).lower()) != expected:
        errors.append(f"<root>: apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')} is not what "
                      f"{schema_path.name} describes")
    found = _validator(str(schema_path.resolve())).iter_errors(_drop_nulls(obj))
    for error in sorted(found, key=lambda e: [str(p) for p in e.absolute_path]):
        path = ".".join(str(p) for p in error.absolute_path) or "<root>"
        errors.append(f"{path}: {_message(error)}")
    return errors
