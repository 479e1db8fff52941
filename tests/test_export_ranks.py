"""The export's decisions are global rank 0's and every process follows them
(``modules.export.on_global_zero``): a finished folder, a busy folder or a failed save stops every
process, so none waits at a collective that the others never reach."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict

from rlhf_lightning.modules import export
from rlhf_lightning.modules.export import ExportExistsError, GlobalZeroFailed, check_export_dirs, on_global_zero

from .conftest import run_distributed_script

SCRIPT = Path(__file__).with_name("export_ranks_run.py")


class RecordingBroadcast:
    """A strategy's broadcast on one rank: records what the rank sends, returns rank 0's ``sent``."""

    def __init__(self, sent=None) -> None:
        self.sent, self.calls = sent, []

    def broadcast(self, obj, src: int = 0):
        self.calls.append(obj)
        return obj if self.sent is None else self.sent


def fake_trainer(rank: int, broadcast: RecordingBroadcast) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=rank == 0, strategy=broadcast, fast_dev_run=False, ckpt_path=None)


def test_one_process_refuses_a_finished_folder_and_raises_a_failed_saves_own_error(tmp_path: Path, byte_gpt2_dir: Path,
                                                                                     monkeypatch):
    broadcast = RecordingBroadcast()
    module = SimpleNamespace(trainer=fake_trainer(0, broadcast),
                             hparams=AttributeDict(overwrite_export=False, export_dir=str(tmp_path / "new")))
    with pytest.raises(ExportExistsError, match="already holds a finished model"):
        check_export_dirs(module, {"export_dir": str(byte_gpt2_dir)})
    assert isinstance(broadcast.calls[-1], ExportExistsError)  # shared with the other processes
    check_export_dirs(module, {"export_dir": str(tmp_path / "new")})
    assert broadcast.calls[-1] is None

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "save_hf_folder", full_disk)
    with pytest.raises(OSError, match="No space left"):  # rank 0 raises its own error
        export.export_at_fit_end(module, "export_dir", torch.nn.Linear(1, 1), None)
    assert isinstance(broadcast.calls[-1], GlobalZeroFailed) and "OSError: No space left" in str(broadcast.calls[-1])


def test_another_rank_does_not_run_the_action_and_raises_rank_zeros_outcome():
    ran = []
    for sent, expected in ((ExportExistsError("finished"), ExportExistsError), (GlobalZeroFailed("failed"), GlobalZeroFailed)):
        with pytest.raises(expected):
            on_global_zero(fake_trainer(1, RecordingBroadcast(sent)), lambda: ran.append(1))
    on_global_zero(fake_trainer(1, RecordingBroadcast()), lambda: ran.append(1))  # rank 0 succeeded: go on
    assert ran == []


@pytest.mark.slow
def test_every_process_stops_when_only_rank_zero_fails(tmp_path: Path, byte_gpt2_dir: Path):
    run_distributed_script(SCRIPT, byte_gpt2_dir, tmp_path, timeout=180)
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes == [{"exists": "ExportExistsError", "save": "OSError"},
                        {"exists": "ExportExistsError", "save": "GlobalZeroFailed"}]
