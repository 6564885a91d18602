"""The `qadapter` command line: every subcommand listed, --help names options and config keys, `generate` and
`chat` answer with the customized policy (greedy = QAdapterModel.generate), bad input is one clear error."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qadapter.cli import main
from qcore.config import AdapterConfig, QConfig
from qcore.model import QAdapterModel

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["run", "preprocess", "train", "tune", "evaluate", "report", "generate", "chat", "serve"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    model = QAdapterModel.from_pretrained(tiny_model_dir, adapter_cfg=AdapterConfig(dropout=0.0),
                                          q_cfg=QConfig(alpha_0=0.5, alpha_tilde=0.8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), str(model.save_pretrained(tmp_path_factory.mktemp("cli") / "adapter"))


def _reference(model, tokenizer, prompt, max_new_tokens=8, **dial):
    from qcore.data import encode_prompt
    from qcore.generation import eos_ids, left_pad

    eos = sorted(set(eos_ids(model)) | {tokenizer.eos_token_id})
    ids, mask = left_pad([encode_prompt(prompt, tokenizer)], tokenizer.pad_token_id)
    out = model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, **dial)[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return tokenizer.decode(out[:cut], skip_special_tokens=True).strip()


def test_help_lists_every_subcommand_as_a_module():
    """`python -m qadapter --help` (the console script calls the same main)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "qadapter", "--help"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.split("commands:")[1].splitlines() if line.startswith("  ")]
    assert listed == SUBCOMMANDS


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_each_help_names_its_options_and_config_keys(cmd, capsys):
    with pytest.raises(SystemExit) if cmd in ("generate", "chat", "serve") else _nothing():
        main([cmd, "--help"])
    text = capsys.readouterr().out
    assert "config keys read" in text or "config keys read (with --config)" in text
    assert "--config" in text
    want = {"run": ["--stop-after", "train.lr (", "tune.enabled ("], "preprocess": ["data.max_length ("],
            "train": ["--data DIR", "train.objective ('qadapter')"], "tune": ["tune.num_samples ("],
            "evaluate": ["--adapter NAME=DIR", "eval.max_new_tokens ("], "report": ["--results FILE"],
            "generate": ["--alpha-0", "--alpha-tilde", "--input", "--output", "model.path"],
            "chat": ["--alpha-0", "/alpha_0"], "serve": ["--token-file", "--port", "model.path"]}[cmd]
    for w in want:
        assert w in text, (cmd, w)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_generate_from_stdin_streams_and_writes_jsonl(adapter, tiny_model_dir, tiny_tokenizer, tmp_path,
                                                      monkeypatch, capsys):
    model, adir = adapter
    prompts = ["hello there", "what is the time", '{"prompt": [{"role": "user", "content": "hi"}]}']
    parsed = ["hello there", "what is the time", [{"role": "user", "content": "hi"}]]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(prompts) + "\n"))
    assert main(["generate", "--adapter", adir, "--base", tiny_model_dir, "--max-new-tokens", "8",
                 "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    refs = [_reference(model, tiny_tokenizer, p) for p in parsed]
    assert [line.strip() for line in lines] == refs
    # JSON lines to a file, the dial turned; the base recorded in qadapter.json is found without --base
    f = tmp_path / "in.txt"
    f.write_text("\n".join(prompts[:2]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--adapter", adir, "--input", str(f), "--output", str(out), "--max-new-tokens", "8",
                 "--alpha-0", "3", "--alpha-tilde", "0.5"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts[:2]
    assert [r["response"] for r in rows] == [_reference(model, tiny_tokenizer, p, alpha_0=3.0, alpha_tilde=0.5)
                                             for p in prompts[:2]]
    assert rows[0]["alpha_0"] == 3.0 and rows[0]["alpha_tilde"] == 0.5


def test_chat_keeps_the_conversation_and_turns_the_dial(adapter, tiny_model_dir, tiny_tokenizer, monkeypatch,
                                                        capsys):
    model, adir = adapter
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/alpha_0 3\nand then?\n/quit\n"))
    assert main(["chat", "--adapter", adir, "--base", tiny_model_dir, "--max-new-tokens", "6"]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first.strip() == _reference(model, tiny_tokenizer, [{"role": "user", "content": "hello"}], 6)
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.strip()},
            {"role": "user", "content": "and then?"}]
    assert second.strip() == _reference(model, tiny_tokenizer, conv, 6, alpha_0=3.0)


def test_bad_input_is_one_clear_error(adapter, tiny_model_dir, tmp_path, monkeypatch):
    _, adir = adapter
    with pytest.raises(SystemExit, match="no adapter_config.json"):
        main(["generate", "--adapter", str(tmp_path), "--base", tiny_model_dir])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: a JSON line needs a 'prompt' key"):
        main(["generate", "--adapter", adir, "--base", tiny_model_dir, "--input", str(bad)])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    with pytest.raises(SystemExit, match="alpha-tilde > 0"):
        main(["generate", "--adapter", adir, "--base", tiny_model_dir, "--alpha-tilde", "0"])
    assert main(["nosuch"]) == 2
