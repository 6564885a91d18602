"""Checkpoints are data, not code: every file the trainer's resume reads is unpickled weights-only. A crafted
pickle (a ``__reduce__`` that writes a marker file when unpickled) placed in a checkpoint is refused with an error
naming the file, and its code never runs; every file DeepSpeed itself writes still loads."""
import glob
import os
import pickle
import shutil
import time
import types
from pathlib import Path

import pytest
import torch

from test_train import pref_data, tiny_cfg  # noqa: F401  (a fixture)


class _Payload:
    """Unpickling this runs code: it writes ``marker`` (what an attacker's checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _craft(path: Path, marker: Path) -> None:
    """A torch checkpoint file shaped like DeepSpeed's, with the payload inside."""
    torch.save({"module": {"w": torch.zeros(2)}, "dp_world_size": 1, "payload": _Payload(marker)}, path)


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    """No Ray: the loader the trainer gives DeepSpeed refuses the file by name; while DeepSpeed loads, even its own
    direct ``torch.load(weights_only=False)`` calls are weights-only; the payload is live (a plain load runs it)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from pipelines.train import UnsafeCheckpointError, _WeightsOnlyLoads, safe_torch_load

    live, live_marker = tmp_path / "live.pt", tmp_path / "live-ran"
    _craft(live, live_marker)
    torch.load(live, weights_only=False)  # what DeepSpeed's own loader does: the code runs
    assert live_marker.read_text() == "code ran"

    crafted, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "ran"
    _craft(crafted, marker)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint file") as err:
        safe_torch_load(str(crafted))
    assert str(crafted) in str(err.value) and "'exec'" in str(err.value)
    assert not marker.exists()

    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with _WeightsOnlyLoads(engine):
        with pytest.raises(UnsafeCheckpointError, match=str(crafted)):
            engine.checkpoint_engine.load(str(crafted), map_location="cpu")
        with pytest.raises(pickle.UnpicklingError):  # DeepSpeed's direct torch.load(..., weights_only=False)
            torch.load(crafted, weights_only=False)
    assert not marker.exists()
    # afterwards DeepSpeed's engine and the process are as they were
    assert "load" not in vars(engine.checkpoint_engine)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before
    genuine = tmp_path / "genuine.pt"
    torch.save({"w": torch.arange(3.0)}, genuine)
    assert torch.equal(safe_torch_load(str(genuine))["w"], torch.arange(3.0))


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_resume_refuses_crafted_checkpoint(ray_session, pref_data, tmp_path):  # noqa: F811
    """Through the real trainer (Ray Train + DeepSpeed ZeRO-3, one worker): a checkpoint whose model-states file is
    a crafted pickle is refused by name and the marker is never written. Genuine checkpoints still resume through
    the same weights-only loader: a Ray Train restart and a ``train.resume_from`` in tests/test_resume.py (which
    also shows the resumed adapter is exact), the restarts in tests/test_train.py and tests/test_faults.py."""
    from pipelines.train import DS_SUBDIR, safe_torch_load, train_stage

    t0 = time.time()
    first = train_stage(tiny_cfg(tmp_path, num_workers=1, max_steps=2, report_every=2, checkpoint_every=2),
                        pref_data, str(tmp_path / "first"))
    genuine = first["checkpoint_dir"]
    files = sorted(glob.glob(f"{genuine}/{DS_SUBDIR}/**/*.pt", recursive=True))
    assert any(f.endswith("model_states.pt") for f in files) and any(f.endswith("optim_states.pt") for f in files)
    for f in files:  # every file DeepSpeed wrote loads weights-only: the allow-list covers what it stores
        assert isinstance(safe_torch_load(f), dict)

    tampered = tmp_path / "tampered"
    shutil.copytree(genuine, tampered)
    target = Path(glob.glob(f"{tampered}/{DS_SUBDIR}/**/*model_states.pt", recursive=True)[0])
    marker = tmp_path / "code-ran"
    _craft(target, marker)
    with pytest.raises(Exception) as err:
        train_stage(tiny_cfg(tmp_path, num_workers=1, max_steps=4, report_every=2, checkpoint_every=2,
                             resume_from=str(tampered)), pref_data, str(tmp_path / "bad"))
    print(f"\n[wall] train 2 steps + refused resume (1 worker): {time.time() - t0:.1f}s")
    assert "refusing to load checkpoint file" in str(err.value) and str(target) in str(err.value), str(err.value)
    assert not marker.exists()
