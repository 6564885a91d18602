"""eval.compose: the evaluate stage's weight sweep over composed adapters (pipelines/evaluate.py compose_sweep), on a
real local Ray with a tiny model, checked against independently computed policies; and its config checks."""
import json

import pytest
import torch

from qcore.config import ConfigError, QConfig, load_config

A0, AT = 0.2, 0.8
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "What is 2 + 3?",
           "Describe the quick brown fox."]
PAIRS_A = [{"prompt": PROMPTS[0], "chosen": "Paris.", "rejected": "It is a city in Europe, I think, maybe Lyon."},
           {"prompt": PROMPTS[1], "chosen": "Waves roll in.", "rejected": "The sea the sea the sea the sea."},
           {"prompt": PROMPTS[2], "chosen": "5.", "rejected": "6."},
           {"prompt": PROMPTS[3], "chosen": "A fox jumps.", "rejected": "Foxes are animals of many kinds."}]
PAIRS_B = [{"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Red."},
           {"prompt": "What color is the sky?", "chosen": "It is blue.", "rejected": "It is red today."},
           {"prompt": "Pick a paint.", "chosen": "A blue one.", "rejected": "The red paint."}]


@pytest.mark.parametrize("compose, key", [
    ({"adapters": ["ppo"]}, "eval.compose.adapters[0]"),
    ({"adapters": ["qadapter", "x=/a", "x=/b"]}, "eval.compose.adapters"),
    ({"adapters": ["qadapter", "=/a"]}, "eval.compose.adapters[1]"),
    ({"adapters": ["qadapter", "/runs/x/base/adapter"]}, "eval.compose.adapters[1]"),  # named 'base'
    ({"adapters": ["qadapter", "b=/a"], "grid": [[1, 0], [1]]}, "eval.compose.grid[1]"),
    ({"adapters": ["qadapter"], "grid": [[float("nan")]]}, "eval.compose.grid[0]"),
    ({"adapters": ["qadapter"], "alpha_tilde": 0}, "eval.compose.alpha_tilde"),
    ({"adapters": ["qadapter"], "alpha_0": -1}, "eval.compose.alpha_0"),
    ({"adapters": ["qadapter"], "pairs": {"zz": "p.jsonl"}}, "eval.compose.pairs.zz"),
    ({"grid": [[1.0]]}, "eval.compose.grid"),
])
def test_bad_compose_config_names_the_key(compose, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"eval": {"compose": compose}})
    assert f"'{key}'" in str(err.value)


def test_compose_config_names_and_default_grid():
    with pytest.raises(ConfigError, match="'eval.compose.adapters'.*neither"):
        load_config(None, {"eval": {"judges": ["reward_model"], "reward_model": "/rm",
                                    "compose": {"adapters": ["qadapter"]}}})
    c = load_config(None, ["--eval.compose.adapters", "[qadapter, color=/r/c/adapter, /r/train/dpo-k1/adapter]"]
                    ).eval.compose
    assert c.names() == ["qadapter", "color", "dpo-k1"]
    assert [m for _, m, _ in c.entries()] == ["qadapter", None, None]
    assert c.weight_grid() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]
    assert load_config(None, {}).eval.compose.adapters == []  # off by default


def _save_adapter(base_dir, out, seed):
    from qcore.model import QAdapterModel

    model = QAdapterModel.from_pretrained(base_dir, q_cfg=QConfig(alpha_0=A0, alpha_tilde=AT))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return str(model.save_pretrained(out))


def _rows(pairs, tokenizer):
    from qcore.data import tokenize_pair

    return [tokenize_pair(p, tokenizer, 512, 256) for p in pairs]


