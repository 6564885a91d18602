"""Evaluate stage (being written): Ray Data batch inference of base + each adapter (+ dial settings)."""
from __future__ import annotations

from typing import Any


def evaluate_stage(cfg, adapters: dict[str, str], data_dir: str | None, out_dir: str) -> dict[str, Any]:
    raise NotImplementedError("pipelines/evaluate.py is being written")
