"""The README's configuration examples are real: each ```toml block loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tidegate.config import load_config

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_config_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS)
def test_readme_toml_block_loads(block: str, tmp_path: Path) -> None:
    path = tmp_path / "tidegate.toml"
    path.write_text(block, encoding="utf-8")
    load_config(path)
