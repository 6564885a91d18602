"""What every stage shares: the CLI, starting or joining Ray, and where a stage's artifacts go."""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from pathlib import Path

# `python pipelines/x.py` from a checkout (and `ray job submit --working-dir .`) must find qcore/ and pipelines/.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from qcore.config import Config, load_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def torch_extensions_dir(prefix: str = sys.prefix) -> str:
    """Where DeepSpeed's JIT-built CPU ops (its shm comm op) go for the Python install at ``prefix``.

    torch's default, ~/.cache/torch_extensions/<py>_<cpu|cu>, is one directory per machine, and the build names
    its sources by path: two checkouts with their own venvs rebuilt the op (~40-70 s) in turns, inside a training
    run. One directory per install (``prefix`` as Python sees it, links unresolved) keeps each one's build."""
    import hashlib

    key = hashlib.sha1(str(prefix).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", f"qadapter-{key}")


# a local Ray cluster's workers inherit it; `make setup` builds into the same directory (an explicit one wins)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())


def _venv_ninja_first() -> None:
    """torch builds that op with whichever `ninja` PATH finds first. The install's own (pip's, next to this Python)
    and the system's hash commands differently in the shared .ninja_log, so each rebuilt the other's output (40-130 s,
    inside a training run or a test) whenever PATH changed between two processes: the install's ninja always wins."""
    bin_dir = os.path.dirname(sys.executable)
    ninja = os.path.join(bin_dir, "ninja")
    if os.access(ninja, os.X_OK) and shutil.which("ninja") != ninja:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


_venv_ninja_first()

WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    # Each ray.train.report() otherwise blocks ~2 s (the controller polls every 2 s).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # Every read_parquet otherwise starts (and kills) 32 footer-reader actors: ~10 s per read on 2 cores. Raise it
    # for datasets of thousands of files (the variable is honoured when set).
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": os.environ.get("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2"),
}
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", WORKER_ENV["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"])

# Object-store settings a worker needs to reach the same bucket as the driver (an S3-compatible endpoint such as
# MinIO, the region, where the credentials live). Secrets themselves (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN) are never forwarded: a runtime_env is visible in the dashboard; set them where Ray runs.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


def worker_env() -> dict[str, str]:
    """WORKER_ENV plus this process's object-store settings (STORAGE_ENV): the env_vars of a stage's runtime_env."""
    return {**WORKER_ENV, **{k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k)}}


def cli_config(description: str, argv: list[str] | None = None) -> Config:
    """``--config profile.yaml`` plus dotted overrides (``--train.lr 1e-4``) -> validated Config."""
    from qcore.config import config_help

    parser = argparse.ArgumentParser(description=description, epilog=config_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    # On a loaded machine a raylet can need over Ray's default 30 s to register ("The current node timed out").
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")  # default 60 s: "Failed to start the dashboard"
    if ray.is_initialized():
        return ray
    runtime_env = {"env_vars": worker_env()}
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address="auto", runtime_env=runtime_env, log_to_driver=True)
    else:
        num_cpus = cfg.run.num_cpus or max(4, os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, include_dashboard=True, runtime_env=runtime_env)
    return ray


def run_dir(cfg: Config) -> str:
    """``<storage_path>/<run name>``: a local absolute path, or a URI (s3://bucket/runs/name) kept as is."""
    base = cfg.run.storage_path
    if is_uri(base) and "?" in base:  # stage paths are joined onto it: a query string would end up mid-path
        raise ValueError(f"config key 'run.storage_path' = {base!r}: no URI parameters; give the endpoint and "
                         "credentials as environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")
    if not is_uri(base):
        base = str(Path(base).expanduser().resolve())
    return f"{base.rstrip('/')}/{cfg.run.name}"


def stage_dir(cfg: Config, stage: str) -> str:
    return f"{run_dir(cfg)}/{stage}"


# ----------------------------------------------------------------------------------------------------------------
# Storage: local paths and pyarrow filesystem URIs (s3://, gs://, file://) through one small API
# ----------------------------------------------------------------------------------------------------------------
def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve_fs(uri: str):
    """``uri`` -> (pyarrow FileSystem, path on it). A plain path is local, resolved against the current directory.

    S3-compatible stores take their endpoint, region and credentials from the environment (AWS_ENDPOINT_URL,
    AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_SHARED_CREDENTIALS_FILE), as Ray does."""
    import pyarrow.fs as pafs

    uri = str(uri)
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' (URIs keep their scheme)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve_fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve_fs(uri)
    fs.create_dir(path, recursive=True)


