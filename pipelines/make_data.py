"""Generate the embedded default's preference data with the real base model (Ray Data batch inference).

    python pipelines/make_data.py [--config configs/default.yaml] [--out data/default] [--num-prompts 640]
        [--samples 2] [--max-new-tokens 48] [--temperature 0.9] [--top-p 0.95] [--margin 1.0] [--seed 0]
        [--actors 2]
    python pipelines/make_data.py --probe-check [--probe data/probe.jsonl]   # base model's probe accuracy
    python pipelines/make_data.py --from-samples data/default/samples.jsonl  # re-pair without the model

What it does (see data/README.md for the numbers of the shipped run):
1. Prompts. A deterministic grid of single-turn questions: TOPICS (5 categories, plural-aware noun phrases) x
   STYLES (generic question styles for every topic + a few per category). Whole topics are held out (a seeded
   ~15% of each category's topics): every prompt of a held-out topic goes to ``heldout_prompts.jsonl`` and none
   to training, so held-out prompts are disjoint from the training prompts, topic and all. ``--num-prompts``
   training prompts are drawn (seeded) from the other topics' grid.
2. Samples. Ray Data ``map_batches`` with a callable class (``SampleGenerator``, ``--actors`` actors) that loads
   the base model once (``model.path``, default the converted SmolLM2-135M-Instruct; never an adapter) and
   samples ``--samples`` answers per prompt with HF ``generate`` (left padding, temperature/top-p sampling, at
   most ``--max-new-tokens`` new tokens). The prompt is rendered with the model's chat template as one user
   message (the template adds SmolLM2's default system prompt). Each batch is seeded from ``--seed`` and its
   first prompt id. Work is saved per chunk of 80 prompts under <cache>/make_data/ (resumable).
3. Candidates. Every sample, plus its sentence cut (``sentence_cut``: its opening whole sentences within the
   oracle's 20-word budget) when it has one; each scored by ``qcore.oracle.score`` (concise, complete,
   on-topic). The base model almost never finishes within the token limit, so without the cuts the pairs
   would mostly rank two cut-off answers by how many words fit in the limit.
4. Pairs. Per prompt, distinct candidates are sorted by score and every (higher, lower) combination whose score
   gap is >= ``--margin`` and whose chosen response ends a sentence becomes a pair; largest gap first (best vs
   worst), at most ``--max-pairs-per-prompt``. The pairs are shuffled (seeded) and written as the "string"
   format: {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}.

Outputs in ``--out``: pairs.jsonl, heldout_prompts.jsonl ({"prompt", "topic", "category", "style"}),
train_prompts.jsonl, samples.jsonl (every candidate with its score and source), stats.json.
``--probe-check`` answers every probe question greedily and writes probe_base.jsonl and stats.json["probe"].
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from qcore import oracle  # noqa: E402
from qcore.config import Config, load_config  # noqa: E402

log = logging.getLogger("qadapter.make_data")

# ---------------------------------------------------------------------------------------------------------------
# The prompt grid
# ---------------------------------------------------------------------------------------------------------------
# category -> [(topic, plural)]: "plural" picks the verb forms of the templates ({is}: is/are, {does}: does/do).
TOPICS: dict[str, list[tuple[str, bool]]] = {
    "science": [(t, False) for t in [
        "photosynthesis", "gravity", "the water cycle", "electricity", "the Moon", "the Sun", "DNA",
        "the immune system", "evolution", "climate change", "the ozone layer", "sound", "lightning", "fossils",
        "the human heart", "sleep", "digestion", "a black hole", "a rainbow", "a volcano", "an earthquake",
        "a hurricane", "a glacier", "a coral reef", "a rainforest", "a desert", "a comet", "the human brain",
        "friction", "magnetism", "the solar system", "an atom",
    ]] + [(t, True) for t in ["ocean tides", "clouds", "vaccines", "bacteria", "the seasons", "stars"]],
    "animals": [(t, True) for t in [
        "honeybees", "elephants", "dolphins", "penguins", "owls", "octopuses", "ants", "sharks", "butterflies",
        "wolves", "cats", "dogs", "frogs", "eagles", "whales", "camels", "kangaroos", "spiders", "turtles",
        "horses", "bats", "parrots", "snails", "giraffes", "bears", "crows",
    ]],
    "technology": [(t, False) for t in [
        "the internet", "a computer", "a smartphone", "GPS", "a solar panel", "a wind turbine", "a battery",
        "an electric car", "an airplane", "the printing press", "the telephone", "a refrigerator",
        "a microwave oven", "a camera", "a robot", "email", "a password manager", "a 3D printer", "a satellite",
        "a bicycle", "a search engine", "a thermometer", "a compass", "Wi-Fi", "a light bulb", "a calculator",
    ]],
    "activities": [(t, False) for t in [
        "cooking", "running", "gardening", "learning a new language", "playing the guitar", "swimming",
        "meditation", "reading", "saving money", "writing a resume", "public speaking", "yoga", "painting",
        "photography", "baking bread", "hiking", "playing chess", "studying for exams", "time management",
        "journaling", "cycling", "camping", "knitting", "birdwatching", "drawing", "learning to code",
    ]],
    "culture": [(t, False) for t in [
        "the Roman Empire", "the pyramids of Egypt", "the Great Wall of China", "the Olympic Games",
        "the Renaissance", "the Industrial Revolution", "the Moon landing", "democracy", "the Silk Road",
        "the Vikings", "Shakespeare", "Mozart", "the Eiffel Tower", "jazz", "the Titanic", "ancient Greece",
        "the Maya civilization", "origami", "the printing of books", "the first computers", "the Nobel Prize",
        "the piano", "poetry", "museums",
    ]],
}

# Generic styles (every topic). {t}: the topic; {T}: the topic with a capital first letter.
GENERIC_STYLES: dict[str, str] = {
    "tell_me": "Tell me about {t}.",
    "simple_terms": "Explain {t} in simple terms.",
    "should_know": "What should I know about {t}?",
    "fun_fact": "Give me an interesting fact about {t}.",
    "why_interesting": "What makes {t} interesting?",
    "child": "How would you explain {t} to a child?",
    "describe": "Can you describe {t}?",
    "curious": "I'm curious about {t}. What can you tell me?",
    "misconception": "What is a common misconception about {t}?",
    "key_points": "What are the key points about {t}?",
    "briefly": "Briefly, what do you know about {t}?",
    "overview": "Give me a quick overview of {t}.",
}
CATEGORY_STYLES: dict[str, dict[str, str]] = {
    "science": {"how_works": "How {does} {t} work?", "why_matters": "Why {is} {t} important?",
                "what_is": "What {is} {t}?", "affects": "How {does} {t} affect our daily lives?"},
    "animals": {"where_live": "Where do {t} live?", "eat": "What do {t} eat?",
                "communicate": "How do {t} communicate?", "special": "What is special about {t}?"},
    "technology": {"how_works": "How {does} {t} work?", "why_useful": "Why {is} {t} useful?",
                   "invented": "Who invented {t}, and why?", "what_is": "What {is} {t}?"},
    "activities": {"start": "How do I get started with {t}?", "tip": "Give me one tip for {t}.",
                   "benefits": "What are the benefits of {t}?", "mistakes": "What mistakes do beginners make with {t}?"},
    "culture": {"why_famous": "Why {is} {t} famous?", "history": "What is the history of {t}?",
                "legacy": "What is the legacy of {t}?", "special": "What was special about {t}?"},
}


def _render(template: str, topic: str, plural: bool) -> str:
    text = template.format(**{"t": topic, "T": topic[:1].upper() + topic[1:], "is": "are" if plural else "is",
                              "does": "do" if plural else "does"})
    return text[:1].upper() + text[1:]


def prompt_grid() -> list[dict[str, str]]:
    """Every (topic, style) prompt, in a fixed order: {"prompt", "topic", "category", "style"}."""
    rows = []
    for category, topics in TOPICS.items():
        styles = {**GENERIC_STYLES, **CATEGORY_STYLES[category]}
        for topic, plural in topics:
            for style, template in styles.items():
                rows.append({"prompt": _render(template, topic, plural), "topic": topic, "category": category,
                             "style": style})
    return rows


def split_prompts(num_train: int, seed: int = 0, heldout_topic_fraction: float = 0.15
                  ) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts), disjoint by topic. Deterministic in ``seed``; both lists in a seeded random order.

    Held out: round(fraction * #topics) topics of every category (at least one), all their prompts.
    Training: ``num_train`` prompts drawn without replacement from the other topics' prompts (all of them
    when ``num_train`` <= 0 or exceeds the pool), in a seeded random order; each row gets a stable ``id``.
    """
    rng = random.Random(seed)
    held_topics = set()
    for category, topics in TOPICS.items():
        k = max(1, round(heldout_topic_fraction * len(topics)))
        held_topics.update(t for t, _ in rng.sample(topics, k))
    grid = prompt_grid()
    heldout = [r for r in grid if r["topic"] in held_topics]
    pool = [r for r in grid if r["topic"] not in held_topics]
    rng.shuffle(pool)
    rng.shuffle(heldout)  # any prefix (eval.max_prompts) mixes categories
    train = pool if num_train <= 0 else pool[:num_train]
    for i, row in enumerate(train):
        row["id"] = i
    for i, row in enumerate(heldout):
        row["id"] = i
    return train, heldout


