"""The conformance suite on the sqlite:/// backend, a broker file per test, sync and through msgstream.aio."""

from __future__ import annotations

from pathlib import Path

import pytest

from msgstream.testing import ConformanceSuite

from .aio_sync import AsyncConformanceSuite


class TestSQLiteConformance(ConformanceSuite):
    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/broker.db"


class TestSQLiteConformanceAio(AsyncConformanceSuite):
    """The same suite through msgstream.aio."""

    @pytest.fixture
    def url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/broker.db"
