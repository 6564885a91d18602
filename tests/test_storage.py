"""The storage layer (pipelines/common.py) on a real S3-compatible server: moto's standalone server on 127.0.0.1.

The server runs in its own process group; clients reach it as users reach MinIO or S3: AWS_ENDPOINT_URL, a
region, and credentials from a file (AWS_SHARED_CREDENTIALS_FILE, a path: the pipeline forwards storage
settings to Ray workers, never secrets). The server fixture (``s3_server``) is in conftest.py: the end-to-end run with
``run.storage_path: s3://...`` is the 2-node ``ray job submit`` of tests/test_multinode.py, where object storage is
what lets the nodes share a run.
"""
import time
from pathlib import Path

import pytest

from pipelines import common

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def _keys(bucket: str, prefix: str = "") -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    # pyarrow's create_dir leaves empty "dir/" marker objects: only real files count
    return sorted(o["Key"] for p in pages for o in p.get("Contents", []) if not o["Key"].endswith("/"))


def test_files_on_s3(bucket):
    """Text/JSON round trips, listing, copy and delete through the same calls as local paths."""
    import boto3

    root = f"s3://{bucket}/runs/r"
    common.write_json(common.join(root, "a", "m.json"), {"x": [1, 2]})
    common.write_text(common.join(root, "a", "t.txt"), "héllo\n")
    assert common.read_json(f"{root}/a/m.json") == {"x": [1, 2]}
    assert common.read_text(f"{root}/a/t.txt") == "héllo\n"
    assert common.exists(f"{root}/a") and common.exists(f"{root}/a/t.txt") and not common.exists(f"{root}/b")
    assert common.list_files(f"{root}/a") == ["m.json", "t.txt"] and common.list_files(f"{root}/none") == []
    # the atomic write left no temporary object behind; the bytes are what boto3 reads
    assert _keys(bucket) == ["runs/r/a/m.json", "runs/r/a/t.txt"]
    body = boto3.client("s3").get_object(Bucket=bucket, Key="runs/r/a/t.txt")["Body"].read()
    assert body == "héllo\n".encode()
    common.copy_file(f"{root}/a/t.txt", f"{root}/c/t.txt")
    assert common.read_text(f"{root}/c/t.txt") == "héllo\n"
    common.remove(f"{root}/a")
    common.remove(f"{root}/never")  # absent: nothing happens
    assert _keys(bucket) == ["runs/r/c/t.txt"]


def test_local_copy_downloads_once_and_again_after_a_change(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{bucket}/x/adapter"
    common.write_text(f"{uri}/weights.bin", "A" * 100)
    common.write_text(f"{uri}/sub/cfg.json", "{}")
    first = common.local_copy(uri)
    assert Path(first).name == "adapter" and str(tmp_path / "cache" / "remote") in first
    assert sorted(str(p.relative_to(first)) for p in Path(first).rglob("*") if p.is_file()) == \
        ["sub/cfg.json", "weights.bin"]
    assert Path(first, "weights.bin").read_text() == "A" * 100
    marker = Path(first, "weights.bin").stat().st_mtime_ns
    assert common.local_copy(uri) == first and Path(first, "weights.bin").stat().st_mtime_ns == marker  # cached
    # a retrained adapter: same size, new content (S3 times have 1 s resolution)
    time.sleep(1.1)
    common.write_text(f"{uri}/weights.bin", "B" * 100)
    second = common.local_copy(uri)
    assert second != first and Path(second, "weights.bin").read_text() == "B" * 100
    assert not Path(first).exists()  # the old version is gone: one copy per URI on disk
    # one file; a local path is returned as is; a missing URI is one clear error
    one = common.local_copy(f"{uri}/sub/cfg.json")
    assert Path(one).name == "cfg.json" and Path(one).read_text() == "{}"
    assert common.local_copy(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        common.local_copy(f"s3://{bucket}/nothing-here")


def test_adapter_on_s3_resolves_and_loads(bucket, tiny_model_dir, tmp_path, monkeypatch):
    """An adapter saved to the bucket: found from its train dir, read (objective, QConfig), loaded with its weights."""
    import pyarrow.fs as pafs
    import torch

    from pipelines.evaluate import adapter_objective, resolve_adapter_dir, saved_q_config
    from qcore.config import AdapterConfig, QConfig
    from qcore.model import QAdapterModel

    monkeypatch.setenv("QADAPTER_CACHE", str(tmp_path / "cache"))
    model = QAdapterModel.from_pretrained(tiny_model_dir, adapter_cfg=AdapterConfig(rank=2),
                                          q_cfg=QConfig(alpha_0=0.25))
    with torch.no_grad():
        for n, p in model.peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # B = 0 at init would make any loaded adapter look right
    model.save_pretrained(tmp_path / "saved", objective="qadapter")
    train_dir = f"s3://{bucket}/runs/tiny/train/qadapter-abc"
    fs, path = common.resolve_fs(f"{train_dir}/adapter")
    pafs.copy_files(str(tmp_path / "saved"), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    adir = resolve_adapter_dir(train_dir)
    assert adir == f"{train_dir}/adapter"  # a URI stays a URI: each loader localizes it on its own node
    assert adapter_objective(adir) == "qadapter" and saved_q_config(adir).alpha_0 == 0.25
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        resolve_adapter_dir(f"s3://{bucket}/runs/tiny/train")  # no adapter under it
    loaded = QAdapterModel.from_pretrained(tiny_model_dir, adapter_path=common.local_copy(adir), is_trainable=False)
    want = {n: p for n, p in model.peft_model.named_parameters() if "lora_" in n}
    got = {n: p for n, p in loaded.peft_model.named_parameters() if "lora_" in n}
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert loaded.q_config.alpha_0 == 0.25


def test_storage_settings_and_refusals(monkeypatch):
    from qcore.config import load_config

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-runtime-env")
    env = common.worker_env()
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["OMP_NUM_THREADS"] == common.WORKER_ENV["OMP_NUM_THREADS"]
    cfg = load_config(TINY, ["--run.storage_path", "s3://b/runs?endpoint_override=127.0.0.1:9000"])
    with pytest.raises(ValueError, match="run.storage_path"):
        common.run_dir(cfg)
    assert common.run_dir(load_config(TINY, ["--run.storage_path", "s3://b/runs/"])) == "s3://b/runs/tiny"