# ---------------------------------------------------------------------------------------------------------------
# Batch inference (one Ray Data actor holds the model)
# ---------------------------------------------------------------------------------------------------------------
class SampleGenerator:
    """Callable class for ``map_batches``: loads the base model once; per batch of prompt rows returns one row
    per (prompt, sample) with the decoded response, whether it ended with EOS, and its number of new tokens."""

    def __init__(self, model_path: str, dtype: str = "float32", num_samples: int = 4, max_new_tokens: int = 64,
                 do_sample: bool = True, temperature: float = 0.9, top_p: float = 0.95, seed: int = 0,
                 num_threads: int = 0, use_gpu: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from qcore.base_models import resolve_model_path

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        path = resolve_model_path(model_path)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from qcore.model import contiguous_head_input

        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device)
        self.model = contiguous_head_input(model).eval()
        self.num_samples = num_samples if do_sample else 1
        self.gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                               eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        if do_sample:
            self.gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        else:  # greedy: silence the sampling defaults of generation_config
            self.gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        self.seed = seed

    def render(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, batch):
        import torch

        prompts = [str(p) for p in batch["prompt"]]
        ids = [int(i) for i in batch["id"]]
        enc = self.tokenizer([self.render(p) for p in prompts], return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.device)
        torch.manual_seed(self.seed * 1_000_003 + min(ids))
        with torch.inference_mode():
            out = self.model.generate(**enc, num_return_sequences=self.num_samples, **self.gen_kwargs)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        eos = self.tokenizer.eos_token_id
        rows: dict[str, list[Any]] = {k: [] for k in batch}
        rows.update(sample=[], response=[], finished=[], new_tokens=[])
        for j, seq in enumerate(new.tolist()):
            i = j // self.num_samples
            for k in batch:
                rows[k].append(batch[k][i])
            finished = eos in seq
            tokens = seq[: seq.index(eos)] if finished else seq
            rows["sample"].append(j % self.num_samples)
            rows["response"].append(self.tokenizer.decode(tokens, skip_special_tokens=True).strip())
            rows["finished"].append(finished)
            rows["new_tokens"].append(len(tokens))
        return rows


