"""Writing a stage's Hugging Face folders when its fit ends, and guarding them while it runs.

Every stage is an :class:`ExportingModule`: its fit

* refuses the Trainer strategies and precisions no stage supports (:meth:`ExportingModule.setup`);
* refuses to start while another run writes one of its folders (:class:`ExportLock`, held from
  setup until the fit ends or fails);
* refuses, before training and again just before writing, to replace a folder that already
  holds a finished stage, unless ``overwrite_export`` (:func:`check_export_dirs`);
* writes checkpoints and folders atomically.

What touches the filesystem (the lock, the finished-folder check, the export) is decided on the
global-zero process, and every process learns the outcome (:func:`on_global_zero`), so that all
of them stop or all go on.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..checkpoint_io import use_atomic_checkpoints
from ..errors import UserInputError
from ..lora import ADAPTER_SUBFOLDER, AdapterCritic, LoRASettings, is_adapter_model, merged_model
from ..models import is_complete_hf_folder, save_hf_folder
from ..optim import check_precision
from ..sharding import check_strategy, gathered_state_dict


class ExportExistsError(UserInputError):
    """An export folder already holds a finished stage and ``overwrite_export`` is off."""


class ExportBusyError(UserInputError):
    """Another run is writing the export folder."""


class GlobalZeroFailed(RuntimeError):
    """What the global-zero process did for every process failed there (see :func:`on_global_zero`)."""


def on_global_zero(trainer: Trainer, action: Callable[[], None]) -> None:
    """Run ``action`` on the global-zero process alone, then share its outcome with every process
    (``strategy.broadcast``, which each of them joins): when ``action`` raised, the global-zero
    process raises that error again, and every other one raises it too (a
    :class:`UserInputError`, whose one-line message the CLI prints) or a :class:`GlobalZeroFailed`
    naming it. So no process goes on to a collective (a barrier, a gather, the next training
    step) that the others never reach, which would hang the run."""
    error: Exception | None = None
    if trainer.is_global_zero:
        try:
            action()
        except Exception as err:  # shared below, then raised again
            error = err
    if error is None or isinstance(error, UserInputError):
        shared: Exception | None = error
    else:
        shared = GlobalZeroFailed(f"global rank 0 failed: {type(error).__name__}: {error}")
    shared = trainer.strategy.broadcast(shared)
    if error is not None:
        raise error
    if shared is not None:
        raise shared


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` for one run: ``fcntl.flock`` on the hidden
    sibling file ``.<name>.lock``, which holds the owner's pid.

    ``flock`` belongs to one open file, so two locks on a folder conflict even within one
    process. The system drops the lock when the process ends, however it ends; :meth:`release`
    drops it sooner and removes the file.
    """

    def __init__(self, folder: str | os.PathLike[str], key: str = "export_dir") -> None:
        self.folder, self.key = str(folder), key
        resolved = Path(folder).expanduser().resolve()
        self.path = resolved.with_name(f".{resolved.name}.lock")
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`ExportBusyError` naming the folder and the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")  # created if missing, never truncated here
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise ExportBusyError(
                    f"model.init_args.{self.key}: '{self.folder}' is being written by another run (pid {owner}); "
                    f"hint: wait for that run to end, or choose another {self.key}"
                ) from None
            if self._still_at_path(handle):
                break
            handle.close()  # its holder released and removed it meanwhile: lock the file now there
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def _still_at_path(self, handle: IO[str]) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(handle.fileno())
        return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    def release(self) -> None:
        """Drop the lock (a no-op when not held); the file is removed while still locked, so a
        run waiting on it sees that and locks a new one."""
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None


class ExportLock(Callback):
    """Holds a :class:`FolderLock` on each folder an :class:`ExportingModule`'s fit writes, from
    ``setup`` (before any model loads) until the fit ends or fails, on the global-zero process
    (the one that writes). Nothing is locked under ``fast_dev_run``: it exports nothing."""

    def __init__(self) -> None:
        self.locks: list[FolderLock] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.fast_dev_run:
            return
        # every process stops, not only the one that knows
        on_global_zero(trainer, lambda: self.acquire(pl_module.export_dirs()))

    def acquire(self, export_dirs: Mapping[str, str]) -> None:
        """Lock each folder of ``export_dirs`` (config key -> folder), or raise :class:`ExportBusyError`."""
        for key, folder in export_dirs.items():
            lock = FolderLock(folder, key)
            lock.acquire()
            self.locks.append(lock)

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.release()


