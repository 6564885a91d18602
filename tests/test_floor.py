"""benchmarks/floor.py: the FLOP counts its compute floor rests on, by hand and against torch's FLOP counter."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import floor  # noqa: E402


def test_shape_reads_the_model(tiny_model_dir):
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(tiny_model_dir)
    shape = floor.Shape(tiny_model_dir)
    h, i, layers = conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers
    kv = conf.num_key_value_heads * (h // conf.num_attention_heads)
    # per layer: q and o (h x h), k and v (h x kv), gate, up and down (h x i); embedding and head excluded
    assert shape.linear == layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    assert (shape.hidden, shape.vocab, shape.layers, shape.attn_dim) == (h, conf.vocab_size, layers, h)


def test_counts_by_hand(tiny_model_dir):
    shape = floor.Shape(tiny_model_dir)
    lin, att, hv = 2 * shape.linear, 4 * shape.layers * shape.attn_dim, 2 * shape.hidden * shape.vocab
    assert shape.decoder(3) == 3 * lin + att * (1 + 2 + 3)  # causal: the tokens attend to 1, 2, 3 keys
    assert shape.decoder(2, cached=3) == 2 * lin + att * (4 + 5)
    assert shape.head(5) == 5 * hv
    # a pair: prompt of 2 once, responses of 1 and 2 after it, the head at the 3 response positions
    assert shape.pair(2, 1, 2) == (2 * lin + att * 3) + (lin + att * 3) + (2 * lin + att * (3 + 4)) + 3 * hv
    assert shape.row(2, 2) == 4 * lin + att * 10 + 2 * hv
    assert shape.decode(4, 2) == 2 * lin + att * (5 + 6) + 2 * hv


def test_forward_matches_torch_flop_counter(tiny_model_dir):
    """One forward of n tokens: torch counts the linear layers, the head at every position and eager attention's
    two matmuls over the full n x n square (the causal mask is applied after QK^T, not skipped); floor counts the
    causal half, so the two differ by exactly the masked half of the attention products."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    shape = floor.Shape(tiny_model_dir)
    n = 7
    ids = torch.arange(1, n + 1)[None]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    att = 4 * shape.layers * shape.attn_dim
    full_square = att * n * n
    assert counter.get_total_flops() == shape.decoder(n) - att * n * (n + 1) / 2 + full_square + shape.head(n)


def test_policies_from_lm_eval_else_from_the_stage_results(tmp_path):
    """The policies come from lm-eval's per-policy results (their ids name the sample files) and, in a run without
    lm-eval tasks, from the evaluate stage's results.json: methods and dial points by name."""
    import json

    assert floor._policies(str(tmp_path)) == {}
    results = {"methods": {"base": {"adapter": None, "alpha_0": 0.0},
                           "qadapter": {"adapter": "a/q", "alpha_0": 0.1},
                           "dpo": {"adapter": "a/d", "alpha_0": 0.0}},
               "dial": [{"name": "qadapter@a0=1,at=1", "adapter": "a/q", "alpha_0": 1.0}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    got = floor._policies(str(tmp_path))
    assert sorted(got) == ["base", "dpo", "qadapter", "qadapter@a0=1,at=1"]
    assert got["qadapter@a0=1,at=1"]["alpha_0"] == 1.0 and got["dpo"]["adapter"] == "a/d"
    assert len({p["adapter"] for p in got.values() if p.get("adapter")}) == 2  # 2 adapters: 3 distinct passes
    (tmp_path / "lm_eval" / "p0").mkdir(parents=True)
    (tmp_path / "lm_eval" / "p0" / "results.json").write_text(json.dumps({"policy": {"adapter": "a/q", "alpha_0": 0.1}}))
    assert floor._policies(str(tmp_path)) == {"p0": {"adapter": "a/q", "alpha_0": 0.1}}
