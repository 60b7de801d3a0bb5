"""The OpenAPI document, without a server: valid OpenAPI 3.1, and it documents exactly the
routes the app serves (the e2e test checks the responses)."""

from __future__ import annotations

import re

import orjson
import schemathesis
from starlette.routing import Route

from tidegate.api.app import create_app
from tidegate.api.openapi import build_openapi, encode_openapi
from tidegate.config import Config, ModelConfig, ServerConfig
from tidegate.kinds import RuntimeKind


def config() -> Config:
    return Config(server=ServerConfig(max_inputs_per_request=7),
                  models=(ModelConfig(id="vectors", runtime=RuntimeKind.ECHO),
                          ModelConfig(id="words", runtime=RuntimeKind.CAUSAL_LM,
                                      source="/nowhere")))


def test_valid_openapi_31() -> None:
    document = build_openapi(config())
    schemathesis.openapi.from_dict(document).validate()
    assert orjson.loads(encode_openapi(config())) == document


def test_every_served_route_is_documented_and_nothing_else() -> None:
    served = set()
    for route in create_app(config()).routes:
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        served |= {(method, path) for method in route.methods or () if method != "HEAD"}
    document = build_openapi(config())
    documented = {(method.upper(), path) for path, item in document["paths"].items()
                  for method in item}
    assert documented == served


def test_limits_and_examples_are_the_servers() -> None:
    document = build_openapi(config())
    request = document["components"]["schemas"]["EmbeddingRequest"]
    assert request["properties"]["input"]["anyOf"][1]["maxItems"] == 7
    paths = document["paths"]
    examples = {path: paths[path]["post"]["requestBody"]["content"]["application/json"]
                ["example"]["model"]
                for path in ("/v1/embeddings", "/v1/completions", "/v1/chat/completions")}
    assert examples == {"/v1/embeddings": "vectors", "/v1/completions": "words",
                        "/v1/chat/completions": "words"}


def test_every_error_response_has_the_openai_shape() -> None:
    document = build_openapi(config())
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for item in document["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and not operation["operationId"].startswith("health"):
                    assert response["content"]["application/json"]["schema"] == error