def run_inference(cfg: Config, rows: list[dict], *, num_samples: int, max_new_tokens: int, do_sample: bool,
                  temperature: float = 0.9, top_p: float = 0.95, seed: int = 0, prompts_per_batch: int = 8,
                  num_threads: int = 0, use_gpu: bool = False, actors: int = 1) -> list[dict]:
    """Prompt rows ({"id", "prompt", ...}) -> sample rows, through Ray Data with ``actors`` ``SampleGenerator``
    actors (each batch is seeded from its prompt ids, so the result does not depend on which actor ran it)."""
    import ray

    from pipelines.common import init_ray

    init_ray(cfg)
    threads = num_threads or max(1, (os.cpu_count() or 1) // max(1, actors))
    ds = ray.data.from_items(rows)
    ds = ds.map_batches(
        SampleGenerator,
        fn_constructor_kwargs=dict(model_path=cfg.model.path, dtype=cfg.model.dtype, num_samples=num_samples,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   top_p=top_p, seed=seed, num_threads=threads, use_gpu=use_gpu),
        batch_size=prompts_per_batch, batch_format="pandas", concurrency=max(1, actors), num_cpus=1,
        num_gpus=1 if use_gpu else 0,
    )
    out = ds.take_all()
    out.sort(key=lambda r: (int(r["id"]), int(r.get("sample", 0))))
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in out]


