"""The fault report: every figure the fault suite measures, written as Markdown at the end of the
session when ``--fault-report PATH`` is given (docs/reliability.md keeps the last one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


class FaultReport:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, Any]]] = []

    def add(self, test: str, backend: str, **figures: Any) -> None:
        self.rows.append((test, backend, figures))

    def markdown(self) -> str:
        lines = ["| test | backend | figures |", "| --- | --- | --- |"]
        for test, backend, figures in self.rows:
            lines.append(f"| {test} | {backend} | {', '.join(f'{k}={v}' for k, v in figures.items())} |")
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def fault_report(request: pytest.FixtureRequest) -> Iterator[FaultReport]:
    report = FaultReport()
    yield report
    path = request.config.getoption("--fault-report")
    if path and report.rows:
        Path(path).write_text(report.markdown(), encoding="utf-8")
