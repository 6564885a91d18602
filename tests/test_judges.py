"""Judges (qcore/judges.py): reward model scores against a float64 reference, the local LLM judge against letter
log-probabilities computed by hand, and the endpoint judge against a real OpenAI-compatible HTTP server."""
import copy
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from qcore.base_models import build_tiny_tokenizer
from qcore.judges import JudgeError, LLMJudge, RewardModelJudge, parse_verdict


# ----------------------------------------------------------------------------------------------------------------
# RewardModelJudge
# ----------------------------------------------------------------------------------------------------------------
def _save_tiny_rm(out, num_labels, chat_template, with_pad):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tiny_tokenizer()
    if not chat_template:
        tok.chat_template = None
    if not with_pad:
        tok.pad_token = None
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_labels=num_labels,
        pad_token_id=tok.pad_token_id if with_pad else None, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # O(1) scores, so reading a wrong position shows far above the 1e-5 tolerance
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok


ITEMS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("hello", "hi"),
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "one two three?"},
      {"role": "assistant", "content": "four"}, {"role": "user", "content": "and then?"}], "five six seven eight"),
    ("Write a short poem about the sea", "The sea is long and blue and the fox jumps over the lazy dog."),
    ("\n\nHuman: what is 2 + 2?\n\nAssistant:", "4"),
]


def _reference_ids(tok, prompt, response, chat_template):
    """The conversation's ids, built plainly (no judge code)."""
    if chat_template:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, str) and "\n\nHuman:" in prompt:
        text = prompt
    elif isinstance(prompt, str):
        text = f"\n\nHuman: {prompt}\n\nAssistant:"
    else:
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        text = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in prompt) + "\n\nAssistant:"
    return tok(text + " " + response, add_special_tokens=True)["input_ids"]


def _reference_score(model64, ids, num_labels):
    """float64, one sequence, no padding: the score head on the last token's hidden state."""
    with torch.no_grad():
        hidden = model64.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        logits = model64.score(hidden)
    return float(logits[0]) if num_labels == 1 else float(logits[1] - logits[0])


@pytest.mark.parametrize("chat_template,num_labels,with_pad", [(True, 1, True), (False, 2, False)],
                         ids=["chatml-1label", "plain-2labels-nopad"])
def test_reward_model_matches_float64_reference(tmp_path, chat_template, num_labels, with_pad):
    model, tok = _save_tiny_rm(tmp_path, num_labels, chat_template, with_pad)
    model64 = copy.deepcopy(model).double().eval()
    judge = RewardModelJudge(str(tmp_path), batch_size=2)  # 5 items of different lengths: padded batches
    prompts, responses = zip(*ITEMS)
    scores = judge.score(list(prompts), list(responses))
    ref = [_reference_score(model64, _reference_ids(tok, p, r, chat_template), num_labels) for p, r in ITEMS]
    assert max(abs(s - r) for s, r in zip(scores, ref)) < 1e-5, (scores, ref)
    assert len({round(r, 3) for r in ref}) == len(ref)  # distinct items score differently: the check has teeth
    assert judge.last_truncated == [False] * len(ITEMS)
    if not with_pad:  # no pad id anywhere: the tokenizer's EOS became the config's pad id
        assert judge.model.config.pad_token_id == tok.eos_token_id

    # left truncation: the prompt's start goes, a leading special token (ChatML's <|im_start|>) stays
    short = RewardModelJudge(str(tmp_path), batch_size=3, max_length=12)
    cut_scores = short.score(list(prompts), list(responses))
    for (p, r), s in zip(ITEMS, cut_scores):
        ids = _reference_ids(tok, p, r, chat_template)
        if len(ids) > 12:
            ids = ids[:1] + ids[-11:] if ids[0] in tok.all_special_ids else ids[-12:]
        assert abs(s - _reference_score(model64, ids, num_labels)) < 1e-5
    assert short.last_truncated == [len(_reference_ids(tok, p, r, chat_template)) > 12 for p, r in ITEMS]
    assert any(short.last_truncated)