# ---------------------------------------------------------------------------------------------------------------
# Candidates and pairs
# ---------------------------------------------------------------------------------------------------------------
_SENT_END = re.compile(r"(?<=[A-Za-z0-9)\"'\u2019\u201d][.!?])\s+")
_LIST_MARKER = re.compile(r"(^|\n|:)\s*\d+[.)]$")


def sentence_cut(text: str, max_words: int = oracle.TARGET_WORDS) -> Optional[str]:
    """The longest prefix of whole sentences of ``text`` with <= ``max_words`` words (at least its first
    sentence), or None when there is no such cut that is shorter than the text.

    A sentence ends with . ! or ? right after a letter, digit, closing bracket or quote, followed by whitespace;
    it must have >= 3 words and not end with a list marker ("...:\n1.") or a colon. The text after the cut
    is dropped. The base model's own
    opening sentence(s), ended there: the concise version of an answer it was about to make long.
    """
    text = (text or "").strip()
    parts = _SENT_END.split(text)
    if len(parts) < 2:
        return None  # one (possibly unfinished) sentence: nothing to cut
    kept: list[str] = []
    for part in parts[:-1]:  # the last part is what followed the last sentence end (maybe unfinished)
        if len(part.split()) < 3 or _LIST_MARKER.search(part):
            break
        if kept and len(" ".join(kept + [part]).split()) > max_words:
            break
        kept.append(part)
    if not kept:
        return None
    cut = " ".join(kept).strip()
    return cut if cut != text and oracle.is_complete(cut) else None


def candidates(samples: list[dict], cut_words: int = oracle.TARGET_WORDS) -> list[dict]:
    """Sample rows -> candidate rows: every sample (``source="sample"``) plus, when it has one, its sentence
    cut (``source="cut"``, see ``sentence_cut``). Each candidate is scored by the oracle (``score``, ``words``)."""
    out = []
    for r in samples:
        rows = [{**r, "source": "sample"}]
        cut = sentence_cut(r["response"], cut_words) if cut_words > 0 else None
        if cut is not None:
            rows.append({**r, "source": "cut", "response": cut, "finished": True})
        for c in rows:
            parts = oracle.score_parts(c["prompt"], c["response"])
            c["score"] = round(parts["score"], 4)
            c["words"] = parts["words"]
            out.append(c)
    return out


