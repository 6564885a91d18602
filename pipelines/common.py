"""What every stage shares: the CLI, starting or joining Ray, and where a stage's artifacts go."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# `python pipelines/x.py` from a checkout (and `ray job submit --working-dir .`) must find qcore/ and pipelines/.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from qcore.config import Config, load_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Each ray.train.report() otherwise blocks ~2 s (the controller polls every 2 s).
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
}


def cli_config(description: str, argv: list[str] | None = None) -> Config:
    """``--config profile.yaml`` plus dotted overrides (``--train.lr 1e-4``) -> validated Config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML profile (default: configs/default.yaml)")
    args, rest = parser.parse_known_args(argv)
    path = args.config or str(Path(_ROOT) / "configs" / "default.yaml")
    return load_config(path, rest)


def init_ray(cfg: Config):
    """Join the cluster this driver was submitted to (ray job submit / RAY_ADDRESS), else start a local one.

    A local Ray declares at least 4 logical CPUs: on 2 cores, Ray Data and 2 Train workers otherwise deadlock.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": WORKER_ENV}
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address="auto", runtime_env=runtime_env, log_to_driver=True)
    else:
        num_cpus = cfg.run.num_cpus or max(4, os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env=runtime_env)
    return ray


def run_dir(cfg: Config) -> str:
    """``<storage_path>/<run name>``: a local absolute path, or a URI (s3://bucket/runs/name) kept as is."""
    base = cfg.run.storage_path
    if "://" not in base:
        base = str(Path(base).expanduser().resolve())
    return f"{base.rstrip('/')}/{cfg.run.name}"


def stage_dir(cfg: Config, stage: str) -> str:
    return f"{run_dir(cfg)}/{stage}"
