"""/openapi.json carries the seed contract of POST /v2/{entity}/{project}/scores."""

from typing import Any

import httpx
import pytest

PATH = "/v2/{entity}/{project}/scores"

# From the seed (shared/seed/score-create.openapi.md), with its Korean descriptions left out:
# ours are in English, so only their presence is checked.
SEED_OPERATION_ID = "score_create_v2__entity___project__scores_post"
SEED_SCORE_CREATE_BODY_PROPERTIES: dict[str, dict[str, Any]] = {
    "evaluation_run_id": {
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "title": "Evaluation Run Id",
    },
    "prediction_id": {"title": "Prediction Id", "type": "string"},
    "scorer": {"title": "Scorer", "type": "string"},
    "value": {"title": "Value"},
}
SEED_SECURITY_SCHEMES = {
    "HTTPBasic": {"scheme": "basic", "type": "http"},
    "HTTPBearer": {"scheme": "bearer", "type": "http"},
}


@pytest.fixture
async def spec(client: httpx.AsyncClient) -> dict[str, Any]:
    """The served OpenAPI document, fetched without credentials."""
    response = await client.get("/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_schema(responses_or_body: dict[str, Any]) -> Any:
    return responses_or_body["content"]["application/json"]["schema"]


def _subset(schema: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    """schema reduced to the keys the seed names, so that added constraints do not matter."""
    return {key: schema.get(key) for key in keys}


def test_openapi_is_served_without_credentials(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    assert PATH in spec["paths"]


def test_score_create_operation(spec: dict[str, Any]) -> None:
    operation = spec["paths"][PATH]["post"]

    assert operation["operationId"] == SEED_OPERATION_ID
    assert operation["tags"] == ["Scores"]
    assert operation["summary"]
    assert operation["description"]
    assert operation["security"] == [{"HTTPBasic": []}, {"HTTPBearer": []}]
    assert operation["requestBody"]["required"] is True
    assert _json_schema(operation["requestBody"]) == _ref("ScoreCreateBody")
    assert _json_schema(operation["responses"]["200"]) == _ref("ScoreCreateRes")
    assert _json_schema(operation["responses"]["422"]) == _ref("HTTPValidationError")
    for status in ("200", "422"):
        assert operation["responses"][status]["description"]


def test_path_parameters(spec: dict[str, Any]) -> None:
    parameters = spec["paths"][PATH]["post"]["parameters"]
    in_path = {p["name"]: p for p in parameters if p["in"] == "path"}
    elsewhere = [p for p in parameters if p["in"] != "path"]

    assert set(in_path) == {"entity", "project"}
    assert [p["name"] for p in elsewhere if p.get("required")] == [], "the seed needs no more"
    for name, title in (("entity", "Entity"), ("project", "Project")):
        assert in_path[name]["required"] is True
        assert in_path[name]["schema"]["type"] == "string"
        assert in_path[name]["schema"]["title"] == title


def test_score_create_body_schema(spec: dict[str, Any]) -> None:
    body = spec["components"]["schemas"]["ScoreCreateBody"]

    assert body["title"] == "ScoreCreateBody"
    assert body["type"] == "object"
    assert body["description"]
    assert body["required"] == ["prediction_id", "scorer", "value"]
    assert set(body["properties"]) == set(SEED_SCORE_CREATE_BODY_PROPERTIES)
    for name, seed in SEED_SCORE_CREATE_BODY_PROPERTIES.items():
        served = body["properties"][name]
        if "anyOf" in seed:
            assert [option["type"] for option in served["anyOf"]] == ["string", "null"]
            assert served["title"] == seed["title"]
        else:
            assert _subset(served, seed) == seed, name
        assert isinstance(served.get("description"), str), f"{name} has no description"
        assert served["description"]
    assert "type" not in body["properties"]["value"], "value takes any JSON"


def test_score_create_res_schema(spec: dict[str, Any]) -> None:
    res = spec["components"]["schemas"]["ScoreCreateRes"]

    assert res["title"] == "ScoreCreateRes"
    assert res["type"] == "object"
    assert res["required"] == ["score_id"]
    assert set(res["properties"]) == {"score_id"}
    score_id = res["properties"]["score_id"]
    assert (score_id["type"], score_id["title"]) == ("string", "Score Id")
    assert score_id["description"]


def test_validation_error_schemas(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    http_error = schemas["HTTPValidationError"]
    error = schemas["ValidationError"]

    assert http_error["title"] == "HTTPValidationError"
    assert http_error["properties"]["detail"] == {
        "items": _ref("ValidationError"),
        "title": "Detail",
        "type": "array",
    }
    assert error["title"] == "ValidationError"
    assert error["required"] == ["loc", "msg", "type"]
    assert error["properties"]["loc"] == {
        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "title": "Location",
        "type": "array",
    }
    assert error["properties"]["msg"] == {"title": "Message", "type": "string"}
    assert error["properties"]["type"] == {"title": "Error Type", "type": "string"}


def test_security_schemes(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]

    assert set(schemes) == set(SEED_SECURITY_SCHEMES)
    for name, seed in SEED_SECURITY_SCHEMES.items():
        assert _subset(schemes[name], seed) == seed, name
