"""Fault suite: consumer crashes, corrupt input and secrets, against every backend with a real broker, and
sqlite:///'s producing processes killed.

Short by default (CI); ``--long`` for the full runs. Every figure a test measures goes to the session's
fault report (``--fault-report PATH`` writes it as Markdown; docs/reliability.md keeps the last one).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import msgstream as ms
from msgstream.errors import MsgStreamError, ProduceError, UnmarshalError

from .load import consume_confirmed

WORKER = Path(__file__).with_name("crash_worker.py")
BROKERS = ["redis", "kafka", "pulsar"]  # brokers in processes of their own
BACKENDS = [*BROKERS, "sqlite"]  # and the one in a file


@pytest.fixture(params=BACKENDS)
def broker_url(request: pytest.FixtureRequest) -> tuple[str, str]:
    name: str = request.param
    return name, str(request.getfixturevalue(f"{name}_url"))


def _owner() -> ms.OwnerDescription:
    return ms.OwnerDescription(role="faults")


def _row(i: int, ts: int) -> ms.InsertMsg:
    return ms.InsertMsg(begin_ts=ts, end_ts=ts, hash_values=[i], row_ids=[i], row_data=[i.to_bytes(4, "big")])


def _rows_in_state(state: Path) -> int:
    try:
        return len(json.loads(state.read_text())["rows"])
    except (OSError, ValueError, KeyError):
        return 0


# -- consumer crash -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["plain", "tt"])
def test_consumer_killed_at_random_points_outputs_everything_once(
    broker_url: tuple[str, str], mode: str, tmp_path: Path, request: pytest.FixtureRequest, fault_report: Any
) -> None:
    """A consumer process that checkpoints its output and positions together is SIGKILLed at random
    points and started again from its checkpoint: its output is every row exactly once, in order."""
    name, url = broker_url
    long = bool(request.config.getoption("--long"))
    kills, n = (20, 12000) if long else (4, 3000)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    with ms.connect(url) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=3))
        with client.msg_stream() as out:
            out.create_producers(chans)
            for k in range(0, n, 100):  # a tick after every 100 rows, each row's ts below its tick
                base = 10 * k + 10
                out.produce(ms.MsgPack.of([_row(i, base + (i - k)) for i in range(k, k + 100)]))
                out.broadcast(ms.MsgPack(0, 0, [ms.TimeTickMsg(begin_ts=base + 200, end_ts=base + 200)]))
    state = tmp_path / "state.json"
    argv = [sys.executable, str(WORKER), url, ",".join(chans), str(state), mode, str(n)]
    done_kills, last_run = _kill_repeatedly(argv, state, kills, n, rng=rng, seed=seed)
    rows: list[int] = json.loads(state.read_text())["rows"]
    lost = len(set(range(n)) - set(rows))
    duplicated = len(rows) - len(set(rows))
    fault_report.add(
        "consumer crash", name, mode=mode, kills=done_kills, rows=n, lost=lost, duplicated=duplicated, seed=seed
    )
    assert lost == 0 and duplicated == 0, f"lost {lost}, duplicated {duplicated} (seed {seed})"
    assert "done" in last_run, last_run
    for c in range(3):  # per-channel order (rows of channel c are those with i % 3 == c)
        mine = [r for r in rows if r % 3 == c]
        assert mine == sorted(mine), f"channel {c} out of order (seed {seed})"
    if mode == "tt":  # ticks come in order, so rows of an earlier tick never follow a later one
        assert [r // 100 for r in rows] == sorted(r // 100 for r in rows)
    assert done_kills == kills, f"the worker finished after {done_kills} of {kills} kills: raise n"


def _kill_repeatedly(
    argv: list[str],
    state: Path,
    kills: int,
    n: int,
    *,
    rng: random.Random,
    seed: int,
    after_kill: Callable[[], None] = lambda: None,
) -> tuple[int, str]:
    """Start the worker and SIGKILL it soon after it saved progress, ``kills`` times (fewer if it
    finishes first), calling ``after_kill`` once each killed worker is gone; then run it to the end.
    Returns how many times it was killed, and what the last run printed ("done" if it finished)."""
    done_kills = 0
    for _ in range(kills):
        before = _rows_in_state(state)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while _rows_in_state(state) <= before and proc.poll() is None:  # it made progress: now kill it
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)  # no worker left behind
                proc.wait(10)
                raise AssertionError(f"worker made no progress (seed {seed})")
            time.sleep(0.001)
        # within a few ms of a save: a random point of the next pack's handling. Not much later: a
        # worker that reads ahead (a time-tick stream holds ticks in memory) saves a pack a
        # millisecond, and would finish before the last kill
        time.sleep(rng.uniform(0, 0.004))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            done_kills += 1
            proc.wait(10)
            after_kill()
        proc.wait(10)
        if _rows_in_state(state) >= n:
            break
    final = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    return done_kills, final.stdout + final.stderr[-2000:]


# a killed Kafka member holds its channels until its session times out (6 s here): 20 kills take minutes
@pytest.mark.timeout(900)
def test_killed_member_resumed_by_the_broker_loses_nothing(
    broker_url: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest, fault_report: Any
) -> None:
    """Without checkpointed positions: a consumer killed at random points and started again in the same
    subscription gets, from the broker, every message it had not acknowledged. Nothing is lost; what is
    repeated is at most what was in flight at each kill (at-least-once)."""
    name, url = broker_url
    with ms.connect(url) as probe:
        if not type(probe.backend).features.member_kill_recovery:
            pytest.skip(f"{name} declares member_kill_recovery=False (docs/backends.md)")
    sep = "&" if "?" in url else ("?" if name == "redis" else "/?")
    if name == "redis":  # hand a dead member's entries over within a second, not claim_idle's default 30 s
        url += sep + "claim_idle=1&claim_interval=0.2"
    elif name == "kafka":  # the group drops a dead member after 6 s (a stock broker's minimum), not 45 s
        url += sep + "consumer.session.timeout.ms=6000"
    elif name == "pulsar":  # the admin API counts what the subscription has not acknowledged
        url += f"?admin_url={request.getfixturevalue('pulsar_admin_url')}"
    long = bool(request.config.getoption("--long"))
    kills, n = (20, 12000) if long else (4, 3000)
    seed = random.randrange(2**32)
    with ms.connect(url) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=3))
        with client.msg_stream() as out:
            out.create_producers(chans)
            for k in range(0, n, 100):
                out.produce(ms.MsgPack.of([_row(i, i + 1) for i in range(k, k + 100)]))
    state = tmp_path / "state.json"
    sub = f"resume-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, str(WORKER), url, ",".join(chans), str(state), "resume", str(n), sub]
    in_flight: list[int] = []

    def note_in_flight() -> None:
        """What the dead member had saved and the broker had not recorded as acknowledged: the most its
        successor can repeat. Counted as soon as it is dead: an acknowledgement it sent just before can
        still arrive, which only makes the repeats fewer. (An acknowledgement is sent only for a pack
        saved, and with Kafka asynchronously: several packs can be in flight at a kill.)"""
        with ms.connect(url) as client:
            unacked = [client.backend.unacknowledged(sub, c)[0] for c in chans]
        assert None not in unacked, f"{name} cannot count unacknowledged messages: {unacked}"
        acknowledged = n - sum(c for c in unacked if c is not None)
        saved: list[int] = json.loads(state.read_text())["rows"] if state.exists() else []
        in_flight.append(len(set(saved)) - acknowledged)

    done_kills, last_run = _kill_repeatedly(
        argv, state, kills, n, rng=random.Random(seed), seed=seed, after_kill=note_in_flight
    )
    rows: list[int] = json.loads(state.read_text())["rows"]
    lost = len(set(range(n)) - set(rows))
    repeated = len(rows) - len(set(rows))
    fault_report.add(
        "member killed, broker resumes",
        name,
        kills=done_kills,
        rows=n,
        lost=lost,
        repeated=repeated,
        in_flight=sum(in_flight),
        seed=seed,
    )
    assert lost == 0, f"lost {lost} (seed {seed})"
    assert "done" in last_run, last_run
    assert done_kills > 0, f"the worker finished before it could be killed (seed {seed})"
    assert min(in_flight, default=0) >= 0, f"acknowledged more than was saved: {in_flight} (seed {seed})"
    assert repeated <= sum(in_flight), f"{repeated} repeats, {in_flight} in flight at the kills (seed {seed})"


# -- corrupt input --------------------------------------------------------------------------------
def _bad_frames(rng: random.Random, good: list[bytes], count: int) -> list[bytes]:
    """Random bytes, and valid frames truncated, extended, or with bytes flipped."""
    out = []
    for _ in range(count):
        kind = rng.randrange(4)
        base = bytearray(rng.choice(good))
        if kind == 0:
            frame = rng.randbytes(rng.randrange(1, 200))
        elif kind == 1:
            frame = bytes(base[: rng.randrange(len(base))])
        elif kind == 2:
            frame = bytes(base) + rng.randbytes(rng.randrange(1, 20))
        else:
            for _ in range(rng.randrange(1, 4)):
                base[rng.randrange(len(base))] = rng.randrange(256)
            frame = bytes(base)
        out.append(frame or b"\x00")
    return out


def _write_raw(backend: Any, chan: str, payloads: list[bytes]) -> None:
    """Write ``payloads`` to the channel with the broker's own client, as another program would: redis-py
    XADD, confluent-kafka produce, pulsar-client send (memory://: its backend's producer)."""
    name = type(backend).__name__
    if name == "RedisBackend":
        import redis

        raw = redis.Redis.from_url(backend.url.raw().split("?")[0])
        for k in range(0, len(payloads), 1000):
            pipe = raw.pipeline(transaction=False)
            for p in payloads[k : k + 1000]:
                pipe.xadd(backend.key(chan), {"d": p})
            pipe.execute()
        raw.close()
    elif name == "KafkaBackend":
        import confluent_kafka as ck

        producer = ck.Producer({"bootstrap.servers": backend.bootstrap, "enable.idempotence": True})
        for p in payloads:
            while True:
                try:
                    producer.produce(chan, p, partition=0)
                    break
                except BufferError:
                    producer.poll(0.05)
        assert producer.flush(30) == 0
    elif name == "PulsarBackend":
        import pulsar

        raw = pulsar.Client(backend.url.raw().split("?")[0], logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
        producer = raw.create_producer(backend.live(chan).topic, block_if_queue_full=True)
        for p in payloads:
            producer.send_async(p, None)
        producer.flush()
        raw.close()
    else:
        producer = backend.create_producer(chan)
        for k in range(0, len(payloads), 1000):
            producer.send(payloads[k : k + 1000], 30)
        producer.close()


@pytest.mark.parametrize("backend_name", ["memory", *BACKENDS])
def test_corrupt_frames_are_reported_and_good_messages_go_on(
    backend_name: str, request: pytest.FixtureRequest, fault_report: Any
) -> None:
    """Corrupt frames written straight to a channel by the broker's own client come out only as
    ``UnmarshalError`` reports with their position, and every good message around them arrives, in
    order."""
    url = "memory://faults" if backend_name == "memory" else str(request.getfixturevalue(f"{backend_name}_url"))
    n_bad = 100_000 if request.config.getoption("--long") else 5_000
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    dispatcher = ms.UnmarshalDispatcher()
    with ms.connect(url) as client:
        [chan] = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
        good = [_row(i, i + 1).marshal() for i in range(n_bad // 10)]
        bad = _bad_frames(rng, good, n_bad)
        payloads: list[bytes] = []
        expected: list[bytes] = []  # what must come out as messages: the good frames, and mutants that decode
        undecodable = 0
        for i, frame in enumerate(bad):
            payloads.append(frame)
            try:
                dispatcher.unmarshal(frame)
                expected.append(frame)
            except UnmarshalError:
                undecodable += 1
            if i % 10 == 9:
                payloads.append(good[i // 10])
                expected.append(good[i // 10])
        _write_raw(client.backend, chan, payloads)
        reports: list[UnmarshalError] = []
        got: list[bytes] = []
        with client.msg_stream(on_error=reports.append) as inp:
            inp.create_consumers("corrupt", [chan])
            deadline = time.monotonic() + 120
            while len(got) + len(reports) < len(payloads):
                assert time.monotonic() < deadline, f"{len(got)} + {len(reports)} of {len(payloads)} (seed {seed})"
                pack = inp.consume(timeout=1)
                if pack is not None:
                    got += [m.marshal() for m in pack.msgs]
            assert inp.consume(timeout=0.3) is None
    fault_report.add(
        "corrupt input", backend_name, frames=n_bad, reported=len(reports), undecodable=undecodable, seed=seed
    )
    assert len(reports) == undecodable, f"seed {seed}"
    assert all(r.position is not None and r.position.channel == chan and r.position.msg_id for r in reports)
    assert len({r.position.msg_id for r in reports if r.position}) == len(reports), "a frame reported twice"
    assert [dispatcher.unmarshal(f) for f in got] == [dispatcher.unmarshal(f) for f in expected], f"seed {seed}"


# -- secrets --------------------------------------------------------------------------------------
def _workload(url: str, secret: str, texts: list[str]) -> None:
    """Everything a user does, including the failures, collecting every text msgstream produces."""

    def attempt(call: Callable[[], Any]) -> None:
        try:
            call()
        except MsgStreamError as exc:
            texts.extend([str(exc), repr(exc)])

    with ms.connect(url) as client:
        texts += [repr(client), repr(client.backend), str(client.backend.url)]
        chans = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=2))
        with client.msg_stream() as out, client.msg_stream() as inp:
            texts += [repr(out), repr(inp)]
            out.create_producers(chans)
            inp.create_consumers("secrets", chans)
            out.produce(ms.MsgPack.of([_row(i, i + 1) for i in range(10)]))
            texts.append(repr(inp.consume(timeout=5)))
            attempt(lambda: inp.seek([ms.Position(chans[0], b"\xff" * 8, 0)]))
            attempt(lambda: client.describe_channels(["no-such-channel"]))
            attempt(lambda: out.create_producers(["no-such-channel"]))
            client.destroy_channels(chans[:1])
            attempt(lambda: out.produce(ms.MsgPack.of([_row(0, 1)])))
    assert secret in url  # the secret really was in the URL


def test_secrets_never_appear(
    tmp_path: Path,
    *,
    kafka_url: str,
    pulsar_url: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    fault_report: Any,
) -> None:
    """With a password or token in every backend's URL, no log line, repr, exception text or output of
    the whole workload (failures included) contains it."""
    from scripts.broker import start_redis

    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    redis_secret = f"pw-{uuid.uuid4().hex}"
    broker = start_redis(tmp_path / "auth", password=redis_secret)
    try:
        port = broker.port
        _workload(f"redis://:{redis_secret}@127.0.0.1:{port}/0", redis_secret, texts)
        try:  # a wrong password: the error names neither
            ms.connect(f"redis://:wrong-{redis_secret}@127.0.0.1:{port}/0")
        except MsgStreamError as exc:
            texts.append(str(exc))
    finally:
        broker.stop()
    secrets = [redis_secret]
    for url, option in ((kafka_url, "sasl.password"), (pulsar_url, "token")):
        secret = f"tok-{uuid.uuid4().hex}"
        sep = "&" if "?" in url else "/?"
        _workload(f"{url}{sep}{option}={secret}", secret, texts)
        secrets.append(secret)
    captured = capfd.readouterr()
    everything = "\n".join([*texts, *(r.getMessage() for r in caplog.records), captured.out, captured.err])
    hits = sum(everything.count(s) for s in secrets)
    fault_report.add("secrets", "redis, kafka, pulsar", texts=len(texts) + len(caplog.records), hits=hits)
    assert hits == 0


# -- broker restart under load --------------------------------------------------------------------
@pytest.mark.parametrize("broker_name", BROKERS)
def test_broker_killed_under_load_loses_nothing_confirmed(
    broker_name: str, tmp_path: Path, request: pytest.FixtureRequest, fault_report: Any
) -> None:
    """A producer and a consumer keep running while the broker (durable configuration) is SIGKILLed and
    started again on the same data. Every row whose produce was confirmed is consumed, in per-channel
    order, and no message is delivered twice; where the backend declares idempotent produce, no row is
    stored twice either (so each is consumed exactly once). Rows of a failed produce may land or not.
    Durable configurations: Redis AOF always; Apache Kafka and Apache Pulsar standalone as they ship, on
    their data dirs."""
    import threading

    from scripts.broker import start_kafka, start_pulsar, start_redis

    restarts = 5 if request.config.getoption("--long") else 3
    if broker_name == "redis":
        broker = start_redis(tmp_path / "b", durable=True)
        url = f"{broker.url}?socket_timeout=2&connect_timeout=2"
    elif broker_name == "pulsar":
        broker = start_pulsar(tmp_path / "b")
        url = f"{broker.url}/?operation_timeout=3"
    else:
        broker = start_kafka(tmp_path / "b")
        url = f"{broker.url}/?operation_timeout=5"
    confirmed: set[int] = set()
    failed_produces = 0
    output: list[tuple[str, int, bytes]] = []  # channel, row, message id
    stop = threading.Event()
    errors: list[BaseException] = []
    try:
        with ms.connect(url) as client:
            assert type(client.backend).features.durable, f"{broker_name} runs durable here but its backend says not"
            chans = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=3))
            out = client.msg_stream(produce_timeout=5)
            out.create_producers(chans)
            inp = client.msg_stream(receive_batch=100)
            inp.create_consumers("restart-load", chans)

            def produce() -> None:
                nonlocal failed_produces
                k = 0
                while not stop.is_set():
                    rows = list(range(k, k + 50))
                    k += 50
                    try:
                        out.produce(ms.MsgPack.of([_row(i, i + 1) for i in rows]))
                        confirmed.update(rows)
                    except ProduceError as exc:
                        if not exc.retriable:
                            errors.append(exc)
                            return
                        failed_produces += 1
                        time.sleep(0.05)

            produced = threading.Event()  # the producer has stopped: `confirmed` is final

            def consume() -> None:
                try:
                    consume_confirmed(
                        inp,
                        produced=produced,
                        confirmed=confirmed,
                        drain_deadline=drain_deadline,
                        output=output,
                        seen=set(),
                    )
                except MsgStreamError as exc:
                    errors.append(exc)

            drain_deadline = [float("inf")]
            threads = [threading.Thread(target=produce, daemon=True), threading.Thread(target=consume, daemon=True)]
            for t in threads:
                t.start()
            try:
                for _ in range(restarts):
                    time.sleep(1.0)  # load between restarts, not a wait for a condition
                    broker.restart()  # SIGKILL, then start on the same port and data
                time.sleep(1.0)
                stop.set()
                threads[0].join(30)
                drain_deadline[0] = time.monotonic() + 60
                produced.set()
                threads[1].join(90)
            finally:  # after a failure too: the workers end instead of looping on a broker that is gone
                stop.set()
                drain_deadline[0] = min(drain_deadline[0], time.monotonic() + 60)
                produced.set()
            assert not any(t.is_alive() for t in threads), "a worker thread hung"
            deadline = time.monotonic() + 60
            while True:  # as documented: a close whose acknowledgement fails, retriable, closes nothing
                try:
                    inp.close()
                    break
                except MsgStreamError as exc:
                    assert exc.retriable and time.monotonic() < deadline, exc
            out.close()
    finally:
        broker.stop()
    assert not errors, errors
    rows = [r for _, r, _ in output]
    lost = len(confirmed - set(rows))
    repeated = len(rows) - len(set(rows))
    # a repeat is either the consumer delivering one stored message twice (same id: never allowed) or a
    # row stored twice because the client resent it across the crash (different ids: allowed only where
    # the backend declares idempotent_produce=False)
    redelivered = len(output) - len({(c, i) for c, _, i in output})
    stored_twice = repeated - redelivered
    idempotent = type(client.backend).features.idempotent_produce
    fault_report.add(
        "broker killed under load",
        broker_name,
        restarts=restarts,
        confirmed=len(confirmed),
        failed_produces=failed_produces,
        lost=lost,
        repeated=repeated,
        redelivered=redelivered,
        stored_twice=stored_twice,
    )
    assert lost == 0, f"{lost} confirmed rows never consumed"
    assert redelivered == 0, f"{redelivered} messages delivered twice by the consumer"
    if idempotent:
        assert stored_twice == 0, f"{stored_twice} rows stored twice although produce is idempotent"
    for c, ch in enumerate(chans):
        firsts: list[int] = []
        once: set[int] = set()
        for name, r, _ in output:
            if name == ch and r not in once:
                once.add(r)
                firsts.append(r)
        assert firsts == sorted(firsts), f"channel {c}: first deliveries out of order"


# -- producing processes killed (sqlite:///: the broker is the file) -----------------------------
_WRITER = """
import os, sys
import msgstream as ms
url, chans, log, base = sys.argv[1], sys.argv[2].split(","), sys.argv[3], int(sys.argv[4])
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
with ms.connect(url) as client, client.msg_stream(produce_timeout=30) as out:
    out.create_producers(chans)
    for k in range(base, base + 10**6, 50):
        rows = range(k, k + 50)
        out.produce(ms.MsgPack.of([ms.InsertMsg(begin_ts=1, end_ts=1, hash_values=[i], row_ids=[i]) for i in rows]))
        os.write(fd, f"{k}\\n".encode())  # confirmed: one write(2), so a kill leaves whole lines
"""


def test_producers_killed_lose_and_repeat_nothing_confirmed(
    sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest, fault_report: Any
) -> None:
    """Three processes produce into one sqlite:/// file at once and are SIGKILLed at random points, again
    and again. Every pack whose produce returned is stored, exactly once; of a pack a kill interrupted,
    each channel's share is stored whole or not at all (it is one transaction); per channel, each writer's
    rows keep their order."""
    rounds = 20 if request.config.getoption("--long") else 5
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    with ms.connect(sqlite_url) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=3))
    logs: list[Path] = []
    for r in range(rounds):
        procs = []
        for w in range(3):
            logs.append(tmp_path / f"confirmed-{r}-{w}.log")
            base = len(logs) * 10**6  # each writer's rows are its own
            argv = [sys.executable, "-c", _WRITER, sqlite_url, ",".join(chans), str(logs[-1]), str(base)]
            procs.append(subprocess.Popen(argv, start_new_session=True))
        deadline = time.monotonic() + 60
        while not all(log.exists() and log.stat().st_size for log in logs[-3:]):  # every writer confirmed a pack
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), f"writers stalled ({seed})"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    confirmed = {i for log in logs for k in log.read_text().split() for i in range(int(k), int(k) + 50)}
    got: list[tuple[str, int]] = []
    with ms.connect(sqlite_url) as client, client.msg_stream(receive_batch=1000) as inp:
        inp.create_consumers("check", chans)
        while (pack := inp.consume(timeout=1)) is not None:
            got += [(m.position.channel, m.row_ids[0]) for m in pack.msgs if isinstance(m, ms.InsertMsg) and m.position]
    rows = [r for _, r in got]
    lost = len(confirmed - set(rows))
    repeated = len(rows) - len(set(rows))
    unconfirmed = set(rows) - confirmed
    fault_report.add(
        "producers killed", "sqlite", rounds=rounds, writers=3, confirmed=len(confirmed), stored=len(rows),
        lost=lost, repeated=repeated, unconfirmed_stored=len(unconfirmed), seed=seed,
    )  # fmt: skip
    assert lost == 0 and repeated == 0, f"lost {lost}, repeated {repeated} (seed {seed})"
    packs = {r - r % 50 for r in unconfirmed}  # packs a kill interrupted: at most one per writer process
    assert len(packs) <= len(logs), f"seed {seed}"
    stored = set(rows)
    for k, c in ((k, c) for k in packs for c in range(3)):  # each channel's share of a pack: whole or nothing
        share = {i for i in range(k, k + 50) if i % 3 == c}
        assert share <= stored or not share & stored, f"pack {k}, channel {c}: partly stored (seed {seed})"
    for ch in chans:
        for writer in {r // 10**6 for r in rows}:
            mine = [r for c, r in got if c == ch and r // 10**6 == writer]
            assert mine == sorted(mine), f"{ch}: writer {writer} out of order (seed {seed})"


# -- sustained load -------------------------------------------------------------------------------
def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


RSS_GROWTH_BOUND_MIB = 40.0  # after the first fifth of the run (warm-up: caches, client buffers)


@pytest.mark.parametrize("backend_name", BACKENDS)  # not memory://: it is the broker, it keeps every message
def test_sustained_load_keeps_memory_flat_and_leaks_nothing(
    backend_name: str, request: pytest.FixtureRequest, fault_report: Any
) -> None:
    """100,000 messages (1,000,000 with ``--long``) produced and consumed in steady state: resident
    memory after the warm-up grows by less than RSS_GROWTH_BOUND_MIB, and after close the process is
    back to the threads and file descriptors it had before connecting (once a first client came and went,
    so that what a backend keeps per process is there already)."""
    import gc
    import threading

    url = "memory://load" if backend_name == "memory" else str(request.getfixturevalue(f"{backend_name}_url"))
    n = 1_000_000 if request.config.getoption("--long") else 100_000
    pack_size = 1000
    with ms.connect(url):  # Pulsar's log forwarder lives as long as the process (docs/backends.md)
        pass
    gc.collect()
    threads_before, fds_before = threading.active_count(), _open_fds()
    samples: list[float] = []
    started = time.monotonic()
    with ms.connect(url) as client:
        chans = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=4))
        with client.msg_stream() as out, client.msg_stream(receive_batch=pack_size) as inp:
            out.create_producers(chans)
            inp.create_consumers("load", chans)
            received = 0
            step = 10 * pack_size  # produce ten packs, then consume them
            for k in range(0, n, step):
                for j in range(k, k + step, pack_size):
                    out.produce(ms.MsgPack.of([_row(i, i + 1) for i in range(j, j + pack_size)]))
                deadline = time.monotonic() + 30
                while received < k + step:
                    assert time.monotonic() < deadline, f"consume stalled at {received}"
                    pack = inp.consume(timeout=1)
                    received += len(pack.msgs) if pack else 0
                if k >= n // 5:
                    samples.append(_rss_mib())
        client.destroy_channels(chans)
    elapsed = time.monotonic() - started
    gc.collect()  # client, out and inp are still referenced here: close() itself must free the sockets
    deadline = time.monotonic() + 15  # client threads wind down after close
    while (threading.active_count(), _open_fds()) > (threads_before, fds_before) and time.monotonic() < deadline:
        time.sleep(0.1)
    threads_after, fds_after = threading.active_count(), _open_fds()
    growth = max(samples) - samples[0]
    fault_report.add(
        "sustained load",
        backend_name,
        messages=n,
        seconds=round(elapsed, 1),
        rss_mib=f"{samples[0]:.0f}->{samples[-1]:.0f}",
        growth_mib=round(growth, 1),
        threads=f"{threads_before}->{threads_after}",
        fds=f"{fds_before}->{fds_after}",
    )
    assert received == n
    assert growth < RSS_GROWTH_BOUND_MIB, f"resident memory grew {growth:.1f} MiB in steady state"
    assert threads_after <= threads_before, f"threads left after close: {threads_before} -> {threads_after}"
    assert fds_after <= fds_before, f"file descriptors left after close: {fds_before} -> {fds_after}"


# -- bad input at the API -------------------------------------------------------------------------
def _within(seconds: float, call: Callable[[], Any]) -> BaseException | None:
    """Run ``call`` with a deadline; return what it raised (None if it returned). A hang fails."""
    import threading

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds}s: a hang"
    return outcome[0]


