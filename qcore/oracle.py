"""The programmatic preference of the embedded default, and the capability probe's answer check.

Both are pure functions of strings (no model, no randomness), so every stage (data generation, evaluation,
reports, tests) scores text the same way.

The preference oracle: "concise, complete, on-topic"
----------------------------------------------------
SmolLM2-135M-Instruct is verbose: asked "Why is the sky blue?" it writes a paragraph and, with 64 new tokens,
is usually cut off mid-sentence. The oracle prefers the opposite: a short answer that finishes its sentence,
stays on the prompt's topic and does not repeat itself. Learning it therefore pulls *against* the base model's
habits, and the shift is measurable (oracle score, words per answer, fraction of finished answers), while the
quality guards (completeness, relevance, repetition, a minimum length) keep "say nothing" from winning.

With ``words`` = whitespace-separated tokens of the stripped response::

    score(prompt, response) =
        -10                                          if the response is empty (no words)
        otherwise  C + R - L - S - P, where
        C = +1.0 if the response ends a sentence, else -2.0
              (ends a sentence: the last character, ignoring trailing closing quotes/brackets/asterisks,
               is one of . ! ? ; a response cut off by the token limit almost never does)
        R = +0.5 if the response shares a content word with the prompt, else 0
              (content word: lowercase alphabetic token of >= 3 letters, not a stop word, compared on its
               first 5 letters so "volcano"/"volcanoes"/"volcanic" match; R = +0.5 when the prompt has none)
        L = 0.05 * max(0, words - 20)                (length: 0.05 per word beyond a 20-word budget)
        S = 0.25 * max(0, 5 - words)                 (too short to be an answer: below 5 words)
        P = 5.0 * rep                                (repetition)
              rep = 1 - distinct / total over the lowercase word trigrams (0 when fewer than 3 words)
                    + 0.5 * [some sentence of >= 4 words occurs twice]; capped at 1

Reference points: an ideal answer (5-20 words, finished, on topic, no repetition) scores 1.5, the maximum.
A finished 40-word answer scores 0.5; a 45-word answer cut off mid-sentence scores -2.75; empty text -10.

``prefer(prompt, a, b, margin)`` compares two responses with it (+1: a, -1: b, 0: within the margin).

The probe check
---------------
``probe_correct(answer_text, gold)``: ``gold`` is one accepted answer, a list of them, or a string of them
separated by "|" ("Washington, D.C.|Washington DC": probe rows store their aliases that way). Both sides are normalized (Unicode NFKD with accents dropped, lowercase,
"&" -> "and", every non-alphanumeric character -> space, whitespace collapsed; the articles a/an/the dropped;
number words zero..twenty mapped to digits, and digit groups "1,000" joined). The answer is correct when, for
any gold alias, the normalized alias equals the normalized answer or occurs in it as a whole-word sequence.
Lenient by design (a chat model answers in a sentence: "The capital of France is Paris."); an answer that lists
several candidates counts as correct if one matches, so the probe's questions have one short answer each.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence, Union

# ---------------------------------------------------------------------------------------------- preference

TARGET_WORDS = 20
PER_WORD_PENALTY = 0.05
MIN_WORDS = 5
SHORT_PENALTY = 0.25
COMPLETE_BONUS = 1.0
INCOMPLETE_PENALTY = 2.0
RELEVANCE_BONUS = 0.5
REPETITION_WEIGHT = 5.0
EMPTY_SCORE = -10.0
MAX_SCORE = COMPLETE_BONUS + RELEVANCE_BONUS

STOP_WORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each explain describe few for from further give had has have
having he her here hers herself him himself his how i if in into is it its itself just know let like me more most
my myself no nor not now of off on once only or other our ours ourselves out over own please same she should so
some such tell than that the their theirs them themselves then there these they this those through to too under
until up very was we were what when where which while who whom why will with would you your yours yourself
yourselves one two three simple simply terms brief briefly short sentence sentences words word answer question
things thing something someone people person make makes made good best some main important interesting work
works working explain explaining beginner beginners know tips tip fact facts kind kinds example examples
difference different mean means get got use used way ways new let lot lots say see yes
many much may might must shall yet via per etc common misconception overview quick history legacy special
famous invented useful benefits mistakes started curious daily lives affect key points point child
""".split())

_WORD = re.compile(r"[A-Za-z]+")
_SENTENCE_END = re.compile(r"[.!?;]$")
_TRAILING_CLOSERS = "\"')]}*»”’ \t\n"
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


def words(text: str) -> list[str]:
    return text.split()


def content_words(text: str) -> set[str]:
    """Lowercase alphabetic tokens of >= 3 letters that are not stop words, cut to their first 5 letters."""
    return {w[:5] for w in (m.lower() for m in _WORD.findall(text)) if len(w) >= 3 and w not in STOP_WORDS}


