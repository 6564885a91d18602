"""Regenerate data/tiny/pairs.jsonl: 64 string-format preference pairs for the tiny profile (deterministic).

The new preference is "short, correct answers": chosen is the brief correct answer, rejected is either a wrong
answer or a long, padded one. The words come from the tiny tokenizer's corpus so sequences stay short.

    python data/tiny/make_pairs.py
"""
import json
import random
from pathlib import Path

FILLER = "Here is a long and detailed answer with many words."


def pairs(n: int = 64, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        prompt = f"What is {a} + {b}? Answer briefly."
        right = f"{a + b}."
        if i % 8 == 7:
            prompt, right = "What is the capital of France?", "Paris."
        if i % 2:
            wrong = f"{FILLER} I think so. {right} Maybe."
        else:
            wrong = f"{(a + b + rng.randint(1, 3)) % 10}." if i % 8 != 6 else "No."
        if wrong == right:
            wrong = f"{FILLER} {right}"
        out.append({"prompt": prompt, "chosen": right, "rejected": wrong})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("pairs.jsonl")
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs()))
    print(f"wrote {path}")
