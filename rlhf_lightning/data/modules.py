"""LightningDataModules for the three record families: SFT, preferences, prompts.

Each reads JSONL files (``train_file`` and an optional ``val_file``, or a seeded
``val_fraction`` split of the training file) or, when no file is given, the records of
``task`` (a built-in task's name, or the import path of a user's task class or object).
The tokenizer is either named here (``tokenizer``) or taken from the LightningModule being
trained (its ``tokenizer`` attribute), so a YAML config names the model only once.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..errors import UserInputError, check_minimum
from ..models import load_tokenizer
from .encoding import (
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    encode_preference,
    encode_prompt_record,
    encode_sft,
)
from ..records import Record, read_preferences, read_prompts, read_sft
from ..tasks import get_task, load_callable, task_records
from .sampling import ResumableSampler, loader_generator

BUILTIN = "the built-in task"


class _JSONLDataModule(LightningDataModule):
    """Shared plumbing: find records, split them, encode them, serve DataLoaders."""

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        val_fraction: float = 0.05,
        tokenizer: str | None = None,
        max_length: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        task: str = "sentiment",
    ) -> None:
        """``task``: where records come from when ``train_file`` is null: a built-in task's name
        (see :data:`rlhf_lightning.tasks.BUILTIN_TASKS`) or an import path; drawn with ``seed``."""
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise UserInputError(f"data.init_args.val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("max_length", max_length), ("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            check_minimum(f"data.init_args.{name}", value, 1)
        self.train_file, self.val_file, self.val_fraction = train_file, val_file, val_fraction
        self.tokenizer_name = tokenizer
        self.max_length, self.batch_size, self.num_workers, self.seed = max_length, batch_size, num_workers, seed
        self.task = task
        self.val_batch_size = val_batch_size or batch_size
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []
        self.train_dataset: list[dict[str, Any]] = []
        self.val_dataset: list[dict[str, Any]] = []
        self._resume_position: tuple[int, int] | None = None  # (epoch, batches consumed) to skip

    # --- what a subclass supplies -------------------------------------------------------
    #: the record kind a task makes for this module: ``sft``, ``prefs`` or ``prompts``
    record_kind = ""

    def read(self, path: str) -> list[Record]:
        raise NotImplementedError

    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
        raise NotImplementedError

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[Any]], dict[str, Any]]:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------
    def builtin_records(self, split: str) -> list[Record]:
        """The ``task``'s records of this module's kind for ``split`` (its default sizes)."""
        try:
            task = get_task(self.task, self.seed)
        except ValueError as err:
            raise UserInputError(f"data.init_args.task: {err}") from err
        return task_records(task, self.record_kind, split)

    def resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name is not None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        elif self.trainer is not None and getattr(self.trainer.lightning_module, "tokenizer", None) is not None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        else:
            raise UserInputError(
                f"{type(self).__name__} needs a tokenizer: pass tokenizer=<name or folder>, or "
                "attach it to a Trainer whose LightningModule has a .tokenizer"
            )
        return self.tokenizer

    def load_records(self) -> tuple[list[Record], list[Record]]:
        """Training and validation records from files, a seeded split, or the built-in task."""
        if self.train_file is None:
            val = self.read(self.val_file) if self.val_file else self.builtin_records("val")
            return self.builtin_records("train"), val
        train = self.read(self.train_file)
        if self.val_file is not None:
            return train, self.read(self.val_file)
        if self.val_fraction == 0.0 or len(train) < 2:
            return train, []
        order = list(range(len(train)))
        random.Random(self.seed).shuffle(order)
        n_val = max(1, round(len(train) * self.val_fraction))
        held_out = set(order[:n_val])
        return [r for i, r in enumerate(train) if i not in held_out], [train[i] for i in sorted(held_out)]

    def training_records(self, records: list[Record]) -> list[Record]:
        """What setup trains on: the training records read (a subclass may add to them; what
        :meth:`load_records` returns stays the records of the files or task)."""
        return records

    def _encode_all(self, records: list[Record], tokenizer: PreTrainedTokenizerBase, source: str) -> list[dict[str, Any]]:
        encoded = []
        for index, record in enumerate(records):
            example = self.encode(record, tokenizer)
            if example is not None:
                example["index"] = index
                encoded.append(example)
        dropped = len(records) - len(encoded)
        if dropped:
            rank_zero_warn(
                f"{source}: dropped {dropped} of {len(records)} records that leave nothing to learn "
                f"after truncation to max_length={self.max_length}"
            )
        if records and not encoded:
            raise UserInputError(
                f"{source}: no usable record after truncation to max_length={self.max_length}; "
                "hint: raise data.init_args.max_length (within the model's context) or shorten the prompts"
            )
        return encoded

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset:
            return
        tokenizer = self.resolve_tokenizer()
        train, self.val_records = self.load_records()
        self.train_records = self.training_records(train)
        self.train_dataset = self._encode_all(self.train_records, tokenizer, self.train_file or BUILTIN)
        self.val_dataset = self._encode_all(self.val_records, tokenizer, self.val_file or self.train_file or BUILTIN)

    def _loader(self, dataset: list[dict[str, Any]], shuffle: bool, batch_size: int, drop_last: bool = False) -> DataLoader:
        sampler = None
        if shuffle:
            trainer = self.trainer
            sampler = ResumableSampler(
                dataset,
                num_replicas=trainer.world_size if trainer is not None else 1,
                rank=trainer.global_rank if trainer is not None else 0,
                seed=self.seed,
            )
            if self._resume_position is not None:  # every loader of this fit (Lightning may build several)
                epoch, consumed_batches = self._resume_position
                sampler.resume(epoch, consumed_batches * batch_size)
                sampler.set_epoch(epoch)  # workers may draw indices before Lightning sets the epoch
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=self.collator(self.resolve_tokenizer()),
            generator=loader_generator(self.seed),
        )

    # --- exact resume: where in the epoch training stopped ------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint of a fit: the epoch, and how many of its training batches
        the model has processed (Lightning's own count; the one prefetched batch is not in it)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "consumed_batches": processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume, the next training loader continues that epoch after the consumed batches."""
        self._resume_position = (state_dict["epoch"], state_dict["consumed_batches"])
        # Lightning only knows stateful DataLoaders; this data module resumes through its sampler.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

    def teardown(self, stage: str) -> None:
        self._resume_position = None  # a later fit without a checkpoint starts from the beginning

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_dataset:
            return []
        return self._loader(self.val_dataset, shuffle=False, batch_size=self.val_batch_size)