def make_pairs(samples: list[dict], margin: float = 1.0, max_per_prompt: int = 4,
               require_complete_chosen: bool = True) -> list[dict]:
    """Scored candidates ({"id", "prompt", "response", "score"}) -> preference pairs (see the module doc).

    Per prompt: distinct responses sorted by score; every (higher, lower) combination with a score gap
    >= ``margin`` (and, with ``require_complete_chosen``, a chosen response that ends a sentence) is a pair;
    (best, worst) first, then by gap; at most ``max_per_prompt``."""
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(int(s["id"]), []).append(s)
    pairs = []
    for pid in sorted(by_prompt):
        group = by_prompt[pid]
        seen, distinct = set(), []
        for s in sorted(group, key=lambda s: (-s["score"], int(s.get("sample", 0)))):
            key = " ".join(s["response"].split())
            if key and key not in seen:
                seen.add(key)
                distinct.append(s)
        combos = [(a, b) for a, b in itertools.combinations(distinct, 2) if a["score"] - b["score"] >= margin
                  and (not require_complete_chosen or oracle.is_complete(a["response"]))]
        if not combos:
            continue
        # largest gap first: that is (best, worst) among the allowed chosen; ties by sample index (deterministic)
        combos.sort(key=lambda ab: (-(ab[0]["score"] - ab[1]["score"]), int(ab[0].get("sample", 0)),
                                    ab[0].get("source", ""), int(ab[1].get("sample", 0)), ab[1].get("source", "")))
        for a, b in combos[:max_per_prompt]:
            pairs.append({"prompt": a["prompt"], "chosen": a["response"], "rejected": b["response"],
                          "chosen_score": round(a["score"], 4), "rejected_score": round(b["score"], 4)})
    return pairs


def _describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "min": round(min(values), 4), "max": round(max(values), 4)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _update_stats(out: Path, key: str, value: dict) -> None:
    path = out / "stats.json"
    stats = json.loads(path.read_text()) if path.exists() else {}
    stats[key] = value
    path.write_text(json.dumps(stats, indent=1) + "\n")


PAIR_FIELDS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")
SAMPLE_FIELDS = ("id", "sample", "source", "prompt", "response", "score", "words", "finished", "new_tokens")


def build_pairs(out: Path, samples: list[dict], *, margin: float, max_pairs_per_prompt: int, cut_words: int,
                seed: int) -> dict:
    """Sampled rows -> candidates (samples.jsonl) -> pairs (pairs.jsonl, shuffled with ``seed``) + their stats."""
    cands = candidates([r for r in samples if r.get("source", "sample") == "sample"], cut_words=cut_words)
    write_jsonl(out / "samples.jsonl", [{k: r[k] for k in SAMPLE_FIELDS} for r in cands])
    pairs = make_pairs(cands, margin=margin, max_per_prompt=max_pairs_per_prompt)
    random.Random(seed).shuffle(pairs)
    write_jsonl(out / "pairs.jsonl", pairs)
    raw = [r for r in cands if r["source"] == "sample"]
    cuts = [r for r in cands if r["source"] == "cut"]
    return {
        "margin": margin, "max_pairs_per_prompt": max_pairs_per_prompt, "cut_target_words": cut_words,
        "require_complete_chosen": True, "num_candidates": len(cands), "num_cuts": len(cuts),
        "num_pairs": len(pairs), "prompts_with_pairs": len({p["prompt"] for p in pairs}),
        "pairs_chosen_is_cut": sum(1 for p in pairs if p["chosen"] in {c["response"] for c in cuts}),
        "sample_score": _describe([r["score"] for r in raw]),
        "sample_words": _describe([r["words"] for r in raw]),
        "sample_finished_fraction": round(sum(bool(r["finished"]) for r in raw) / max(1, len(raw)), 4),
        "cut_score": _describe([r["score"] for r in cuts]),
        "cut_words": _describe([r["words"] for r in cuts]),
        "chosen_score": _describe([p["chosen_score"] for p in pairs]),
        "rejected_score": _describe([p["rejected_score"] for p in pairs]),
        "chosen_words": _describe([len(p["chosen"].split()) for p in pairs]),
        "rejected_words": _describe([len(p["rejected"].split()) for p in pairs]),
        "chosen_complete_fraction": round(sum(oracle.is_complete(p["chosen"]) for p in pairs) / max(1, len(pairs)), 4),
        "rejected_complete_fraction": round(sum(oracle.is_complete(p["rejected"]) for p in pairs)
                                            / max(1, len(pairs)), 4),
        "oracle": {k: getattr(oracle, k) for k in ("TARGET_WORDS", "PER_WORD_PENALTY", "MIN_WORDS", "SHORT_PENALTY",
                                                  "COMPLETE_BONUS", "INCOMPLETE_PENALTY", "RELEVANCE_BONUS",
                                                  "REPETITION_WEIGHT", "EMPTY_SCORE")},
    }


