"""Build probe_mc.jsonl (the choices of qadapter_probe_mc) from data/probe.jsonl, deterministically.

    python data/lm_eval/make_probe_mc.py          # rewrites data/lm_eval/probe_mc.jsonl (committed)

Each probe question gets its first accepted answer plus N_DISTRACTORS distractors: first accepted answers of
other questions of the same kind (kind = "number" for numeric answers, so "How many legs..." gets numbers, else
the probe's category), never one that matches an accepted answer of this question (normalized as the probe
check does, either containing the other). The draw and the gold position come from random.Random seeded by the
question's index, so the file is the same on every machine and Python version.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

from utils import PROBE, PROBE_MC, accepted_answers, probe_docs  # noqa: E402

from qcore.oracle import normalize_answer  # noqa: E402

N_DISTRACTORS = 3


def kind(doc: dict) -> str:
    return "number" if doc["answer"].isdigit() else doc["category"]


def overlaps(a: list[str], b: list[str]) -> bool:
    """Does one normalized word sequence occur inside the other ("blue" vs "blue whale")?"""
    short, long_ = sorted((a, b), key=len)
    return any(long_[i:i + len(short)] == short for i in range(len(long_) - len(short) + 1))


def build(docs: list[dict]) -> list[dict]:
    rows = []
    for i, doc in enumerate(docs):
        gold = [normalize_answer(a) for a in accepted_answers(doc)]
        pool, seen = [], []
        for j, other in enumerate(docs):
            cand = other["answer"]
            norm = normalize_answer(cand)
            if j == i or kind(other) != kind(doc) or not norm or norm in seen:
                continue
            if any(overlaps(norm, g) for g in gold if g):
                continue
            seen.append(norm)
            pool.append(cand)
        if len(pool) < N_DISTRACTORS:
            raise ValueError(f"{PROBE}: question {i} ({doc['question']!r}): only {len(pool)} distractors of kind "
                             f"{kind(doc)!r}, need {N_DISTRACTORS}")
        rng = random.Random(f"qadapter_probe_mc:{i}")
        choices = rng.sample(sorted(pool), N_DISTRACTORS)
        label = rng.randrange(N_DISTRACTORS + 1)
        choices.insert(label, doc["answer"])
        rows.append({"question": doc["question"], "choices": choices, "label": label, "answer": doc["answer"],
                     "category": doc["category"]})
    return rows


def main() -> None:
    rows = build(probe_docs())
    PROBE_MC.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {PROBE_MC}")


if __name__ == "__main__":
    main()
