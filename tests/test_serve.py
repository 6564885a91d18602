"""The OpenAI-compatible Ray Serve app (pipelines/serve.py), called with the official openai client: greedy answers
equal QAdapterModel.generate's for the same prompt and dial, concurrent requests keep their own dial, bad requests
get a 4xx with a message and the replica keeps serving, and every route wants the bearer token."""
import socket
import threading

import pytest
import torch

from qcore.config import AdapterConfig, QConfig
from qcore.model import QAdapterModel

TOKEN = "test-token-0123456789abcdef"
MAX_TOKENS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save_adapter(base_dir, out, seed, alpha_0):
    model = QAdapterModel.from_pretrained(base_dir, adapter_cfg=AdapterConfig(dropout=0.0),
                                          q_cfg=QConfig(alpha_0=alpha_0, alpha_tilde=0.8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return str(model.save_pretrained(out))


@pytest.fixture(scope="module")
def served(ray_session, tiny_model_dir, tmp_path_factory):
    """A real local Serve app on a free port with two adapters (each a model id); shut down afterwards."""
    from ray import serve

    from pipelines.serve import build_app

    tmp = tmp_path_factory.mktemp("serve")
    adapters = {"qadapter": _save_adapter(tiny_model_dir, tmp / "a", 1, 0.5),
                "other": _save_adapter(tiny_model_dir, tmp / "b", 2, 0.0)}
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"base": tiny_model_dir, "adapters": adapters, "token_file": str(token_file),
                       "max_prompt_tokens": 48, "max_tokens_limit": 32, "batch_wait_timeout_s": 0.2,
                       "num_threads": 1},
                    options={"ray_actor_options": {"num_cpus": 0.5}})
    serve.run(app, name="qadapter-test", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}/v1", "adapters": adapters}
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(served, tiny_model_dir, tiny_tokenizer):
    """Greedy answers of QAdapterModel.generate (this process, no server) for a prompt's token ids and a dial."""
    from qcore.compose import load_adapters
    from qcore.generation import eos_ids, left_pad

    model = load_adapters(tiny_model_dir, served["adapters"])
    tok = tiny_tokenizer
    eos = sorted(set(eos_ids(model)) | {tok.eos_token_id})

    def answer(ids, adapter="qadapter", **dial):
        single = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=served["adapters"][adapter],
                                               is_trainable=False) if adapter != "qadapter" else None
        m = single or model
        x, mask = left_pad([ids], tok.pad_token_id)
        out = m.generate(x, mask, max_new_tokens=MAX_TOKENS, eos_token_id=eos, pad_token_id=tok.pad_token_id, **dial)
        new = out[0, x.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))
        return tok.decode(new[:cut], skip_special_tokens=True)

    return answer


def _client(served, key=TOKEN):
    import openai

    return openai.OpenAI(base_url=served["url"], api_key=key, max_retries=0, timeout=120)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_serve_with_the_openai_client(served, reference, tiny_tokenizer):
    import openai

    from qcore.data import encode_prompt, prepend_bos

    client = _client(served)
    assert [m.id for m in client.models.list().data] == ["qadapter", "other"]

    # completions: raw text (+ BOS where expected), the adapter's own dial, then the dial per request
    prompt = "the quick brown fox"
    raw_ids = prepend_bos(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"], tiny_tokenizer)
    got = client.completions.create(model="qadapter", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert got.choices[0].text == reference(raw_ids)
    assert got.choices[0].finish_reason in ("stop", "length") and got.usage.prompt_tokens == len(raw_ids)
    dialed = client.completions.create(model="qadapter", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body={"alpha_0": 3.0, "alpha_tilde": 0.5})
    assert dialed.choices[0].text == reference(raw_ids, alpha_0=3.0, alpha_tilde=0.5)

    # chat: the chat template (as in training); streamed deltas add up to the same answer
    messages = [{"role": "user", "content": "hello there, who are you?"}]
    chat_ids = encode_prompt(messages, tiny_tokenizer)
    chat = client.chat.completions.create(model="qadapter", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    want = reference(chat_ids)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="qadapter", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True)]
    assert "".join(pieces) == want and len(pieces) >= 2
    other = client.chat.completions.create(model="other", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert other.choices[0].message.content == reference(chat_ids, adapter="other")

    # two concurrent clients with different alpha_0 (one batch): each gets its own policy
    dials = [0.0, 4.0]
    refs = [reference(chat_ids, alpha_0=a, alpha_tilde=0.5) for a in dials]
    assert refs[0] != refs[1]  # the dial changes the answer here, so a mix-up would show
    results = [None, None]

    def ask(i):
        results[i] = _client(served).chat.completions.create(
            model="qadapter", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"alpha_0": dials[i], "alpha_tilde": 0.5}).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert results == refs

    # bad requests: a 4xx naming the problem; the replica keeps serving
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=messages, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="alpha_tilde"):
        client.chat.completions.create(model="qadapter", messages=messages, max_tokens=2,
                                       extra_body={"alpha_tilde": -1.0})
    with pytest.raises(openai.BadRequestError, match="at most 48"):
        client.completions.create(model="qadapter", prompt="word " * 100, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="weights"):
        client.completions.create(model="qadapter", prompt=prompt, max_tokens=2, extra_body={"weights": {"zz": 1}})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="qadapter", prompt=prompt, max_tokens=10_000)
    for key in ("wrong-token-0123456789", ""):
        with pytest.raises(openai.AuthenticationError):
            _client(served, key=key or "x").models.list()
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:  # no Authorization header at all
        urllib.request.urlopen(served["url"] + "/models", timeout=30)
    assert err.value.code == 401
    again = client.completions.create(model="qadapter", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert again.choices[0].text == got.choices[0].text

    # composition per request: weights {qadapter: 1, other: 0} is the qadapter policy; sampling with a seed repeats
    w = client.completions.create(model="qadapter", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"weights": {"qadapter": 1.0, "other": 0.0}})
    assert w.choices[0].text == got.choices[0].text
    s1, s2 = (client.completions.create(model="qadapter", prompt=prompt, max_tokens=MAX_TOKENS, temperature=1.0,
                                        seed=5).choices[0].text for _ in range(2))
    assert s1 == s2


def test_read_token(tmp_path, monkeypatch):
    from pipelines.serve import TOKEN_ENV, TOKEN_FILE_ENV, read_token

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(ValueError, match="no API token"):
        read_token()
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(ValueError, match="too short"):
        read_token()
    monkeypatch.setenv(TOKEN_ENV, "x" * 20)
    assert read_token() == "x" * 20
    f = tmp_path / "tok"
    f.write_text("  " + "y" * 24 + "\n")
    assert read_token(str(f)) == "y" * 24  # the file wins over the variable
    with pytest.raises(FileNotFoundError, match="not found"):
        read_token(str(tmp_path / "missing"))
