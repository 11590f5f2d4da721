"""The ``msgstream`` console script, run as a subprocess against every backend (docs/cli.md)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

import msgstream as ms
from msgstream.cli import main
from scripts.broker import free_port, start_redis

BACKENDS = ["sqlite", "redis", "kafka", "pulsar"]


def run(
    *args: str, url: str | None = None, stdin: str = "", status: int = 0, path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``msgstream ARGS --url URL``; checks the exit status, and that a failure says one line.
    ``path``: a directory put on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "MSGSTREAM_URL"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "msgstream.cli", *args, *(["--url", url] if url else [])]
    done = subprocess.run(argv, check=False, input=stdin, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == status, (argv, done.stdout, done.stderr)
    if status:
        assert done.stderr.startswith("msgstream: error: ") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
    return done


def lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    if request.param == "pulsar":  # list_subscriptions needs the admin REST API
        return f"{request.getfixturevalue('pulsar_url')}?admin_url={request.getfixturevalue('pulsar_admin_url')}"
    return str(request.getfixturevalue(f"{request.param}_url"))


def messages(channel: str) -> list[dict[str, Any]]:
    """Six messages as tail --json prints them (channel and msg_id are ignored by produce)."""
    insert = ms.InsertMsg(
        begin_ts=1, end_ts=2, hash_values=[7, 8], row_ids=[1, 2], timestamps=[1, 2], row_data=[b"\x00\xffa", b""]
    )
    stats = ms.SegStatisticsMsg(begin_ts=3, end_ts=3, hash_values=[1], seg_stats=[ms.SegmentStats(segment_id=9)])
    msgs: list[ms.TsMsg] = [
        insert,
        ms.DeleteMsg(begin_ts=2, end_ts=2, hash_values=[3], primary_keys=[5, "k"], properties={"tenant": "t1"}),
        stats,
        ms.SearchMsg(begin_ts=4, end_ts=4, hash_values=[0], placeholder_group=b"\x01\x02", dsl="a > 1"),
        ms.TimeTickMsg(begin_ts=5, end_ts=5, source_id=3, properties={"a": "b", "c": ""}),
        ms.InsertMsg(begin_ts=6, end_ts=6, hash_values=[2], row_ids=[3], row_data=[b"z"]),
    ]
    out = []
    for m in msgs:
        fields = _builtins(m)
        out.append(
            {
                "channel": channel,
                "msg_id": "",
                "msg_type": int(m.msg_type),
                "type": type(m).__name__,
                "begin_ts": m.begin_ts,
                "end_ts": m.end_ts,
                "hash_values": m.hash_values,
                "properties": m.properties,
                "body": {k: v for k, v in fields.items() if k not in ("begin_ts", "end_ts", "hash_values")},
            }
        )
    return out


def _builtins(m: ms.TsMsg) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(msgspec.structs.asdict(m))
    return out


def comparable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("channel", "msg_id")} for r in records]


def test_every_subcommand(url: str) -> None:
    """create, channels, describe, produce, tail (throwaway and kept subscriptions), the tail | produce
    copy, lag after partial consumption, subscriptions, drop-subscription, positions, bench, destroy,
    and an unknown channel and a bad input line as errors."""
    made = run("create", "--channels", "2", "--role", "proxy", "--address", "10.0.0.7:19530", "--description", "dml",
               url=url)  # fmt: skip
    a, b = made.stdout.split()
    assert a.startswith("proxy-") and b.startswith("proxy-")
    listed = lines(run("channels", "--json", url=url).stdout)
    mine = {"role": "proxy", "address": "10.0.0.7:19530", "description": "dml"}
    assert {"channel": a, **mine} in listed and {"channel": b, **mine} in listed
    table = run("describe", a, b, url=url).stdout.splitlines()
    assert table[0].split() == ["CHANNEL", "ROLE", "ADDRESS", "DESCRIPTION"]
    assert table[1].split() == [a, "proxy", "10.0.0.7:19530", "dml"] and len(table) == 3

    sent = messages(a)
    stdin = "".join(json.dumps(r) + "\n" for r in sent)
    assert run("produce", a, url=url, stdin=stdin).stdout == "produced 6 messages\n"
    got = lines(run("tail", a, "--from", "earliest", "--count", "6", "--json", url=url).stdout)
    assert comparable(got) == comparable(sent)
    assert {r["channel"] for r in got} == {a} and len({r["msg_id"] for r in got}) == 6
    assert all(bytes.fromhex(r["msg_id"]) for r in got)

    # copy: tail --json | produce, properties and hash values included; channel a is not a target, so by hash
    run("produce", b, url=url, stdin=run("tail", a, "--from", "earliest", "--count", "6", "--json", url=url).stdout)
    copied = lines(run("tail", b, "--from", "earliest", "--count", "6", "--json", url=url).stdout)
    assert comparable(copied) == comparable(sent) and {r["channel"] for r in copied} == {b}

    # a kept subscription that read 2 of 6: lag counts the 4 after them; the throwaway ones are gone
    human = run("tail", a, "--from", "earliest", "--count", "2", "--subscription", "ops", url=url).stdout
    assert [line.split()[:3] for line in human.splitlines()] == [
        [a, got[0]["msg_id"], "InsertMsg"],
        [a, got[1]["msg_id"], "DeleteMsg"],
    ]
    assert '{"tenant":"t1"}' in human.splitlines()[1]
    assert lines(run("lag", "--subscription", "ops", a, "--json", url=url).stdout)[0] == {
        "channel": a,
        "messages": 4,
        "seconds": 0.0,  # end_ts 2 and 6 are the same millisecond
    }
    assert run("lag", "--subscription", "ops", a, url=url).stdout.splitlines()[1].split()[:2] == [a, "4"]
    assert run("subscriptions", a, url=url).stdout.split() == ["ops"]
    resumed = lines(run("tail", a, "--count", "1", "--subscription", "ops", "--json", url=url).stdout)
    assert resumed[0]["msg_id"] == got[2]["msg_id"]
    run("drop-subscription", "--subscription", "ops", a, url=url)
    assert run("subscriptions", a, "--json", url=url).stdout == ""

    (pos,) = lines(run("positions", a, "--json", url=url).stdout)
    assert pos["channel"] == a and pos["msg_id"] == got[-1]["msg_id"]
    checkpoint = ms.Position.from_bytes(base64.b64decode(pos["checkpoint"]))
    assert checkpoint == ms.Position(a, bytes.fromhex(pos["msg_id"]), 0)

    report = json.loads(run("bench", "--messages", "300", "--size", "64", "--channels", "2", "--json", url=url).stdout)
    assert report["messages"] == 300 and report["produce_msgs_per_s"] > 0 and report["consume_msgs_per_s"] > 0
    assert 0 < report["latency_p50_ms"] <= report["latency_p99_ms"]

    failed = run("describe", a, "no-such-channel", url=url, status=1)
    assert "ChannelNotFoundError" in failed.stderr and "no-such-channel" in failed.stderr
    bad = stdin.splitlines()[0] + "\n{not json\n"
    failed = run("produce", b, url=url, stdin=bad, status=2)
    assert "line 2" in failed.stderr
    wide = stdin.splitlines()[0].replace('"row_ids": [', '"row_ids": [1180591620717411303424, ')  # 2**70
    failed = run("produce", b, url=url, stdin=stdin.splitlines()[0] + "\n" + wide + "\n", status=2)
    assert "line 2" in failed.stderr

    assert run("destroy", a, b, url=url).stdout == "destroyed 2 channels\n"
    left = {r["channel"] for r in lines(run("channels", "--json", url=url).stdout)}
    assert not left & {a, b} and not any(c.startswith("bench-") for c in left)


@pytest.mark.parametrize("backend", ["redis", "kafka", "pulsar"])
@pytest.mark.parametrize("broker", ["nothing listens", "a listener that never answers"])
def test_unreachable_broker_is_reported_within_the_timeout(backend: str, broker: str) -> None:
    """Each backend checks its broker when it is made, on its own longer timeouts (5-10 s and retries):
    the command's ``--timeout`` bounds the whole wait all the same."""
    with contextlib.ExitStack() as stack:
        if broker == "nothing listens":
            port = free_port()
        else:  # the kernel completes the connections; nobody reads or answers
            listener = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=64))
            port = listener.getsockname()[1]
        where = f"{backend}://:pw-Secret9@127.0.0.1:{port}" if backend == "redis" else f"{backend}://127.0.0.1:{port}"
        for _ in range(3):  # the exit, with the connect still running in its thread, is clean every time
            start = time.monotonic()
            failed = run("channels", "--timeout", "1", url=where, status=1)
            elapsed = time.monotonic() - start
            assert "BrokerUnavailableError" in failed.stderr and "pw-Secret9" not in failed.stderr + failed.stdout
            assert elapsed < 4.0, f"reported after {elapsed:.1f} s for --timeout 1"


