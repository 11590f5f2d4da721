from __future__ import annotations

import subprocess
import sys

from msgstream.cli import main


def test_demo_runs_the_pipeline(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--channels", "3", "--ticks", "4", "--rows", "5"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("created 3 channels on memory://, owner proxy@")
    ticks = [line for line in lines if line.startswith("tick ")]
    assert len(ticks) == 4 and all("5 rows" in line for line in ticks)
    assert "checkpointed 3 positions" in out and lines[-1] == "destroyed 3 channels"


def test_console_script_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "msgstream.cli", "version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.startswith("msgstream 0.1.0; backends: ") and "memory" in done.stdout


def test_bad_url_is_a_clean_error(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--url", "nosuch://:pw123@h/"]) == 2
    err = capsys.readouterr().err
    assert "BackendNotFoundError" in err and "pw123" not in err
