"""API keys on the inference routes: who is calling, which models they may use, their limits.

With no key configured :attr:`AppState.keys` is ``None`` and routes skip all of this with one
test. Otherwise a route calls :func:`authenticate` before reading the body (401 comes first, as
OpenAI answers) and :func:`admit` once it knows the model. A model the key may not use is
refused exactly as an unknown one (404 ``model_not_found``), naming only the key's own models,
so a key learns nothing about the others.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from tidegate.auth.keyring import ApiKey, KeyRing
from tidegate.errors import InvalidApiKey, ModelNotFound

__all__ = ["admit", "authenticate", "authorize_reader", "check_model"]


def _bearer(request: Request) -> str | None:
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            # The key is hashed from the bytes the client sent (UTF-8; undecodable bytes kept).
            scheme, _, token = value.decode("utf-8", "surrogateescape").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def authenticate(request: Request, keys: KeyRing) -> ApiKey:
    """The caller's key, or :class:`InvalidApiKey` (401). The message never echoes the key."""
    secret = _bearer(request)
    key = keys.identify(secret)
    if key is not None:
        return key
    if secret is None:
        raise InvalidApiKey("You didn't provide an API key. Send it as "
                            "'Authorization: Bearer <key>'.")
    raise InvalidApiKey("Incorrect API key provided.")


def authorize_reader(request: Request, keys: KeyRing | None, admin_token: str | None
                     ) -> str | None:
    """``/metrics`` and ``/openapi.json`` under ``[auth] protect_metrics``: any API key (its id
    is returned), or the admin token (None); else :class:`InvalidApiKey` (401). The key's model
    list does not matter."""
    secret = _bearer(request)
    if secret is not None and admin_token is not None and hmac.compare_digest(
        secret.encode("utf-8", "surrogateescape"), admin_token.encode("utf-8")
    ):
        return None  # checked first: the admin token is not counted as an invalid API key
    if keys is not None and (key := keys.identify(secret)) is not None:
        return key.id
    if secret is None:
        raise InvalidApiKey("[auth] protect_metrics is set: send an API key or the admin "
                            "token as 'Authorization: Bearer <key>'.")
    raise InvalidApiKey("Incorrect API key provided.")


def check_model(key: ApiKey, model: str) -> None:
    """404 ``model_not_found`` if ``key`` may not use ``model`` (as for an unknown model)."""
    if not key.allows(model):
        assert key.models is not None
        raise ModelNotFound(model, available=sorted(key.models))


def admit(key: ApiKey, model: str) -> dict[str, str]:
    """Check the model and count the request; the ``x-ratelimit-*`` headers to answer with.
    Raises ModelNotFound (404) or RateLimited (429)."""
    check_model(key, model)
    return key.admit()