@pytest.mark.parametrize("backend_name", ["memory", *BACKENDS])
def test_bad_input_is_a_typed_error_never_a_hang(
    backend_name: str, request: pytest.FixtureRequest, fault_report: Any
) -> None:
    """Wrong types, huge and empty packs, unknown channels, closed streams, bad timeouts and positions,
    invalid URLs: each call ends within its deadline with a msgstream.errors type (or, for a huge
    message a broker takes, succeeds)."""
    from msgstream import errors as e

    url = "memory://bad" if backend_name == "memory" else str(request.getfixturevalue(f"{backend_name}_url"))
    scheme = url.split("://", 1)[0]
    client = ms.connect(url)
    [chan] = client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=1))
    out = client.msg_stream(produce_timeout=10)
    out.create_producers([chan])
    inp = client.msg_stream()
    inp.create_consumers("bad", [chan])
    closed = client.msg_stream()
    closed.create_producers([chan])
    closed.close()
    huge = ms.InsertMsg(begin_ts=1, end_ts=1, hash_values=[0], row_ids=[0], row_data=[b"x" * (20 * 2**20)])
    cases: list[tuple[str, Callable[[], Any], tuple[type[BaseException], ...] | None]] = [
        ("URL without scheme", lambda: ms.connect("127.0.0.1:6379"), (e.InvalidURLError,)),
        ("URL with a bad port", lambda: ms.connect(f"{scheme}://127.0.0.1:99999"), (e.InvalidURLError,)),
        ("unknown scheme", lambda: ms.connect("nosuchbroker://127.0.0.1:1"), (e.BackendNotFoundError,)),
        ("produce a str", lambda: out.produce("rows"), (e.InvalidArgumentError,)),  # type: ignore[arg-type]
        ("a pack of non-messages", lambda: out.produce(ms.MsgPack(1, 1, [b"x"])), (e.InvalidArgumentError,)),  # type: ignore[list-item]
        (
            "a field of the wrong type",
            lambda: out.produce(ms.MsgPack.of([ms.InsertMsg(begin_ts=1, end_ts=1, hash_values=[0], row_ids=["a"])])),  # type: ignore[list-item]
            (e.InvalidArgumentError,),
        ),
        ("an empty pack", lambda: out.produce(ms.MsgPack.of([])), None),
        ("a 20 MiB message", lambda: out.produce(ms.MsgPack.of([huge])), None),
        (
            "producer on an unknown channel",
            lambda: client.msg_stream().create_producers(["nope"]),
            (e.ChannelNotFoundError,),
        ),
        (
            "consumer on an unknown channel",
            lambda: client.msg_stream().create_consumers("s", ["nope"]),
            (e.ChannelNotFoundError,),
        ),
        ("describe an unknown channel", lambda: client.describe_channels(["nope"]), (e.ChannelNotFoundError,)),
        ("produce on a closed stream", lambda: closed.produce(ms.MsgPack.of([_row(1, 1)])), (e.StreamClosedError,)),
        ("a negative timeout", lambda: inp.consume(timeout=-1), (e.InvalidArgumentError,)),
        ("a timeout that is a str", lambda: inp.consume(timeout="1"), (e.InvalidArgumentError,)),  # type: ignore[arg-type]
        ("seek to garbage", lambda: inp.seek([ms.Position(chan, b"garbage", 0)]), (e.SeekError,)),
        ("seek to another channel", lambda: inp.seek([ms.Position("other", b"1", 0)]), (e.SeekError,)),
        (
            "zero channels",
            lambda: client.create_channels(ms.CreateChannelRequest(owner=_owner(), num_channels=0)),
            (e.InvalidArgumentError,),
        ),
    ]
    outcomes = []
    try:
        for what, call, expected in cases:
            exc = _within(30, call)
            if expected is None:  # may succeed; if not, a typed error
                assert exc is None or isinstance(exc, e.MsgStreamError), f"{what}: {exc!r}"
            else:
                assert isinstance(exc, expected), f"{what}: expected {expected}, got {exc!r}"
            outcomes.append(f"{what}: {type(exc).__name__ if exc else 'ok'}")
        out.produce(ms.MsgPack.of([_row(7, 7)]))  # and both streams still work after all that
        deadline = time.monotonic() + 30
        seen: list[int] = []
        while 7 not in seen:
            assert time.monotonic() < deadline, f"the good message after the bad input never came: {seen}"
            pack = inp.consume(timeout=1)
            seen += [m.row_ids[0] for m in (pack.msgs if pack else []) if isinstance(m, ms.InsertMsg)]
        exc = _within(30, lambda: (inp.close(), inp.consume(timeout=0)))
        assert isinstance(exc, e.StreamClosedError), f"consume on a closed stream: {exc!r}"
    finally:
        out.close()
        client.close()
    fault_report.add("bad input", backend_name, cases=len(cases) + 1, typed="all", huge=outcomes[7].split(": ")[1])
