"""pipelines/evaluate.py: the pairs judge against a float64 reference, policies, and the stage on a real local Ray
(session fixture) with a tiny model, saved adapters and a held-out pair split written as preprocess writes it."""
import json
import math

import pytest
import torch

from qcore.config import QConfig, load_config

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "What is 2 + 3?",
           "Describe the quick brown fox."]
PAIRS = [{"prompt": PROMPTS[0], "chosen": "Paris.", "rejected": "It is a city in Europe, I think, maybe Lyon."},
         {"prompt": PROMPTS[0], "chosen": "Paris is the capital.", "rejected": "London."},  # same prompt: 1 prompt
         {"prompt": PROMPTS[1], "chosen": "Waves roll in.", "rejected": "The sea the sea the sea the sea."},
         {"prompt": PROMPTS[2], "chosen": "5.", "rejected": "6."},
         {"prompt": PROMPTS[3], "chosen": "A fox jumps.", "rejected": "Foxes are animals of many kinds."}]


def _save_adapter(base_dir, out, seed, q_cfg, objective="qadapter"):
    from qcore.model import QAdapterModel

    model = QAdapterModel.from_pretrained(base_dir, q_cfg=q_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out, objective=objective)
    return str(out)


def _save_tiny_reward_model(out):
    """A tiny random Llama sequence classifier (1 label) with the tiny model's tokenizer: a local reward model."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from qcore.base_models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # O(1) rewards: answers get distinct scores
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _pair_rows(tokenizer):
    from qcore.data import tokenize_pair

    rows = []
    for i, p in enumerate(PAIRS):
        row = tokenize_pair(p, tokenizer, max_length=64, max_prompt_length=32)
        rows.append({"source": "t.jsonl", "row": i, "pair_index": 0, "prompt_json": json.dumps(p["prompt"]),
                     "chosen": p["chosen"], "rejected": p["rejected"], **row})
    return rows


def _write_split(rows, data_dir):
    """<data_dir>/eval as preprocess writes it: Parquet pair rows (shuffled: the stage orders them itself)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (data_dir / "eval").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[::-1]), data_dir / "eval" / "part-0.parquet")


def _reference_mean_logp(model64, ids, n_prompt, a0, at, use_base):
    """Mean over the response tokens of log pi(a_t | s_t), pi = softmax((Q + a0 log softmax(z)) / at), in float64,
    one unpadded sequence, a plain loop over positions and the vocabulary."""
    x = torch.tensor([ids])
    with torch.no_grad():
        q = model64.peft_model(input_ids=x).logits[0].tolist()
        with model64.adapter_disabled():
            z = model64.peft_model(input_ids=x).logits[0].tolist()
    total = 0.0
    for t in range(n_prompt - 1, len(ids) - 1):  # the state before each response token
        zmax = max(z[t])
        lse_z = math.log(sum(math.exp(v - zmax) for v in z[t])) + zmax
        qt = q[t] if use_base else z[t]  # the base policy: no adapter, the logits are z itself
        logits = [(qv + a0 * (zv - lse_z)) / at for qv, zv in zip(qt, z[t])]
        m = max(logits)
        lse = math.log(sum(math.exp(v - m) for v in logits)) + m
        total += logits[ids[t + 1]] - lse
    return total / (len(ids) - n_prompt)