def is_complete(text: str) -> bool:
    """True when the text ends a sentence (. ! ? ;), ignoring trailing closing quotes, brackets and asterisks."""
    return bool(_SENTENCE_END.search(text.rstrip(_TRAILING_CLOSERS)))


def repetition(text: str) -> float:
    """In [0, 1]: share of repeated lowercase word trigrams, + 0.5 if a sentence of >= 4 words occurs twice."""
    toks = [w.lower().strip(".,;:!?\"'()") for w in text.split()]
    rep = 0.0
    if len(toks) >= 3:
        grams = [tuple(toks[i:i + 3]) for i in range(len(toks) - 2)]
        rep = 1.0 - len(set(grams)) / len(grams)
    sents = [" ".join(s.lower().split()) for s in _SENTENCE_SPLIT.split(text.strip())]
    sents = [s for s in sents if len(s.split()) >= 4]
    if len(sents) != len(set(sents)):
        rep += 0.5
    return min(rep, 1.0)


def score_parts(prompt: str, response: str) -> dict[str, float]:
    """The terms of ``score`` (C, R, L, S, P) and the word count, for reports and debugging."""
    text = (response or "").strip()
    n = len(words(text))
    if n == 0:
        return {"words": 0, "complete": 0.0, "relevance": 0.0, "length": 0.0, "short": 0.0, "repetition": 0.0,
                "score": EMPTY_SCORE}
    complete = COMPLETE_BONUS if is_complete(text) else -INCOMPLETE_PENALTY
    prompt_words = content_words(prompt or "")
    relevance = RELEVANCE_BONUS if (not prompt_words or prompt_words & content_words(text)) else 0.0
    length = PER_WORD_PENALTY * max(0, n - TARGET_WORDS)
    short = SHORT_PENALTY * max(0, MIN_WORDS - n)
    rep = REPETITION_WEIGHT * repetition(text)
    return {"words": n, "complete": complete, "relevance": relevance, "length": length, "short": short,
            "repetition": rep, "score": complete + relevance - length - short - rep}


def score(prompt: str, response: str) -> float:
    """The oracle's scalar score of ``response`` to ``prompt`` (higher is better; max 1.5; see module doc)."""
    return float(score_parts(prompt, response)["score"])


def prefer(prompt: str, a: str, b: str, margin: float = 0.0) -> int:
    """+1 if the oracle prefers ``a``, -1 if it prefers ``b``, 0 if their scores differ by <= ``margin``."""
    diff = score(prompt, a) - score(prompt, b)
    if diff > margin:
        return 1
    if diff < -margin:
        return -1
    return 0


def win_rate(prompts: Sequence[str], a: Sequence[str], b: Sequence[str], margin: float = 0.0) -> float:
    """Share of prompts where ``a`` beats ``b`` under the oracle, ties counted as half."""
    if not (len(prompts) == len(a) == len(b)):
        raise ValueError("prompts, a and b must have the same length")
    if not prompts:
        return float("nan")
    total = sum({1: 1.0, 0: 0.5, -1: 0.0}[prefer(p, x, y, margin)] for p, x, y in zip(prompts, a, b))
    return total / len(prompts)


# ---------------------------------------------------------------------------------------------- probe

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
}
_ARTICLES = {"a", "an", "the"}
_DIGIT_GROUPS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def normalize_answer(text: str) -> list[str]:
    """Text -> list of normalized word tokens (see the module doc for the rules)."""
    text = unicodedata.normalize("NFKD", text or "")
    text = "".join(c for c in text if not unicodedata.combining(c)).lower().replace("&", " and ")
    text = _DIGIT_GROUPS.sub("", text)
    text = re.sub(r"[^0-9a-z]+", " ", text)
    out = []
    for tok in text.split():
        if tok in _ARTICLES:
            continue
        out.append(_NUMBER_WORDS.get(tok, tok))
    return out


def _contains(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def probe_correct(answer_text: str, gold: Union[str, Iterable[str]]) -> bool:
    """Is ``answer_text`` correct for ``gold`` (one answer or a list of accepted aliases)? See the module doc."""
    aliases = [gold] if isinstance(gold, str) else list(gold)
    aliases = [a.strip() for alias in aliases for a in str(alias).split("|")]
    answer = normalize_answer(answer_text)
    for alias in aliases:
        norm = normalize_answer(alias)
        if norm and (answer == norm or _contains(answer, norm)):
            return True
    return False


def probe_item_correct(answer_text: str, item: dict) -> bool:
    """A probe row ``{"question", "answer", "aliases"?}``: correct if any of answer ("|"-separated) / aliases
    matches."""
    return probe_correct(answer_text, [item["answer"], *item.get("aliases", [])])
