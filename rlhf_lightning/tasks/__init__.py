"""Built-in tasks: deterministic toy worlds, each with a gold judge and a noisy rater.

Generic code finds a task by name or import path through :func:`get_task`; it never imports a
particular task module. Each task module also exposes its judge as ``judge`` and its noisy
rater as ``rater`` (for YAML, e.g. ``judge: rlhf_lightning.tasks.sentiment.judge``).
"""

from __future__ import annotations

import importlib
from typing import Any

from rlhf_lightning.tasks.base import (
    DEFAULT_NOISE_TEMPERATURE,
    DEFAULT_SIZES,
    BuiltinTask,
    RaterFn,
    Task,
    TaskJudge,
    TaskRater,
    bradley_terry_probability,
    compare,
    judge_validity,
    label_agreement,
    task_records,
    win_rate,
)
from rlhf_lightning.tasks.sentiment import SentimentTask, gold_rewards

#: name -> "module:class" of the built-in tasks (imported only when asked for).
BUILTIN_TASKS: dict[str, str] = {
    "sentiment": "rlhf_lightning.tasks.sentiment:SentimentTask",
    "menu": "rlhf_lightning.tasks.menu:MenuTask",
    "lists": "rlhf_lightning.tasks.lists:ListsTask",
    "describe": "rlhf_lightning.tasks.describe:DescribeTask",
}


def import_object(path: str) -> Any:
    """The object at ``module.attribute`` (or ``module:attribute``)."""
    module, _, attribute = path.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"{path!r} is not an import path (module.attribute)")
    return getattr(importlib.import_module(module), attribute)


def load_callable(path: str, key: str, signature: str = "(prompts, completions) -> scores") -> Any:
    """The callable at import path ``path``, or a one-line :class:`UserInputError` naming the
    config key or option ``key`` it came from (and the ``signature`` it should have)."""
    from ..errors import UserInputError

    try:
        found = import_object(path)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserInputError(f"{key}: cannot import {path!r} ({err})") from err
    if not callable(found):
        raise UserInputError(f"{key}: {path!r} is not callable {signature}")
    return found


def get_task(spec: str | Task, seed: int = 0) -> Task:
    """A task from a built-in name (``sentiment``, ...), an import path of a task class (called
    with ``seed=``) or of a task object, or a task object itself."""
    if not isinstance(spec, str):
        return spec
    if spec in BUILTIN_TASKS:
        return import_object(BUILTIN_TASKS[spec])(seed=seed)
    if "." not in spec:
        raise ValueError(f"unknown task {spec!r}: give one of {sorted(BUILTIN_TASKS)} or an import path")
    try:
        found = import_object(spec)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"task {spec!r} cannot be imported: {err}") from err
    return found(seed=seed) if isinstance(found, type) else found


__all__ = [
    "BUILTIN_TASKS",
    "DEFAULT_NOISE_TEMPERATURE",
    "DEFAULT_SIZES",
    "BuiltinTask",
    "SentimentTask",
    "Task",
    "RaterFn",
    "TaskJudge",
    "TaskRater",
    "bradley_terry_probability",
    "compare",
    "get_task",
    "import_object",
    "gold_rewards",
    "judge_validity",
    "label_agreement",
    "load_callable",
    "task_records",
    "win_rate",
]
