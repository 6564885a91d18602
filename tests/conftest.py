"""Shared fixtures. Everything is offline: no hub downloads, tiny random-init models, one Ray session."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # ray.train.report otherwise blocks ~2 s
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# A loaded 2-core machine can take over 30 s (Ray's default) to register a raylet: "The current node timed out
# during startup".
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")  # default 60 s: "Failed to start the dashboard"

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir():
    """A saved tiny random-init Llama + BPE tokenizer with a ChatML template (built once, cached on disk)."""
    from qcore.base_models import resolve_model_path

    return resolve_model_path("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model():
    """A fresh tiny random-init Llama (vocab 384) for unit tests that need no tokenizer."""
    from qcore.base_models import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every Ray test (ray.init costs ~4 s). 4 logical CPUs: Ray Data + 2 Train workers on
    2 cores otherwise deadlock (see docs/environment notes). The dashboard stays on: Tune needs it."""
    import ray

    from pipelines.common import WORKER_ENV  # what the pipelines give their workers (threads, Ray Data, reports)

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False,
                 runtime_env={"env_vars": WORKER_ENV})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server in its own process group (as users reach MinIO or S3: an endpoint, a region and a
    credentials file); yields the environment a client needs to reach it."""
    work = tmp_path_factory.mktemp("moto")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    creds = work / "credentials"
    creds.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    endpoint = f"http://127.0.0.1:{port}"
    with open(work / "moto.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not come up: {(work / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: exactly the server
        proc.wait(timeout=30)


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A fresh bucket on ``s3_server``; this test's environment points at the server (no real AWS keys reach it)."""
    import uuid

    import boto3

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    name = f"qa-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
