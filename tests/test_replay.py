"""Replay data as the authors build it (make_replay_data.py): every chosen response of the training pairs PLUS the
base model's greedy answer to each distinct training prompt; a step budget keeps the head of the even mix."""
import json
from pathlib import Path

import pytest
import torch

from test_train import _PROMPTS, _YES, tiny_cfg, write_pref_parquet


def test_replay_counts_add_base_answers_to_every_chosen_row():
    """No Ray: N chosen + R base answers (R = distinct prompts, or train.replay_count), the head of the
    interleaved mix under a step budget."""
    from pipelines.replay import interleave, replay_counts

    epochs = dict(max_steps=-1)
    assert replay_counts(tiny_cfg(Path("/tmp"), **epochs), n_train=48, n_prompts=6) == (48, 6)  # authors: all
    assert replay_counts(tiny_cfg(Path("/tmp"), replay_count=4, **epochs), 48, 6) == (48, 4)  # the first 4 prompts
    assert replay_counts(tiny_cfg(Path("/tmp"), replay_count=10, **epochs), 48, 6) == (48, 6)  # at most one each
    assert replay_counts(tiny_cfg(Path("/tmp"), replay_count=0, **epochs), 48, 6) == (48, 0)  # = sft
    # a budget of 5 steps x 2 rows x 1 accumulation x 2 workers = 20 rows of the 48 + 6 mix: chosen keys
    # (i + .5) / 48, replay keys (j + .5) / 6 = .083, .25, .417, ...; the 20 smallest keys are chosen 0..17
    # (17.5 / 48 = .365) and replay 0, 1
    assert replay_counts(tiny_cfg(Path("/tmp"), max_steps=5), 48, 6) == (18, 2)
    assert replay_counts(tiny_cfg(Path("/tmp"), max_steps=100), 48, 6) == (48, 6)  # budget over the mix: all of it
    # chosen at (i+.5)/3 = .17 .5 .83, replay at .5: ties keep chosen first
    assert interleave(["a", "b", "c"], ["X"]) == ["a", "b", "X", "c"]
    assert interleave(["a", "b"], ["X", "Y"]) == ["a", "X", "b", "Y"]
    assert interleave(["a"], []) == ["a"]


def test_replay_keys_are_validated():
    from qcore.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'train.replay_count'"):
        load_config(None, ["--train.replay_count", "-2"])
    with pytest.raises(ConfigError, match="'train.replay_fraction'"):  # the old key is gone, not ignored
        load_config(None, ["--train.replay_fraction", "0.5"])
    assert load_config(None, []).train.replay_max_new_tokens == 256  # the authors' answer length


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory, tiny_model_dir):
    return write_pref_parquet(tmp_path_factory.mktemp("replaydata"), tiny_model_dir)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_replay_data_adds_one_base_answer_per_distinct_prompt(ray_session, pref_data, tiny_model_dir, tmp_path):
    """The full mix (no step budget): 48 chosen rows + one base answer for each of the 6 distinct prompts, each the
    base model's greedy answer recomputed here with transformers' generate on the bare base weights."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.replay import replay_data
    from qcore.data import encode_prompt, tokenize_sft

    cfg = tiny_cfg(tmp_path, objective="replay", num_workers=1, max_steps=-1, replay_max_new_tokens=8)
    summary = replay_data(cfg, pref_data, str(tmp_path / "mix"))
    rows = pq.read_table(tmp_path / "mix" / "train").to_pylist()
    replayed = [r for r in rows if r["kind"] == "replay"]
    chosen = [r for r in rows if r["kind"] == "chosen"]
    assert summary["replay_requested"] == 6 == len(_PROMPTS) and summary["chosen_rows"] == 48
    assert len(replayed) == summary["replay_rows"] == 6 - summary["replay_dropped"]
    assert replayed, "every base answer was dropped: nothing was replayed"
    assert len(rows) == 48 + len(replayed)  # added, not replacing chosen rows
    assert [r["response"] for r in chosen] == [_YES[i % len(_YES)] for i in range(48)]  # every pair row, in order
    got = [json.loads(r["prompt_json"]) for r in replayed]
    assert got == [p for p in _PROMPTS if p in got]  # one per distinct prompt, in the training file's order
    # spread through the epoch, not appended: the first base answer comes within the first ~1/6 of the rows
    first = next(i for i, r in enumerate(rows) if r["kind"] == "replay")
    assert 0 < first <= len(rows) // 6 + 1
    assert pq.read_table(tmp_path / "mix" / "eval").num_rows == 8
    assert json.loads((tmp_path / "mix" / "replay.json").read_text())["replay_max_new_tokens"] == 8

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for r in replayed:
        prompt = json.loads(r["prompt_json"])
        ids = torch.tensor([encode_prompt(prompt, tok)])  # template / BOS as qcore.data applies them
        with torch.no_grad():
            gen = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        want = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert r["response"] == want
        assert r["input_ids"] == tokenize_sft({"prompt": prompt, "response": want}, tok, 512, 256)["input_ids"]