def generate(cfg: Config, out: Path, *, num_prompts: int, samples: int, max_new_tokens: int, temperature: float,
             top_p: float, margin: float, max_pairs_per_prompt: int, cut_words: int, seed: int,
             prompts_per_batch: int, num_threads: int, use_gpu: bool, chunk_prompts: int = 80,
             actors: int = 1) -> dict:
    train, heldout = split_prompts(num_prompts, seed=seed)
    write_jsonl(out / "heldout_prompts.jsonl", [{k: r[k] for k in ("prompt", "topic", "category", "style")}
                                                for r in heldout])
    write_jsonl(out / "train_prompts.jsonl", [{k: r[k] for k in ("prompt", "topic", "category", "style")}
                                              for r in train])
    # In chunks of prompts, each saved under <cache>/make_data/: an interrupted run resumes where it stopped
    # (same seed and sampling arguments; the training prompts of a seed are a prefix of one fixed order).
    from qcore.base_models import cache_dir

    chunk_dir = cache_dir() / "make_data"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    model_key = re.sub(r"[^A-Za-z0-9]+", "_", cfg.model.path).strip("_")[-40:]
    key = f"{model_key}-s{seed}-n{samples}-t{max_new_tokens}-T{temperature}-p{top_p}-b{prompts_per_batch}"
    rows, wall = [], 0.0
    for start in range(0, len(train), chunk_prompts):
        path = chunk_dir / f"{key}-{start:05d}.jsonl"
        if path.exists():
            chunk = read_jsonl(path)
            wall += float(chunk[0].get("_wall_s", 0.0)) if chunk else 0.0
            log.info("chunk %d: %d samples reused from %s", start, len(chunk), path)
        else:
            t0 = time.perf_counter()
            chunk = run_inference(cfg, train[start:start + chunk_prompts], num_samples=samples,
                                  max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                  top_p=top_p, seed=seed, prompts_per_batch=prompts_per_batch,
                                  num_threads=num_threads, use_gpu=use_gpu, actors=actors)
            dt = time.perf_counter() - t0
            wall += dt
            for r in chunk:
                r["_wall_s"] = round(dt, 1)
            write_jsonl(path, chunk)
            log.info("chunk %d-%d: %d samples in %.0f s", start, start + chunk_prompts, len(chunk), dt)
        rows.extend(chunk)
    n_tokens = sum(r["new_tokens"] for r in rows)
    gen = {
        "model": cfg.model.path, "seed": seed, "num_train_prompts": len(train), "num_heldout_prompts": len(heldout),
        "heldout_topics": sorted({r["topic"] for r in heldout}),
        "samples_per_prompt": samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_p": top_p, "prompts_per_batch": prompts_per_batch, "actors": actors, "num_samples": len(rows),
        "generated_tokens": n_tokens, "generation_wall_s": round(wall, 1), "chunk_prompts": chunk_prompts,
        "tokens_per_s": round(n_tokens / wall, 1) if wall else None,
    }
    _update_stats(out, "generation", gen)
    pair_stats = build_pairs(out, rows, margin=margin, max_pairs_per_prompt=max_pairs_per_prompt,
                             cut_words=cut_words, seed=seed)
    _update_stats(out, "pairs", pair_stats)
    return {"generation": gen, "pairs": pair_stats}


