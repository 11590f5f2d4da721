"""Run a real broker on loopback: Apache Kafka (KRaft, single node), Apache Pulsar (standalone) or Redis.

    python scripts/broker.py {redis|kafka|pulsar} [--data DIR] [--port N]

prints ``URL=<msgstream url>`` as its first line of stdout once the broker has answered a real client call,
then serves in the foreground until SIGTERM or SIGINT, when it stops the broker and exits. With ``--data
DIR`` the broker's data (and the ports it chose) stay in DIR, so a second start on the same DIR is a
restart; without it a temporary directory is used and removed. ``--fetch`` only fetches what a broker
needs (the Kafka and Pulsar jars) and exits.

Apache Kafka and Apache Pulsar run from their Maven Central artifacts: the first start resolves them with
Maven (``mvn`` on the PATH, Java 17+), into the user's Maven repository, and keeps the class path in
``$MSGSTREAM_BROKER_CACHE`` (default ``~/.cache/msgstream/brokers``). Redis is Debian's ``redis-server``.

The test suite and the benchmarks start their brokers through the same functions (``start_kafka``,
``start_pulsar``, ``start_redis``, ``start_kafka_cluster``), each returning a :class:`Broker` that can be
killed (SIGKILL), restarted on the same ports and data, and stopped. The brokers are configured as they ship,
except where a single node needs it (replication factors of 1) and two settings that only make a test broker
quicker: ``group.initial.rebalance.delay.ms=0`` and ``offsets.topic.num.partitions=1`` on Kafka.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

KAFKA_VERSION = "4.1.1"
PULSAR_VERSION = "4.2.4"
LOG4J_VERSION = "2.24.3"

_POMS = {
    "kafka": f"""
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version></dependency>
    <!-- the published POM leaves out a logging binding: without one the broker logs nothing -->
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{LOG4J_VERSION}</version></dependency>
  </dependencies>""",
    "pulsar": f"""
  <dependencyManagement><dependencies>
    <dependency><groupId>org.apache.pulsar</groupId><artifactId>pulsar</artifactId>
      <version>{PULSAR_VERSION}</version><type>pom</type><scope>import</scope></dependency>
  </dependencies></dependencyManagement>
  <dependencies>
    <dependency><groupId>org.apache.pulsar</groupId><artifactId>pulsar-broker</artifactId>
      <version>{PULSAR_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId></dependency>
  </dependencies>""",
}
_VERSIONS = {"kafka": KAFKA_VERSION, "pulsar": PULSAR_VERSION}
# Pulsar's POMs name extra repositories that these artifacts do not need: resolve from Maven Central only
_SETTINGS = """<settings><mirrors><mirror><id>central-only</id><mirrorOf>*,!central</mirrorOf>
<url>file:///nonexistent-msgstream-mirror</url></mirror></mirrors></settings>"""
_LOG4J = """rootLogger.level=INFO
rootLogger.appenderRef.file.ref=FILE
appender.file.type=File
appender.file.name=FILE
appender.file.fileName={path}
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
"""
# bin/pulsar's flags for Java 17+
_PULSAR_JVM = [
    "-Xms512m",
    "-Xmx512m",
    "-XX:MaxDirectMemorySize=512m",
    "--add-opens",
    "java.base/sun.net=ALL-UNNAMED",
    "--add-opens",
    "java.base/java.lang=ALL-UNNAMED",
    "--add-opens",
    "java.base/java.util.zip=ALL-UNNAMED",
    "--add-opens",
    "java.base/java.nio=ALL-UNNAMED",
    "--add-opens",
    "java.base/jdk.internal.misc=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Djava.net.preferIPv4Stack=true",
]


class BrokerError(RuntimeError):
    """A broker could not be fetched or started; the text says why and where its log is."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until it returns true (exceptions count as not yet); TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout}s")
        time.sleep(0.05)


# -- the jars -------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("MSGSTREAM_BROKER_CACHE") or Path.home() / ".cache" / "msgstream" / "brokers")


def jars(name: str) -> Path:
    """The directory holding the class path of ``name`` (kafka or pulsar), resolved with Maven on first use."""
    lib = cache_dir() / f"{name}-{_VERSIONS[name]}"
    if (lib / ".complete").exists():
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(f"{name} runs from Maven Central artifacts: install Maven (apt-get install maven)")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise BrokerError(f"{name} needs Java 17+ (apt-get install openjdk-17-jre-headless)")
    with tempfile.TemporaryDirectory() as work:
        pom, settings = Path(work, "pom.xml"), Path(work, "settings.xml")
        pom.write_text(
            '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
            f"<groupId>msgstream.brokers</groupId><artifactId>{name}</artifactId><version>1</version>"
            f"<packaging>pom</packaging>{_POMS[name]}</project>"
        )
        settings.write_text(_SETTINGS)
        shutil.rmtree(lib, ignore_errors=True)
        argv = [mvn, "-B", "-q", "-s", str(settings), "-f", str(pom), "dependency:copy-dependencies"]
        argv += ["-DincludeScope=runtime", f"-DoutputDirectory={lib}"]
        try:  # the first resolution downloads a few hundred MB
            done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
        except subprocess.TimeoutExpired:
            raise BrokerError(f"resolving {name} {_VERSIONS[name]} with Maven took over 30 minutes") from None
        if done.returncode != 0:
            raise BrokerError(f"resolving {name} {_VERSIONS[name]} with Maven failed:\n{done.stdout[-3000:]}")
    (lib / ".complete").touch()
    return lib


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    return str(Path(home, "bin", "java")) if home else "java"


# -- a broker process -----------------------------------------------------------------------------------
class Broker:
    """A broker process this module started: ``url``, ``kill()`` (SIGKILL), ``restart()`` (same ports and
    data), ``stop()`` (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        url: str,
        ready: Callable[[], bool],
        *,
        port: int,
        start_timeout: float = 20.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.argv, self.workdir, self.url, self._ready = name, argv, workdir, url, ready
        self.port, self.start_timeout = port, start_timeout
        self.env = {**os.environ, **env} if env else None
        self.log = workdir / f"{name}.out"
        self.admin_url: str | None = None  # a broker's admin REST API, where it has one (Pulsar)
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the process without waiting for it to serve."""
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True, env=self.env
            )

    def wait_ready(self) -> None:
        """Wait until the broker answers a client call; BrokerError (the process stopped) if it does not."""
        try:
            wait_until(lambda: self.alive() and self._ready(), self.start_timeout, f"{self.name} on port {self.port}")
        except TimeoutError:
            self.stop()
            tail = self.log.read_text(errors="replace")[-3000:]
            raise BrokerError(
                f"{self.name} did not start within {self.start_timeout}s (log {self.log}):\n{tail}"
            ) from None

    def start(self) -> Broker:
        self.launch()
        self.wait_ready()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _ports(workdir: Path, names: list[str], given: dict[str, int | None]) -> dict[str, int]:
    """The ports of a broker on ``workdir``: those it had before (a restart keeps its identity: Kafka's
    controller and Pulsar's bookie are known by address), else ``given`` or free ones."""
    record = workdir / "ports.json"
    ports: dict[str, int] = json.loads(record.read_text()) if record.exists() else {}
    for name in names:
        if given.get(name):
            ports[name] = int(given[name] or 0)
        elif name not in ports:
            ports[name] = free_port()
    record.write_text(json.dumps(ports))
    return ports


# -- Redis ----------------------------------------------------------------------------------------------
def _redis_ping(port: int, password: str | None) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        if password:
            s.sendall(f"AUTH {password}\r\n".encode())
            s.recv(64)
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def start_redis(
    workdir: Path, *, port: int | None = None, durable: bool = False, password: str | None = None
) -> Broker:
    """redis-server from Debian's package. ``durable``: append-only file, fsync'd on every write."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BrokerError("redis-server is not installed (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    p = _ports(workdir, ["redis"], {"redis": port})["redis"]
    argv = [binary, "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)]
    argv += ["--logfile", str(workdir / "redis.log"), "--daemonize", "no"]
    argv += ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    argv += ["--requirepass", password] if password else []
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}127.0.0.1:{p}/0"
    return Broker("redis", argv, workdir, url, lambda: _redis_ping(p, password), port=p).start()


# -- Apache Kafka ---------------------------------------------------------------------------------------
_PROBE_LOG = logging.getLogger("broker.probe")  # the readiness probes' client lines: not for anyone's eyes
_PROBE_LOG.addHandler(logging.NullHandler())
_PROBE_LOG.propagate = False


def _kafka_ready(bootstrap: str, brokers: int = 1) -> bool:
    from confluent_kafka.admin import AdminClient

    host, port = bootstrap.split(",", maxsplit=1)[0].rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=0.5).close()  # before a client that logs refusals
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _PROBE_LOG}
    if len(AdminClient(conf).list_topics(timeout=2).brokers) < brokers:
        return False
    # and an idempotent producer gets its id and a write lands: until then a new broker answers clients'
    # first writes with "coordinator load in progress", which they log and retry
    from confluent_kafka import Producer

    producer = Producer({**conf, "enable.idempotence": True, "acks": "all", "message.timeout.ms": 5000})
    delivered: list[bool] = []
    producer.produce("__broker_ready", b"ready", on_delivery=lambda err, _m: delivered.append(err is None))
    producer.flush(6)
    return delivered == [True]


def _kafka_node(
    workdir: Path, node: int, *, ports: dict[str, int], voters: str, replicas: int, extra: dict[str, str]
) -> list[str]:
    """Write node ``node``'s configuration, format its log dir once, and return its command line."""
    data = workdir / f"data-{node}"
    client, controller = ports[f"client-{node}"], ports[f"controller-{node}"]
    config = {
        "process.roles": "broker,controller",
        "node.id": str(node),
        "listeners": f"PLAINTEXT://127.0.0.1:{client},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{client}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "controller.quorum.voters": voters,
        "log.dirs": str(data),
        "offsets.topic.replication.factor": str(replicas),
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(min(replicas, 2)),
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": str(min(replicas, 2)),
        # test speed only; neither changes what a client sees
        "group.initial.rebalance.delay.ms": "0",
        "offsets.topic.num.partitions": "1",
        **extra,
    }
    properties = workdir / f"server-{node}.properties"
    properties.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
    log4j = workdir / f"log4j2-{node}.properties"
    log4j.write_text(_LOG4J.format(path=workdir / f"kafka-{node}.log"))
    classpath = f"{jars('kafka')}/*"
    base = [_java(), f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
    if not (data / "meta.properties").exists():
        cluster = (workdir / "cluster.id").read_text().strip()
        fmt = [*base, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster}", f"--config={properties}"]
        done = subprocess.run(fmt, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise BrokerError(f"formatting {data} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return [*base[:1], "-Xmx512m", *base[1:], "kafka.Kafka", str(properties)]


def start_kafka_cluster(
    workdir: Path, *, nodes: int = 1, port: int | None = None, extra: dict[str, str] | None = None
) -> list[Broker]:
    """Apache Kafka in KRaft mode, ``nodes`` processes that are each broker and controller. With more than
    one node, internal topics have ``nodes`` replicas (and a min ISR of 2); ``extra`` adds broker settings."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"{kind}-{n}" for n in range(1, nodes + 1) for kind in ("client", "controller")]
    ports = _ports(workdir, names, {"client-1": port})
    cluster_id = workdir / "cluster.id"
    if not cluster_id.exists():
        cluster_id.write_text(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))
    voters = ",".join(f"{n}@127.0.0.1:{ports[f'controller-{n}']}" for n in range(1, nodes + 1))
    bootstrap = ",".join(f"127.0.0.1:{ports[f'client-{n}']}" for n in range(1, nodes + 1))
    brokers = [
        Broker(
            f"kafka-{n}",
            _kafka_node(workdir, n, ports=ports, voters=voters, replicas=nodes, extra=extra or {}),
            workdir,
            f"kafka://{bootstrap}",
            # a node is up once the cluster lists it: a controller quorum needs a majority first
            functools.partial(_kafka_ready, f"127.0.0.1:{ports[f'client-{n}']}", 1),
            port=ports[f"client-{n}"],
            start_timeout=90.0,
        )
        for n in range(1, nodes + 1)
    ]
    for broker in brokers:  # a quorum of several nodes forms only once most of them run: launch all first
        broker.launch()
    try:
        for broker in brokers:
            broker.wait_ready()
        wait_until(lambda: _kafka_ready(bootstrap, nodes), 90.0, f"a Kafka cluster of {nodes}")
    except (BrokerError, TimeoutError) as exc:
        for broker in brokers:
            broker.stop()
        raise BrokerError(str(exc)) from None
    return brokers


def start_kafka(workdir: Path, *, port: int | None = None) -> Broker:
    """Apache Kafka, one node in KRaft mode (broker and controller in one process)."""
    return start_kafka_cluster(workdir, nodes=1, port=port)[0]


# -- Apache Pulsar --------------------------------------------------------------------------------------
_PULSAR_PROBE = """
import sys, pulsar
client = pulsar.Client(sys.argv[1], operation_timeout_seconds=5, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
try:
    client.create_producer("persistent://public/default/__broker_ready").send(b"ready")
finally:
    client.close()
"""


def _pulsar_ready(web: int, service: int) -> bool:
    """The admin API lists public/default, and a client can create a topic there and write to it (the first
    topic of a new standalone can take seconds more). The client runs in a process of its own: pulsar-client
    keeps the first client's logger for the whole process, which is not this probe's to choose."""
    with urllib.request.urlopen(f"http://127.0.0.1:{web}/admin/v2/namespaces/public", timeout=2) as response:
        if "public/default" not in json.loads(response.read()):
            return False
    probe = [sys.executable, "-c", _PULSAR_PROBE, f"pulsar://127.0.0.1:{service}"]
    return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0


def start_pulsar(workdir: Path, *, port: int | None = None) -> Broker:
    """Apache Pulsar standalone (broker, in-process bookie, RocksDB metadata), functions worker off.
    ``broker.admin_url`` is its admin REST API."""
    workdir.mkdir(parents=True, exist_ok=True)
    ports = _ports(workdir, ["service", "web", "bookie"], {"service": port})
    config = {
        "clusterName": "standalone",
        "advertisedAddress": "127.0.0.1",
        "bindAddress": "127.0.0.1",
        "brokerServicePort": ports["service"],
        "webServicePort": ports["web"],
        # one bookie: recent releases default to 2
        "managedLedgerDefaultEnsembleSize": 1,
        "managedLedgerDefaultWriteQuorum": 1,
        "managedLedgerDefaultAckQuorum": 1,
        "functionsWorkerEnabled": "false",
    }
    conf = workdir / "standalone.conf"
    conf.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
    log4j = workdir / "log4j2.properties"
    log4j.write_text(_LOG4J.format(path=workdir / "pulsar.log"))
    argv = [_java(), *_PULSAR_JVM, f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{jars('pulsar')}/*"]
    argv += ["org.apache.pulsar.PulsarStandaloneStarter", "-c", str(conf), "-nfw", "-nss", "-a", "127.0.0.1"]
    argv += ["--metadata-dir", str(workdir / "metadata"), "--bookkeeper-dir", str(workdir / "bookkeeper")]
    argv += ["--bookkeeper-port", str(ports["bookie"])]
    broker = Broker(
        "pulsar",
        argv,
        workdir,
        f"pulsar://127.0.0.1:{ports['service']}",
        lambda: _pulsar_ready(ports["web"], ports["service"]),
        port=ports["service"],
        start_timeout=120.0,
    )
    broker.admin_url = f"http://127.0.0.1:{ports['web']}"
    return broker.start()


STARTERS: dict[str, Callable[..., Broker]] = {"redis": start_redis, "kafka": start_kafka, "pulsar": start_pulsar}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("broker", choices=sorted(STARTERS))
    parser.add_argument("--data", type=Path, help="keep the broker's data here (a second start is a restart)")
    parser.add_argument("--port", type=int, help="the port clients connect to (default: a free one)")
    parser.add_argument("--fetch", action="store_true", help="only fetch what the broker needs, then exit")
    args = parser.parse_args(argv)
    if args.fetch:
        if args.broker in _POMS:
            print(jars(args.broker), flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    temp = None if args.data else tempfile.mkdtemp(prefix=f"msgstream-{args.broker}-")
    workdir = (args.data or Path(temp or ".")).resolve()
    try:
        broker = STARTERS[args.broker](workdir, port=args.port)
    except BrokerError as exc:
        print(f"broker.py: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"URL={broker.url}", flush=True)
        if broker.admin_url:
            print(f"ADMIN_URL={broker.admin_url}", flush=True)
        print(f"DATA={workdir}", flush=True)
        while not stop.wait(0.5):
            if not broker.alive():
                print(f"broker.py: {args.broker} exited (log {broker.log})", file=sys.stderr)
                return 1
        return 0
    finally:
        broker.stop()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
