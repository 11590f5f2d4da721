"""The fault-injecting conformance mode (msgstream.testing.faults) against real Redis, Kafka and Pulsar
brokers: transient errors at seeded random send/receive/ack/seek calls, and nothing lost or repeated
once the caller retries as documented."""

from __future__ import annotations

import pytest

from msgstream.testing.faults import FaultInjectingSuite


class TestRedisUnderFaults(FaultInjectingSuite):
    @pytest.fixture
    def url(self, redis_url: str) -> str:
        return redis_url


class TestKafkaUnderFaults(FaultInjectingSuite):
    @pytest.fixture
    def url(self, kafka_url: str) -> str:
        return kafka_url


class TestPulsarUnderFaults(FaultInjectingSuite):
    @pytest.fixture
    def url(self, pulsar_url: str) -> str:
        return pulsar_url
