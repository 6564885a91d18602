"""The DAG driver (pipelines/full.py) on the shared Ray: stage keys, the manifest, and resume-by-skipping."""
from pathlib import Path

import pytest

from pipelines import full
from pipelines.common import Manifest

pytestmark = [pytest.mark.ray]
ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
DATA = str(ROOT / "data" / "tiny" / "pairs.jsonl")


def _argv(storage, *extra):
    return ["--config", TINY, "--run.storage_path", str(storage), "--data.train_files", f"[{DATA}]", *extra]


def _manifest(storage):
    return Manifest(str(Path(storage) / "tiny"))


@pytest.mark.timeout(420)
def test_rerun_skips_finished_preprocess(ray_session, tmp_path, capsys):
    # 1. interrupted after preprocessing
    res = full.main(_argv(tmp_path, "--stop-after", "preprocess"))
    first = capsys.readouterr().out
    assert "run  preprocess" in first
    entry = _manifest(tmp_path).data["stages"]["preprocess"]
    assert entry["status"] == "finished" and entry["wall_s"] > 0
    assert entry["outputs"]["read"] == 64 and entry["out_dir"] == res["preprocess"]["out_dir"]
    assert entry["out_dir"].endswith(f"/tiny/preprocess/{entry['key']}")
    assert entry["inputs"]["files"][0]["file"] == DATA and entry["worker"]["node_id"]
    stats = Path(entry["out_dir"]) / "stats.json"
    mtime = stats.stat().st_mtime_ns

    # 2. the rerun does not run preprocess again
    again = full.main(_argv(tmp_path, "--stop-after", "preprocess"))
    out = capsys.readouterr().out
    assert "skip preprocess (cached)" in out and "run  preprocess" not in out
    assert _manifest(tmp_path).events("preprocess") == [("preprocess", "run"), ("preprocess", "finish"),
                                                        ("preprocess", "skip")]
    assert stats.stat().st_mtime_ns == mtime
    assert again["preprocess"] == res["preprocess"]

    # 3. --run.resume false forces it; 4. a changed data section is a new key and a new directory
    full.main(_argv(tmp_path, "--stop-after", "preprocess", "--run.resume", "false"))
    assert "run  preprocess" in capsys.readouterr().out
    assert stats.stat().st_mtime_ns != mtime
    changed = full.main(_argv(tmp_path, "--stop-after", "preprocess", "--data.max_length", "48"))
    assert "run  preprocess" in capsys.readouterr().out
    assert changed["preprocess"]["out_dir"] != res["preprocess"]["out_dir"]
    assert [e for _, e in _manifest(tmp_path).events("preprocess")].count("run") == 3
    # switching back finds the first directory again
    full.main(_argv(tmp_path, "--stop-after", "preprocess"))
    assert "skip preprocess (cached)" in capsys.readouterr().out


# The whole DAG end to end (and its all-cached rerun) runs in tests/test_multinode.py, submitted to a 2-node cluster.


@pytest.mark.timeout(420)
def test_training_stages_run_side_by_side(ray_session, tmp_path, capsys):
    """The DAG starts every baseline as soon as preprocessing is done and the cluster has room: with two 1-worker
    trainings on the 4-CPU session (one CPU kept for Ray Data), the two runs overlap in time (the manifest keeps
    when each stage task started and ended). A stage that fails fails the run with its name, after the stage
    running next to it has finished and been recorded as finished (cached for the next run)."""
    argv = _argv(tmp_path, "--stop-after", "train", "--tune.enabled", "false", "--eval.methods", "[dpo, sft]",
                 "--train.num_workers", "1")
    full.main(argv)
    stages = _manifest(tmp_path).data["stages"]
    (a0, a1), (b0, b1) = stages["train/dpo"]["ran"], stages["train/sft"]["ran"]
    assert stages["train/dpo"]["status"] == stages["train/sft"]["status"] == "finished"
    assert max(a0, b0) < min(a1, b1), (stages["train/dpo"]["ran"], stages["train/sft"]["ran"])  # they overlapped
    capsys.readouterr()

    # sft fails at its first step (fault injection, no retries); dpo, already cached, is skipped; qadapter runs
    # next to the failing sft and is recorded as finished before the run fails
    with pytest.raises(full.StageFailed, match=r"stage train/sft failed"):
        full.main(_argv(tmp_path, "--stop-after", "train", "--tune.enabled", "false", "--train.num_workers", "1",
                        "--eval.methods", "[dpo, sft, qadapter]",
                        "--train.method_overrides.sft.train.fail_at_step", "1"))
    out = capsys.readouterr().out
    assert "skip train/dpo (cached)" in out
    stages = _manifest(tmp_path).data["stages"]
    assert stages["train/sft"]["status"] == "failed" and stages["train/qadapter"]["status"] == "finished"
    assert "fail_at_step" not in stages["train/qadapter"]["config"]["train"] or \
        stages["train/qadapter"]["config"]["train"]["fail_at_step"] == -1  # sft's override stays sft's


@pytest.mark.timeout(600)
def test_standalone_stage_commands_chain(ray_session, tmp_path):
    """The README's standalone commands with one config find each other's outputs without flags: preprocess, then
    train, evaluate and report, each reading what the stages before it recorded in the run's manifest. A stage
    started before the stages it reads fails with one error naming the missing stage and its command."""
    from pipelines import evaluate, preprocess, report, train

    argv = _argv(tmp_path, "--tune.enabled", "false", "--eval.methods", "[sft]", "--train.num_workers", "1",
                 "--train.max_steps", "2", "--eval.lm_eval.tasks", "[]")
    with pytest.raises(full.StageFailed, match=r"needs the outputs of stage preprocess.*pipelines/preprocess.py"):
        evaluate.main(argv)
    pre = preprocess.main(argv)
    with pytest.raises(full.StageFailed, match=r"stage train/sft.*pipelines/train.py --train.objective sft"):
        evaluate.main(argv)
    trained = train.main([*argv, "--train.objective", "sft"])
    ev = evaluate.main(argv)
    rep = report.main(argv)
    stages = _manifest(tmp_path).data["stages"]
    assert {s: e["status"] for s, e in stages.items()} == {
        "preprocess": "finished", "train/sft": "finished", "evaluate": "finished", "report": "finished"}
    assert stages["train/sft"]["inputs"] == {"preprocess": stages["preprocess"]["key"]}
    assert ev["methods"]["sft"]["adapter"] == trained["adapter_dir"]
    assert stages["evaluate"]["inputs"]["preprocess"] == stages["preprocess"]["key"] and pre["out_dir"]
    assert (Path(tmp_path) / "tiny" / "report.md").exists() and rep["observations"]
