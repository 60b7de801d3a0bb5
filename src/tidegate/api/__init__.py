"""HTTP API: the ASGI app, request schemas and error mapping."""
