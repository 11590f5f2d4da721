"""The brokers the benchmarks run against: an existing one named by a URL, else Apache Kafka (KRaft, one
node), Apache Pulsar (standalone) or redis-server started through ``scripts/broker.py`` (the launcher the
test suite uses) on free loopback ports, pinned to CPUs of its own (``bench_core.apart``), and stopped
at the end of the ``with`` block.

A suite starts each broker it needs once and runs all its sections on it; topics, streams and
channels it writes are deleted as it goes (Apache Pulsar's channel topics through the admin REST API,
which the started broker's URL names as ``admin_url``). A JVM broker is warmed up before it is handed
out (:func:`warm_up`): it runs its code interpreted until the JIT compiler has seen it run, and its
first seconds of traffic are several times slower than the rest (Apache Kafka here: ~100k msgs/s in the
first 3 s, ~300k after), which would otherwise land in whichever side's runs came first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgstream as ms
from benchmarks.bench_core import apart, clock, insert_msg
from scripts.broker import KAFKA_VERSION, PULSAR_VERSION, Broker, start_kafka, start_pulsar, start_redis

#: seconds of traffic through a started JVM broker before a suite measures anything
JVM_WARMUP_SECONDS = 4.0
#: broker name -> the environment variable naming an existing one (as for the test suite)
URL_ENV = {"redis": "MSGSTREAM_REDIS_URL", "kafka": "MSGSTREAM_KAFKA_URL", "pulsar": "MSGSTREAM_PULSAR_URL"}


@dataclass
class Server:
    """A broker for a suite: the msgstream URL to connect with, and what it is."""

    name: str
    url: str
    description: str
    broker: Broker | None = None  # None: a given broker, not started here

    def rss_mib(self) -> float | None:
        """The started broker's resident memory, MiB (None for a given broker)."""
        if self.broker is None or self.broker.proc is None:
            return None
        try:
            status = Path(f"/proc/{self.broker.proc.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return None


def _redacted(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def _redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "redis-server"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"v=(\S+)", out)
    return f"redis-server {match.group(1) if match else '?'}"


def warm_up(url: str, seconds: float) -> None:
    """Traffic through the broker at ``url`` for about ``seconds``: msgstream produces packs of 1000 one-row
    inserts (100 B and 1 KiB rows, in turn) into a channel and a subscription reads them back, then the
    channel is destroyed."""
    owner = ms.OwnerDescription(role="bench", description_text="benchmarks.brokers warm-up")
    ts = ms.timestamp.now()
    packs = [ms.MsgPack.of([insert_msg(i, ts + i, b"w" * size) for i in range(1000)]) for size in (100, 1024)]
    with ms.connect(url) as client:
        [channel] = client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=1))
        try:
            with client.msg_stream() as out, client.msg_stream(receive_batch=1000) as inp:
                out.create_producers([channel])
                inp.create_consumers("bench-warm-up", [channel])
                sent = received = 0
                deadline = clock() + seconds
                while clock() < deadline:
                    out.produce(packs[sent // 1000 % 2])
                    sent += 1000
                    while received < sent:  # the first round also waits for the group join / subscribe
                        pack = inp.consume(timeout=30.0)
                        if pack is None:
                            raise RuntimeError(f"warm-up of {url}: {received} of {sent} messages came back")
                        received += len(pack.msgs)
        finally:
            client.destroy_channels([channel])


def given_url(name: str, url: str | None = None) -> str | None:
    """``url``, else the environment's URL for broker ``name`` (``MSGSTREAM_<NAME>_URL``), else None."""
    return url or os.environ.get(URL_ENV[name]) or None


@contextmanager
def server(name: str, url: str | None = None) -> Iterator[Server]:
    """Broker ``name`` (redis, kafka or pulsar) for the ``with`` block: the one at ``url`` if given,
    else one started here (see the module docstring)."""
    if url:
        yield Server(name, url, f"given broker {_redacted(url)}")
        return
    with tempfile.TemporaryDirectory(prefix=f"msgstream-bench-{name}-") as tmp:
        workdir = Path(tmp)
        if name == "redis":
            broker = start_redis(workdir)
            started = Server(name, broker.url, f"{_redis_version()}, no persistence", broker)
        elif name == "kafka":
            broker = start_kafka(workdir)
            what = f"Apache Kafka {KAFKA_VERSION} (KRaft, one node, broker and controller in one JVM)"
            started = Server(name, broker.url, what, broker)
        elif name == "pulsar":
            broker = start_pulsar(workdir)
            admin = broker.admin_url
            what = f"Apache Pulsar {PULSAR_VERSION} standalone (in-process bookie, RocksDB metadata)"
            started = Server(name, f"{broker.url}/?admin_url={admin}", what, broker)
        else:
            raise ValueError(f"no broker called {name!r}")
        try:
            assert broker.proc is not None
            with apart(broker.proc.pid):
                started.description += f", started for the run on loopback ({broker.url})"
                if name in ("kafka", "pulsar"):
                    warm_up(started.url, JVM_WARMUP_SECONDS)
                    started.description += f", warmed up with {JVM_WARMUP_SECONDS:g} s of traffic"
                yield started
        finally:
            broker.stop()
