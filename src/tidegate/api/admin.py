"""Admin routes: load and unload models on demand."""

from __future__ import annotations

import hmac
import ipaddress

from starlette.requests import Request
from starlette.responses import Response

from tidegate.api.common import app_state, endpoint, json_response
from tidegate.errors import AuthenticationRequired, PermissionDenied

__all__ = ["admin_load", "admin_unload", "authorize"]


def authorize(request: Request, token: str | None) -> None:
    """With a token: ``Authorization: Bearer <token>`` (401 if absent, 403 if wrong).
    Without one: loopback clients only (403 otherwise)."""
    if token is not None:
        header = request.headers.get("authorization")
        if not header:
            raise AuthenticationRequired(
                "Admin routes need 'Authorization: Bearer <admin_token>'.", code="unauthorized"
            )
        scheme, _, given = header.partition(" ")
        # Bytes, not str: compare_digest refuses non-ASCII strings (a 500 for a bad token).
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")):
            raise PermissionDenied("The admin token is not valid.", code="forbidden")
        return
    host = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise PermissionDenied(
            "Admin routes are served only to loopback clients unless [auth] admin_token is set.",
            code="forbidden",
        )


@endpoint
async def admin_load(request: Request) -> Response:
    state = app_state(request)
    authorize(request, state.config.auth.admin_token)
    return json_response(await state.manager.load(request.path_params["model_id"]))


@endpoint
async def admin_unload(request: Request) -> Response:
    state = app_state(request)
    authorize(request, state.config.auth.admin_token)
    return json_response(await state.manager.unload(request.path_params["model_id"]))
