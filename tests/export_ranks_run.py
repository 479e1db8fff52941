"""Run by tests/test_export_ranks.py: the export's decisions on 2 CPU processes (gloo), where only
global rank 0 can fail (it alone looks at the folders and writes).

    python tests/export_ranks_run.py FINISHED OUT

Rank 0's fit names the finished model folder ``FINISHED``, rank 1's a folder that does not exist
(as when only rank 0 sees the shared disk); then rank 0's save fails. Each rank writes
``OUT/rank<N>.json``: the error each step raised there (``null``: none). Every process must raise or none: a
process that goes on alone waits forever at the next collective.
"""

import json
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from lightning.fabric.utilities.data import AttributeDict

from rlhf_lightning.modules import export


class GlooStrategy:
    """A strategy's collectives, as Lightning's DDP strategy runs them."""

    def broadcast(self, obj, src: int = 0):
        objects = [obj]
        dist.broadcast_object_list(objects, src)
        return objects[0]

    def barrier(self, name: str | None = None) -> None:
        dist.barrier()


def outcome(step) -> str | None:
    try:
        step()
    except Exception as err:
        return type(err).__name__
    return None


def fail_on_rank_zero(*args, **kwargs) -> None:
    raise OSError("No space left on device")


def run(rank: int, port: int, finished: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    trainer = SimpleNamespace(is_global_zero=rank == 0, strategy=GlooStrategy(), fast_dev_run=False, ckpt_path=None)
    folder = finished if rank == 0 else str(Path(out) / "missing")
    module = SimpleNamespace(trainer=trainer, hparams=AttributeDict(overwrite_export=False, export_dir=folder))
    exists = outcome(lambda: export.check_export_dirs(module, {"export_dir": folder}))
    export.save_hf_folder = fail_on_rank_zero  # only rank 0 saves
    module.hparams.update(overwrite_export=True, export_dir=str(Path(out) / "new"))
    save = outcome(lambda: export.export_at_fit_end(module, "export_dir", torch.nn.Linear(1, 1), None))
    dist.barrier()  # a process that went on alone would wait here
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"exists": exists, "save": save}))
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    torch.multiprocessing.spawn(run, args=(free_port, sys.argv[1], sys.argv[2]), nprocs=2)
