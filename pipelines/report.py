"""Report stage (being written): report.md + report.json + PNG plots."""
from __future__ import annotations

from typing import Any


def report_stage(cfg, results: dict[str, Any], out_dir: str) -> dict[str, Any]:
    raise NotImplementedError("pipelines/report.py is being written")
