"""Response ids: uuid4-sized random hex, unique, and not repeated by a forked child."""

from __future__ import annotations

import os
import re

import pytest

from tidegate.api.ids import new_id


def test_ids_are_prefixed_random_hex_and_unique() -> None:
    ids = [new_id("cmpl") for _ in range(10_000)]
    assert all(re.fullmatch(r"cmpl-[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert re.fullmatch(r"[0-9a-f]{32}", new_id())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.close(read)
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    parents = new_id()
    with os.fdopen(read, "rb") as pipe:
        childs = pipe.read().decode()
    os.waitpid(pid, 0)
    assert re.fullmatch(r"[0-9a-f]{32}", childs) and childs != parents
