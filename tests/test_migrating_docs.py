"""The code of docs/migrating runs: every ```python block of every page (peers' code is shown as text)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGES = sorted((Path(__file__).resolve().parent.parent / "docs" / "migrating").glob("*.md"))
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_every_preset_has_a_page():
    from larsopt import presets

    named = {page.stem.replace("-", "_") for page in PAGES}
    assert set(presets.__all__) <= named


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_page_code_runs(page):
    blocks = BLOCK.findall(page.read_text())
    if page.name == "README.md":
        assert not blocks
        return
    assert blocks, f"{page.name} has no python block"
    for block in blocks:
        exec(compile(block, str(page), "exec"), {})
