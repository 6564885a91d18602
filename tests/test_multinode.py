"""A real 2-node Ray cluster on loopback (token auth on) running pipelines/full.py through `ray job submit`, its run
on an S3-compatible server (moto, conftest's ``s3_server``): what lets a real cluster's nodes share one run.

Each node is `ray start --block` in its own process group (a new session); the test ends exactly those two groups
afterwards, never a broad `ray stop`. Every port is picked here and the temp dir is the test's own, so other Ray
sessions on the machine are untouched.
"""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
NODE_CPUS = 3


def _free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _env(storage_env: dict):
    env = {**os.environ, **storage_env}  # both nodes, and so the job's driver, reach the bucket
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` = ours
    # the cluster's own token: a fresh machine has no ~/.ray/auth_token, and `ray start` never creates one
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_raylet_start_wait_time_s="120", RAY_DASHBOARD_STARTUP_TIMEOUT_S="300",
               RAY_USAGE_STATS_ENABLED="0")
    return env


def _node_ports():
    p = _free_ports(6)
    return ["--node-manager-port", p[0], "--object-manager-port", p[1], "--metrics-export-port", p[2],
            "--dashboard-agent-listen-port", p[3], "--dashboard-agent-grpc-port", p[4],
            "--runtime-env-agent-port", p[5]]


def _group_alive(pgid: int) -> bool:
    """Whether a process group has a live member; zombies (nobody here may reap them) do not count."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class Cluster:
    def __init__(self, storage_env: dict):
        self.tmp = tempfile.mkdtemp(prefix="rqmn", dir="/tmp")  # short: Unix socket paths have a length limit
        self.procs: list[subprocess.Popen] = []
        self.env = _env(storage_env)
        self.failed = False

    def _start(self, name, args):
        log = open(os.path.join(self.tmp, f"{name}.log"), "w")
        cmd = [RAY, "start", "--block", "--num-cpus", str(NODE_CPUS), "--node-ip-address", "127.0.0.1",
               "--object-store-memory", str(300 * 1024**2), "--disable-usage-stats", *map(str, [*args, *_node_ports()])]
        # start_new_session: setsid, so the node and everything it forks form one process group we can end
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True, cwd=self.tmp))

    def start(self, attempts=4):
        """Head, then worker. On a loaded machine a raylet aborts when its dashboard agent has not written its
        port file within a fixed ~15 s ("Timed out waiting for file .../dashboard_agent_listen_port_..." in
        raylet.out; RAY_agent_register_timeout_ms does not change it). A failed start ends both groups and
        starts again on fresh ports in a fresh temp dir."""
        for attempt in range(1, attempts + 1):
            self.gcs_port, self.dash_port, self.client_port = _free_ports(3)
            self.address = f"http://127.0.0.1:{self.dash_port}"
            temp_dir = os.path.join(self.tmp, f"t{attempt}")
            try:
                self._start(f"head{attempt}", [
                    "--head", "--port", self.gcs_port, "--dashboard-port", self.dash_port, "--dashboard-host",
                    "127.0.0.1", "--ray-client-server-port", self.client_port, "--temp-dir", temp_dir,
                    "--include-dashboard", "true"])
                self._wait(lambda: self.alive_nodes() == 1, 240, "the head node")
                # its own temp dir: with the head's, both nodes unpack a job's working_dir into one
                # runtime_resources dir and one re-creates it under the running driver, whose cwd then is gone
                # ("FileNotFoundError: [Errno 2] No such file or directory" from os.path.abspath)
                self._start(f"worker{attempt}", ["--address", f"127.0.0.1:{self.gcs_port}",
                                                 "--temp-dir", f"{temp_dir}w"])
                self._wait(lambda: self.alive_nodes() == 2, 240, "2 alive nodes")
                return attempt
            except (AssertionError, TimeoutError):
                if attempt == attempts:
                    self.failed = True
                    raise
                self._end_all()

    def _end_all(self):
        """SIGTERM every group at once, SIGKILL whatever is left after 5 s (a node's graceful shutdown took ~30 s of
        every test run, and this cluster's state is thrown away), and wait until nothing of any group is left."""
        def signal_group(proc, sig):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # ended meanwhile
                pass

        for proc in self.procs:
            signal_group(proc, signal.SIGTERM)
        deadline = time.time() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        while time.time() < deadline + 30:  # a group outlives its leader while the node's children shut down
            left = [proc for proc in self.procs if _group_alive(proc.pid)]
            if not left:
                break
            if time.time() > deadline:
                for proc in left:
                    signal_group(proc, signal.SIGKILL)
            time.sleep(0.5)
        self.procs.clear()

    def cli(self, *args, timeout=120):
        # --address goes before a "--" entrypoint separator: after it, it would be an argument of the job
        if "--" in args:
            cut = args.index("--")
            args = (*args[:cut], "--address", self.address, *args[cut:])
        else:
            args = (*args, "--address", self.address)
        return subprocess.run([RAY, *args], env=self.env, cwd=ROOT, text=True, capture_output=True,
                              timeout=timeout)

    def alive_nodes(self):
        out = self.cli("list", "nodes", "--format", "json")
        try:  # "No resource in the cluster" (not JSON) while the nodes register
            nodes = json.loads(out.stdout) if out.returncode == 0 else []
        except json.JSONDecodeError:
            nodes = []
        return sum(n.get("state") == "ALIVE" for n in nodes)

    def _wait(self, ok, timeout, what):
        end = time.time() + timeout
        while time.time() < end:
            dead = [p.args[2:4] for p in self.procs if p.poll() is not None]
            assert not dead, f"a node exited while waiting for {what}: {self.logs()}"
            if ok():
                return
            time.sleep(2)
        raise TimeoutError(f"no {what} after {timeout}s: {self.logs()}")

    def logs(self):
        out = {f.name: f.read_text()[-1500:] for f in Path(self.tmp).glob("*.log")}
        for f in Path(self.tmp).glob("t*/session_*/logs/raylet.out"):  # why a raylet died, when it did
            out.update({str(f): line[-400:] for line in f.read_text().splitlines() if "Check failed" in line})
        return out

    def submit(self, *entry_args, timeout=900):
        t0 = time.time()
        for _ in range(30):  # the head's job agent registers a while after the node is up
            job_id = f"qadapter-{uuid.uuid4().hex[:8]}"
            out = self.cli("job", "submit", "--submission-id", job_id, "--working-dir", str(ROOT), "--",
                           "python", "pipelines/full.py", *entry_args, timeout=timeout)
            if "No available agent to submit job" not in out.stderr + out.stdout:
                break
            time.sleep(5)
        wall = time.time() - t0
        status = self.cli("job", "status", job_id)
        if out.returncode:  # the whole driver log, for the failure message
            print(self.cli("job", "logs", job_id).stdout[-20000:])
            print(out.stderr[-5000:])
        return job_id, out, status, wall

    def stop(self):
        """End exactly our process groups (SIGTERM, then SIGKILL for whatever is left)."""
        self._end_all()
        if self.failed or os.environ.get("QADAPTER_KEEP_CLUSTER_LOGS"):
            print(f"cluster logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_server):
    c = Cluster(s3_server)
    t0 = time.time()

    def _on_sigterm(signum, frame):  # e.g. an outer `timeout`: still end our process groups (finally below)
        raise SystemExit(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        attempt = c.start()
        print(f"2-node cluster up in {time.time() - t0:.1f}s (attempt {attempt})")
        yield c
    finally:
        groups = [p.pid for p in c.procs]
        t0 = time.time()
        c.stop()
        print(f"2-node cluster ended in {time.time() - t0:.1f}s")
        signal.signal(signal.SIGTERM, previous)
    assert groups and not any(_group_alive(g) for g in groups)  # the groups are gone


def _check_upload(out: str, manifest: dict):
    """The working dir went up without .venv (honouring .gitignore): small, and the unpacked copy has no .venv."""
    sizes = re.findall(r"Uploading package \S+ \(([\d.]+)(KiB|MiB|GiB)\)", out)
    if sizes:
        value, unit = sizes[0]
        assert unit != "GiB" and not (unit == "MiB" and float(value) > 20), out[:2000]
    worker = manifest["stages"]["preprocess"]["worker"]
    unpacked = Path(worker["cwd"])
    assert worker["code"].startswith(str(unpacked)), worker  # the stage ran the uploaded code, not /work/main
    assert "runtime_resources" in str(unpacked) and (unpacked / "pipelines" / "full.py").exists()
    assert not (unpacked / ".venv").exists() and not (unpacked / "runs").exists()


@pytest.mark.timeout(1800)  # includes starting the cluster (retried on a loaded machine)
def test_job_submit_full_pipeline_on_two_nodes(cluster, bucket):
    """The tiny profile end to end, submitted with `ray job submit --working-dir .` to the 2-node cluster, with
    run.storage_path on the bucket: every artifact lands there; the same job again skips every stage."""
    import io

    import pandas as pd

    from pipelines import common
    from test_storage import _keys

    storage = f"s3://{bucket}/runs"
    job_id, out, status, wall = cluster.submit("--config", "configs/tiny.yaml", "--run.storage_path", storage,
                                               timeout=1700)
    print(f"job {job_id}: {wall:.1f}s")
    assert out.returncode == 0 and "succeeded" in out.stdout, (out.stdout[-6000:], out.stderr[-4000:])
    assert "succeeded" in (status.stdout + status.stderr).lower()
    manifest = common.Manifest(f"{storage}/tiny").data
    stages = manifest["stages"]
    assert sorted(stages) == ["evaluate", "preprocess", "report", "train/qadapter", "tune"], sorted(stages)
    assert all(e["status"] == "finished" for e in stages.values()), stages
    for name in stages:
        assert f"run  {name}" in out.stdout, name
    stats = common.read_json(stages["preprocess"]["outputs"]["stats_path"])
    assert (stats["read"], stats["kept"], stats["rejected"]) == (64, 64, 0)
    assert "64 read, 64 kept, 0 rejected" in out.stdout
    _check_upload(out.stdout + out.stderr, manifest)

    # every artifact in the bucket, each stage reading the one before it from there
    rel = [k[len("runs/tiny/"):] for k in _keys(bucket, "runs/tiny/")]
    for name in ("manifest.json", "report.md", "report.json"):
        assert name in rel, rel
    assert any(k.startswith("preprocess/") and k.endswith("/stats.json") for k in rel), rel
    assert any(k.startswith("tune/") and k.endswith("/results.csv") for k in rel), rel
    assert any(k.startswith("evaluate/") and k.endswith("/results.json") for k in rel), rel
    train = stages["train/qadapter"]["outputs"]
    adapter = train["adapter_dir"]
    assert adapter.startswith(f"{storage}/tiny/train/qadapter-") and adapter.endswith("/adapter"), adapter
    for f in ("adapter_config.json", "adapter_model.safetensors", "qadapter.json"):
        assert f"{adapter[len(f'{storage}/tiny/'):]}/{f}" in rel, (f, rel)
    assert train["metrics"], train
    tune = stages["tune"]["outputs"]
    trials = pd.read_csv(io.StringIO(common.read_text(tune["results_csv"])))
    assert len(trials) >= 2, trials
    assert common.exists(tune["results_md"])
    results = common.read_json(stages["evaluate"]["outputs"]["results_path"])
    assert set(results["methods"]) >= {"base", "qadapter"}
    assert results["methods"]["qadapter"]["adapter"] == adapter  # what was evaluated: the bucket's adapter
    assert "qadapter" in common.read_text(f"{storage}/tiny/report.md")
    # the report read the sweep's results.csv from the bucket (it plots the Tune front only when it finds it)
    assert any(k.startswith("report/") and k.endswith("plots/tune_pareto.png") for k in rel), rel
    assert "artifacts of run 'tiny'" in out.stdout

    # the same job again: every stage's key matches a finished manifest entry, nothing runs
    job_id, out, status, wall = cluster.submit("--config", "configs/tiny.yaml", "--run.storage_path", storage)
    print(f"job {job_id} (all cached): {wall:.1f}s")
    assert out.returncode == 0 and "succeeded" in out.stdout, (out.stdout[-6000:], out.stderr[-4000:])
    for name in stages:
        assert f"skip {name} (cached)" in out.stdout and f"run  {name}" not in out.stdout, name
    events = common.Manifest(f"{storage}/tiny").events()
    assert [e for _, e in events].count("run") == 5 and [e for _, e in events].count("skip") == 5, events
