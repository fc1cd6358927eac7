"""Checks admin API answers against the component's own OpenAPI document.

`Component.request` hands every answer to `check`, so each call any end-to-end test
makes is checked where it is made: the operation (method and path template) must be
in the document, the status must be one of its documented responses, the media type one of
that response's, and a JSON body must validate against its schema. Object schemas are
checked closed (`additionalProperties: false` where the document says nothing), so a field
the code sends but the document does not name fails too.

A request body the component accepted (2xx) must match the documented request body
(`check_request`), so the document describes what clients really send.

Only the router's own fallback ("route not found") may answer outside the document, and
only for a path the document does not have.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from openapi_schema_validator import OAS31Validator

ROUTE_NOT_FOUND = "route not found"


@dataclass
class Operation:
    method: str
    template: str
    spec: dict


class OpenApiChecker:
    """Matches requests to the document's operations and validates the answers."""

    def __init__(self, document: dict) -> None:
        self.document = document
        self.components = _closed_components(copy.deepcopy(document.get("components", {})), document)
        self._routes: list[tuple[int, re.Pattern, str]] = []
        for template in document.get("paths", {}):
            params = template.count("{")
            pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            self._routes.append((params, re.compile(pattern), template))
        # A literal segment wins over a parameter, as in the router.
        self._routes.sort(key=lambda r: r[0])

    def template(self, path: str) -> str | None:
        """The documented path template that `path` (without query) falls under."""
        path = path.split("?", 1)[0]
        for _, pattern, template in self._routes:
            if pattern.match(path):
                return template
        return None

    def operation(self, method: str, path: str) -> Operation | None:
        template = self.template(path)
        if template is None:
            return None
        spec = self.document["paths"][template].get(method.lower())
        return Operation(method.upper(), template, spec) if spec else None

    def check_request(self, method: str, path: str, body) -> None:
        """Raise AssertionError when an accepted request's JSON body does not match its
        documented request body."""
        op = self.operation(method, path)
        schema = ((op.spec.get("requestBody") or {}).get("content", {})
                  .get("application/json", {}).get("schema")) if op else None
        if op is None or body is None:
            return
        if schema is None:
            raise AssertionError(f"{method} {path}: accepted a body the document does not describe")
        self._validate(schema, body, f"{method} {path} (request body)")

    def check(self, method: str, path: str, status: int, content_type: str | None, body) -> None:
        """Raise AssertionError when the answer is not what the document says."""
        where = f"{method} {path} -> {status}"
        op = self.operation(method, path)
        if op is None:
            if self.template(path) is None and status == 404 and _detail(body) == ROUTE_NOT_FOUND:
                return  # the router's fallback, for a path that is not an API route
            if self.template(path) is not None and status == 405:
                return  # a documented path with a method it does not have
            raise AssertionError(f"{where}: {method} {path} is not in the OpenAPI document")
        responses = op.spec.get("responses", {})
        response = responses.get(str(status)) or responses.get("default")
        if response is None:
            raise AssertionError(
                f"{where}: status {status} is not documented for {op.method} {op.template} "
                f"(documented: {sorted(responses)})")
        content = response.get("content") or {}
        if not content:
            if body not in (None, ""):
                raise AssertionError(f"{where}: documented without a body, got {body!r:.200}")
            return
        media = (content_type or "").split(";", 1)[0].strip().lower()
        documented = {k.split(";", 1)[0].strip().lower(): v for k, v in content.items()}
        if media not in documented:
            raise AssertionError(f"{where}: media type {media!r} is not documented (documented: {sorted(documented)})")
        schema = documented[media].get("schema")
        if schema is None or not media.endswith("json"):
            return
        self._validate(schema, body, where)

    def _validate(self, schema: dict, body, where: str) -> None:
        root = dict(_closed(copy.deepcopy(schema)))
        root["components"] = self.components
        errors = sorted(OAS31Validator(root).iter_errors(body), key=lambda e: list(e.path))
        if errors:
            shown = "; ".join(f"at {'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:5])
            raise AssertionError(f"{where}: the body does not match the document: {shown}")


def _detail(body) -> str | None:
    return body.get("detail") if isinstance(body, dict) else None


def _closed(node, top: bool = True):
    """Every object schema with `properties` and no word on extra ones gets
    `additionalProperties: false`. A composition (`allOf`) is closed as a whole with
    `unevaluatedProperties: false`, which sees the properties every part evaluated, and its
    parts stay open at their top level (closing one part would refuse the others'
    properties); `top` is false while inside such a part, through `oneOf`/`anyOf` too."""
    if isinstance(node, dict):
        if "allOf" in node:
            node.setdefault("unevaluatedProperties", False)
        elif top and "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for key, value in node.items():
            if key == "allOf":
                for part in value:
                    _closed(part, top=False)
            elif key in ("oneOf", "anyOf"):
                for part in value:
                    _closed(part, top=top)
            elif key == "properties":
                for schema in value.values():
                    _closed(schema)
            else:
                _closed(value)
    elif isinstance(node, list):
        for value in node:
            _closed(value)
    return node


def _closed_components(components: dict, document: dict) -> dict:
    """The components, closed; a schema that is a part of some `allOf` of several parts stays
    open at its top level (the composition that uses it is closed instead)."""
    parts: set[str] = set()

    def collect(node):
        if isinstance(node, dict):
            # A real composition has several parts; utoipa also wraps a lone documented `$ref`
            # in `allOf`, which composes nothing and leaves the schema closed.
            composition = node.get("allOf", [])
            for part in composition if len(composition) > 1 else []:
                ref = part.get("$ref", "") if isinstance(part, dict) else ""
                if ref.startswith("#/components/schemas/"):
                    parts.add(ref.rsplit("/", 1)[1])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(document)
    for name, schema in components.get("schemas", {}).items():
        _closed(schema, top=name not in parts)
    return components