def remove(uri: str) -> None:
    """Delete a file or a directory tree; nothing when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = resolve_fs(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(path)


def list_files(uri: str) -> list[str]:
    """Names of the files directly in a directory (sorted); [] when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = resolve_fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File)


def read_text(uri: str) -> str:
    fs, path = resolve_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write a whole file atomically (a temporary sibling, then a move): readers never see half a file."""
    fs, path = resolve_fs(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    fs.move(tmp, path)


def read_json(uri: str):
    import json

    return json.loads(read_text(uri))


def write_json(uri: str, data) -> None:
    import json

    write_text(uri, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def copy_file(src: str, dst: str) -> None:
    sfs, spath = resolve_fs(src)
    dfs, dpath = resolve_fs(dst)
    parent = dpath.rsplit("/", 1)[0]
    if parent:
        dfs.create_dir(parent, recursive=True)
    with sfs.open_input_stream(spath) as fin, dfs.open_output_stream(dpath) as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)


def upload_dir(src: str, dst: str) -> None:
    """Copy the local directory ``src`` into ``dst`` (a local path or a URI), file by file, overwriting.

    One thread: pyarrow's threaded copy_files can deadlock on uploads to S3 (apache/arrow#32372; Ray Train's own
    checkpoint upload avoids it the same way). A rank stuck there leaves its peers in a collective until the
    process group's 30-minute timeout."""
    import pyarrow.fs as pafs

    fs, path = resolve_fs(dst)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(src, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    use_threads=False)


