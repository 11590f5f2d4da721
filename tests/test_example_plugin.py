"""The conformance suite on the example SQLite plugin (tests/example_plugin, a broker file per test).

The plugin is installed by the README's test command (``pip install -e ./tests/example_plugin``) and
found through its own entry point, like any third-party backend. If it is not installed this module
fails: a backend that cannot be reached is a failure, not a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from msgstream.backend import installed_schemes
from msgstream.testing import ConformanceSuite


def test_plugin_is_installed_through_its_entry_point() -> None:
    assert "sqlite" in installed_schemes(), "pip install -e ./tests/example_plugin (see README)"


class TestSqliteConformance(ConformanceSuite):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/broker.db"