class ExportingModule(LightningModule):
    """A stage whose fit ends by writing Hugging Face folders, each named by a hyperparameter
    (:meth:`export_keys`); ``hparams.overwrite_export`` allows replacing finished ones.

    Subclasses that override ``setup``, ``configure_callbacks`` or ``on_fit_start`` call
    ``super()``. A stage that trains LoRA adapters sets :attr:`lora`.
    """

    lora: LoRASettings | None = None

    def export_keys(self) -> tuple[str, ...]:
        """The hyperparameters that name the folders this fit writes."""
        return ("export_dir",)

    def export_dirs(self) -> dict[str, str]:
        """Config key -> folder of each folder this fit writes (unset ones left out)."""
        return {key: self.hparams[key] for key in self.export_keys() if self.hparams.get(key)}

    def setup(self, stage: str) -> None:
        """Refuse, before any model loads, the Trainer strategies
        (:func:`~rlhf_lightning.sharding.check_strategy`) and precisions
        (:func:`~rlhf_lightning.optim.check_precision`) no stage supports."""
        check_strategy(self.trainer.strategy, type(self).__name__, self.lora)
        check_precision(self.trainer.precision)

    def configure_callbacks(self) -> list[Callback]:
        return [ExportLock()]

    def on_fit_start(self) -> None:
        """Before the first step: refuse to replace a finished model; write checkpoints atomically."""
        check_export_dirs(self, self.export_dirs())
        use_atomic_checkpoints(self.trainer)


def check_export_dirs(module: LightningModule, export_dirs: Mapping[str, str]) -> None:
    """Raise :class:`ExportExistsError` if a folder the fit would export to is already complete.

    ``export_dirs`` maps the config key (``export_dir``, ``policy_export_dir``, ...) to its
    folder. Called from ``on_fit_start``, so a rerun of a finished stage stops before the first
    training step instead of replacing the earlier result at the end, and again just before
    writing (:func:`export_at_fit_end`), for a folder finished meanwhile by a run that took no
    lock. Nothing is refused with ``overwrite_export``, under ``fast_dev_run`` (it exports
    nothing) or when resuming from a checkpoint (``ckpt_path``: the run continues the one that
    wrote the folder). The global-zero process looks, and every process raises or none does
    (:func:`on_global_zero`).
    """
    trainer = module.trainer
    if module.hparams.overwrite_export or trainer.fast_dev_run or trainer.ckpt_path is not None:
        return
    on_global_zero(trainer, lambda: refuse_finished_folders(export_dirs))


def refuse_finished_folders(export_dirs: Mapping[str, str]) -> None:
    """Raise :class:`ExportExistsError` for the first folder of ``export_dirs`` (config key ->
    folder) that already holds a finished model."""
    for key, folder in export_dirs.items():
        if is_complete_hf_folder(folder):
            raise ExportExistsError(
                f"model.init_args.{key}: '{folder}' already holds a finished model, which this fit would "
                "replace when it ends; hint: delete the folder, choose another "
                f"{key}, or set model.init_args.overwrite_export: true"
            )


def export_at_fit_end(
    module: ExportingModule,
    key: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lora: LoRASettings | None = None,
) -> None:
    """Save ``model`` + ``tokenizer`` to the folder of the hyperparameter ``key`` on rank zero,
    atomically.

    A LoRA (peft) model, or a critic adapter (:class:`~rlhf_lightning.lora.AdapterCritic`), is
    saved merged, as a plain Hugging Face folder, and with
    ``lora.export_adapter`` its adapter alone goes to the ``adapter`` subfolder too. An FSDP2-sharded
    model is gathered whole to rank zero first (:func:`~rlhf_lightning.sharding.gathered_state_dict`),
    so every rank must call this. Skipped under
    ``fast_dev_run`` (a smoke run must not replace a trained model) and when the folder is unset.
    """
    trainer = module.trainer
    export_dir: Any = module.hparams.get(key)
    if not export_dir:
        return
    if trainer.fast_dev_run:
        rank_zero_info(f"fast_dev_run: not exporting to {export_dir}")
        return
    check_export_dirs(module, {key: export_dir})
    # FSDP2: every rank sends its shards, and rank zero gets the full state dict (the others an
    # empty one). None: the model is not sharded, and rank zero saves its own weights.
    state_dict = gathered_state_dict(model)

    def save() -> None:
        if is_adapter_model(model) or isinstance(model, AdapterCritic):
            save_hf_folder(export_dir, merged_model(model), tokenizer)
            if lora is not None and lora.export_adapter:
                save_hf_folder(Path(export_dir) / ADAPTER_SUBFOLDER, model, tokenizer)
        else:
            save_hf_folder(export_dir, model, tokenizer, state_dict=state_dict)
        rank_zero_info(f"exported Hugging Face folder: {export_dir}")

    # Rank zero saves while the others wait in the broadcast of its outcome (the barrier of the
    # export): a failed save stops every process, none is left waiting.
    on_global_zero(trainer, save)
