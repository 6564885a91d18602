"""The train stage on real Ray Train (V2) + real DeepSpeed on CPU: ZeRO-3 over two workers, the saved adapter,
fault tolerance, and every objective. Tiny model, few steps; one Ray session shared with the other Ray tests."""
import json
import time
from pathlib import Path

import pytest
import torch


_YES = ["Yes. I think so.", "Yes, here is a short answer.", "Yes. Paris.", "I think so, yes."]
_NO = ["No.", "Maybe. No.", "No, no.", "Maybe."]
_PROMPTS = ["What is the capital of France?", "Answer briefly.", "Please explain the sea.",
            "Write a short poem about the dog.", "List one two three.", "Describe the quick brown fox."]


def write_pref_parquet(out_dir: Path, model_dir: str, n_train: int = 48, n_eval: int = 8) -> str:
    """A tiny synthetic preference (chosen say yes, rejected say no), tokenized as preprocess does, as Parquet
    ``train/`` and ``eval/`` directories of tokenized pair rows."""
    import pandas as pd
    from transformers import AutoTokenizer

    from qcore.data import tokenize_pair

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for i in range(n_train + n_eval):
        pair = {"prompt": _PROMPTS[i % len(_PROMPTS)], "chosen": _YES[i % len(_YES)], "rejected": _NO[(i // 2) % len(_NO)]}
        rows.append({"prompt_json": json.dumps(pair["prompt"]), "chosen": pair["chosen"],
                     **tokenize_pair(pair, tok, max_length=64, max_prompt_length=32)})
    for split, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(part).to_parquet(out_dir / split / "part-0.parquet")
    return str(out_dir)


def tiny_cfg(tmp_path: Path, model_dtype: str = "float32", **train):
    from qcore.config import config_from_dict

    base = {"num_workers": 2, "cpus_per_worker": 1.0, "zero_stage": 3, "micro_batch_size": 2, "lr": 5e-3,
            "schedule": "constant", "warmup_ratio": 0.0, "max_steps": 4, "report_every": 2, "checkpoint_every": 4,
            "keep_checkpoints": 2, "max_failures": 0}
    base.update(train)
    return config_from_dict({
        "model": {"path": "tiny", "dtype": model_dtype},
        "adapter": {"rank": 4, "lora_alpha": 8, "dropout": 0.0},
        "q": {"alpha_0": 0.1, "beta": 0.1, "chunk_size": 32},
        "train": base,
        "run": {"name": "t", "storage_path": str(tmp_path / "runs")},
    })


def test_plan_and_deepspeed_config():
    """No Ray: every rank gets the same micro-batch count from the global row count; the DeepSpeed config."""
    from pipelines.train import ds_config, plan_steps

    cfg = tiny_cfg(Path("/tmp"), micro_batch_size=2, grad_accumulation=3, max_steps=-1, epochs=2)
    plan = plan_steps(cfg, n_train=47, world=2)  # 23 rows per rank (Ray's equal split drops one), 11 batches
    assert plan == {"micro_batches_per_epoch": 11, "total_steps": 2 * 11 // 3, "rows_per_rank": 23}
    assert plan_steps(tiny_cfg(Path("/tmp"), max_steps=5), 48, 2)["total_steps"] == 5
    with pytest.raises(ValueError, match="too few"):
        plan_steps(cfg, n_train=3, world=2)
    conf = ds_config(cfg, {"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    assert conf["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0,
                                         "stage3_max_reuse_distance": 0}  # CPU: no reuse scan
    gpu = ds_config(tiny_cfg(Path("/tmp"), use_gpu=True))
    assert gpu["zero_optimization"] == {"stage": 3}  # DeepSpeed's defaults
    # DeepSpeed's bf16 mode is off everywhere: the model holds bf16 base weights and fp32 LoRA weights itself
    assert gpu["bf16"]["enabled"] is False
    assert conf["gradient_accumulation_steps"] == 3 and conf["train_micro_batch_size_per_gpu"] == 2
    assert conf["bf16"]["enabled"] is False and conf["gradient_clipping"] == 1.0
    assert "optimizer" not in conf  # the client torch AdamW: no FusedAdam / cpu_adam op to compile
    # train.deepspeed: any DeepSpeed key, from YAML or dotted CLI strings, merged last (ds_overrides still after it)
    from qcore.config import load_config

    cli = load_config(None, ["--train.deepspeed.zero_optimization.stage3_max_reuse_distance", "0",
                             "--train.deepspeed.zero_optimization.stage3_param_persistence_threshold", "1e6",
                             "--train.deepspeed.wall_clock_breakdown", "true", "--train.grad_accumulation", "3"])
    assert cli.train.deepspeed == {"zero_optimization": {"stage3_max_reuse_distance": 0,  # typed by the config
                                                         "stage3_param_persistence_threshold": 1e6},
                                   "wall_clock_breakdown": True}
    conf = ds_config(cli, {"zero_optimization": {"stage3_max_reuse_distance": 5}})
    assert conf["zero_optimization"] == {"stage": 3, "stage3_max_reuse_distance": 5,
                                         "stage3_param_persistence_threshold": 1e6}
    assert conf["wall_clock_breakdown"] is True and conf["gradient_accumulation_steps"] == 3


def test_torch_extensions_dir_is_per_install():
    """DeepSpeed's JIT-built CPU op goes to one directory per Python install (two checkouts rebuilt it in turns in
    torch's shared default); the stages set it unless the user did."""
    import os
    import subprocess
    import sys

    from pipelines.common import torch_extensions_dir

    one, two = torch_extensions_dir("/srv/a/.venv"), torch_extensions_dir("/srv/b/.venv")
    assert one != two and one == torch_extensions_dir("/srv/a/.venv")
    root = str(Path(__file__).resolve().parent.parent)
    code = "import os, pipelines.common; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    got = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == torch_extensions_dir(sys.prefix)
    got = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "TORCH_EXTENSIONS_DIR": "/srv/mine"},
                         capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "/srv/mine"

    # and it is built with this install's ninja whatever PATH says (another ninja's log hashes rebuilt it each time)
    ninja = os.path.join(os.path.dirname(sys.executable), "ninja")
    assert os.access(ninja, os.X_OK)  # pip's ninja, a DeepSpeed dependency
    code = "import shutil, pipelines.common; print(shutil.which('ninja'))"
    for path in ("/usr/bin:/bin", f"/usr/bin:{os.path.dirname(sys.executable)}:/bin"):
        got = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "PATH": path}, capture_output=True,
                             text=True, check=True)
        assert got.stdout.strip() == ninja, (path, got.stdout)


def test_partitioned_load_config():
    """No Ray: under ZeRO-3 with train.zero_init, transformers sees ZeRO-3 (from_pretrained then builds the model in
    deepspeed.zero.Init and loads it partitioned) while the returned object lives, in the model's dtype."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from pipelines.train import ds_config, partitioned_load_config

    cfg = tiny_cfg(Path("/tmp"), model_dtype="bfloat16")
    conf = ds_config(cfg)
    hf = partitioned_load_config(cfg, conf)
    assert is_deepspeed_zero3_enabled()
    assert hf.config["bf16"]["enabled"] is True and hf.config["fp16"]["enabled"] is False
    assert conf["bf16"]["enabled"] is False  # the engine's config is not changed
    del hf
    assert not is_deepspeed_zero3_enabled()  # a weakref: gone with the object
    assert partitioned_load_config(tiny_cfg(Path("/tmp"), zero_stage=2), conf) is None
    assert partitioned_load_config(tiny_cfg(Path("/tmp"), zero_init=False), conf) is None
    fp32 = partitioned_load_config(tiny_cfg(Path("/tmp")), conf)
    assert fp32.config["bf16"]["enabled"] is False and fp32.is_zero3()


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory, tiny_model_dir):
    return write_pref_parquet(tmp_path_factory.mktemp("prefdata"), tiny_model_dir)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_worker_zero3_train_save_reload(ray_session, pref_data, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from pipelines.train import PROBE_FILE, STATE_FILE, train_stage
    from qcore.model import QAdapterModel

    cfg = tiny_cfg(tmp_path, max_steps=8, report_every=2, checkpoint_every=4)
    t0 = time.time()
    # persistence threshold 0: even the tiny model's small parameters are released after use (not kept whole)
    out = train_stage(cfg, pref_data, str(tmp_path / "train"),
                      ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    wall = time.time() - t0
    print(f"\n[wall] two-worker ZeRO-3 train_stage (8 steps, 2 checkpoints): {wall:.1f}s")

    # the engines ran ZeRO-3 and each rank held only its partition of every parameter
    assert out["steps"] == 8 and out["metrics"]["step"] == 8
    assert out["metrics"]["zero_stage"] == 3 and out["metrics"]["world_size"] == 2
    parts = out["partition"]
    assert [p["rank"] for p in parts] == [0, 1]
    for p in parts:
        assert p["zero_stage"] == 3
        for kind in ("lora", "base"):
            assert 0 < p[kind]["local_numel"] < p[kind]["full_numel"], (kind, p)
            assert p[kind]["local_numel"] * 2 >= p[kind]["full_numel"]  # two ranks together cover the tensor
        assert p["base"]["data_numel"] == 0  # released after the forward: not held whole between uses
        assert p["total_local_numel"] < 0.6 * p["total_full_numel"]
        # loaded partitioned (train.zero_init): right after from_pretrained, before DeepSpeed's engine, each rank
        # held only its half of the base weights, never the whole model
        loaded = p["memory"]["loaded"]
        assert p["memory"]["partitioned_load"] and loaded["dtypes"] == ["float32"]
        assert 0.45 < loaded["fraction"] < 0.55, loaded
        assert p["memory"]["first_step"]["peak_rss"] >= p["memory"]["start"]["rss"] > 0

    # the loss went down (eval loss on the fixed eval split, first report vs last)
    hist = out["history"]
    assert [h["step"] for h in hist] == [2, 4, 6, 8]
    assert hist[-1]["eval_loss"] < hist[0]["eval_loss"] - 1e-3, [h["eval_loss"] for h in hist]
    assert all(k in hist[-1] for k in ("rewards/accuracies", "rewards/margins", "lr", "epoch", "grad_norm"))

    # files in out_dir
    out_dir = tmp_path / "train"
    assert json.loads((out_dir / "metrics.json").read_text())["steps"] == 8
    assert len((out_dir / "history.jsonl").read_text().splitlines()) == 4

    # the saved adapter: full shapes, non-empty, trained (lora_B moved away from its zero init)
    adapter = Path(out["adapter_dir"])
    assert (adapter / "adapter_config.json").exists() and (adapter / "qadapter.json").exists()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(weights) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    for name, w in weights.items():
        assert w.numel() > 0 and 4 in w.shape, (name, w.shape)
    assert max(float(w.abs().max()) for n, w in weights.items() if "lora_B" in n) > 1e-4

    # it reloads to the same customized logits as the live, gathered model at the end of training
    ckpt = Path(out["checkpoint_dir"])
    probe = torch.load(ckpt / PROBE_FILE, weights_only=True)
    assert json.loads((ckpt / STATE_FILE).read_text())["step"] == 8
    model = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=str(adapter), is_trainable=False).eval()
    with torch.no_grad():
        q, base = model.q_and_base_logits(probe["input_ids"], probe["attention_mask"])
        custom = model.customized_logits(q, base)
        zero_adapter = model.customized_logits(base, base)
    diff = float((custom - probe["custom_logits"]).abs().max())
    assert diff < 1e-5, diff
    assert float((zero_adapter - probe["custom_logits"]).abs().max()) > 1e-4  # the adapter changed the policy
    # checkpoints kept: at most keep_checkpoints (2) of the ones at steps 4 and 8
    kept = [p for p in Path(out["run_path"]).iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert 1 <= len(kept) <= 2


# Restarts: a worker SIGKILLed from outside (bf16 ZeRO-3, tests/test_faults.py) and rank 0's in-process exit
# (train.fail_at_step, tests/test_resume.py, which also checks the resumed adapter against an uninterrupted run).


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dpo_objective_and_linear_schedule(ray_session, pref_data, tmp_path):
    """DPO on the same trainer (ZeRO-2, one worker); sft's path (no base pass) runs in the replay test below."""
    from pipelines.train import train_stage

    cfg = tiny_cfg(tmp_path, objective="dpo", num_workers=1, zero_stage=2, max_steps=2, report_every=1,
                   checkpoint_every=2, schedule="linear", lr=1e-2)
    out = train_stage(cfg, pref_data, str(tmp_path / "train"))
    assert out["steps"] == 2 and [h["step"] for h in out["history"]] == [1, 2]
    assert out["metrics"]["zero_stage"] == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in out["history"])
    # the linear schedule is wired through DeepSpeed: lr after each step (1e-2 -> 5e-3 -> 0)
    assert [h["lr"] for h in out["history"]] == pytest.approx([5e-3, 0.0])
    assert "rewards/margins" in out["metrics"] and "eval_rewards/accuracies" in out["metrics"]
    assert out["history"][0]["loss"] == pytest.approx(0.6931, abs=0.05)  # log 2: policy == reference at start
    assert (Path(out["adapter_dir"]) / "adapter_model.safetensors").exists()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_replay_objective_trains_on_base_answers(ray_session, pref_data, tmp_path):
    """replay: training runs on the head of the authors' mix (48 chosen rows + 6 base answers, interleaved) that a
    4-step budget reads; that the base answers are the base model's own is checked in test_replay.py."""
    import pyarrow.parquet as pq

    from pipelines.train import train_stage

    cfg = tiny_cfg(tmp_path, objective="replay", num_workers=1, zero_stage=2, max_steps=4, report_every=2,
                   checkpoint_every=4, replay_max_new_tokens=8)
    out = train_stage(cfg, pref_data, str(tmp_path / "train"))
    assert out["steps"] == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in out["history"])
    assert "logps/chosen" in out["metrics"] and "rewards/margins" not in out["metrics"]  # SFT metrics, no base pass
    rep = out["replay"]
    # budget 4 steps x 2 rows = 8 of the 48 + 6 mix: chosen keys (i + .5) / 48 = .010 .. .135 (i < 7) and the
    # first base answer at .5 / 6 = .083
    assert (rep["chosen_rows"], rep["replay_requested"]) == (7, 1)
    assert rep["replay_rows"] + rep["replay_dropped"] == 1
    rows = pq.read_table(tmp_path / "train" / "replay_data" / "train").to_pylist()
    assert len(rows) == 7 + rep["replay_rows"] and {r["kind"] for r in rows} <= {"chosen", "replay"}
    assert pq.read_table(tmp_path / "train" / "replay_data" / "eval").num_rows == 8
    assert [json.loads(r["prompt_json"]) for r in rows if r["kind"] == "replay"] in ([_PROMPTS[0]], [])
    chosen = [r["response"] for r in rows if r["kind"] == "chosen"]
    assert chosen == [_YES[i % len(_YES)] for i in range(7)]  # the first pair rows, in order

