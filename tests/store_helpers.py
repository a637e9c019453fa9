"""What a test reads back from a verdict store."""

from __future__ import annotations

import json
from typing import Any

from pipeline.store.verdicts import VerdictStore


def stored_messages(url: str, run: str) -> list[dict[str, Any]]:
    """Every stored message of `run`, as published, in seq order."""
    store = VerdictStore(url)
    try:
        return [json.loads(v.message()[1]) for v in store.range(run, 1, 10**9)]
    finally:
        store.close()