def test_wrong_password_is_masked(tmp_path: Path) -> None:
    broker = start_redis(tmp_path / "auth", password="right-one")
    try:
        failed = run("channels", url=f"redis://:Wr0ngPassw0rd@127.0.0.1:{broker.port}/0", status=1)
        assert "BrokerUnavailableError" in failed.stderr and "Wr0ngPassw0rd" not in failed.stderr + failed.stdout
        ok = run("bench", "--messages", "50", url=f"redis://:right-one@127.0.0.1:{broker.port}/0")
        assert "right-one" not in ok.stdout + ok.stderr and "redis://:***@" in ok.stdout
    finally:
        broker.stop()


def test_usage_errors() -> None:
    failed = run("channels", url="nosuch://:pw123@h/", status=2)
    assert "BackendNotFoundError" in failed.stderr and "pw123" not in failed.stderr
    assert "MSGSTREAM_URL" in run("channels", status=2).stderr


def test_tail_follows_until_interrupted(sqlite_url: str) -> None:
    """Without --count, tail prints what arrives until SIGINT, SIGTERM or SIGHUP, exits 0 and drops its
    throwaway subscription; --from latest skips what was there; MSGSTREAM_URL is the default URL."""
    (chan,) = run("create", "--role", "ops", url=sqlite_url).stdout.split()
    one = json.dumps(messages(chan)[5])
    run("produce", chan, url=sqlite_url, stdin=one + "\n")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        env = {**os.environ, "MSGSTREAM_URL": sqlite_url}
        proc = subprocess.Popen(
            [sys.executable, "-m", "msgstream.cli", "tail", chan, "--json"], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 30
            while not run("subscriptions", chan, url=sqlite_url).stdout:  # tail has joined
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
            run("produce", chan, url=sqlite_url, stdin=one.replace('"row_ids": [3]', '"row_ids": [4]') + "\n")
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                assert sel.select(timeout=30), "tail printed nothing within 30 s"
            record = json.loads(proc.stdout.readline())
            assert record["body"]["row_ids"] == [4]
            proc.send_signal(sig)
            assert proc.wait(timeout=30) == 0
        finally:  # a failure above leaves no tail running, nor a test waiting for it
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        assert run("subscriptions", chan, url=sqlite_url).stdout == ""


def test_tail_drops_its_subscription_from_the_channels_left_when_one_is_destroyed(sqlite_url: str) -> None:
    a, b = run("create", "--role", "ops", "--channels", "2", url=sqlite_url).stdout.split()
    env = {**os.environ, "MSGSTREAM_URL": sqlite_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "msgstream.cli", "tail", a, b], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        deadline = time.monotonic() + 30
        while not run("subscriptions", a, url=sqlite_url).stdout:  # tail has joined
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        run("destroy", b, url=sqlite_url)
        assert proc.wait(timeout=30) == 1  # its consume fails: the channel is gone
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    assert run("subscriptions", a, url=sqlite_url).stdout == ""


USER_TYPE = """
import msgstream as ms

class FlushMsg(ms.TsMsg, kw_only=True):
    msg_type = 2000
    segment_ids: list[int] = []
    blob: bytes = b""

dispatcher = ms.UnmarshalDispatcher()
dispatcher.add_msg_template(2000, FlushMsg)
"""


def test_user_types_through_dispatcher(sqlite_url: str, tmp_path: Path) -> None:
    """--dispatcher module:object makes tail decode a user type and produce encode it; without it,
    tail skips the message with a warning and produce refuses the line."""
    (tmp_path / "usertypes.py").write_text(USER_TYPE)
    (chan,) = run("create", "--role", "ops", url=sqlite_url).stdout.split()
    flush = {"msg_type": 2000, "begin_ts": 4, "end_ts": 4, "hash_values": [1], "properties": {"p": "q"},
             "body": {"segment_ids": [7, 8], "blob": base64.b64encode(b"\x00\x01").decode()}}  # fmt: skip
    tick = json.dumps(messages(chan)[4])
    failed = run("produce", chan, url=sqlite_url, stdin=json.dumps(flush) + "\n", status=2)
    assert "line 1" in failed.stderr and "2000" in failed.stderr
    run("produce", chan, "--dispatcher", "usertypes:dispatcher", url=sqlite_url, stdin=f"{json.dumps(flush)}\n{tick}\n",
        path=tmp_path)  # fmt: skip
    args = ("tail", chan, "--from", "earliest", "--json", "--count")
    (got,) = lines(run(*args, "1", "--dispatcher", "usertypes:dispatcher", url=sqlite_url, path=tmp_path).stdout)
    assert got["type"] == "FlushMsg" and comparable([got]) == comparable([{**flush, "type": "FlushMsg"}])
    skipped = run(*args, "1", url=sqlite_url)
    assert lines(skipped.stdout)[0]["type"] == "TimeTickMsg"
    assert skipped.stderr.startswith("msgstream: warning: skipped a message: unknown MsgType 2000")


def test_demo_runs_the_pipeline(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--channels", "3", "--ticks", "4", "--rows", "5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("created 3 channels on memory://, owner proxy@")
    ticks = [line for line in lines if line.startswith("tick ")]
    assert len(ticks) == 4 and all("5 rows" in line for line in ticks)
    assert "checkpointed 3 positions" in out and lines[-1] == "destroyed 3 channels"


def test_console_script_version() -> None:
    done = run("version")
    assert done.stdout.startswith("msgstream 0.1.0; backends: ") and "memory" in done.stdout


def test_bad_url_is_a_clean_error(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--url", "nosuch://:pw123@h/"]) == 2
    err = capsys.readouterr().err
    assert "BackendNotFoundError" in err and "pw123" not in err


def test_produce_stops_at_a_bad_line_with_its_number_and_keeps_what_came_before(sqlite_url: str) -> None:
    (chan,) = run("create", "--role", "ops", url=sqlite_url).stdout.split()
    good = json.dumps(messages(chan)[5])
    bad_channel = json.dumps({**messages(chan)[5], "channel": {"a": 1}})
    failed = run("produce", chan, url=sqlite_url, stdin=f"{good}\n{bad_channel}\n", status=2)
    assert "stdin line 2" in failed.stderr and "channel must be a string" in failed.stderr
    # bytes that are not text: the reader thread ends the input with the error, instead of dying and
    # leaving produce waiting forever
    env = {k: v for k, v in os.environ.items() if k != "MSGSTREAM_URL"}
    env["PYTHONIOENCODING"] = "utf-8:strict"
    done = subprocess.run(
        [sys.executable, "-m", "msgstream.cli", "produce", chan, "--url", sqlite_url],
        input=f"{good}\n".encode() + b"\xff\xfe\n",
        capture_output=True,
        timeout=60,
        env=env,
        check=False,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert stderr.startswith("msgstream: error: ") and stderr.count("\n") == 1 and "stdin line 2" in stderr
    got = lines(run("tail", chan, "--from", "earliest", "--json", "--count", "2", url=sqlite_url).stdout)
    assert [g["body"]["row_ids"] for g in got] == [[3], [3]]  # the good line of each run


def test_produce_that_stops_at_a_bad_line_before_the_end_of_its_input_exits_with_its_status(sqlite_url: str) -> None:
    """Its stdin reader may still be reading when the command ends; the process ends with status 2, not
    with the interpreter's abort at shutdown (SIGABRT) over the lock that reader holds on stdin."""
    (chan,) = run("create", "--role", "ops", url=sqlite_url).stdout.split()
    good = json.dumps(messages(chan)[5]) + "\n"
    for before in range(0, 400, 40):  # where the bad line falls, against how far the reader got
        failed = run("produce", chan, url=sqlite_url, stdin=good * before + "{not json\n" + good * 20_000, status=2)
        assert f"stdin line {before + 1}" in failed.stderr


def test_main_in_a_process_of_its_own_returns_where_produce_left_its_reader(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``main`` called by an application returns its status; only the console script ends the process
    itself over the reader left behind (the test above)."""
    (chan,) = run("create", "--role", "ops", url=sqlite_url).stdout.split()
    good = json.dumps(messages(chan)[5]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("{not json\n" + good * 5000))  # more than the reader's queue holds
    assert main(["produce", chan, "--url", sqlite_url]) == 2
    assert "stdin line 1" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["bench", "--messages", "0"], ["demo", "--rows", "0"], ["demo", "--channels", "0"]])
def test_counts_that_cannot_run_are_usage_errors(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--url", "memory://"])
    assert exit_.value.code == 2


def test_demo_destroys_its_channels_when_it_fails(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from msgstream.cli import _demo

    def broken(pack: ms.MsgPack) -> str:
        raise RuntimeError("the query node crashed")

    monkeypatch.setattr(_demo, "_describe", broken)
    assert main(["demo", "--url", sqlite_url]) == 1
    assert lines(run("channels", "--json", url=sqlite_url).stdout) == []
