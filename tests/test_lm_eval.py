"""The lm-eval model type "qadapter" on local tasks (tests/data/*.yaml + jsonl; no downloads), tiny model;
the shipped probe tasks (data/lm_eval) and pipelines/forgetting.lm_eval_policies on a real local Ray.

Loglikelihoods are checked against an independent float64 computation of the customized policy
(plain transformers + peft, no qcore code); generations against QAdapterModel.generate; the probe's answer check
against the matching rule written plainly here.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data"
TASKS = Path(__file__).resolve().parent.parent / "data" / "lm_eval"
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
    model.save_pretrained(out.parent / "dpo_adapter", objective="dpo")  # same weights, recorded as DPO
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

    def logprob(ids, n_scored, alpha_0=ALPHA_0, alpha_tilde=ALPHA_TILDE):
        x = torch.tensor([ids[:-1]])
        with torch.no_grad():
            q = model(input_ids=x).logits[0].double()
            with model.disable_adapter():
                z = model(input_ids=x).logits[0].double()
        custom = (q + alpha_0 * torch.log_softmax(z, dim=-1)) / alpha_tilde
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
        # one window: the prefix token (the tiny tokenizer adds no BOS: EOS), then every token scored
        ids = [tok.eos_token_id] + encode(text)
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
    trained = cls.create_from_arg_string(f"pretrained={tiny_model_dir},adapter={adapter_dir}")
    assert (trained.alpha_0, trained.alpha_tilde, trained.need_base) == (ALPHA_0, ALPHA_TILDE, True)
    # a DPO adapter (objective in qadapter.json) is softmax(Q), whatever QConfig it was saved with
    dpo = cls.create_from_arg_string(f"pretrained={tiny_model_dir},adapter={Path(adapter_dir).parent / 'dpo_adapter'}")
    assert (dpo.alpha_0, dpo.alpha_tilde, dpo.need_base) == (0.0, 1.0, False)
    # the base policy's scores are plain log_softmax of the base model's logits
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    ids = base.tok_encode("The quick brown fox jumps")
    ((got, _),) = base._loglikelihood_tokens([(None, ids[:2], ids[2:])])
    with torch.no_grad():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), -1)
    ref = sum(float(lp[p, ids[p + 1]]) for p in range(1, len(ids) - 1))
    assert got == pytest.approx(ref, abs=1e-4)


def test_policies_on_one_model_equal_each_policy_alone(tiny_model_dir, adapter_dir):
    """QAdapterLM.for_policies (the evaluate stage's lm-eval path: every policy on one model, each request list
    computed for all at once and cached): per item the same loglikelihoods bit for bit and the same answers as a
    one-policy QAdapterLM each, and the second policy's simple_evaluate runs no forward at all."""
    from lm_eval.tasks import TaskManager

    from qcore.lm_eval_model import QAdapterLM

    dpo = str(Path(adapter_dir).parent / "dpo_adapter")
    policies = [(None, 0.0, 1.0), (adapter_dir, ALPHA_0, ALPHA_TILDE), (dpo, 0.0, 1.0), (adapter_dir, 0.0, 2.0)]
    views = QAdapterLM.for_policies(tiny_model_dir, policies, batch_size=2)
    calls = []
    hook = views[0].model.peft_model.register_forward_hook(lambda *a: calls.append(1))
    tasks = ["qadapter_tiny_mc", "qadapter_tiny_gen", "qadapter_tiny_text"]
    tm = TaskManager(include_path=str(DATA), include_defaults=False)

    def run(lm):
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True, bootstrap_iters=0)
        return {t: [s["filtered_resps"] for s in res["samples"][t]] for t in tasks}

    cwd = os.getcwd()
    os.chdir(DATA)
    try:
        together, forwards = [], []
        for view in views:
            together.append(run(view))
            forwards.append(len(calls))
        hook.remove()
        for (adapter, a0, at), got in zip(policies, together):
            alone = QAdapterLM(pretrained=tiny_model_dir, adapter=adapter, alpha_0=a0, alpha_tilde=at, batch_size=2)
            assert got == run(alone), (adapter, a0, at)
    finally:
        os.chdir(cwd)
    assert forwards[0] > 0 and forwards[1:] == [forwards[0]] * 3  # policies 2..4: all from the cache
    assert together[1]["qadapter_tiny_mc"] != together[0]["qadapter_tiny_mc"]  # the policies do differ
    assert together[3]["qadapter_tiny_mc"] != together[1]["qadapter_tiny_mc"]


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


