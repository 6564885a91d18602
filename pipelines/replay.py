"""Replay data: the base model's own greedy answers to the training prompts, added to the chosen SFT rows.

The paper's Replay baseline (docs/method.md) is SFT on the chosen responses plus the base model's greedy answers to
the training prompts, built as the authors' make_replay_data.py builds it: the training set keeps every row, and one
row is ADDED per distinct training prompt, its response the base model's greedy answer (at most
``train.replay_max_new_tokens`` tokens, 256 in their code). So the full mix is

    N chosen rows (every training pair's chosen response) + R base answers,
    R = #distinct training prompts (``train.replay_count`` -1, the authors' default) or the first k of them (k >= 0)

and an epoch over it is N + R rows long. The two kinds are interleaved evenly (training reads nearly in file order),
so any stretch of training sees the same N : R mix. A step budget (``train.max_steps``) that reads only
B = max_steps x micro_batch x accumulation x workers < N + R rows keeps the first B rows of that interleaved mix, so
the run sees the authors' proportion and generates only the answers it will read.

Generation runs as Ray Data batch inference on the evaluation actors (``PolicyEvaluator`` with no adapter = the base
policy, in ``model.dtype``), ``cfg.eval.batch_size`` prompts per call on ``cfg.eval.num_actors`` actors, each on a GPU
where training uses them (``train.use_gpu``: one GPU per actor), else on CPU threads. Greedy decoding of the first
``replay_count`` distinct prompts in file order: nothing in it is random, so ``run.seed`` does not change it.

Output ``<out_dir>/train`` and ``<out_dir>/eval`` (Parquet rows of ``qcore.data.tokenize_sft``: input_ids,
response_mask, prompt_length, plus kind ("chosen" | "replay"), prompt_json, response) and ``replay.json``.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

from qcore.config import Config

MIX_COLUMNS = ["kind", "prompt_json", "response", "input_ids", "response_mask", "prompt_length"]


def replay_counts(cfg: Config, n_train: int, n_prompts: int) -> tuple[int, int]:
    """(n_chosen, n_replay) of the mix this run trains on: all N = n_train chosen rows + R base answers, or the
    first B rows of their even interleaving when the step budget reads only B < N + R rows (see the module doc)."""
    tc = cfg.train
    n_replay = n_prompts if tc.replay_count < 0 else min(tc.replay_count, n_prompts)
    if tc.max_steps <= 0:
        return n_train, n_replay
    budget = tc.max_steps * tc.micro_batch_size * tc.grad_accumulation * tc.num_workers
    if budget >= n_train + n_replay:
        return n_train, n_replay
    head = interleave([0] * n_train, [1] * n_replay)[:budget]
    return budget - sum(head), sum(head)


def interleave(chosen: list, replay: list) -> list:
    """Both lists merged so that each is spread evenly (stable: each keeps its own order)."""
    keyed = [((i + 0.5) / len(chosen), 0, x) for i, x in enumerate(chosen)]
    keyed += [((i + 0.5) / len(replay), 1, x) for i, x in enumerate(replay)]
    return [x for *_, x in sorted(keyed, key=lambda t: (t[0], t[1]))]


class BaseAnswers:
    """Ray Data callable class: the base model's greedy answers to a batch of prompts, tokenized as SFT rows."""

    def __init__(self, cfg_dict: dict, num_threads: int, use_gpu: bool = False):
        from pipelines.evaluate import PolicyEvaluator
        from qcore.config import config_from_dict

        cfg = config_from_dict(cfg_dict)
        self.data_cfg = cfg.data
        self.evaluator = PolicyEvaluator(cfg.model.path, dtype=cfg.model.dtype,
                                         max_new_tokens=cfg.train.replay_max_new_tokens,
                                         trust_remote_code=cfg.model.trust_remote_code,
                                         use_gpu=use_gpu, num_threads=num_threads)
        if use_gpu and self.evaluator.device.type != "cuda":  # Ray gave this actor a GPU that torch cannot see
            raise RuntimeError("train.use_gpu is true but torch sees no CUDA device in the replay actor")
        self.evaluator._load(None)

    def __call__(self, batch: dict) -> dict:
        from qcore.data import InvalidRecord, tokenize_sft

        prompts = [json.loads(p) for p in batch["prompt_json"]]
        texts, _, _ = self.evaluator.generate_and_kl(prompts, alpha_0=0.0, alpha_tilde=1.0, want_kl=False)
        cols: dict[str, list] = {c: [] for c in MIX_COLUMNS}
        for prompt_json, prompt, text in zip(batch["prompt_json"], prompts, texts):
            if not text:  # an immediate EOS: nothing to imitate
                continue
            try:
                row = tokenize_sft({"prompt": prompt, "response": text}, self.evaluator.tokenizer,
                                   self.data_cfg.max_length, self.data_cfg.max_prompt_length)
            except InvalidRecord:
                continue
            for k, v in {"kind": "replay", "prompt_json": prompt_json, "response": text, **row}.items():
                cols[k].append(v)
        return cols