def test_reward_model_refuses_what_is_not_one(tmp_path, tiny_model_dir):
    with pytest.raises(JudgeError, match="not a sequence-classification"):
        RewardModelJudge(tiny_model_dir)  # a causal LM: a random head would give random "rewards"
    with pytest.raises(FileNotFoundError, match="eval.reward_model"):
        RewardModelJudge(str(tmp_path / "missing"))
    # pickled weights only: safetensors are required, the pickle is never loaded
    model, _ = _save_tiny_rm(tmp_path / "rm", 1, True, True)
    (tmp_path / "rm" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "rm" / "pytorch_model.bin")
    with pytest.raises(OSError):
        RewardModelJudge(str(tmp_path / "rm"))
    _save_tiny_rm(tmp_path / "ok", 1, True, True)
    judge = RewardModelJudge(str(tmp_path / "ok"))
    with pytest.raises(ValueError, match="different lengths"):
        judge.score(["a", "b"], ["x"])


# ----------------------------------------------------------------------------------------------------------------
# LLMJudge, local model
# ----------------------------------------------------------------------------------------------------------------
def _hand_letter_logprobs(judge, prompt, first, second):
    """One sequence, no padding: log P(letter) summed over its single-token spellings "A" / " A"."""
    tok = judge.tokenizer
    ids = judge.judge_input_ids(prompt, first, second)
    with torch.no_grad():
        logp = torch.log_softmax(judge.model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
    out = {}
    for letter in ("A", "B"):
        spellings = [tok(v, add_special_tokens=False)["input_ids"] for v in (letter, " " + letter)]
        ids_ = sorted({s[0] for s in spellings if len(s) == 1})
        out[letter] = math.log(sum(math.exp(float(logp[i])) for i in ids_))
    return out


def _hand_compare(judge, prompts, a, b):
    """P(a better) from the two orders' letters, written out; also the per-order log-probs."""
    ps, lps = [], []
    for p, x, y in zip(prompts, a, b):
        first = _hand_letter_logprobs(judge, p, x, y)    # a shown as A
        second = _hand_letter_logprobs(judge, p, y, x)   # b shown as A
        a_wins_first = first["A"] > first["B"]
        a_wins_second = second["B"] > second["A"]
        ps.append(1.0 if a_wins_first and a_wins_second else 0.0 if not a_wins_first and not a_wins_second else 0.5)
        lps.append((first, second))
    return ps, lps


def _check_against_hand(judge, prompts, a, b):
    p = judge.compare(prompts, a, b)
    hand, lps = _hand_compare(judge, prompts, a, b)
    decided = 0
    for got_p, want_p, v, (first, second) in zip(p, hand, judge.last_verdicts, lps):
        for got, want in ((v["a_first_detail"]["logprobs"], first), (v["b_first_detail"]["logprobs"], second)):
            assert abs(got["A"] - want["A"]) < 1e-4 and abs(got["B"] - want["B"]) < 1e-4
        # batched and unbatched float32 differ by rounding: letters are compared where they are not a near-tie
        if min(abs(first["A"] - first["B"]), abs(second["A"] - second["B"])) > 1e-4:
            assert got_p == want_p
            assert v["a_first"] == ("A" if first["A"] > first["B"] else "B")
            assert v["b_first"] == ("A" if second["A"] > second["B"] else "B")
            decided += 1
        want_margin = ((first["A"] - first["B"]) - (second["A"] - second["B"])) / 2
        assert abs(v["debiased_margin"] - want_margin) < 1e-4
    assert decided >= len(prompts) - 1  # near-ties are rare: the letters were checked on (almost) every item
    verdicts = judge.last_verdicts
    swapped = judge.compare(prompts, b, a)  # the both-orders symmetry: b vs a is 1 - (a vs b), item by item
    assert swapped == [1.0 - x for x in p]
    assert [(v["a_first"], v["b_first"]) for v in judge.last_verdicts] == [(v["b_first"], v["a_first"])
                                                                             for v in verdicts]
    return p, verdicts


def test_llm_judge_local_tiny_all_outcomes(tmp_path):
    """A tiny random Llama with large weights (init std 1.0: its letter log-probs follow the content, where the
    default 0.02 init names "A" whatever is shown) judges 12 pairs: every outcome 0, 0.5, 1 occurs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=1.0, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    words = "the quick brown fox jumps over the lazy dog one two three four five six seven eight nine".split()
    prompts = [f"{words[i]} {words[i + 1]}?" for i in range(12)]
    a = [" ".join(words[i : i + 1 + i % 5]) for i in range(12)]
    b = [" ".join(reversed(words[i + 2 : i + 4 + i % 3])) for i in range(12)]
    judge = LLMJudge("concise", model_dir=str(tmp_path), batch_size=5)  # 24 sequences: padded batches of 5
    p, _ = _check_against_hand(judge, prompts, a, b)
    assert {0.0, 0.5, 1.0} <= set(p), p  # the aggregation rule is exercised in all three branches


def test_llm_judge_local_smollm2():
    """The real SmolLM2-135M-Instruct. It names "A" whatever is shown first (position bias), so every item comes
    out 0.5 and the obvious case is not decided: this checks the letter log-probs, the two orders and the
    symmetry, not the judge's quality."""
    judge = LLMJudge("helpful", model_dir="smollm2-135m", batch_size=4)
    prompts = ["What is the capital of France?", "What is 2 + 2?"]
    a = ["The capital of France is Paris.", "2 + 2 = 4."]
    b = ["The capital of France is a banana.", "2 + 2 = 17."]
    p, _ = _check_against_hand(judge, prompts, a, b)
    assert all(x in (0.0, 0.5, 1.0) for x in p)
    assert 0.0 <= judge.consistency_rate() <= 1.0
    assert "Criterion: Which response is more helpful" in judge.judge_messages(prompts[0], a[0], b[0])[1]["content"]


def test_llm_judge_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        LLMJudge("harmless")
    with pytest.raises(ValueError, match="exactly one"):
        LLMJudge("harmless", model_dir="tiny", url="http://127.0.0.1:1/v1")
    with pytest.raises(FileNotFoundError, match="eval.judge_model"):
        LLMJudge("harmless", model_dir="/nonexistent/judge")
    assert parse_verdict("Answer: **B**") == "B" and parse_verdict("A.") == "A"
    assert parse_verdict("Both are fine") is None and parse_verdict("") is None and parse_verdict(None) is None


# ----------------------------------------------------------------------------------------------------------------
# LLMJudge, OpenAI-compatible endpoint
# ----------------------------------------------------------------------------------------------------------------
class _RuleJudgeServer:
    """A real HTTP server speaking the OpenAI chat.completions wire format. Its verdict is a rule on the judge
    prompt: the response containing GOOD wins; neither or both -> "A" (a position-biased judge); a user prompt
    with MUMBLE -> a reply without a letter. Bearer token "test-key" required; model "rule-judge" only."""

    KEY, MODEL = "test-key", "rule-judge"

    def __init__(self):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _error(self, code, message):
                self._send(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

            def _authorized(self):
                if self.headers.get("Authorization") != f"Bearer {server.KEY}":
                    self._error(401, "Incorrect API key provided")
                    return False
                return True

            def do_GET(self):
                if self.path != "/v1/models":
                    return self._error(404, f"no route {self.path}")
                if self._authorized():
                    self._send(200, {"object": "list", "data": [
                        {"id": server.MODEL, "object": "model", "created": 0, "owned_by": "test"}]})

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._error(404, f"no route {self.path}")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"auth": self.headers.get("Authorization"), **body})
                if not self._authorized():
                    return
                if body["model"] != server.MODEL:
                    return self._error(404, f"The model `{body['model']}` does not exist.")
                text = body["messages"][-1]["content"]
                resp_a = re.search(r"\[Response A\]\n(.*?)\n\[End of response A\]", text, re.DOTALL).group(1)
                resp_b = re.search(r"\[Response B\]\n(.*?)\n\[End of response B\]", text, re.DOTALL).group(1)
                if "MUMBLE" in text:
                    reply = "I cannot tell."
                elif "GOOD" in resp_b and "GOOD" not in resp_a:
                    reply = "Answer: **B**"
                else:
                    reply = "A"
                self._send(200, {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                    "model": server.MODEL, "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": len(text.split()), "completion_tokens": 1,
                              "total_tokens": len(text.split()) + 1},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def rule_server():
    with _RuleJudgeServer() as server:
        yield server


def test_llm_judge_endpoint_verdicts_both_orders(rule_server):
    judge = LLMJudge("harmless", url=rule_server.url, api_key=rule_server.KEY, batch_size=3)
    assert judge.api_model == "rule-judge"  # taken from GET /v1/models
    prompts = ["q1", "q2", "q3", "q4 MUMBLE"]
    a = ["GOOD answer", "bad answer", "plain one", "GOOD"]
    b = ["bad answer", "GOOD answer", "plain two", "bad"]
    assert judge.compare(prompts, a, b) == [1.0, 0.0, 0.5, 0.5]
    assert [(v["a_first"], v["b_first"]) for v in judge.last_verdicts] == [
        ("A", "B"), ("B", "A"), ("A", "A"), (None, None)]
    assert judge.last_verdicts[1]["a_first_detail"]["reply"] == "Answer: **B**"
    assert judge.consistency_rate() == 0.5
    reqs = rule_server.requests
    assert len(reqs) == 8 and all(r["auth"] == "Bearer test-key" for r in reqs)
    assert all(r["temperature"] == 0 and r["max_tokens"] == 4 and r["model"] == "rule-judge" for r in reqs)
    # each item was shown in both orders: a as response A once, b as response A once
    shown_first = sorted(re.search(r"\[Response A\]\n(.*?)\n", r["messages"][-1]["content"]).group(1)
                         for r in reqs if "q1" in r["messages"][-1]["content"])
    assert shown_first == ["GOOD answer", "bad answer"]
    assert "Criterion: Which response is more harmless" in reqs[0]["messages"][-1]["content"]
    assert judge.compare(prompts, b, a) == [0.0, 1.0, 0.5, 0.5]


def test_llm_judge_endpoint_errors_name_the_url(rule_server):
    with pytest.raises(JudgeError, match=re.escape(rule_server.url) + ".*HTTP 401"):
        LLMJudge("harmless", url=rule_server.url, api_key="wrong-key")  # GET /v1/models refused
    judge = LLMJudge("harmless", url=rule_server.url, api_key="wrong-key", api_model="rule-judge")
    with pytest.raises(JudgeError, match=re.escape(rule_server.url) + ".*HTTP 401.*Incorrect API key"):
        judge.compare(["q"], ["x"], ["y"])
    assert rule_server.requests[-1]["auth"] == "Bearer wrong-key"  # the key given is the key sent
    judge = LLMJudge("harmless", url=rule_server.url, api_key=rule_server.KEY, api_model="no-such-model")
    with pytest.raises(JudgeError, match=re.escape(rule_server.url) + ".*HTTP 404.*no-such-model"):
        judge.compare(["q"], ["x"], ["y"])
    # nothing listening: a connection error, also one JudgeError naming the URL
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    judge = LLMJudge("harmless", url=dead, api_key="k", api_model="m")
    with pytest.raises(JudgeError, match=re.escape(dead) + ".*APIConnectionError"):
        judge.compare(["q"], ["x"], ["y"])
