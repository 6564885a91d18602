"""The lm-eval model type "qadapter" on local tasks (tests/data/*.yaml + jsonl; no downloads), tiny model.

Loglikelihoods are checked against an independent float64 computation of the customized policy
(plain transformers + peft, no qcore code); generations against QAdapterModel.generate.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data"
ALPHA_0, ALPHA_TILDE = 0.3, 0.7  # the adapter's trained values (qadapter.json): far from (0, 1) on purpose


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A saved Q-Adapter with non-zero LoRA B (so Q != z_base) and a non-trivial QConfig."""
    from qcore.config import QConfig
    from qcore.model import QAdapterModel

    model = QAdapterModel.from_pretrained(tiny_model_dir, q_cfg=QConfig(alpha_0=ALPHA_0, alpha_tilde=ALPHA_TILDE))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = tmp_path_factory.mktemp("lm_eval") / "adapter"
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, adapter_dir):
    """One simple_evaluate over the three local tasks (loglikelihood, generate_until, loglikelihood_rolling)."""
    import qcore.lm_eval_model  # noqa: F401 - registers "qadapter"
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(DATA)  # the task YAMLs name their data_files relative to the working directory
    try:
        res = lm_eval.simple_evaluate(
            model="qadapter", model_args={"pretrained": tiny_model_dir, "adapter": adapter_dir, "batch_size": 2},
            tasks=["qadapter_tiny_mc", "qadapter_tiny_gen", "qadapter_tiny_text"],
            task_manager=TaskManager(include_path=str(DATA), include_defaults=False),
            log_samples=True, bootstrap_iters=0)
    finally:
        os.chdir(cwd)
    return res


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dir):
    """pi_custom in float64 from plain transformers + peft: returns f(token ids, n_scored) -> sum log-prob."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def logprob(ids, n_scored):
        x = torch.tensor([ids[:-1]])
        with torch.no_grad():
            q = model(input_ids=x).logits[0].double()
            with model.disable_adapter():
                z = model(input_ids=x).logits[0].double()
        custom = (q + ALPHA_0 * torch.log_softmax(z, dim=-1)) / ALPHA_TILDE
        lp = torch.log_softmax(custom, dim=-1)
        total = 0.0
        for pos in range(len(ids) - 1 - n_scored, len(ids) - 1):
            total += float(lp[pos, ids[pos + 1]])
        return total

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    return logprob, encode, tok


def test_loglikelihood_matches_float64_reference(evaluated, reference):
    logprob, encode, _ = reference
    samples = evaluated["samples"]["qadapter_tiny_mc"]
    assert len(samples) == 3
    n = 0
    for s in samples:
        for (context, continuation), (got, _greedy) in zip(s["arguments"], s["filtered_resps"]):
            whole = encode(context + continuation)
            n_cont = len(whole) - len(encode(context))
            assert n_cont >= 1
            assert got == pytest.approx(logprob(whole, n_cont), abs=2e-4, rel=1e-5), (context, continuation)
            n += 1
    assert n == 8
    assert "acc,none" in evaluated["results"]["qadapter_tiny_mc"]


def test_loglikelihood_rolling_matches_reference(evaluated, reference, tiny_model_dir):
    logprob, encode, tok = reference
    samples = evaluated["samples"]["qadapter_tiny_text"]
    assert len(samples) == 2
    for s in samples:
        (text,) = s["arguments"][0]
        ids = [tok.bos_token_id] + encode(text)  # one window: the prefix token, then every token scored
        assert s["filtered_resps"][0] == pytest.approx(logprob(ids, len(ids) - 1), abs=5e-4, rel=1e-5)


def test_generate_until_equals_qadapter_generate(evaluated, tiny_model_dir, adapter_dir):
    from transformers import AutoTokenizer

    from qcore.model import QAdapterModel

    model = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=adapter_dir, is_trainable=False).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    samples = evaluated["samples"]["qadapter_tiny_gen"]
    assert len(samples) == 3
    for s in samples:
        context, gen_kwargs = s["arguments"][0]
        ids = torch.tensor([tok(context, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, torch.ones_like(ids), max_new_tokens=gen_kwargs["max_gen_toks"], do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        text = tok.decode(new, skip_special_tokens=True)
        for stop in gen_kwargs["until"]:
            text = text.split(stop)[0]
        assert s["filtered_resps"][0] == text


def test_model_args_and_base_policy(tiny_model_dir, adapter_dir):
    """Dial overrides from model_args; without an adapter the model is the base policy (alpha_0 0, alpha_tilde 1)."""
    from lm_eval.api.registry import get_model

    import qcore.lm_eval_model  # noqa: F401

    cls = get_model("qadapter")
    lm = cls.create_from_arg_string(f"pretrained={tiny_model_dir},adapter={adapter_dir},alpha_0=0.05,alpha_tilde=2")
    assert (lm.alpha_0, lm.alpha_tilde) == (0.05, 2.0)
    base = cls.create_from_arg_string(f"pretrained={tiny_model_dir}")
    assert (base.alpha_0, base.alpha_tilde) == (0.0, 1.0)
    # the base policy's scores are plain log_softmax of the base model's logits
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    ids = base.tok_encode("The quick brown fox jumps")
    ((got, _),) = base._loglikelihood_tokens([(None, ids[:2], ids[2:])])
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), -1)
    ref = sum(float(lp[p, ids[p + 1]]) for p in range(1, len(ids) - 1))
    assert got == pytest.approx(ref, abs=1e-4)


@pytest.mark.slow
def test_cli_entry_point(tiny_model_dir, adapter_dir, tmp_path):
    """`python -m qcore.lm_eval_model --model qadapter ...` runs lm-eval's CLI with the model registered."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "qcore.lm_eval_model", "--model", "qadapter",
           "--model_args", f"pretrained={tiny_model_dir},adapter={adapter_dir},batch_size=2",
           "--tasks", "qadapter_tiny_mc", "--include_path", str(DATA), "--limit", "2",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=DATA, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "qadapter_tiny_mc" in proc.stdout and "acc" in proc.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))
