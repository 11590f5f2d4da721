"""Pulsar backend: the whole conformance suite against a real Pulsar-protocol broker (pulsar-lite,
started by the suite; MSGSTREAM_PULSAR_URL for your own Apache Pulsar), plus Pulsar-specific tests."""

from __future__ import annotations

import pytest

from msgstream.backend import installed_schemes
from msgstream.testing import ConformanceSuite


def test_registered() -> None:
    assert {"pulsar", "pulsar+ssl"} <= set(installed_schemes())


class TestPulsarConformance(ConformanceSuite):
    @pytest.fixture
    def url(self, pulsar_url: str) -> str:
        return pulsar_url
