"""pipelines/evaluate.py on a real local Ray (session fixture): tiny model, two saved adapters, tiny files."""
import json

import pytest
import torch

from qcore.config import QConfig, load_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

KEYS = {"pref_score", "win_rate", "probe_accuracy", "kl_to_base"}
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.", "What is 2 + 3?",
           "Describe the quick brown fox."]
PROBE = [{"question": "What is the capital of France?", "answer": "Paris"},
         {"question": "What is 1 + 1?", "answer": "2", "aliases": ["two"]},
         {"question": "Say yes.", "answer": ["yes", "y"]}]


def _save_adapter(base_dir, out, seed, q_cfg):
    from qcore.model import QAdapterModel

    model = QAdapterModel.from_pretrained(base_dir, q_cfg=q_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    return str(out)


def test_evaluate_stage(ray_session, tiny_model_dir, tmp_path):
    from pipelines.evaluate import evaluate_stage

    data = tmp_path / "data"
    data.mkdir()
    (data / "heldout_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (data / "probe.jsonl").write_text("".join(json.dumps(q) + "\n" for q in PROBE))
    adapters = {
        "qadapter": _save_adapter(tiny_model_dir, tmp_path / "qadapter", 1, QConfig(alpha_0=0.2, alpha_tilde=0.8)),
        "dpo": _save_adapter(tiny_model_dir, tmp_path / "dpo", 2, QConfig()),
    }
    dial = [{"alpha_0": 1.0, "alpha_tilde": 2.0}, {"alpha_0": 0.0, "alpha_tilde": 0.5},
            {"alpha_0": 0.2, "alpha_tilde": 0.8}]  # the last equals the trained setting: evaluated once
    cfg = load_config(None, {"model": {"path": tiny_model_dir},
                             "eval": {"max_prompts": 4, "max_new_tokens": 6, "batch_size": 4, "num_actors": 1,
                                      "dial": dial},
                             "run": {"name": "t", "storage_path": str(tmp_path / "runs")}})
    out_dir = tmp_path / "runs" / "t" / "evaluate"
    res = evaluate_stage(cfg, adapters, str(data), str(out_dir))

    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["methods"] == res["methods"] and on_disk["dial"] == res["dial"]
    methods = on_disk["methods"]
    assert set(methods) == {"base", "qadapter", "dpo"}
    for name, m in methods.items():
        assert KEYS <= set(m), name
        assert m["n_prompts"] == 4 and m["n_probe"] == 3
        assert 0.0 <= m["win_rate"] <= 1.0 and 0.0 <= m["probe_accuracy"] <= 1.0
    assert methods["base"]["win_rate"] == 0.5 and methods["base"]["kl_to_base"] == 0.0
    assert methods["base"]["kl_to_base_measured"] == pytest.approx(0.0, abs=1e-6)
    assert methods["qadapter"]["kl_to_base"] > 1e-4 and methods["dpo"]["kl_to_base"] > 1e-4
    assert (methods["qadapter"]["alpha_0"], methods["qadapter"]["alpha_tilde"]) == (0.2, 0.8)
    assert methods["dpo"]["objective"] == "dpo" and (methods["dpo"]["alpha_0"], methods["dpo"]["alpha_tilde"]) == (
        0.0, 1.0)  # a DPO adapter is the plain adapter-on policy

    assert [(d["alpha_0"], d["alpha_tilde"]) for d in on_disk["dial"]] == [(1.0, 2.0), (0.0, 0.5), (0.2, 0.8)]
    assert all(d["method"] == "qadapter" and KEYS <= set(d) for d in on_disk["dial"])
    kls = [d["kl_to_base"] for d in on_disk["dial"]]
    assert len(set(kls)) == 3  # distinct settings, distinct policies
    assert kls[2] == methods["qadapter"]["kl_to_base"]  # the same policy as the trained setting

    gens = [json.loads(x) for x in (out_dir / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 5 * (4 + 3)  # base, qadapter(=dial 3), dpo, dial 1, dial 2
    assert {g["kind"] for g in gens} == {"heldout", "probe"}

    # the Ray path generates exactly what QAdapterModel.generate does (first prompt, the Q-Adapter policy)
    from transformers import AutoTokenizer

    from qcore.data import encode_prompt
    from qcore.model import QAdapterModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=adapters["qadapter"], is_trainable=False)
    ids = torch.tensor([encode_prompt(PROMPTS[0], tok)])
    out = model.generate(ids, torch.ones_like(ids), max_new_tokens=6, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id) + 1]
    want = tok.decode(new, skip_special_tokens=True).strip()
    got = [g for g in gens if g["method"] == "qadapter" and g["alpha_0"] == 0.2 and g["kind"] == "heldout"
           and g["idx"] == 0]
    assert len(got) == 1 and got[0]["response"] == want


def test_build_policies_and_files(tiny_model_dir, tmp_path):
    """No Ray: policy list, dedup, objective inference, missing-file errors naming the config key."""
    from pipelines.evaluate import adapter_objective, build_policies, resolve_eval_files

    q = _save_adapter(tiny_model_dir, tmp_path / "a" / "adapter", 0, QConfig(alpha_0=0.05))
    cfg = load_config(None, {"eval": {"dial": [{"alpha_0": 0.05}, {"alpha_tilde": 3.0}]}})
    policies, entries = build_policies(cfg, {"qadapter": str(tmp_path / "a"), "sft_small": q})
    assert [e["name"] for e in entries] == ["base", "qadapter", "sft_small", "qadapter@a0=0.05,at=1",
                                           "qadapter@a0=0.05,at=3"]
    assert len(policies) == 4  # qadapter@a0=0.05,at=1 is the trained setting
    assert adapter_objective("sft_small", q) == "sft" and adapter_objective("mine", q) == "qadapter"
    with pytest.raises(FileNotFoundError, match="eval.prompts_file"):
        resolve_eval_files(load_config(None, {"eval": {"prompts_file": str(tmp_path / "none.jsonl")}}), None)
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