class SFTDataModule(_JSONLDataModule):
    """Demonstrations: prompt/completion, plain text or chat messages (mixed freely).

    ``train_file=None`` trains on the ``task``'s demonstrations.
    """

    record_kind = "sft"

    def read(self, path: str) -> list[Record]:
        return read_sft(path)

    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
        return encode_sft(record, tokenizer, self.max_length)

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> SFTCollator:
        return SFTCollator(tokenizer.pad_token_id)


class PreferenceDataModule(_JSONLDataModule):
    """Preference pairs ``{"prompt", "chosen", "rejected"[, "margin"]}`` for the reward stage."""

    record_kind = "prefs"

    def __init__(
        self,
        *args: Any,
        padding_side: str = "right",
        synthetic_pairs: float = 0.0,
        corruption: str | Callable[[str, random.Random], str | None] = "rlhf_lightning.data.corruptions.repeat_word",
        **kwargs: Any,
    ) -> None:
        """``synthetic_pairs``: for this fraction of the training records (drawn with ``seed``),
        train also on the pair ``chosen`` over ``corruption(chosen)`` to the same prompt
        (:mod:`rlhf_lightning.data.corruptions`); ``corruption`` is a callable
        ``(text, rng) -> str | None`` or its import path. Validation records are kept as read, and
        :meth:`load_records` returns only the records read (the iterate loop counts them as labels)."""
        super().__init__(*args, **kwargs)
        if padding_side not in ("left", "right"):
            raise UserInputError(f"data.init_args.padding_side must be 'left' or 'right', got {padding_side!r}")
        if not 0.0 <= synthetic_pairs <= 1.0:
            raise UserInputError(f"data.init_args.synthetic_pairs must be in [0, 1], got {synthetic_pairs}")
        self.padding_side = padding_side
        self.synthetic_pairs = synthetic_pairs
        if isinstance(corruption, str):
            corruption = load_callable(corruption, "data.init_args.corruption", "(text, rng) -> text or None")
        self.corruption = corruption

    def read(self, path: str) -> list[Record]:
        return read_preferences(path)

    def training_records(self, records: list[Record]) -> list[Record]:
        """The pairs read, then the synthetic pairs (:meth:`corrupted_pairs`) when asked for."""
        if self.synthetic_pairs == 0.0:
            return records
        synthetic = self.corrupted_pairs(records)
        rank_zero_info(f"{self.train_file or BUILTIN}: {len(synthetic)} synthetic pairs added to "
                       f"{len(records)} training pairs (data.init_args.synthetic_pairs={self.synthetic_pairs})")
        return records + synthetic

    def corrupted_pairs(self, records: list[Record]) -> list[Record]:
        """The synthetic pairs for ``records``: ``chosen`` over ``corruption(chosen)``, marked
        ``"synthetic": True``, for a seeded ``synthetic_pairs`` fraction of them (fewer where the
        corruption returns ``None`` or the text unchanged)."""
        rng = random.Random(self.seed)
        picked = rng.sample(range(len(records)), round(len(records) * self.synthetic_pairs))
        pairs = []
        for index in sorted(picked):
            record = records[index]
            worse = self.corruption(record["chosen"], rng)
            if worse is not None and worse != record["chosen"]:
                pairs.append(
                    {"prompt": record["prompt"], "chosen": record["chosen"], "rejected": worse, "synthetic": True}
                )
        return pairs

    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
        return encode_preference(record, tokenizer, self.max_length)

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> PreferenceCollator:
        return PreferenceCollator(tokenizer.pad_token_id, self.padding_side)


class PromptDataModule(_JSONLDataModule):
    """Prompts ``{"prompt"}`` (text or chat messages) for PPO, left-padded for generation.

    ``max_length`` bounds the prompt; batches carry ``index`` so the module can find the
    record (for callable rewards that need the prompt text).
    """

    record_kind = "prompts"

    def read(self, path: str) -> list[Record]:
        return read_prompts(path)

    def encode(self, record: Record, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
        return {"prompt_ids": encode_prompt_record(record, tokenizer, self.max_length)}

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> PromptCollator:
        return PromptCollator(tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        # Every PPO batch is full: a short last batch would change whitening statistics.
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if len(self.train_dataset) < self.batch_size * world_size:
            raise UserInputError(
                f"{self.train_file or BUILTIN}: {len(self.train_dataset)} prompts, fewer than one PPO batch "
                f"(data.init_args.batch_size={self.batch_size} x {world_size} processes), so no iteration would "
                "run; hint: add prompts or lower batch_size"
            )
        return self._loader(self.train_dataset, shuffle=True, batch_size=self.batch_size, drop_last=True)