def local_copy(uri: str) -> str:
    """A local path holding ``uri`` (a file or a directory tree): a local path as is, a remote one downloaded once.

    The download goes to ``<QADAPTER_CACHE>/remote/<hash of the URI>/<version>/<name>``; the version hashes every
    file's relative path, size and modification time, so a rewritten remote copy (e.g. a retrained adapter) is
    downloaded again and an unchanged one is reused. Concurrent callers (several actors on one node) each download
    to a temporary sibling and the first rename wins: a reader never sees a partial copy."""
    import hashlib
    import json
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    fs, path = resolve_fs(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    path = path.rstrip("/")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: not found")
    if info.type == pafs.FileType.File:
        files = [("", info.size, info.mtime_ns)]
    else:
        files = sorted((i.path[len(path) + 1:], i.size, i.mtime_ns)
                       for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                       if i.type == pafs.FileType.File)
    from qcore.base_models import cache_dir

    base = cache_dir() / "remote" / hashlib.sha256(str(uri).rstrip("/").encode()).hexdigest()[:16]
    version = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    name = path.rsplit("/", 1)[-1] or "root"
    final = base / version
    if not (final / ".complete").exists():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=base))
        try:
            for rel, _, _ in files:  # exactly the listed files: the version names what was downloaded
                target = tmp / name / rel if rel else tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(f"{path}/{rel}" if rel else path) as fin, open(target, "wb") as fout:
                    while chunk := fin.read(1 << 20):
                        fout.write(chunk)
            if info.type == pafs.FileType.Directory:
                (tmp / name).mkdir(exist_ok=True)  # an empty remote directory is an empty local one
            (tmp / ".complete").write_text(str(uri) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished first: its copy is the same version
                if not (final / ".complete").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in base.iterdir():  # older versions of this URI (finished downloads only)
            if old.name != version and not old.name.startswith(".download-"):
                shutil.rmtree(old, ignore_errors=True)
    return str(final / name)


# ----------------------------------------------------------------------------------------------------------------
# Stage keys and the run manifest: a stage whose key matches a finished entry is skipped
# ----------------------------------------------------------------------------------------------------------------
def stage_key(payload: dict) -> str:
    """Stable 12-hex key of a stage's config sections + input keys (JSON, sorted keys) + the code version, so
    that outputs made by other code are never taken for this code's."""
    import hashlib
    import json

    payload = {**payload, "code": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+<git commit>`` of this checkout (the commit where git and a .git are there; a
    ``ray job submit`` working dir has none)."""
    import importlib.metadata
    import subprocess

    try:
        version = importlib.metadata.version("qadapter")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "-C", _ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit[:12]}" if commit else version


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """``<run dir>/manifest.json``: one entry per stage (config key, inputs, outputs, wall seconds, status) and an
    append-only log of what each invocation did (``run`` / ``skip`` / ``finish`` / ``fail``).

    Finished entries are also kept by ``<stage>@<key>`` so that switching a config back finds its old outputs.
    Only the driver writes it (atomically, after every state change), so an interrupted run leaves a valid file.
    """

    def __init__(self, root: str):
        self.root = root
        self.path = join(root, "manifest.json")
        self.data = {"run_dir": root, "stages": {}, "finished": {}, "log": []}
        if exists(self.path):
            loaded = read_json(self.path)
            for k in self.data:
                self.data[k] = loaded.get(k, self.data[k])

    def save(self) -> None:
        self.data["updated_at"] = _now()
        write_json(self.path, self.data)

    def cached(self, stage: str, key: str) -> dict | None:
        """The finished entry of ``stage`` with this key whose output directory still exists, else None."""
        entry = self.data["finished"].get(f"{stage}@{key}")
        if entry and entry.get("status") == "finished" and exists(entry["out_dir"]):
            return entry
        return None

    def log(self, stage: str, key: str, event: str, **extra) -> None:
        self.data["log"].append({"stage": stage, "key": key, "event": event, "time": _now(), **extra})

    def begin(self, stage: str, key: str, config: dict, inputs: dict, out_dir: str) -> dict:
        # a stage that starts again forgets its old completion: a crash now must not leave an entry to skip over
        self.data["finished"].pop(f"{stage}@{key}", None)
        entry = {"stage": stage, "key": key, "status": "running", "config": config, "inputs": inputs,
                 "out_dir": out_dir, "outputs": None, "wall_s": None, "started_at": _now(), "finished_at": None}
        self.data["stages"][stage] = entry
        self.log(stage, key, "run")
        self.save()
        return entry

    def end(self, entry: dict, status: str, wall_s: float, outputs: dict | None = None, error: str | None = None,
            **extra) -> None:
        entry.update(status=status, wall_s=round(wall_s, 3), finished_at=_now(), outputs=outputs, **extra)
        if error is not None:
            entry["error"] = error
        if status == "finished":
            self.data["finished"][f"{entry['stage']}@{entry['key']}"] = entry
        self.log(entry["stage"], entry["key"], "finish" if status == "finished" else status, wall_s=entry["wall_s"])
        self.save()

    def skip(self, stage: str, entry: dict) -> None:
        self.data["stages"][stage] = entry
        self.log(stage, entry["key"], "skip")
        self.save()

    def events(self, stage: str | None = None) -> list[tuple[str, str]]:
        """``[(stage, event), ...]`` in order (tests read the log through this)."""
        return [(e["stage"], e["event"]) for e in self.data["log"] if stage is None or e["stage"] == stage]


def run_stage(manifest: Manifest, stage: str, key: str, config: dict, inputs: dict, out_dir: str, call,
              resume: bool = True) -> dict:
    """Run ``call() -> dict`` as stage ``stage`` unless a finished entry with the same key exists (``resume``).

    Prints ``skip <stage> (cached)`` for a skipped stage; records status/wall time/outputs in the manifest either way.
    ``call`` may return ``{"result": ..., **extra}`` when it was wrapped (``extra`` goes to the entry, e.g. node).
    """
    import json
    import time

    if resume:
        hit = manifest.cached(stage, key)
        if hit is not None:
            print(f"skip {stage} (cached)  {out_dir}", flush=True)
            manifest.skip(stage, hit)
            return hit["outputs"]
    print(f"run  {stage}  key={key}  -> {out_dir}", flush=True)
    entry = manifest.begin(stage, key, config, inputs, out_dir)
    t0 = time.time()
    try:
        got = call()
    except BaseException as err:  # KeyboardInterrupt too: the entry must not stay "running"
        manifest.end(entry, "failed", time.time() - t0, error=f"{type(err).__name__}: {err}"[:2000])
        raise
    extra = {}
    if isinstance(got, dict) and set(got) >= {"result", "worker"}:
        extra = {"worker": got["worker"]}
        got = got["result"]
    outputs = json.loads(json.dumps(got, default=str))  # JSON-safe copy (paths, numbers, lists)
    wall = time.time() - t0
    manifest.end(entry, "finished", wall, outputs=outputs, **extra)
    print(f"done {stage}  {wall:.1f}s", flush=True)
    return outputs