# ------------------------------------------------------------------------------------------------------------------
# The shipped probe tasks (data/lm_eval)
# ------------------------------------------------------------------------------------------------------------------
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def plain_words(text):
    """The probe's normalization, written plainly: accents off, lowercase, & -> and, 1,000 -> 1000, non-alphanumerics
    -> spaces, articles dropped, number words -> digits."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower().replace("&", " and "))
    words = re.sub(r"[^0-9a-z]+", " ", text).split()
    return [str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w for w in words if w not in ("a", "an", "the")]


def plain_scores(text, accepted):
    """(exact_match, answer_match) for a generated answer and the accepted answers."""
    words = plain_words(text)
    exact = match = 0.0
    for answer in accepted:
        gold = plain_words(answer)
        if not gold:
            continue
        if words == gold:
            exact = 1.0
        if any(words[i:i + len(gold)] == gold for i in range(len(words) - len(gold) + 1)):
            match = 1.0
    return exact, match


def load_task_utils():
    spec = importlib.util.spec_from_file_location("qadapter_lm_eval_utils", TASKS / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_answer_rule_hand_cases():
    """process_gen against hand-checked cases and the plain rule above."""
    utils = load_task_utils()
    cases = [  # (answer text, accepted answers, exact_match, answer_match)
        ("The capital is Amsterdam.", ["Amsterdam"], 0.0, 1.0),
        ("Amsterdam!", ["Amsterdam"], 1.0, 1.0),
        ("Amsterdamned", ["Amsterdam"], 0.0, 0.0),  # whole words only
        ("Insects have six legs.", ["6", "six"], 0.0, 1.0),
        ("CO2", ["carbon dioxide", "CO2"], 1.0, 1.0),
        ("  the Bogotá ", ["Bogota"], 1.0, 1.0),  # accents, articles, spaces
        ("New  Delhi", ["New Delhi", "Delhi"], 1.0, 1.0),
        ("", ["Paris"], 0.0, 0.0),
        ("I think it is Paris or Rome", ["Rome"], 0.0, 1.0),
    ]
    for text, accepted, exact, match in cases:
        doc = {"answer": accepted[0], "aliases": accepted[1:]}
        assert utils.process_gen(doc, [text]) == {"exact_match": exact, "answer_match": match}, text
        assert plain_scores(text, accepted) == (exact, match), text
    docs = utils.probe_docs()
    assert len(docs) == 150 and docs[1]["answer"] == "carbon dioxide" and docs[1]["aliases"] == ["CO2"]


def test_probe_mc_file_is_generated_and_sound():
    """probe_mc.jsonl is what make_probe_mc.py makes; 4 distinct choices, gold at label, no distractor that an
    accepted answer matches, distractors are answers of other questions of the same kind."""
    sys.path.insert(0, str(TASKS))
    try:
        spec = importlib.util.spec_from_file_location("make_probe_mc", TASKS / "make_probe_mc.py")
        maker = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(maker)
    finally:
        sys.path.remove(str(TASKS))
    docs = maker.probe_docs()
    committed = [json.loads(line) for line in (TASKS / "probe_mc.jsonl").read_text().splitlines()]
    assert committed == maker.build(docs), "rerun python data/lm_eval/make_probe_mc.py"
    first_answers = {}
    for d in docs:
        kind = "number" if d["answer"].isdigit() else d["category"]
        first_answers.setdefault(kind, set()).add(d["answer"])
    for doc, row in zip(docs, committed):
        assert row["question"] == doc["question"] and len(row["choices"]) == 4
        assert len({tuple(plain_words(c)) for c in row["choices"]}) == 4
        assert row["choices"][row["label"]] == doc["answer"]
        kind = "number" if doc["answer"].isdigit() else doc["category"]
        for j, choice in enumerate(row["choices"]):
            if j == row["label"]:
                continue
            assert choice in first_answers[kind], (row, choice)
            assert plain_scores(choice, [doc["answer"], *doc["aliases"]]) == (0.0, 0.0), (row, choice)


@pytest.fixture(scope="module")
def probe_evaluated(tiny_model_dir, adapter_dir):
    """The shipped tasks through lm_eval itself (chat template: the tiny tokenizer has ChatML), 4 items each."""
    import qcore.lm_eval_model  # noqa: F401
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="qadapter", model_args={"pretrained": tiny_model_dir, "adapter": adapter_dir, "batch_size": 2},
        tasks=["qadapter_probe_gen", "qadapter_probe_mc"], limit=4, apply_chat_template=True,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), log_samples=True,
        bootstrap_iters=0)


def test_probe_gen_matches_plain_recheck(probe_evaluated, tiny_model_dir, adapter_dir):
    from transformers import AutoTokenizer

    from qcore.model import QAdapterModel

    samples = probe_evaluated["samples"]["qadapter_probe_gen"]
    assert [s["doc_id"] for s in samples] == [0, 1, 2, 3]
    model = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=adapter_dir, is_trainable=False).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for s in samples:
        context, gen_kwargs = s["arguments"][0]
        assert context.startswith("<|im_start|>user\nQuestion: ") and context.endswith("<|im_start|>assistant\n")
        assert gen_kwargs["max_gen_toks"] == 32 and gen_kwargs["until"] == ["\n"]
        ids = torch.tensor([tok(context, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        text = tok.decode(new, skip_special_tokens=True).split("\n")[0]
        assert s["filtered_resps"][0] == text
        exact, match = plain_scores(text, [s["doc"]["answer"], *s["doc"]["aliases"]])
        assert (s["exact_match"], s["answer_match"]) == (exact, match)
    row = probe_evaluated["results"]["qadapter_probe_gen"]
    assert row["answer_match,none"] == pytest.approx(sum(s["answer_match"] for s in samples) / 4)


def test_probe_mc_acc_matches_float64_reference(probe_evaluated, reference):
    logprob, encode, _ = reference
    samples = probe_evaluated["samples"]["qadapter_probe_mc"]
    assert len(samples) == 4
    for s in samples:
        choices = s["doc"]["choices"]
        lls = []
        for (context, continuation), (got, _greedy), choice in zip(s["arguments"], s["filtered_resps"], choices):
            assert continuation == choice  # chat template: no target delimiter
            # lm-eval moves the context's trailing whitespace (the "\n" after the assistant header) into the
            # continuation: that token is scored too (the same term for every choice)
            stripped = context.rstrip()
            assert stripped != context
            whole = encode(context + continuation)
            n_cont = len(whole) - len(encode(stripped))
            lls.append(logprob(whole, n_cont))
            assert got == pytest.approx(lls[-1], abs=2e-4, rel=1e-5)
        best = max(range(len(lls)), key=lambda j: lls[j])
        best_norm = max(range(len(lls)), key=lambda j: lls[j] / len(choices[j]))
        assert s["acc"] == float(best == s["target"])
        assert s["acc_norm"] == float(best_norm == s["target"])
    for metric in ("acc", "acc_norm"):
        assert probe_evaluated["results"]["qadapter_probe_mc"][f"{metric},none"] == pytest.approx(
            sum(s[metric] for s in samples) / 4)


# ------------------------------------------------------------------------------------------------------------------
# BOS: once where the tokenizer adds one, never twice, none where it adds none
# ------------------------------------------------------------------------------------------------------------------
BOS_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bos_model_dir(tiny_model_dir, out, chat_template):
    """The tiny model with a tokenizer that adds a BOS (<|endoftext|>, an existing id) when encoding."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    out.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model_dir) / name, out / name)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.bos_token = "<|endoftext|>"
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                       special_tokens=[("<|endoftext|>", bos)])
    tok.chat_template = chat_template
    tok.save_pretrained(out)
    return str(out), bos


