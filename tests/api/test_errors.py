from __future__ import annotations

import logging

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from tidegate.api.app import endpoint
from tidegate.api.errors import error_response
from tidegate.errors import (
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    RuntimeFailure,
    UnsupportedMediaType,
)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ModelNotFound("m"), 404, "model_not_found"),
        (PayloadTooLarge("big", limit=1), 413, "payload_too_large"),
        (UnsupportedMediaType("text/plain"), 415, "unsupported_media_type"),
        (ModelUnavailable("m", "loading"), 503, "model_unavailable"),
        (RequestTimeout(model="m", timeout_s=1), 504, "timeout"),
        (RuntimeFailure("m", "boom"), 500, None),
    ],
)
def test_status_and_openai_shape(exc: Exception, status: int, code: str | None) -> None:
    response = error_response(exc)  # type: ignore[arg-type]
    assert response.status_code == status
    error = orjson.loads(bytes(response.body))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code


@pytest.mark.parametrize("status", [429, 503])
def test_overload_has_retry_after_and_configured_status(status: int) -> None:
    exc = Overloaded(model="m", queued=10, limit=10, retry_after_s=3, status=status)
    response = error_response(exc)
    assert response.status_code == status
    assert response.headers["retry-after"] == "3"
    message = orjson.loads(bytes(response.body))["error"]["message"]
    assert "10 inputs queued, limit 10" in message


def test_unexpected_error_is_500_with_request_id_and_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @endpoint
    async def broken(request: Request) -> Response:
        raise ZeroDivisionError("secret internals")

    app = Starlette(routes=[Route("/x", broken)])
    with caplog.at_level(logging.ERROR, logger="tidegate.api"), TestClient(app) as client:
        response = client.get("/x")
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert request_id in error["message"]
    assert "secret internals" not in response.text and "Traceback" not in response.text
    assert request_id in caplog.text
    assert caplog.records[0].exc_info is not None
