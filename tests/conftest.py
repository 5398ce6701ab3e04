from __future__ import annotations

from pathlib import Path

import pytest

# pytester: tests/integration/test_plugin.py runs a user's test file with the lab's plugin.
pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def data() -> Path:
    return DATA


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