def test_pair_scores_match_float64_reference(tiny_model_dir, tiny_tokenizer, tmp_path):
    """No Ray: the batched, padded, chunked pair scores equal a float64 loop, for a Q-Adapter at its alpha, a DPO
    adapter (softmax(Q), no base pass) and the base; plus accuracies that hold by construction."""
    from pipelines.evaluate import PolicyEvaluator
    from qcore import metrics
    from qcore.model import QAdapterModel

    q_dir = _save_adapter(tiny_model_dir, tmp_path / "q", 1, QConfig(alpha_0=0.2, alpha_tilde=0.8))
    rows = _pair_rows(tiny_tokenizer)
    ev = PolicyEvaluator(tiny_model_dir, chunk_size=3)
    for adapter, a0, at in ((q_dir, 0.2, 0.8), (q_dir, 0.0, 1.0), (None, 0.0, 1.0)):
        ev._load(adapter)
        lc, lr, nc, nr = ev.pair_scores(rows, a0, at)
        model64 = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=adapter, is_trainable=False).double()
        for i, r in enumerate(rows):
            n = r["prompt_length"]
            assert nc[i] == len(r["chosen_input_ids"]) - n and nr[i] == len(r["rejected_input_ids"]) - n
            for side, got in (("chosen", lc[i]), ("rejected", lr[i])):
                ref = _reference_mean_logp(model64, r[f"{side}_input_ids"], n, a0, at, adapter is not None)
                assert got == pytest.approx(ref, abs=2e-5), (adapter, a0, side, i)

    # By construction: one-token responses, chosen = the policy's most likely next token, rejected = its least
    # likely: accuracy 1; swapped: 0; identical responses: 0.5 (ties).
    ev._load(q_dir)
    model64 = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=q_dir, is_trainable=False).double()
    built = []
    for r in rows:
        prompt = r["chosen_input_ids"][: r["prompt_length"]]
        x = torch.tensor([prompt])
        with torch.no_grad():
            q = model64.peft_model(input_ids=x).logits[0, -1]
            with model64.adapter_disabled():
                z = model64.peft_model(input_ids=x).logits[0, -1]
        custom = (q + 0.2 * torch.log_softmax(z, -1)) / 0.8
        best, worst = int(custom.argmax()), int(custom.argmin())
        mask = [0] * len(prompt) + [1]
        built.append({"chosen_input_ids": prompt + [best], "chosen_response_mask": mask,
                      "rejected_input_ids": prompt + [worst], "rejected_response_mask": mask})
    lc, lr, _, _ = ev.pair_scores(built, 0.2, 0.8)
    assert metrics.mean(metrics.pair_outcomes(lc, lr)) == 1.0
    assert metrics.mean(metrics.pair_outcomes(lr, lc)) == 0.0
    same = [{**b, "rejected_input_ids": b["chosen_input_ids"]} for b in built]
    lc, lr, _, _ = ev.pair_scores(same, 0.2, 0.8)
    assert metrics.pair_outcomes(lc, lr) == [0.5] * len(same)


