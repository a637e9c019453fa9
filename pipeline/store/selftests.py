"""Golden-sample self-test outcomes in the verdict store: when, which bundle, why it ran, what failed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from pipeline.selftest import SelfTestResult
from pipeline.store.schema import selftests
from pipeline.store.verdicts import VerdictStore


class SelfTestLog:
    def __init__(self, store: VerdictStore) -> None:
        self.store = store

    def record(self, run: str, result: SelfTestResult) -> None:
        """StoreError when the store cannot take it."""
        values = {
            "run_id": run, "line_id": self.store.line, "t_ns": result.t_ns, "bundle": result.bundle,
            "bundle_path": result.path,
            "why": result.why, "frames": result.frames, "passed": result.passed,
            "failures": "\n".join(result.failures),
        }  # fmt: skip
        self.store.transact(lambda conn: conn.execute(selftests.insert().values(**values)), write=True)

    def recent(self, limit: int = 20, run: str | None = None) -> list[tuple[str, SelfTestResult]]:
        """(run, result) of the latest self-tests, newest first."""
        c = selftests.c
        query = select(selftests).where(self.store.mine(selftests))
        query = query.order_by(c.t_ns.desc(), c.selftest_id.desc()).limit(limit)
        if run is not None:
            query = query.where(c.run_id == run)
        return self.store.transact(lambda conn: [_result(r) for r in conn.execute(query)], write=False)


def _result(row: Any) -> tuple[str, SelfTestResult]:
    failures = tuple(line for line in row.failures.split("\n") if line)
    return row.run_id, SelfTestResult(row.bundle, row.bundle_path, row.t_ns, row.frames, failures, row.why)
