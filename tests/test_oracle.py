"""The preference oracle, the probe check, and the prompt/pair logic of pipelines/make_data.py (no model)."""
import json
from pathlib import Path

import pytest

from qcore import oracle
from qcore.oracle import prefer, probe_correct, probe_item_correct, score, score_parts

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"

SKY = "Why is the sky blue?"


# ------------------------------------------------------------------------------------------ score, hand-checked
def test_ideal_answer_gets_the_maximum():
    # 13 words, ends with ".", shares "sky" with the prompt, no repeated trigram: C + R = 1 + 0.5
    r = "The sky looks blue because air scatters blue light more than red light."
    assert score(SKY, r) == pytest.approx(1.5) == pytest.approx(oracle.MAX_SCORE)


def test_empty_and_whitespace():
    assert score(SKY, "") == -10.0
    assert score(SKY, "   \n ") == -10.0
    assert score(SKY, None) == -10.0


def test_truncated_answer():
    # 5 words (no short penalty), not a finished sentence: -2 + 0.5
    assert score(SKY, "The sky looks blue because") == pytest.approx(-1.5)


def test_length_penalty():
    # 40 words, finished, on topic: 1 + 0.5 - 0.05 * (40 - 20)
    r = " ".join(f"w{i}" for i in range(39)) + " sky."
    assert len(r.split()) == 40
    assert score(SKY, r) == pytest.approx(0.5)
    # one word fewer is 0.05 better
    r2 = " ".join(f"w{i}" for i in range(38)) + " sky."
    assert score(SKY, r2) - score(SKY, r) == pytest.approx(0.05)


def test_long_truncated_answer_reference_point():
    # 45 words, cut off: -2 + 0.5 - 0.05 * 25 = -2.75 (the module doc's reference point)
    r = " ".join(f"w{i}" for i in range(44)) + " sky"
    assert score(SKY, r) == pytest.approx(-2.75)


def test_short_penalty():
    # 1 word, finished, on topic: 1 + 0.5 - 0.25 * (5 - 1)
    assert score(SKY, "Blue.") == pytest.approx(0.5)


def test_off_topic_gets_no_relevance_bonus():
    assert score(SKY, "I like turtles very much.") == pytest.approx(1.0)
    # a prompt without content words: the bonus is given
    assert score("What is it?", "I like turtles very much.") == pytest.approx(1.5)


def test_relevance_matches_word_stems():
    assert score("Tell me about volcanoes.", "A volcanic mountain erupts lava.") == pytest.approx(1.5)


def test_trigram_repetition():
    # toks: blue sky x4 -> 6 trigrams, 2 distinct: rep = 2/3; 1 + 0.5 - 5 * 2/3
    assert score(SKY, "Blue sky. Blue sky. Blue sky. Blue sky.") == pytest.approx(1.5 - 10 / 3)


def test_repeated_sentence():
    # 8 trigrams, 5 distinct: 3/8, + 0.5 for the repeated 5-word sentence: P = 5 * 0.875
    r = "Cats are very nice pets. Cats are very nice pets."
    assert score("Tell me about cats.", r) == pytest.approx(1.5 - 4.375)


def test_repetition_is_capped():
    # 13 trigrams, 5 distinct: 8/13 + 0.5 for the repeated sentence > 1 -> capped at 1
    r = "Cats are very nice pets. Cats are very nice pets. Cats are very nice pets."
    assert oracle.repetition(r) == 1.0
    assert score("Tell me about cats.", r) == pytest.approx(1.5 - 5.0)


def test_complete_sentence_rules():
    assert oracle.is_complete('He said "yes."')
    assert oracle.is_complete("Really?")
    assert oracle.is_complete("It is **bold.**")
    assert oracle.is_complete("(See above.)")
    assert not oracle.is_complete("The sky looks blue because")
    assert not oracle.is_complete("Here is a list:")


def test_score_parts_add_up():
    p = score_parts(SKY, "The sky is blue, blue, blue because of Rayleigh scattering of sunlight in air")
    assert p["score"] == pytest.approx(p["complete"] + p["relevance"] - p["length"] - p["short"] - p["repetition"])
    assert p["complete"] == -2.0


def test_prefer_and_margin():
    good = "The sky looks blue because air scatters blue light."
    bad = "The sky looks blue because of a process that"
    assert prefer(SKY, good, bad) == 1
    assert prefer(SKY, bad, good) == -1
    assert prefer(SKY, good, good) == 0
    # 1.5 vs 1.0: within a margin of 0.5, outside a margin of 0.4
    assert prefer(SKY, good, "I like turtles very much.", margin=0.5) == 0
    assert prefer(SKY, good, "I like turtles very much.", margin=0.4) == 1