def test_shared_context_passes_equal_full_logits_path(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """No Ray: the pairs judge and lm-eval's log-likelihoods (shared prompt/context, head at the scored positions)
    give the full-logits path's numbers (the one a model without a plain linear head takes), float32 tiny model."""
    import qcore.fused
    from pipelines.evaluate import PolicyEvaluator
    from qcore.lm_eval_model import QAdapterLM

    q_dir = _save_adapter(tiny_model_dir, tmp_path / "q", 1, QConfig(alpha_0=0.2, alpha_tilde=0.8))
    rows = _pair_rows(tiny_tokenizer)
    ev = PolicyEvaluator(tiny_model_dir, chunk_size=3)
    ev._load(q_dir)
    lm = QAdapterLM(pretrained=tiny_model_dir, adapter=q_dir, batch_size=4)
    ctx = [tiny_tokenizer("Question: what is red?")["input_ids"], tiny_tokenizer("Say it.")["input_ids"]]
    answers = [ctx[0] + [7, 8], ctx[0] + [9], ctx[0] + [10, 11, 12], ctx[1] + [13, 14]]  # 3 share a context
    spans = [(len(ctx[i > 2]) - 1, len(a) - 1) for i, a in enumerate(answers)]
    got = {}
    for path in ("shared", "full"):
        if path == "full":
            monkeypatch.setattr(qcore.fused, "plain_lm_head", lambda _m: None)
        got[path] = (ev.pair_scores(rows, 0.2, 0.8), lm.custom_logprobs(answers, spans))
    (pairs_s, mc_s), (pairs_f, mc_f) = got["shared"], got["full"]
    assert pairs_s[2:] == pairs_f[2:]  # the response token counts
    for a, b in zip(pairs_s[:2], pairs_f[:2]):
        assert a == pytest.approx(b, abs=1e-5)
    for (lp_s, greedy_s), (lp_f, greedy_f) in zip(mc_s[0], mc_f[0]):
        assert lp_s.shape == lp_f.shape and torch.equal(greedy_s, greedy_f)
        torch.testing.assert_close(lp_s, lp_f, rtol=1e-5, atol=1e-5)


def test_build_policies_and_files(tiny_model_dir, tmp_path):
    """No Ray: policy list, dedup, the objective read from qadapter.json, errors naming the config key."""
    from pipelines.evaluate import adapter_objective, build_policies, resolve_prompts_file

    q = _save_adapter(tiny_model_dir, tmp_path / "a" / "adapter", 0, QConfig(alpha_0=0.05))
    s = _save_adapter(tiny_model_dir, tmp_path / "s", 0, QConfig(), objective="sft")
    cfg = load_config(None, {"eval": {"dial": [{"alpha_0": 0.05}, {"alpha_tilde": 3.0}]}})
    policies, entries = build_policies(cfg, {"qadapter": str(tmp_path / "a"), "small": s})
    assert [e["name"] for e in entries] == ["base", "qadapter", "small", "qadapter@a0=0.05,at=1",
                                           "qadapter@a0=0.05,at=3"]
    assert len(policies) == 4  # qadapter@a0=0.05,at=1 is the trained setting
    assert adapter_objective(s) == "sft" and adapter_objective(q) == "qadapter"
    small = next(p for p in policies if p["method"] == "small")
    assert (small["objective"], small["alpha_0"], small["alpha_tilde"]) == ("sft", 0.0, 1.0)  # softmax(Q)
    with pytest.raises(FileNotFoundError, match="eval.prompts_file"):
        resolve_prompts_file(str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="base"):
        build_policies(cfg, {"base": q})


def test_kl_recorded_during_generation_equals_scoring_forward(tiny_model_dir, tmp_path):
    """No Ray: the per-step KL recorded while generating equals a separate two-pass forward over prompt+answer."""
    from pipelines.evaluate import PolicyEvaluator

    adapter = _save_adapter(tiny_model_dir, tmp_path / "q", 3, QConfig(alpha_0=0.2, alpha_tilde=0.8))
    ev = PolicyEvaluator(tiny_model_dir, max_new_tokens=7)
    ev._load(adapter)
    a = ev.generate_and_kl(PROMPTS, 0.2, 0.8, want_kl=True, kl_mode="generation")
    b = ev.generate_and_kl(PROMPTS, 0.2, 0.8, want_kl=True, kl_mode="forward")
    assert a[0] == b[0] and a[2] == b[2] and sum(a[2]) > 0
    assert a[1] == pytest.approx(b[1], rel=1e-4, abs=1e-6) and min(a[1]) > 0
    assert "customized_logits" not in vars(ev.model)  # the recording hook is removed afterwards
    ev._load(None)  # the base policy: KL exactly 0
    texts, kls, counts = ev.generate_and_kl(PROMPTS, 0.0, 1.0, want_kl=True)
    assert kls == [0.0] * len(PROMPTS) and sum(counts) > 0


def test_all_policies_at_once_equal_one_at_a_time(tiny_model_dir, tiny_tokenizer, tmp_path):
    """No Ray: the stage's path (every policy of a batch at once, all adapters on one base) gives the per-policy
    path's numbers: pair scores bit for bit (the same forwards), answers token for token, KL within 1e-4."""
    from pipelines.evaluate import PolicyEvaluator

    q_dir = _save_adapter(tiny_model_dir, tmp_path / "q", 1, QConfig(alpha_0=0.2, alpha_tilde=0.8))
    d_dir = _save_adapter(tiny_model_dir, tmp_path / "d", 2, QConfig(), objective="dpo")
    policies = [{"policy_id": "p0", "adapter": None, "alpha_0": 0.0, "alpha_tilde": 1.0},
                {"policy_id": "p1", "adapter": q_dir, "alpha_0": 0.2, "alpha_tilde": 0.8},
                {"policy_id": "p2", "adapter": d_dir, "alpha_0": 0.0, "alpha_tilde": 1.0},
                {"policy_id": "p3", "adapter": q_dir, "alpha_0": 1.0, "alpha_tilde": 2.0}]
    rows = _pair_rows(tiny_tokenizer)
    together = PolicyEvaluator(tiny_model_dir, max_new_tokens=9, chunk_size=3, policies=policies)
    pairs_all, answers_all = together.pair_scores_all(rows), together.generate_all(PROMPTS)
    assert together.loads == 1  # one model for every policy
    alone = PolicyEvaluator(tiny_model_dir, max_new_tokens=9, chunk_size=3)
    for pol, pairs, (texts, kls, counts) in zip(policies, pairs_all, answers_all):
        alone._load(pol["adapter"])
        assert pairs == alone.pair_scores(rows, pol["alpha_0"], pol["alpha_tilde"]), pol["policy_id"]
        t1, k1, c1 = alone.generate_and_kl(PROMPTS, pol["alpha_0"], pol["alpha_tilde"], want_kl=True)
        assert (texts, counts) == (t1, c1), pol["policy_id"]
        assert kls == pytest.approx(k1, rel=1e-4, abs=1e-6), pol["policy_id"]
    assert answers_all[0][1] == [0.0] * len(PROMPTS) and min(answers_all[1][1]) > 0
    assert len({tuple(a[0]) for a in answers_all}) > 1  # the policies answer differently
    # the Ray Data call: item rows in, one row per policy and item out
    import pandas as pd

    df = pd.DataFrame([{"kind": "pairs", "idx": i, "prompt_json": r["prompt_json"],
                        **{c: r[c] for c in ("chosen_input_ids", "chosen_response_mask", "rejected_input_ids",
                                             "rejected_response_mask")}} for i, r in enumerate(rows)])
    got = together(df)
    assert len(got) == len(rows) * len(policies)
    p3 = got[got.policy_id == "p3"].sort_values("idx")
    assert list(p3.logp_chosen) == pairs_all[3][0]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_evaluate_stage(ray_session, tiny_model_dir, tiny_tokenizer, tmp_path):
    from pipelines.evaluate import PolicyEvaluator, evaluate_stage
    from qcore import metrics

    rows = _pair_rows(tiny_tokenizer)
    data = tmp_path / "pre"
    _write_split(rows, data)
    adapters = {
        "qadapter": _save_adapter(tiny_model_dir, tmp_path / "qadapter", 1, QConfig(alpha_0=0.2, alpha_tilde=0.8)),
        "dpo": _save_adapter(tiny_model_dir, tmp_path / "dpo", 2, QConfig(), objective="dpo"),
    }
    dial = [{"alpha_0": 1.0, "alpha_tilde": 2.0}, {"alpha_0": 0.2, "alpha_tilde": 0.8}]  # the last = trained
    rm_dir = _save_tiny_reward_model(tmp_path / "rm")
    cfg = load_config(None, {"model": {"path": tiny_model_dir},
                             "eval": {"judges": ["pairs", "oracle", "reward_model", "llm_judge"], "max_pairs": 4,
                                      "max_new_tokens": 6, "batch_size": 3, "num_actors": 1, "dial": dial,
                                      "bootstrap_samples": 200, "reward_model": rm_dir, "judge_model": tiny_model_dir,
                                      "judge_criterion": "concise"},
                             "run": {"name": "t", "storage_path": str(tmp_path / "runs")}})
    out_dir = tmp_path / "runs" / "t" / "evaluate"
    res = evaluate_stage(cfg, adapters, str(data), str(out_dir))

    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["methods"] == res["methods"] and on_disk["dial"] == res["dial"]
    methods = on_disk["methods"]
    assert set(methods) == {"base", "qadapter", "dpo"}
    assert on_disk["preference_key"] == "pair_accuracy" and on_disk["n_pairs"] == 4
    # held-out prompts: the distinct prompts of the run's own eval split (no prompts_file), never a repo file
    assert on_disk["n_prompts"] == 4 and "eval split" in on_disk["prompts_source"]
    assert any("eval.lm_eval.tasks" in n for n in on_disk["notes"])  # a missing setting: one line
    for name, m in methods.items():
        for key in ("pair_accuracy", "pair_margin", "pref_score", "win_rate", "kl_to_base"):
            ci = m["ci"][key]
            assert ci["low"] <= m[key] <= ci["high"], (name, key)
        assert m["ci"]["pair_accuracy"]["n"] == 4 and m["ci"]["win_rate"]["n"] == 4
        if name != "base":
            assert set(m["vs_base"]) >= {"pair_accuracy", "pair_margin", "pref_score", "win_rate"}
            assert isinstance(m["vs_base"]["pair_accuracy"]["within_noise"], bool)
    assert methods["base"]["win_rate"] == 0.5 and methods["base"]["kl_to_base"] == 0.0
    assert "vs_base" not in methods["base"] or not methods["base"]["vs_base"]
    assert methods["qadapter"]["kl_to_base"] > 1e-4 and methods["dpo"]["kl_to_base"] > 1e-4
    assert (methods["qadapter"]["alpha_0"], methods["qadapter"]["alpha_tilde"]) == (0.2, 0.8)
    assert methods["dpo"]["objective"] == "dpo" and (methods["dpo"]["alpha_0"], methods["dpo"]["alpha_tilde"]) == (
        0.0, 1.0)

    # the pairs columns are what PolicyEvaluator.pair_scores gives on the first max_pairs pairs in (source, row)
    ev = PolicyEvaluator(tiny_model_dir)
    ev._load(adapters["qadapter"])
    lc, lr, _, _ = ev.pair_scores(rows[:4], 0.2, 0.8)
    assert methods["qadapter"]["pair_accuracy"] == metrics.mean(metrics.pair_outcomes(lc, lr))
    assert methods["qadapter"]["pair_margin"] == pytest.approx(metrics.mean([a - b for a, b in zip(lc, lr)]),
                                                               abs=1e-6)

    assert [(d["alpha_0"], d["alpha_tilde"]) for d in on_disk["dial"]] == [(1.0, 2.0), (0.2, 0.8)]
    assert on_disk["dial"][1]["pair_margin"] == methods["qadapter"]["pair_margin"]  # the same policy, once
    assert on_disk["dial"][0]["pair_margin"] != methods["qadapter"]["pair_margin"]

    gens = [json.loads(x) for x in (out_dir / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 4 * 4  # base, qadapter (= dial 2), dpo, dial 1 x 4 prompts
    scores = [json.loads(x) for x in (out_dir / "pair_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4 * 4

    # the answer judges: each policy's answer to prompt i scored / compared with the base's answer to prompt i
    from qcore.judges import LLMJudge, RewardModelJudge

    by = {}
    for g in gens:
        by.setdefault(tuple(g["policy"]), {})[g["idx"]] = g
    base_answers = [by[("base",)][i]["response"] for i in range(4)]
    q_answers = [by[("qadapter", "qadapter@a0=0.2,at=0.8")][i]["response"] for i in range(4)]
    rm = RewardModelJudge(rm_dir)
    r_base, r_q = rm.score(PROMPTS, base_answers), rm.score(PROMPTS, q_answers)
    assert methods["qadapter"]["rm_reward"] == pytest.approx(metrics.mean(r_q), abs=1e-5)
    assert methods["base"]["rm_reward"] == pytest.approx(metrics.mean(r_base), abs=1e-5)
    assert methods["qadapter"]["rm_win_rate"] == metrics.win_rate(r_q, r_base) and methods["base"]["rm_win_rate"] == 0.5
    assert [g["score_reward_model"] for g in gens if g["policy"] == ["base"]] == pytest.approx(r_base, abs=1e-5)
    judged = LLMJudge("concise", model_dir=tiny_model_dir).compare(PROMPTS, q_answers, base_answers)
    assert methods["qadapter"]["judge_win_rate"] == metrics.mean(judged)
    assert methods["base"]["judge_win_rate"] == 0.5 and 0 <= methods["dpo"]["judge_consistency"] <= 1
    for key in ("rm_reward", "rm_win_rate", "judge_win_rate"):
        assert methods["dpo"]["ci"][key]["n"] == 4 and key in methods["dpo"]["vs_base"]

    # the Ray path generates exactly what QAdapterModel.generate does (first prompt, the Q-Adapter policy)
    from qcore.data import encode_prompt

    ids = torch.tensor([encode_prompt(PROMPTS[0], tiny_tokenizer)])
    out = ev.model.generate(ids, torch.ones_like(ids), max_new_tokens=6, eos_token_id=tiny_tokenizer.eos_token_id,
                            pad_token_id=tiny_tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tiny_tokenizer.eos_token_id in new:
        new = new[: new.index(tiny_tokenizer.eos_token_id) + 1]
    want = tiny_tokenizer.decode(new, skip_special_tokens=True).strip()
    got = [g for g in gens if g["method"] == "qadapter" and g["alpha_0"] == 0.2 and g["idx"] == 0]
    assert len(got) == 1 and got[0]["response"] == want and got[0]["prompt"] == PROMPTS[0]



@pytest.mark.ray
@pytest.mark.timeout(600)
def test_evaluate_pairs_only_with_lm_eval(ray_session, tiny_model_dir, tiny_tokenizer, tmp_path):
    """judges [pairs]: nothing is generated; lm-eval (the shipped probe MC task) gives scores and retention."""
    from pipelines.evaluate import evaluate_stage
    from qcore import metrics

    data = tmp_path / "pre"
    _write_split(_pair_rows(tiny_tokenizer), data)
    dpo = _save_adapter(tiny_model_dir, tmp_path / "dpo", 2, QConfig(), objective="dpo")
    cfg = load_config(None, {"model": {"path": tiny_model_dir},
                             "eval": {"judges": ["pairs"], "batch_size": 8, "bootstrap_samples": 100,
                                      "lm_eval": {"tasks": ["qadapter_probe_mc"], "limit": 6, "batch_size": 8}},
                             "run": {"name": "t", "storage_path": str(tmp_path / "runs")}})
    res = evaluate_stage(cfg, {"dpo": dpo}, str(data), str(tmp_path / "e"))
    assert res["n_prompts"] == 0 and res["generations_path"] is None
    assert not (tmp_path / "e" / "generations.jsonl").exists()
    assert res["n_pairs"] == 5  # max_pairs 200: the whole split
    m, base = res["methods"]["dpo"], res["methods"]["base"]
    assert "win_rate" not in m and "kl_to_base" not in m and m["ci"]["pair_accuracy"]["n"] == 5
    assert not any("lm_eval" in n for n in res["notes"]) and res["capability_key"] == "retention"
    t, tb = m["lm_eval"]["qadapter_probe_mc"], base["lm_eval"]["qadapter_probe_mc"]
    assert t["n"] == tb["n"] == 6 and t["metric"] == tb["metric"] and t["low"] <= t["value"] <= t["high"]
    assert tb["value"] > 0, "pick items the tiny base gets some of (retention needs a base score)"
    assert (base["retention"], base["ci"]["retention"]["low"]) == (1.0, 1.0)  # the base against itself
    assert m["retention"] == pytest.approx(t["value"] / tb["value"])
    assert m["ci"]["retention"]["n"] == 6 and "retention" in m["vs_base"]
    items = json.loads((tmp_path / "e" / "lm_eval" / "p1" / "results.json").read_text())["summary"]
    assert metrics.mean(items["qadapter_probe_mc"]["items"]) == pytest.approx(t["value"])
