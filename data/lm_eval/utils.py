"""Helpers of the shipped lm-eval tasks qadapter_probe_gen / qadapter_probe_mc (the default's capability probe).

Loaded by lm-eval through ``!function utils.<name>`` in the task YAMLs of this folder. The data are read from
files next to this one (data/probe.jsonl, data/lm_eval/probe_mc.jsonl), so the tasks work from any working
directory and never touch a hub. The answer check is the project's probe rule (qcore.oracle).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBE = HERE.parent / "probe.jsonl"  # the hand-written probe: question, answer ("|"-separated aliases), category
PROBE_MC = HERE / "probe_mc.jsonl"  # made from it by make_probe_mc.py (committed)

try:
    from qcore.oracle import normalize_answer, probe_correct
except ImportError:  # plain `lm_eval --include_path data/lm_eval` outside the repo's environment: find qcore/
    sys.path.insert(0, str(HERE.parent.parent))
    from qcore.oracle import normalize_answer, probe_correct


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {missing}")
            rows.append(row)
    return rows


def probe_docs(path: Path = PROBE) -> list[dict]:
    """Probe rows as task docs: answer = the first accepted answer, aliases = the others (+ any "aliases")."""
    docs = []
    for row in read_jsonl(path, ("question", "answer")):
        accepted = [a.strip() for a in str(row["answer"]).split("|") if a.strip()]
        accepted += [str(a) for a in row.get("aliases", [])]
        docs.append({"question": row["question"], "answer": accepted[0], "aliases": accepted[1:],
                     "category": str(row.get("category", ""))})
    return docs


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_probe_gen(**_metadata):
    """custom_dataset of qadapter_probe_gen (lm-eval passes the task metadata as keyword arguments)."""
    return _dataset(probe_docs())


def load_probe_mc(**_metadata):
    """custom_dataset of qadapter_probe_mc."""
    rows = read_jsonl(PROBE_MC, ("question", "choices", "label"))
    for n, row in enumerate(rows, 1):
        if not (isinstance(row["label"], int) and 0 <= row["label"] < len(row["choices"])):
            raise ValueError(f"{PROBE_MC}:{n}: 'label' {row['label']!r} is not an index into 'choices'")
    return _dataset(rows)


def accepted_answers(doc: dict) -> list[str]:
    return [doc["answer"], *doc.get("aliases", [])]


def process_gen(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match: the normalized answer equals a normalized accepted answer. answer_match: an accepted answer
    occurs in it as a whole-word sequence (the project's probe rule, qcore.oracle.probe_correct)."""
    text = results[0]
    norm = normalize_answer(text)
    gold = accepted_answers(doc)
    exact = bool(norm) and any(norm == normalize_answer(a) for a in gold)
    return {"exact_match": float(exact), "answer_match": float(probe_correct(text, gold))}
