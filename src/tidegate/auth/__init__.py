"""API keys: who may call the inference routes, which models each key may use, and its
per-minute request and token limits. Pure and framework-free; ``tidegate.api.auth`` applies it
to HTTP requests and :mod:`tidegate.metrics` reads its statistics."""
