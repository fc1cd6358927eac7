"""The OpenAPI document served at /v1/openapi.json.

Every admin API answer of every end-to-end test is checked against the document as it
is made (`Component.request` -> openapi_check). These tests check the document itself,
that each operation in it reaches a handler, and that the checker does fail.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from openapi_check import ROUTE_NOT_FOUND, OpenApiChecker

REPO = Path(__file__).resolve().parents[2]


def _document(component) -> dict:
    status, doc = component.get("/v1/openapi.json")
    assert status == 200, doc
    return doc


def test_the_document_is_valid_openapi_3_1_and_names_this_build(component):
    doc = _document(component)
    validate(doc)  # raises with the first violation of the OpenAPI 3.1 schema
    assert doc["openapi"].startswith("3.1")
    version = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]
    assert doc["info"]["version"] == version
    assert "bearer" in doc["components"]["securitySchemes"]


def test_the_document_needs_a_token_like_the_rest_of_v1(component):
    status, body = component.get("/v1/openapi.json", token=False)
    assert status == 401, body


def test_every_documented_operation_reaches_a_handler(component):
    doc = _document(component)
    fill = {"jid": "nobody@bots.localhost", "id": "none"}
    operations = 0
    for template, item in doc["paths"].items():
        path = re.sub(r"\{([^}]+)\}", lambda m: fill.get(m.group(1), "x"), template)
        for method in ("get", "put", "post", "delete"):
            if method not in item:
                continue
            operations += 1
            body = {} if method in ("put", "post") else None
            # Component.request checks the answer against the document as well.
            status, answer = component.request(method.upper(), path, body=body)
            assert status != 405, f"{method} {template}: the router has no such method"
            assert not (status == 404 and answer.get("detail") == ROUTE_NOT_FOUND), \
                f"{method} {template}: the router has no such route"
    assert operations >= 25, f"only {operations} operations documented"


def test_an_unknown_route_is_the_fallback_and_not_in_the_document(component):
    status, body = component.get("/v1/no-such-thing")
    assert (status, body["detail"]) == (404, ROUTE_NOT_FOUND)


# -- the checker itself ---------------------------------------------------------------

@pytest.fixture(scope="module")
def checker(component) -> OpenApiChecker:
    return OpenApiChecker(_document(component))


def test_the_checker_accepts_a_conforming_answer(checker):
    bot = {"jid": "a@b", "localpart": "a", "handler": "api", "peer_auth": "required", "trust": "tofu",
           "encrypted_only": False, "created_at": "2026-01-01T00:00:00Z",
           "fingerprints": {"spki_sha256": "AA", "cert_sha256": "BB", "cert_sha1": "CC",
                            "offer": {"sha1": "cc", "sha256": "bb"}}}
    checker.check("GET", "/v1/bots", 200, "application/json", [bot])
    checker.check("DELETE", "/v1/bots/a@b", 204, None, None)


def test_the_checker_checks_accepted_request_bodies(checker):
    checker.check_request("POST", "/v1/bots", {"localpart": "x", "handler": "echo"})
    with pytest.raises(AssertionError, match="does not match"):
        checker.check_request("POST", "/v1/bots", {"localpart": "x", "handler": "shell"})
    with pytest.raises(AssertionError, match="does not match"):
        checker.check_request("POST", "/v1/bots", {"localpart": "x", "colour": "red"})


@pytest.mark.parametrize("method,path,status,ctype,body,why", [
    ("GET", "/v1/bots", 200, "application/json", [{"jid": 1}], "does not match"),
    ("GET", "/v1/bots/a", 200, "application/json",
     {"jid": "a@b", "localpart": "a", "handler": "api", "peer_auth": "required", "trust": "tofu",
      "encrypted_only": False, "created_at": "t", "fingerprints": {"spki_sha256": "A", "cert_sha256": "B", "cert_sha1": "C",
                                          "offer": {"sha1": "c", "sha256": "b"}},
      "secret_key": "oops"}, "does not match"),
    ("GET", "/v1/bots", 418, "application/json", [], "not documented"),
    ("GET", "/v1/bots", 200, "text/html", "<p>", "media type"),
    ("PATCH", "/v1/bots", 200, "application/json", [], "not in the OpenAPI document"),
    ("GET", "/v1/undocumented", 200, "application/json", {}, "not in the OpenAPI document"),
    ("DELETE", "/v1/bots/a", 204, None, {"unexpected": True}, "without a body"),
])
def test_the_checker_rejects_what_the_document_does_not_say(checker, method, path, status, ctype, body, why):
    with pytest.raises(AssertionError, match=why):
        checker.check(method, path, status, ctype, body)
