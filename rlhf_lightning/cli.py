"""The ``rlhf-lightning`` command.

* ``rlhf-lightning fit|validate|test --config stage.yaml``: a :class:`LightningCLI` in subclass
  mode, so any LightningModule / LightningDataModule (the package's or a user's) is chosen by
  ``class_path`` in YAML. ``--print_config`` after the subcommand prints a config that runs the
  same way.
* ``rlhf-lightning pipeline --config configs/demo/pipeline.yaml``: SFT -> reward -> PPO and a report.
* ``rlhf-lightning iterate --config configs/demo/iterate.yaml``: the online loop (sample, label,
  refresh the reward model, optimise, repeat; :mod:`rlhf_lightning.iterate`).
* ``rlhf-lightning task --name NAME --out DIR``: write a built-in task's JSONL files (to see the
  formats, or to train on them as files).
* ``rlhf-lightning best-of-n --policy DIR --prompts FILE --n 16 ...``: rejection sampling
  (:mod:`rlhf_lightning.best_of_n`).
* ``rlhf-lightning tokenizer --output_dir DIR``: train a BPE tokenizer on demonstrations
  (:mod:`rlhf_lightning.tokenizer_training`), for a model trained from a preset.
* ``rlhf-lightning label ...`` / ``label export ...``: collect preferences in the browser
  (:mod:`rlhf_lightning.labelling`).

Errors in the user's data or model paths end the command with a one-line message naming the
file, line and field (exit status 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import UserInputError
from .lightning_cli import RLHFCLI, EpochProgressBar

__all__ = ["EpochProgressBar", "RLHFCLI", "main"]


def write_task_command(argv: Sequence[str]) -> int:
    from .tasks import BUILTIN_TASKS, get_task

    parser = argparse.ArgumentParser(
        prog="rlhf-lightning task", description="Write a built-in task's six JSONL files (SFT, preferences, prompts)."
    )
    parser.add_argument("--name", default="sentiment", help=f"one of {', '.join(BUILTIN_TASKS)} (default: sentiment)")
    parser.add_argument("--out", default=None, help="folder to write into (default: data/NAME)")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(list(argv))
    if options.name not in BUILTIN_TASKS:
        raise UserInputError(f"task --name: unknown task {options.name!r}; choose from {', '.join(BUILTIN_TASKS)}")
    task = get_task(options.name, options.seed)
    for name, path in task.write_files(options.out or f"data/{options.name}").items():
        print(f"{name}: {path}")
    return 0


def user_input_error(err: BaseException) -> UserInputError | None:
    """The :class:`UserInputError` ``err`` is or was raised from (jsonargparse wraps one raised
    by a module's ``__init__`` in a ``ValueError``), else None."""
    while err is not None and not isinstance(err, UserInputError):
        err = err.__cause__ or err.__context__
    return err


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["task"]:
            return write_task_command(args[1:])
        if args[:1] == ["tokenizer"]:
            from .tokenizer_training import tokenizer_command

            return tokenizer_command(args[1:])
        if args[:1] == ["best-of-n"]:
            from .best_of_n import best_of_n_command

            return best_of_n_command(args[1:])
        if args[:1] == ["pipeline"]:
            from .pipeline import pipeline_command

            return pipeline_command(args[1:])
        if args[:1] == ["iterate"]:
            from .iterate import iterate_command

            return iterate_command(args[1:])
        if args[:1] == ["label"]:
            from .labelling.cli import label_command

            return label_command(args[1:])
        RLHFCLI(args=None if argv is None else args)
    except ValueError as err:  # UserInputError is one
        user_error = user_input_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
