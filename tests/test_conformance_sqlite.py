"""The conformance suite on the sqlite:/// backend, a broker file per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from msgstream.testing import ConformanceSuite


class TestSQLiteConformance(ConformanceSuite):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/broker.db"
