"""Built-in tasks: deterministic toy worlds with a programmatic gold annotator."""

from rlhf_lightning.tasks.sentiment import (
    DEFAULT_NOISE_TEMPERATURE,
    DEFAULT_SIZES,
    PROMPTS,
    SENTIMENTS,
    SentimentTask,
    degenerate_completion,
    fluency_rate,
    gold_rewards,
    gold_score,
    gold_win_rate,
    is_fluent,
    label_agreement,
    preference_probability,
    sample_completion,
    sentiment_label,
    write_task_files,
)

__all__ = [
    "DEFAULT_NOISE_TEMPERATURE",
    "DEFAULT_SIZES",
    "PROMPTS",
    "SENTIMENTS",
    "SentimentTask",
    "degenerate_completion",
    "fluency_rate",
    "gold_rewards",
    "gold_score",
    "gold_win_rate",
    "is_fluent",
    "label_agreement",
    "preference_probability",
    "sample_completion",
    "sentiment_label",
    "write_task_files",
]