def scored_contexts(model_dir, apply_chat_template):
    """Every token sequence the model scores or generates from, on both probe tasks (2 items each) + a rolling
    log-likelihood request."""
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from qcore.lm_eval_model import QAdapterLM

    lm = QAdapterLM(pretrained=model_dir, batch_size=2)
    seen = []
    score, generate = lm.custom_logprobs, lm.model.generate

    def recording_score(sequences, spans):
        seen.extend(list(s) for s in sequences)
        return score(sequences, spans)

    def recording_generate(input_ids, attention_mask, **kw):
        seen.extend(row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask))
        return generate(input_ids, attention_mask, **kw)

    lm.custom_logprobs, lm.model.generate = recording_score, recording_generate
    lm_eval.simple_evaluate(model=lm, tasks=["qadapter_probe_gen", "qadapter_probe_mc"], limit=2,
                            apply_chat_template=apply_chat_template, bootstrap_iters=0,
                            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    n_tasks = len(seen)
    lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("one two three",), 0)])
    assert len(seen) == n_tasks + 1
    return lm, seen


def test_bos_once_without_template(tiny_model_dir, tmp_path):
    from qcore.data import expected_bos

    model_dir, bos = bos_model_dir(tiny_model_dir, tmp_path / "bos", None)
    lm, seen = scored_contexts(model_dir, apply_chat_template=False)
    assert expected_bos(lm.tokenizer) == bos == lm.prefix_token_id
    assert len(seen) == 2 + 2 * 4 + 1  # 2 generations, 2 x 4 choices, 1 rolling window
    for seq in seen:
        assert seq[0] == bos and seq[1] != bos and bos not in seq[1:], seq


