"""What the package keeps off the terminal: library output a user cannot act on.

Each helper silences one known message of Lightning, transformers or torchmetrics for the
package's own calls only, matched by its text and the module that emits it, and undoes exactly
what it changed on exit. There is no blanket filter and no change to the user's own settings:
a user's warnings, and a library's other messages, still show. The list of what is silenced
and why is in docs/pipeline.md, "What the terminal shows".
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import Callback

# A warnings filter of this module: (message regex, category, regex of the emitting module).
WarningRule = tuple[str, type[Warning], str]

# Lightning's CombinedLoader builds a torch LeafSpec, which torch >= 2.10 deprecates; nothing
# a user of the package can change (Lightning internals under this torch).
LIGHTNING_LEAFSPEC: WarningRule = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree\Z"
)
# ModelCheckpoint under manual optimisation advises saving the weights from before the
# optimiser step. PPO checkpoints after a whole iteration, the state to resume from.
MANUAL_OPTIMISATION_CHECKPOINT: WarningRule = (
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state",
    UserWarning, r"lightning\.pytorch\.callbacks\.model_checkpoint\Z",
)
# SpearmanCorrCoef keeps every value until compute(); the package's validation sets are small.
SPEARMAN_BUFFER: WarningRule = (
    r"Metric `SpearmanCorrcoef` will save all targets and predictions in the buffer",
    UserWarning, r"torchmetrics\.utilities\.prints\Z",
)

# Lightning's advertisements for its cloud logger and model registry ("💡 Tip: ...").
LIGHTNING_CLOUD_TIP = "💡 Tip: For seamless cloud"
# transformers drops an all-ones attention mask before decoding, then its forward sees the pad
# token of rows that have finished and advises passing a mask, which the package did.
ATTENTION_MASK_ADVICE = "We strongly recommend passing in an `attention_mask`"
# transformers' report of weights it initialised when loading: v5, v4.
NEW_WEIGHTS_REPORTS = ("LOAD REPORT", "were not initialized from the model checkpoint")


def eval_mode_rule(count: int) -> WarningRule:
    """Lightning's warning that exactly ``count`` modules are in eval mode when training starts
    (one more, a user's, and it shows)."""
    return rf"Found {count} module\(s\) in eval mode at the start of training", UserWarning, r"lightning\.pytorch\.loops\.fit_loop\Z"


def ignore_warnings(*rules: WarningRule) -> list[Any]:
    """Add an ``ignore`` filter for each rule; returns the entries to hand to :func:`restore_warnings`.

    For a span that no ``with`` block covers (from one Lightning hook to another). Unlike
    ``warnings.catch_warnings`` it leaves alone the filters that others add meanwhile (a module
    imported during a fit that filters its own warnings keeps its filters)."""
    added = []
    for message, category, module in rules:
        before = list(warnings.filters)
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
        if warnings.filters[0] not in before:  # an identical filter of the user's stays theirs
            added.append(warnings.filters[0])
    return added


def restore_warnings(added: list[Any]) -> None:
    """Remove the filters :func:`ignore_warnings` added (and nothing else)."""
    for entry in added:
        if entry in warnings.filters:
            warnings.filters.remove(entry)


@contextmanager
def ignoring_warnings(*rules: WarningRule) -> Iterator[None]:
    """:func:`ignore_warnings` for the block."""
    added = ignore_warnings(*rules)
    try:
        yield
    finally:
        restore_warnings(added)


class _HeldRecords(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if any(fragment in record.getMessage() for fragment in self.fragments):
            self.records.append(record)
            return False
        return True


@contextmanager
def held_log_records(logger: logging.Logger | str, *fragments: str) -> Iterator[list[logging.LogRecord]]:
    """Keep the records of ``logger`` whose message contains one of ``fragments`` off its
    handlers inside the block. They are yielded: the caller drops them (does nothing) or lets
    them through after all with ``logger.handle(record)``. If the block raises they are let
    through, so that an error keeps its context."""
    logger = logging.getLogger(logger) if isinstance(logger, str) else logger
    held = _HeldRecords(fragments)
    logger.addFilter(held)
    failed = True
    try:
        yield held.records
        failed = False
    finally:
        logger.removeFilter(held)
        if failed:
            release(logger, held.records)


def release(logger: logging.Logger, records: list[logging.LogRecord]) -> None:
    """Let records held by :func:`held_log_records` through to ``logger``'s handlers."""
    for record in records:
        logger.handle(record)


@contextmanager
def lightning_noise_silenced() -> Iterator[None]:
    """Around the package's Lightning runs (:class:`~rlhf_lightning.lightning_cli.RLHFCLI`): Lightning's
    cloud tips and its LeafSpec deprecation warning."""
    from lightning_utilities.core import rank_zero

    # rank_zero.log is the logger rank_zero_info writes to (Lightning sets it on import)
    with ignoring_warnings(LIGHTNING_LEAFSPEC), held_log_records(rank_zero.log, LIGHTNING_CLOUD_TIP):
        yield


@contextmanager
def transformers_progress_bars_hidden() -> Iterator[None]:
    """Hide transformers' own progress bars ("Loading weights", "Writing model shards") inside
    the block. The user's setting (``transformers.utils.logging.disable_progress_bar``) and the
    hub's download bars are left alone. transformers < 5 has no hook, and no such bars."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:
        yield
        return
    previous: Callable[..., Any] | None = None

    def hidden(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwargs = {**kwargs, "disable": True}
        return factory(*args, **kwargs) if previous is None else previous(factory, args, kwargs)

    previous = set_hook(hidden)
    try:
        yield
    finally:
        set_hook(previous)


def spearman_corrcoef() -> Any:
    """A torchmetrics ``SpearmanCorrCoef``, without its warning that it keeps every value."""
    from torchmetrics.regression import SpearmanCorrCoef

    with ignoring_warnings(SPEARMAN_BUFFER):
        return SpearmanCorrCoef()


class KnownWarningsSilenced(Callback):
    """For the span of a PPO fit, two Lightning warnings that do not apply: the reference and the
    reward model (``frozen_models()``) are in eval mode on purpose (the warning still shows if
    any other module is in eval mode: it counts them all), and a checkpoint after a whole
    iteration is the state to resume from (the advice for manual optimisation is to save the
    pre-step state)."""

    def __init__(self, frozen_models: Callable[[], list[Any]]) -> None:
        self.frozen_models = frozen_models
        self.added: list[Any] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        frozen = sum(not m.training for model in self.frozen_models() for m in model.modules())
        self.added = ignore_warnings(MANUAL_OPTIMISATION_CHECKPOINT, *([eval_mode_rule(frozen)] if frozen else []))

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        restore_warnings(self.added)
        self.added = []

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # a fit that raises (or is interrupted) never reaches the callbacks' teardown hook
        self.teardown(trainer, pl_module, "fit")

