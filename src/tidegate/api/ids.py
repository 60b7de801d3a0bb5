"""Response ids (``cmpl-…``, ``chatcmpl-…``, ``rerank-…``) and request ids for error logs."""

from __future__ import annotations

import os
import random

__all__ = ["new_id"]

_IDS = random.Random()  # seeded from the OS at start
os.register_at_fork(after_in_child=_IDS.seed)  # a forked child must not repeat the parent's ids


def new_id(prefix: str = "") -> str:
    """``{prefix}-`` (if any) and 128 random bits in hex, like ``uuid4().hex``.

    Not from ``uuid4``: it reads ``os.urandom``, a system call that releases the GIL, and on the
    event loop beside an OpenVINO GenAI step (which holds the GIL for its whole compute) every
    response then waited for the step to end: 6% of the loop's time under the overload soak."""
    value = f"{_IDS.getrandbits(128):032x}"
    return f"{prefix}-{value}" if prefix else value