def test_bos_once_with_a_template_that_writes_it(tiny_model_dir, tmp_path):
    model_dir, bos = bos_model_dir(tiny_model_dir, tmp_path / "bos_chat", BOS_CHAT_TEMPLATE)
    _, seen = scored_contexts(model_dir, apply_chat_template=True)
    for seq in seen:
        assert seq[0] == bos and seq[1] != bos and bos not in seq[1:], seq


def test_no_bos_added_where_the_tokenizer_adds_none(tiny_model_dir):
    """The tiny ChatML tokenizer adds nothing: what is scored is exactly the rendered text's tokens."""
    lm, seen = scored_contexts(tiny_model_dir, apply_chat_template=True)
    assert lm.prefix_token_id == lm.tokenizer.eos_token_id
    tok = lm.tokenizer
    start = tok("<|im_start|>user\nQuestion:", add_special_tokens=False)["input_ids"]
    for seq in seen[:-1]:
        assert seq[: len(start)] == start, seq  # the template's own first tokens, nothing before them
    assert seen[-1] == [tok.eos_token_id] + tok("one two three", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------------------------
# pipelines/forgetting.py
# ------------------------------------------------------------------------------------------------------------------
def forgetting_cfg(**lm_eval_keys):
    from qcore.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml", {"model": {"path": "tiny"}})
    for key, value in lm_eval_keys.items():
        setattr(cfg.eval.lm_eval, key, value)
    return cfg


def test_forgetting_config_errors_name_the_key(tmp_path):
    from pipelines.forgetting import lm_eval_policies

    base = [{"policy_id": "p0", "method": "base", "adapter": None, "alpha_0": 0.0, "alpha_tilde": 1.0,
             "objective": "base"}]
    cfg = forgetting_cfg(tasks=["qadapter_probe_gen"], task_limits={"qadapter_probe_mc": 3})
    with pytest.raises(ValueError, match="eval.lm_eval.task_limits.qadapter_probe_mc"):
        lm_eval_policies(cfg, base, str(tmp_path))
    cfg = forgetting_cfg(tasks=["qadapter_probe_gen"], include_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="eval.lm_eval.include_path"):
        lm_eval_policies(cfg, base, str(tmp_path))
    dpo = [{**base[0], "method": "dpo", "adapter": "x", "alpha_0": 0.01, "objective": "dpo"}]
    with pytest.raises(ValueError, match="softmax"):
        lm_eval_policies(forgetting_cfg(tasks=["qadapter_probe_gen"]), dpo, str(tmp_path))
    assert lm_eval_policies(forgetting_cfg(tasks=[]), base, str(tmp_path)) == {}


def test_hub_task_offline_fails_naming_the_task(tmp_path):
    """A task whose dataset is on the hub: one error naming the task (HF_HUB_OFFLINE=1), no crash elsewhere."""
    from pipelines.forgetting import evaluate_policy

    (tmp_path / "hub_task.yaml").write_text(
        "task: needs_the_hub\ndataset_path: someone/not-downloaded-dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n")
    cfg = forgetting_cfg(tasks=["needs_the_hub"], include_path=str(tmp_path), limit=2)
    policy = {"policy_id": "p0", "method": "base", "adapter": None, "alpha_0": 0.0, "alpha_tilde": 1.0,
              "objective": "base"}
    with pytest.raises(RuntimeError, match="lm-eval task 'needs_the_hub'.*HF_HUB_OFFLINE"):
        evaluate_policy(cfg, policy, 1, "cpu")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_lm_eval_policies_on_ray(ray_session, adapter_dir, reference, tmp_path):
    """Base + the adapter + one dial point as Ray tasks: per-item lists of the limit's length whose mean is the
    reported value; artifacts per policy; the dial's alphas reach the model (float64 reference)."""
    from pipelines.forgetting import lm_eval_policies

    logprob, encode, _ = reference
    cfg = forgetting_cfg(tasks=["qadapter_probe_gen", "qadapter_probe_mc"], limit=3,
                         task_limits={"qadapter_probe_mc": 4}, batch_size=4)
    policies = [
        {"policy_id": "p0", "method": "base", "adapter": None, "alpha_0": 0.0, "alpha_tilde": 1.0, "objective": "base"},
        {"policy_id": "p1", "method": "qadapter", "adapter": adapter_dir, "alpha_0": ALPHA_0,
         "alpha_tilde": ALPHA_TILDE, "objective": "qadapter"},
        {"policy_id": "p2", "method": "qadapter", "adapter": adapter_dir, "alpha_0": 0.0, "alpha_tilde": 2.0,
         "objective": "qadapter"},
    ]
    out = lm_eval_policies(cfg, policies, str(tmp_path))
    assert sorted(out) == ["p0", "p1", "p2"]
    for pid, tasks in out.items():
        assert sorted(tasks) == ["qadapter_probe_gen", "qadapter_probe_mc"]
        for task, n, metric in (("qadapter_probe_gen", 3, "answer_match"), ("qadapter_probe_mc", 4, "acc")):
            entry = tasks[task]
            assert (entry["metric"], entry["filter"], entry["n"], len(entry["items"])) == (metric, "none", n, n)
            assert all(v in (0.0, 1.0) for v in entry["items"])
            assert entry["value"] == pytest.approx(sum(entry["items"]) / n, abs=1e-12)
            assert entry["stderr"] is None or entry["stderr"] >= 0
        saved = json.loads((tmp_path / "lm_eval" / pid / "results.json").read_text())
        assert saved["policy"]["policy_id"] == pid and saved["apply_chat_template"] is True
        assert saved["summary"] == json.loads(json.dumps(tasks))
        assert [r["limit"] for r in saved["lm_eval"]] == [3, 4]
    for pid, (a0, at) in (("p1", (ALPHA_0, ALPHA_TILDE)), ("p2", (0.0, 2.0))):
        rows = [json.loads(line) for line in
                (tmp_path / "lm_eval" / pid / "samples_qadapter_probe_mc.jsonl").read_text().splitlines()]
        assert [r["doc_id"] for r in rows] == [0, 1, 2, 3]
        (context, continuation), (got, _) = rows[0]["arguments"][0], rows[0]["filtered_resps"][0]
        whole = encode(context + continuation)
        n_cont = len(whole) - len(encode(context.rstrip()))  # lm-eval scores the trailing "\n" too (see above)
        assert got == pytest.approx(logprob(whole, n_cont, a0, at), abs=2e-4, rel=1e-5)