def _sharpened_base_margins(model_dir, rows):
    """float64: per pair, mean log-prob of chosen minus rejected under softmax((1 + a0) / at * z_base)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    for r in rows:
        means = []
        for side in ("chosen", "rejected"):
            ids, resp = r[f"{side}_input_ids"], r[f"{side}_response_mask"]
            with torch.no_grad():
                z = hf(input_ids=torch.tensor([ids])).logits[0]
            logp = torch.log_softmax((1 + A0) / AT * z, -1)
            t = [i for i in range(1, len(ids)) if resp[i]]  # predicted response tokens (EOS included)
            means.append(sum(logp[i - 1, ids[i]].item() for i in t) / len(t))
        out.append(means[0] - means[1])
    return out


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_evaluate_stage_compose_sweep(ray_session, tiny_model_dir, tiny_tokenizer, tmp_path):
    """Two adapters (a method of the run, another given as NAME=DIR with its own JSONL pairs), grid (0,0), (1,0),
    (0,1), (.5,.5): w = e_i is adapter i's own customized policy (the ordinary pairs judge, the ordinary decoder),
    w = 0 the base sharpened by (1 + alpha_0) / alpha_tilde (a float64 reference); the report renders both."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.evaluate import PolicyEvaluator, evaluate_stage
    from pipelines.report import report_stage
    from qcore import metrics

    rows_a, rows_b = _rows(PAIRS_A, tiny_tokenizer), _rows(PAIRS_B, tiny_tokenizer)
    (tmp_path / "pre" / "eval").mkdir(parents=True)  # the run's own held-out split, as preprocess writes it
    pq.write_table(pa.Table.from_pylist([{"source": "t.jsonl", "row": i, "pair_index": 0,
                                          "prompt_json": json.dumps(p["prompt"]), **r}
                                         for i, (p, r) in enumerate(zip(PAIRS_A, rows_a))]),
                   tmp_path / "pre" / "eval" / "part-0.parquet")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS_B))
    dir_a = _save_adapter(tiny_model_dir, tmp_path / "a", 1)
    dir_b = _save_adapter(tiny_model_dir, tmp_path / "b", 2)
    grid = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    cfg = load_config(None, {"model": {"path": tiny_model_dir},
                             "eval": {"judges": ["pairs", "oracle"], "max_new_tokens": 6, "batch_size": 4,
                                      "bootstrap_samples": 200, "kl": False,
                                      "compose": {"adapters": ["qadapter", f"b={dir_b}"], "grid": grid,
                                                  "pairs": {"b": str(tmp_path / "b.jsonl")}}},
                             "run": {"name": "t", "storage_path": str(tmp_path / "runs")}})
    res = evaluate_stage(cfg, {"qadapter": dir_a}, str(tmp_path / "pre"), str(tmp_path / "e"))

    comp = json.loads((tmp_path / "e" / "results.json").read_text())["compose"]
    assert comp["adapters"] == {"qadapter": dir_a, "b": dir_b}
    assert (comp["alpha_0"], comp["alpha_tilde"]) == (A0, AT)  # the first adapter's trained dial
    assert comp["names"] == ["qadapter", "b"]  # in the order given (the weights dicts are stored key-sorted)
    assert [[r["weights"][n] for n in comp["names"]] for r in comp["rows"]] == grid
    zero, only_a, only_b, half = comp["rows"]
    for r in comp["rows"]:
        assert r["pairs"]["qadapter"]["n_pairs"] == 4 and r["pairs"]["b"]["n_pairs"] == 3 and r["n_prompts"] == 4
        for m, key in ((r["pairs"]["qadapter"], "pair_margin"), (r["pairs"]["b"], "pair_accuracy"), (r, "win_rate")):
            assert m["ci"][key]["low"] <= m[key] <= m["ci"][key]["high"]

    # w = (1, 0): adapter a's own customized policy, as the ordinary pairs judge scored it in the same stage
    mine = res["methods"]["qadapter"]
    assert only_a["pairs"]["qadapter"]["pair_accuracy"] == mine["pair_accuracy"]
    assert only_a["pairs"]["qadapter"]["pair_margin"] == pytest.approx(mine["pair_margin"], abs=1e-5)
    # ... and its greedy answers are the ordinary decoder's (generations.jsonl), so its oracle columns are too
    gens = [json.loads(x) for x in (tmp_path / "e" / "generations.jsonl").read_text().splitlines()]
    comp_gens = [json.loads(x) for x in (tmp_path / "e" / "compose_generations.jsonl").read_text().splitlines()]
    answers = lambda lines, pick: [g["response"] for g in sorted(lines, key=lambda g: g["idx"]) if pick(g)]  # noqa
    assert answers(comp_gens, lambda g: g["weights"] == only_a["weights"]) == answers(
        gens, lambda g: g["method"] == "qadapter")
    assert only_a["pref_score"] == pytest.approx(mine["pref_score"]) and only_a["win_rate"] == mine["win_rate"]
    # w = (0, 0): the base's argmax, so the base's greedy answers: every prompt a tie with the base
    assert answers(comp_gens, lambda g: g["weights"] == zero["weights"]) == answers(
        gens, lambda g: g["method"] == "base")
    assert zero["win_rate"] == 0.5

    # w = (0, 1): adapter b's own customized policy on its own pairs, scored independently (no composition code)
    ev = PolicyEvaluator(tiny_model_dir)
    ev._load(dir_b)
    lc, lr, _, _ = ev.pair_scores(rows_b, A0, AT)
    assert only_b["pairs"]["b"]["pair_accuracy"] == metrics.mean(metrics.pair_outcomes(lc, lr))
    assert only_b["pairs"]["b"]["pair_margin"] == pytest.approx(metrics.mean([a - b for a, b in zip(lc, lr)]),
                                                                abs=1e-5)
    # w = (0, 0): the base sharpened by (1 + alpha_0) / alpha_tilde, on both pair sets (float64 reference)
    for name, rows in (("qadapter", rows_a), ("b", rows_b)):
        want = metrics.mean(_sharpened_base_margins(tiny_model_dir, rows))
        assert zero["pairs"][name]["pair_margin"] == pytest.approx(want, abs=1e-5), name
    assert len({round(r["pairs"]["b"]["pair_margin"], 6) for r in comp["rows"]}) == 4  # the weights matter

    rep = report_stage(cfg, {"evaluate": str(tmp_path / "e")}, str(tmp_path / "r"))
    md = (tmp_path / "r" / "report.md").read_text()
    table = md.split("## Composition")[1].split("\n## ")[0]
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(grid)  # header + one per row
    assert "pair_accuracy (b)" in table and "oracle win_rate" in table
    assert rep["plots"]["compose"] == "plots/compose.png" and (tmp_path / "r" / "plots" / "compose.png").stat().st_size
