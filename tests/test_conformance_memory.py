"""The conformance suite on the in-process memory backend (a fresh broker per test)."""

from __future__ import annotations

import uuid

import pytest

from msgstream.testing import ConformanceSuite


class TestMemoryConformance(ConformanceSuite):
    quiet_period = 0.2

    @pytest.fixture
    def url(self) -> str:
        return f"memory://conformance-{uuid.uuid4().hex[:8]}"
