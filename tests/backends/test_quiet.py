"""The library is quiet: a whole workload in a fresh process, logging configured to show WARNING and up on
stderr as an application would, writes nothing to stdout or stderr on any backend. Native client logs
(librdkafka, pulsar-client) go to ``logging`` under ``msgstream.<backend>``, and normal operation logs
nothing at WARNING or above."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from scripts.broker import free_port

_WORKLOAD = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.WARNING)  # stderr, as an application's default
    import msgstream as ms

    def row(i):
        return ms.InsertMsg(begin_ts=i, end_ts=i, hash_values=[i], row_ids=[i], row_data=[b"x" * 100])

    with ms.connect(sys.argv[1]) as client:
        owner = ms.OwnerDescription(role="quiet", address="127.0.0.1:1", description_text="quiet")
        chans = client.create_channels(ms.CreateChannelRequest(owner=owner, num_channels=2))
        client.describe_channels(chans)
        with client.msg_stream() as out, client.msg_stream() as inp, client.tt_msg_stream() as tt:
            out.create_producers(chans)
            inp.create_consumers("quiet-plain", chans)
            tt.create_consumers("quiet-tt", chans)
            out.produce(ms.MsgPack.of([row(i) for i in range(1, 201)]))
            ms.Ticker(out).tick(1000)
            got = []
            while len(got) < 200:
                pack = inp.consume(timeout=10)
                assert pack is not None, len(got)
                got += [m for m in pack.msgs if isinstance(m, ms.InsertMsg)]
            ticked = tt.consume(timeout=10)
            assert ticked is not None and len(ticked.msgs) == 200, ticked
            assert len(inp.get_latest_positions()) == 2
        with client.msg_stream() as again:
            again.create_consumers("quiet-seek", chans)
            again.seek([got[0].position])
            assert again.consume(timeout=10) is not None  # what followed the first row
        client.destroy_channels(chans)
""")


@pytest.mark.parametrize("backend", ["memory", "redis", "kafka", "pulsar"])
def test_a_workload_writes_nothing_to_stdout_or_stderr(backend: str, request: pytest.FixtureRequest) -> None:
    url = "memory://" if backend == "memory" else str(request.getfixturevalue(f"{backend}_url"))
    done = subprocess.run(
        [sys.executable, "-c", _WORKLOAD, url], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "", done.stdout[-3000:]
    assert done.stderr == "", done.stderr[-3000:]


_DEAD_BROKER = textwrap.dedent("""
    import logging, sys, time
    names = set()

    class Names(logging.Handler):
        def emit(self, record):
            names.add(record.name)

    logging.getLogger().addHandler(Names())
    logging.getLogger().setLevel(logging.INFO)
    import msgstream as ms

    try:
        ms.connect(sys.argv[1])
    except ms.errors.BrokerUnavailableError:
        pass
    deadline = time.monotonic() + 10
    while sys.argv[2] not in names and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.stdout.write(" ".join(sorted(names)))
""")


@pytest.mark.parametrize(
    ("url", "logger"),
    [
        ("kafka://127.0.0.1:{port}/?operation_timeout=2", "msgstream.kafka"),
        ("pulsar://127.0.0.1:{port}/?operation_timeout=2", "msgstream.pulsar.client"),
    ],
)
def test_native_client_logs_go_to_logging(url: str, logger: str) -> None:
    """A client that cannot reach its broker logs why (librdkafka's and pulsar-client's own lines) through
    ``logging``, under the backend's logger, and writes nothing to stdout or stderr itself."""
    port = free_port()  # nothing listens here
    done = subprocess.run(
        [sys.executable, "-c", _DEAD_BROKER, url.format(port=port), logger],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stderr == "", done.stderr[-3000:]
    assert logger in done.stdout.split(), done.stdout