def test_win_rate_counts_ties_half():
    good = "The sky looks blue because air scatters blue light."
    bad = "The sky looks blue because of a process that"
    assert oracle.win_rate([SKY, SKY, SKY], [good, bad, good], [bad, good, good]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        oracle.win_rate([SKY], [good], [])


def test_oracle_pulls_against_verbosity():
    """A typical verbose SmolLM2 answer (cut off at the token limit) loses to a short complete one."""
    verbose = ("Regular exercise offers numerous benefits that can improve your overall health and well-being. "
               "Engaging in physical activity helps reduce the risk of chronic diseases such as heart disease, high "
               "blood pressure, and diabetes by increasing cardiovascular fitness, improving muscle and bone density, and")
    short = "Exercise strengthens your heart, lifts your mood and helps you sleep better."
    prompt = "What are the benefits of regular exercise?"
    assert score(prompt, short) > 1.0 > score(prompt, verbose)
    assert prefer(prompt, short, verbose, margin=0.5) == 1


# ------------------------------------------------------------------------------------------ probe
@pytest.mark.parametrize("answer,gold,ok", [
    ("The capital of France is Paris.", "Paris", True),
    ("paris", "Paris", True),
    ("PARIS!", "paris", True),
    ("The capital of Brazil is Brasília.", "Brasilia", True),
    ("A spider has eight legs.", "8|eight", True),
    ("A spider has 8 legs.", "8", True),
    ("There are twelve months in a year.", "12", True),
    ("Light travels at about 300,000 km per second.", "300000", True),
    ("The capital of Australia is Sydney.", "Canberra", False),
    ("Parisian cafes are lovely.", "Paris", False),  # whole words only
    ("The capital of Mexico is Mexico.", "Mexico City", False),
    ("It is Mexico City.", "Mexico City", True),
    ("The first president was George Washington.", "George Washington|Washington", True),
    ("It was Washington.", ["George Washington", "Washington"], True),
    ("The answer is H2O.", "H2O", True),
    ("The hardest natural substance is a diamond.", "the diamond", True),  # articles dropped on both sides
    ("Rock and roll", "rock & roll", True),
    ("", "Paris", False),
    ("Paris", "", False),  # an empty gold never matches
    ("The answer is a.", "A", False),  # a gold made only of an article normalizes to nothing
])
def test_probe_correct(answer, gold, ok):
    assert probe_correct(answer, gold) is ok


def test_probe_item_correct_uses_answer_and_aliases():
    item = {"question": "Who painted the Mona Lisa?", "answer": "Leonardo da Vinci", "aliases": ["da Vinci"]}
    assert probe_item_correct("It was painted by da Vinci.", item)
    assert not probe_item_correct("It was painted by Michelangelo.", item)


def test_probe_file():
    rows = [json.loads(line) for line in (DATA / "probe.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) >= 100
    assert len({r["question"] for r in rows}) == len(rows)
    for r in rows:
        assert r["question"].strip() and r["answer"].strip()
        q = oracle.normalize_answer(r["question"])
        for alias in r["answer"].split("|"):
            norm = oracle.normalize_answer(alias)
            assert norm, f"gold {alias!r} normalizes to nothing"
            # the gold must not be given away by the question (containment would then be trivially true)
            assert not oracle._contains(q, norm), r


# ------------------------------------------------------------------------------------------ make_data (no model)
def test_prompt_split_is_disjoint_deterministic_and_large_enough():
    from pipelines.make_data import prompt_grid, split_prompts

    grid = prompt_grid()
    assert len({r["prompt"] for r in grid}) == len(grid)
    train, held = split_prompts(640, seed=0)
    assert len(train) == 640 and len(held) >= 200
    assert not {r["topic"] for r in train} & {r["topic"] for r in held}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert {r["category"] for r in held} == set({r["category"] for r in grid})
    train2, held2 = split_prompts(640, seed=0)
    assert [r["prompt"] for r in train2] == [r["prompt"] for r in train]
    assert [r["prompt"] for r in held2] == [r["prompt"] for r in held]
    assert [r["prompt"] for r in split_prompts(640, seed=1)[0]] != [r["prompt"] for r in train]


def test_make_pairs():
    from pipelines.make_data import make_pairs

    def s(i, sample, text, sc):
        return {"id": i, "sample": sample, "prompt": f"p{i}", "response": text, "score": sc}

    samples = [s(0, 0, "a", 1.5), s(0, 1, "b", 1.2), s(0, 2, "c", -2.0), s(0, 3, "d", 0.9),
               s(1, 0, "x", 1.0), s(1, 1, "x", -1.0), s(1, 2, "y", 0.8),  # "x" twice: duplicates count once
               s(2, 0, "q", 0.1), s(2, 1, "r", 0.0)]  # gap below the margin: no pair
    pairs = make_pairs(samples, margin=0.5, max_per_prompt=6, require_complete_chosen=False)
    p0 = [(p["chosen"], p["rejected"]) for p in pairs if p["prompt"] == "p0"]
    assert p0[0] == ("a", "c")  # best vs worst first
    assert set(p0) == {("a", "c"), ("b", "c"), ("d", "c"), ("a", "d")}  # gaps 3.5, 3.2, 2.9, 0.6; (a,b), (b,d) < 0.5
    assert [(p["chosen"], p["rejected"]) for p in pairs if p["prompt"] == "p1"] == []  # x(1.0) vs y(0.8)
    assert not [p for p in pairs if p["prompt"] == "p2"]
    assert all(p["chosen_score"] - p["rejected_score"] >= 0.5 for p in pairs)
    capped = make_pairs(samples, margin=0.5, max_per_prompt=2, require_complete_chosen=False)
    assert [(p["chosen"], p["rejected"]) for p in capped] == [("a", "c"), ("b", "c")]


def test_make_pairs_requires_a_complete_chosen_by_default():
    from pipelines.make_data import make_pairs

    rows = [{"id": 0, "sample": 0, "prompt": "p", "response": "An unfinished but high scoring", "score": 2.0},
            {"id": 0, "sample": 1, "prompt": "p", "response": "A finished answer.", "score": 1.0},
            {"id": 0, "sample": 2, "prompt": "p", "response": "A long unfinished answer that", "score": -3.0}]
    pairs = make_pairs(rows, margin=1.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("A finished answer.", "A long unfinished answer that")]


@pytest.mark.parametrize("text,cut", [
    ("The Titanic sank in 1912. It was a large ship that", "The Titanic sank in 1912."),
    ("Bees make honey. They live in hives. They dance to tell each other where the flowers are and they also",
     "Bees make honey. They live in hives."),  # whole sentences while <= 20 words
    ("A very long first sentence that goes on and on with many many words well beyond the twenty word budget "
     "of the cut. Then more", "A very long first sentence that goes on and on with many many words well beyond "
     "the twenty word budget of the cut."),  # the first sentence is kept even when over the budget
    ("Here are some tips:\n\n1. Start small. 2. Practice daily.", None),  # a list marker is no sentence end
    ("Dr. Who is a show. It is long.", None),  # "Dr." is too short to be a sentence: no cut
    ("One sentence only.", None),
    ("An unfinished sentence without an end", None),
])
def test_sentence_cut(text, cut):
    from pipelines.make_data import sentence_cut

    assert sentence_cut(text) == cut


def test_candidates_add_scored_cuts():
    from pipelines.make_data import candidates

    rows = [{"id": 0, "sample": 0, "prompt": "Tell me about bees.", "finished": False, "new_tokens": 48,
             "response": "Bees make honey. They live in hives. They dance to tell each other where the flowers are "
                         "and they also collect pollen from many plants in the"}]
    out = candidates(rows)
    assert [c["source"] for c in out] == ["sample", "cut"]
    assert out[1]["response"] == "Bees make honey. They live in hives."
    assert out[1]["score"] == pytest.approx(1.5) and out[0]["score"] == pytest.approx(-2 + 0.5 - 0.05 * (27 - 20))
    assert out[1]["finished"] is True and out[0]["finished"] is False
    assert [c["source"] for c in candidates(rows, cut_words=0)] == ["sample"]


# ------------------------------------------------------------------------------------------ the shipped data
def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not (DATA / "default" / "pairs.jsonl").exists(), reason="data/default not generated")
def test_shipped_default_data():
    pairs = _jsonl(DATA / "default" / "pairs.jsonl")
    held = _jsonl(DATA / "default" / "heldout_prompts.jsonl")
    assert len(pairs) >= 2000 and len(held) >= 200
    for p in pairs:
        assert set(p) >= {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert p["chosen"].strip() and p["rejected"].strip() and p["chosen"] != p["rejected"]
        assert p["chosen_score"] > p["rejected_score"]
        # the stored scores are the oracle's (the formula has not drifted from the data)
        assert score(p["prompt"], p["chosen"]) == pytest.approx(p["chosen_score"], abs=1e-3)
        assert score(p["prompt"], p["rejected"]) == pytest.approx(p["rejected_score"], abs=1e-3)
    assert not {p["prompt"] for p in pairs} & {h["prompt"] for h in held}