CHOSEN_COLUMNS = ["prompt_json", "chosen", "chosen_input_ids", "chosen_response_mask", "prompt_length"]


def _chosen_rows(table) -> list[dict]:
    """Pair rows (Arrow) -> SFT rows of their chosen responses."""
    rows = table.select(CHOSEN_COLUMNS).to_pylist()
    return [{"kind": "chosen", "prompt_json": r["prompt_json"], "response": r["chosen"],
             "input_ids": r["chosen_input_ids"], "response_mask": r["chosen_response_mask"],
             "prompt_length": r["prompt_length"]} for r in rows]


def _write(rows: list[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.common import resolve_fs

    ids = pa.list_(pa.int32())
    schema = pa.schema([("kind", pa.string()), ("prompt_json", pa.string()), ("response", pa.string()),
                        ("input_ids", ids), ("response_mask", ids), ("prompt_length", pa.int32())])
    table = pa.Table.from_pylist(rows, schema=schema)
    fs, root = resolve_fs(path)
    fs.create_dir(root, recursive=True)
    pq.write_table(table, f"{root}/part-0.parquet", filesystem=fs)


def replay_data(cfg: Config, data_dir: str, out_dir: str) -> dict[str, Any]:
    """Build the replay mix from the preprocessed pairs in ``data_dir``; returns the summary written to replay.json."""
    import os

    import pyarrow.dataset as pads
    import ray

    from pipelines.common import resolve_fs, write_text

    t0 = time.time()
    fs, root = resolve_fs(data_dir)
    train = pads.dataset(f"{root}/train", filesystem=fs, format="parquet")
    missing = {"prompt_json", "chosen"} - set(train.schema.names)
    if missing:
        raise ValueError(f"{data_dir}/train lacks {sorted(missing)}: replay needs the pair rows that "
                         f"pipelines/preprocess.py writes")
    n_train = train.count_rows()
    # only the prompt column in full; token columns just for the rows kept (a large split stays on disk)
    prompts = list(dict.fromkeys(train.to_table(columns=["prompt_json"]).column("prompt_json").to_pylist()))
    n_chosen, n_replay = replay_counts(cfg, n_train, len(prompts))
    chosen = _chosen_rows(train.head(n_chosen, columns=CHOSEN_COLUMNS))

    replay: list[dict] = []
    if n_replay:
        num_actors = max(1, min(cfg.eval.num_actors, n_replay))
        use_gpu = bool(cfg.train.use_gpu)  # generate where training runs
        threads = 0 if use_gpu else max(1, min(os.cpu_count() or 1,
                                                int(ray.cluster_resources().get("CPU", 1))) // num_actors)
        batch_size = max(1, cfg.eval.batch_size)
        ds = ray.data.from_items([{"prompt_json": p} for p in prompts[:n_replay]],
                                 override_num_blocks=max(1, math.ceil(n_replay / batch_size)))
        ds = ds.map_batches(BaseAnswers, fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "num_threads": threads,
                                                                "use_gpu": use_gpu},
                            batch_size=batch_size, concurrency=num_actors, num_cpus=1, num_gpus=1 if use_gpu else 0)
        replay = [{k: r[k] for k in MIX_COLUMNS} for r in ds.take_all()]
        order = {p: i for i, p in enumerate(prompts)}  # actors finish out of order: back to prompt order
        replay.sort(key=lambda r: order[r["prompt_json"]])
    for r in replay:
        r["input_ids"], r["response_mask"] = list(r["input_ids"]), list(r["response_mask"])
    _write(interleave(chosen, replay), f"{out_dir}/train")
    if fs.get_file_info(f"{root}/eval").type.name == "Directory":
        _write(_chosen_rows(pads.dataset(f"{root}/eval", filesystem=fs, format="parquet").to_table()),
               f"{out_dir}/eval")
    summary = {"pairs": n_train, "distinct_prompts": len(prompts), "chosen_rows": len(chosen),
               "replay_rows": len(replay), "replay_requested": n_replay,
               "replay_dropped": n_replay - len(replay),  # empty answers or prompts over max_length
               "replay_count": cfg.train.replay_count, "replay_max_new_tokens": cfg.train.replay_max_new_tokens,
               "seconds": round(time.time() - t0, 3),
               "examples": [{"prompt": json.loads(r["prompt_json"]), "base_answer": r["response"]}
                            for r in replay[:3]]}
    write_text(f"{out_dir}/replay.json", json.dumps(summary, indent=2, ensure_ascii=False))
    print(f"[replay] {len(chosen)} chosen + {len(replay)} base answers ({summary['replay_dropped']} dropped) "
          f"in {summary['seconds']:.1f}s -> {out_dir}", flush=True)
    return summary