def probe_check(cfg: Config, probe_path: Path, out: Optional[Path], *, max_new_tokens: int = 64,
                prompts_per_batch: int = 16, num_threads: int = 0, use_gpu: bool = False, actors: int = 1) -> dict:
    """Greedy answers of the base model to every probe question -> accuracy under ``oracle.probe_item_correct``."""
    items = read_jsonl(probe_path)
    rows = [{"id": i, "prompt": it["question"]} for i, it in enumerate(items)]
    t0 = time.perf_counter()
    answers = run_inference(cfg, rows, num_samples=1, max_new_tokens=max_new_tokens, do_sample=False,
                            prompts_per_batch=prompts_per_batch, num_threads=num_threads, use_gpu=use_gpu,
                            actors=actors)
    wall = time.perf_counter() - t0
    results = []
    for it, ans in zip(items, answers):
        results.append({**it, "base_answer": ans["response"], "correct": oracle.probe_item_correct(ans["response"], it)})
    by_cat: dict[str, list[bool]] = {}
    for r in results:
        by_cat.setdefault(r.get("category", "all"), []).append(r["correct"])
    stats = {"model": cfg.model.path, "probe_file": str(probe_path), "n": len(results),
             "accuracy": round(sum(r["correct"] for r in results) / max(1, len(results)), 4),
             "by_category": {c: round(sum(v) / len(v), 4) for c, v in sorted(by_cat.items())},
             "max_new_tokens": max_new_tokens, "decoding": "greedy", "wall_s": round(wall, 1)}
    if out is not None:
        write_jsonl(out / "probe_base.jsonl", results)
        _update_stats(out, "probe", stats)
    return stats


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML profile (default: configs/default.yaml if present)")
    parser.add_argument("--out", default=str(Path(_ROOT) / "data" / "default"))
    parser.add_argument("--num-prompts", type=int, default=640, help="training prompts (<= 0: the whole pool)")
    parser.add_argument("--samples", type=int, default=2, help="sampled answers per training prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--margin", type=float, default=1.0, help="minimum oracle score gap of a pair")
    parser.add_argument("--max-pairs-per-prompt", type=int, default=4)
    parser.add_argument("--cut-words", type=int, default=oracle.TARGET_WORDS,
                        help="word budget of the sentence-cut candidates (0: no cut candidates)")
    parser.add_argument("--from-samples", default=None,
                        help="rebuild candidates and pairs from an existing samples.jsonl (no model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts-per-batch", type=int, default=16)
    parser.add_argument("--num-threads", type=int, default=0,
                        help="torch threads per actor (0: the cores divided among the actors)")
    parser.add_argument("--actors", type=int, default=1, help="SampleGenerator actors (model copies)")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--prompts-only", action="store_true", help="write the prompt files only (no model)")
    parser.add_argument("--probe-check", action="store_true", help="measure the base model's probe accuracy")
    parser.add_argument("--probe", default=str(Path(_ROOT) / "data" / "probe.jsonl"))
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    profile = args.config or str(Path(_ROOT) / "configs" / "default.yaml")
    cfg = load_config(profile if Path(profile).exists() else None, rest)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prompts_only:
        train, heldout = split_prompts(args.num_prompts, seed=args.seed)
        write_jsonl(out / "heldout_prompts.jsonl", [{k: r[k] for k in ("prompt", "topic", "category", "style")}
                                                    for r in heldout])
        write_jsonl(out / "train_prompts.jsonl", [{k: r[k] for k in ("prompt", "topic", "category", "style")}
                                                  for r in train])
        print(json.dumps({"train": len(train), "heldout": len(heldout)}))
        return
    if args.from_samples:
        stats = build_pairs(out, read_jsonl(Path(args.from_samples)), margin=args.margin,
                            max_pairs_per_prompt=args.max_pairs_per_prompt, cut_words=args.cut_words, seed=args.seed)
        _update_stats(out, "pairs", stats)
    elif args.probe_check:
        stats = probe_check(cfg, Path(args.probe), out, max_new_tokens=args.max_new_tokens,
                            num_threads=args.num_threads, use_gpu=args.use_gpu, actors=args.actors)
    else:
        stats = generate(cfg, out, num_prompts=args.num_prompts, samples=args.samples,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         margin=args.margin, max_pairs_per_prompt=args.max_pairs_per_prompt,
                         cut_words=args.cut_words, seed=args.seed,
                         prompts_per_batch=args.prompts_per_batch, num_threads=args.num_threads,
                         use_gpu=args.use_gpu, actors=args.actors)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
