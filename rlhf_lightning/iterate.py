"""The online loop: sample, label, refresh the reward model, optimise, repeat.

``rlhf-lightning iterate --config configs/demo/iterate.yaml``. Round 0 is the pipeline (SFT, a
reward model on ``offline_pairs`` of the offline preference pairs, PPO or the method the PPO
config names). Each further round ``r``:

1. **samples** ``k`` responses per prompt from the current policy on a fresh slice of prompts
   (the labelling tool's :class:`~rlhf_lightning.labelling.CandidateGenerator`);
2. gets them **labelled**, by people on the labelling page (``rater: browser``: the loop serves
   it and waits until the round's quota is labelled, or Ctrl-C ends the round) or by a rater
   callable (an import path, a :data:`~rlhf_lightning.tasks.RaterFn`: a built-in task's noisy
   rater, your own LLM judge). Both write the same annotations file;
3. measures the current reward model on the round's fresh pairs, **before** it trains on them
   (``fresh_accuracy``: how well the model it has judges the text the policy now writes);
4. **refreshes the reward model** on every label so far (``reward_refresh: continue`` trains the
   last reward model for ``refresh_steps`` more steps; ``retrain`` trains from the SFT model
   again, as round 0 did);
5. **optimises** the current policy against it for ``ppo_iterations`` (the reference stays the
   SFT policy, or is the last round's policy with ``reference: last``);
6. compares the round's policy with the SFT policy on held-out prompts, as the pipeline does.

Everything of round ``r`` lives in ``run_dir/round_r/``: its stage configs (``configs/``, each
an ordinary ``rlhf-lightning fit`` config), ``candidates.jsonl``, ``annotations.jsonl`` (the
append-only, fsync'ed labelling log), ``prefs.jsonl`` (its pairs), the stage exports and
TensorBoard sub-runs, ``report.md`` and ``summary.json``, written last: a round with a
``summary.json`` is finished. Rerunning the command resumes at the first unfinished round; in
it, sampled candidates, every label and every complete stage export are kept. ``run_dir``
also gets ``rounds.json`` and ``report.md`` with the per-round table and plot.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import yaml

from .records import Record, read_preferences, read_prompts, write_jsonl
from .errors import UserInputError
from .labelling.candidates import CandidateGenerator, CandidatePool, Item, SamplingSettings, content_id
from .labelling.export import export_annotations
from .labelling.storage import AnnotationLog, judgements, make_judgement
from .pipeline import (
    OVERWRITE,
    PipelineConfig,
    datamodule_records,
    finish,
    load_judge,
    parse_settings,
    run_pipeline,
    run_stages,
    sft_data_file,
    stage_init_args,
    stage_judge,
    write_json,
)
from .report import plot
from .generation import GenerationSettings
from .models import is_complete_hf_folder
from .tokenizer_training import DEFAULT_VOCAB_SIZE

BROWSER = "browser"
REFRESH = ("continue", "retrain")
REFERENCE = ("sft", "last")
CRITIC = ("reward", "last")
LR_SCHEDULE = ("round", "loop")
#: The export folders of each stage inside a round's folder.
EXPORTS = {"sft": {"export_dir": "sft/model"}, "reward": {"export_dir": "reward/model"},
           "ppo": {"policy_export_dir": "ppo/policy", "critic_export_dir": "ppo/critic"}}


@dataclass
class IterateConfig:
    """The online loop (see the module docstring).

    Args:
        run_dir: the loop's folder: ``round_0/``, ``round_1/``, ..., ``rounds.json``, ``report.md``.
        sft, reward, ppo: the stage configs, as for the pipeline; their output folders are moved
            into each round's folder.
        judge: import path of a gold judge (evaluation only), or null.
        rater: ``browser`` (people, on the labelling page) or the import path of a rater
            ``(prompts, firsts, seconds) -> labels`` (1.0 first better, 0.0 second, 0.5 tie,
            None skip), e.g. ``rlhf_lightning.tasks.sentiment.rater``.
        rounds: rounds after round 0.
        offline_pairs: labels of round 0: the first N pairs of the reward config's training
            data (null: all of them).
        labels_per_round: preference pairs labelled in each later round (the round's quota).
        k: responses sampled per prompt. A rater callable labels every pair of them; on the
            page people rank them (a ranking of k gives k(k-1)/2 pairs). Labels count pairs.
        prompts: ``{"prompt"}`` JSONL to sample from, a fresh slice each round; null: the
            training prompts of the PPO config's data module.
        reward_refresh: ``continue`` (train the last reward model ``refresh_steps`` more steps)
            or ``retrain`` (from the SFT model, the reward config's own steps), each on every
            label so far.
        refresh_steps: optimiser steps of a ``continue`` refresh (null: the reward config's).
        on_policy_weight: how many times each on-policy pair (labelled in a later round) appears
            in a refresh's training data, beside the offline pairs once (oversampling: the
            refresh sees the policy's own text that much more often). Labels are counted once.
        ppo_iterations: PPO iterations of every round, round 0 included (null: the PPO
            config's ``max_iterations``).
        reference: the KL reference of later rounds: ``sft`` or ``last`` (the previous policy).
        critic: the critic each later round's PPO starts from: ``reward`` (the round's refreshed
            reward model, PPO's default) or ``last`` (the previous round's trained critic; needs
            ``ppo.advantage_estimator: gae``).
        lr_schedule: ``round`` (each round's PPO runs the PPO config's schedule over its own
            iterations) or ``loop`` (one linear decay over the whole loop's PPO iterations, held
            constant within a round: round ``r`` (0 to ``R`` = ``rounds``) runs at the config's
            learning rates times ``1 - (r + 1/2) / (R + 1)``, the linear schedule's mean over
            its share).
        eval_prompts, seed, tokenizer_vocab_size: as for the pipeline.
        label_host, label_port, label_token, label_guidelines: the labelling page of ``rater:
            browser`` (as ``rlhf-lightning label``'s ``--host``, ``--port``, ``--token``,
            ``--guidelines``).
        poll_seconds: how often the loop checks the annotations file while people label.
        rater_batch_size: pairs per call of a rater callable; each call's labels are on disk
            before the next.
    """

    run_dir: str = "outputs/iterate"
    sft: str = "configs/demo/sft.yaml"
    reward: str = "configs/demo/reward.yaml"
    ppo: str = "configs/demo/ppo.yaml"
    judge: str | None = None
    rater: str = BROWSER
    rounds: int = 3
    offline_pairs: int | None = None
    labels_per_round: int = 500
    k: int = 2
    prompts: str | None = None
    reward_refresh: str = "continue"
    refresh_steps: int | None = None
    on_policy_weight: int = 1
    ppo_iterations: int | None = None
    reference: str = "sft"
    critic: str = "reward"
    lr_schedule: str = "round"
    eval_prompts: str | None = None
    seed: int = 0
    tokenizer_vocab_size: int = DEFAULT_VOCAB_SIZE
    label_host: str = "127.0.0.1"
    label_port: int = 8765
    label_token: str | None = None
    label_guidelines: str | None = None
    poll_seconds: float = 2.0
    rater_batch_size: int = 64

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 0, "rounds", "must be >= 0"),
            (self.labels_per_round >= 1, "labels_per_round", "must be >= 1"),
            (self.rater_batch_size >= 1, "rater_batch_size", "must be >= 1"),
            (self.k >= 2, "k", "must be >= 2 (responses to compare per prompt)"),
            (self.offline_pairs is None or self.offline_pairs >= 1, "offline_pairs", "must be >= 1 or null"),
            (self.refresh_steps is None or self.refresh_steps >= 1, "refresh_steps", "must be >= 1 or null"),
            (self.on_policy_weight >= 1, "on_policy_weight", "must be >= 1"),
            (self.ppo_iterations is None or self.ppo_iterations >= 1, "ppo_iterations", "must be >= 1 or null"),
            (self.reward_refresh in REFRESH, "reward_refresh", f"must be one of {REFRESH}"),
            (self.reference in REFERENCE, "reference", f"must be one of {REFERENCE}"),
            (self.critic in CRITIC, "critic", f"must be one of {CRITIC}"),
            (self.lr_schedule in LR_SCHEDULE, "lr_schedule", f"must be one of {LR_SCHEDULE}"),
        ]
        for ok, key, rule in checks:
            if not ok:
                raise UserInputError(f"iterate: {key} {rule}, got {getattr(self, key)!r}")

    @property
    def pairs_per_item(self) -> int:
        return self.k * (self.k - 1) // 2

    @property
    def prompts_per_round(self) -> int:
        return math.ceil(self.labels_per_round / self.pairs_per_item)

    def round_dir(self, number: int) -> Path:
        return Path(self.run_dir) / f"round_{number}"


# --- stage configs of a round --------------------------------------------------------------
def load_yaml(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}


def init_args(config: dict[str, Any], section: str = "model") -> dict[str, Any]:
    return config.setdefault(section, {}).setdefault("init_args", {})


def round_stage_config(source: str | Path, stage: str, folder: Path, model: dict[str, Any] | None = None,
                       data: dict[str, Any] | None = None, trainer: dict[str, Any] | None = None) -> str:
    """Write ``folder/configs/<stage>.yaml``: the stage config ``source`` with its exports, its
    TensorBoard sub-run and its checkpoints moved into ``folder``, and the given ``init_args``
    of the model and data and trainer keys set. Returns its path."""
    config = load_yaml(source)
    init_args(config).update({key: str(folder / sub) for key, sub in EXPORTS[stage].items()}, **(model or {}))
    init_args(config, "data").update(data or {})
    settings = config.setdefault("trainer", {})
    settings.update(trainer or {})
    logger = settings.get("logger")
    if not isinstance(logger, dict):  # absent, or true: the CLI's default TensorBoard logger
        logger = settings["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"}
    if str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        logger.setdefault("init_args", {}).update(save_dir=str(folder), name=stage, version="")
    for callback in settings.get("callbacks") or []:
        if isinstance(callback, dict) and is_checkpoint_callback(str(callback.get("class_path", ""))):
            callback.setdefault("init_args", {})["dirpath"] = str(folder / stage / "checkpoints")
    path = folder / "configs" / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(path)


def is_checkpoint_callback(class_path: str) -> bool:
    """Whether a config's callback ``class_path`` is Lightning's ``ModelCheckpoint`` or a subclass
    (such as :class:`~rlhf_lightning.checkpoint_io.IterationCheckpoint`); a bare class name counts
    by its name, as LightningCLI resolves it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .tasks import import_object

    try:
        cls = import_object(class_path)
    except (ImportError, AttributeError, ValueError):
        return class_path.endswith("ModelCheckpoint")
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)


def pipeline_config(config: IterateConfig, number: int, sft: str, reward: str, ppo: str) -> PipelineConfig:
    return PipelineConfig(run_dir=str(config.round_dir(number)), sft=sft, reward=reward, ppo=ppo,
                          eval_prompts=config.eval_prompts, judge=config.judge, seed=config.seed,
                          tokenizer_vocab_size=config.tokenizer_vocab_size)


def ppo_default(key: str) -> Any:
    """``PPOModule``'s default for an ``init_args`` key the PPO config leaves unset."""
    import inspect

    from .modules import PPOModule

    return inspect.signature(PPOModule.__init__).parameters[key].default


def ppo_settings(config: IterateConfig, number: int) -> dict[str, Any]:
    """The PPO ``init_args`` the loop sets in round ``number``: its iterations and, with
    ``lr_schedule: loop``, its share of one linear decay (constant within the round)."""
    settings: dict[str, Any] = {} if config.ppo_iterations is None else {"max_iterations": config.ppo_iterations}
    if config.lr_schedule == "loop":
        source = stage_init_args(config.ppo)
        factor = 1.0 - (number + 0.5) / (config.rounds + 1)
        policy_lr = float(source.get("learning_rate", ppo_default("learning_rate")))
        critic_lr = source.get("critic_learning_rate")
        settings.update(lr_scheduler="constant", learning_rate=policy_lr * factor,
                        critic_learning_rate=None if critic_lr is None else float(critic_lr) * factor)
    return settings


def with_judge(config: IterateConfig, source: str) -> dict[str, Any]:
    """The loop's judge for a stage config that names none (the pipeline's rule)."""
    judge = stage_judge(config.judge, stage_init_args(source))
    return {"judge": judge} if judge else {}


# --- round 0: the pipeline on the offline labels -------------------------------------------
def run_round_zero(config: IterateConfig) -> dict[str, Any]:
    folder = config.round_dir(0)
    train, val = datamodule_records(config.reward)
    budget = len(train) if config.offline_pairs is None else config.offline_pairs
    if budget > len(train):
        raise UserInputError(f"iterate: offline_pairs {budget} is more than the {len(train)} training pairs of {config.reward}")
    offline = write_jsonl(folder / "prefs_train.jsonl", train[:budget])
    held_out = write_jsonl(folder / "prefs_val.jsonl", val)
    # the reward model's normalisation data: the SFT config's own (as the pipeline picks it)
    normalize = sft_data_file(config.sft)
    if not normalize:
        normalize = str(write_jsonl(folder / "sft_val.jsonl", datamodule_records(config.sft)[1]))
    reward_model = {"normalize_file": stage_init_args(config.reward).get("normalize_file") or normalize}
    pipeline = pipeline_config(
        config, 0,
        sft=round_stage_config(config.sft, "sft", folder),
        reward=round_stage_config(config.reward, "reward", folder, reward_model,
                                  data={"train_file": str(offline), "val_file": str(held_out)}),
        ppo=round_stage_config(config.ppo, "ppo", folder, ppo_settings(config, 0)),
    )
    return run_pipeline(pipeline, extra={"round": 0, "labels": budget, "labels_total": budget, "fresh_accuracy": None,
                                         "fresh_ceiling": None, "prepare_seconds": 0.0})


def last_critic(config: IterateConfig, number: int) -> str:
    """The critic round ``number - 1`` exported (``critic: last``)."""
    critic = config.round_dir(number - 1) / EXPORTS["ppo"]["critic_export_dir"]
    if not is_complete_hf_folder(critic):
        raise UserInputError(f"iterate: critic last: round {number - 1} exported no critic ({critic}); only "
                             "ppo.advantage_estimator gae has one")
    return str(critic)


# --- a later round --------------------------------------------------------------------------
def prompt_pool(config: IterateConfig) -> list[Record]:
    """Every prompt the rounds sample from, checked to last for all rounds."""
    records = read_prompts(config.prompts) if config.prompts else datamodule_records(config.ppo)[0]
    needed = config.rounds * config.prompts_per_round
    if len(records) < needed:
        source = config.prompts or f"the training prompts of {config.ppo}"
        raise UserInputError(f"iterate: {source} holds {len(records)} prompts; {config.rounds} rounds of "
                             f"{config.prompts_per_round} fresh prompts need {needed} (prompts, rounds, labels_per_round)")
    return records


def labels_in(events: list[Record]) -> int:
    """Preference labels the judgements in force give: k(k-1)/2 per judgement of k responses
    (ties count: the annotator answered), none for a skip."""
    return sum(len(j["responses"]) * (len(j["responses"]) - 1) // 2 for j in judgements(events) if j["choice"] != "skip")


CHOICE = {1.0: ("left", [0, 1]), 0.0: ("right", [1, 0]), 0.5: ("tie", None), None: ("skip", None)}


def label_with_rater(rater: Any, name: str, items: list[Item], log: AnnotationLog, quota: int, batch_size: int) -> None:
    """Label every pair of the items' responses with a rater callable, in item order and
    ``batch_size`` pairs per call, until the log holds ``quota`` labels. Each batch's labels are
    on disk before the next call, and pairs labelled before (a resumed round) are not asked again."""
    done = {j["item"] for j in judgements(log.records())}
    pending = [(item.prompt, a, b) for item in items for a, b in combinations(item.responses, 2)
               if content_id(item.prompt, [a, b]) not in done]
    pending = pending[: max(0, quota - labels_in(log.records()))]
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        prompts, firsts, seconds = (list(column) for column in zip(*batch))
        labels = list(rater(prompts, firsts, seconds))
        if len(labels) != len(batch):
            raise UserInputError(f"iterate: rater {name} returned {len(labels)} labels for {len(batch)} pairs")
        for (prompt, a, b), label in zip(batch, labels):
            key = label if label is None or isinstance(label, str) else float(label)
            if key not in CHOICE:
                raise UserInputError(f"iterate: rater {name} returned {label!r}; expected 1.0, 0.0, 0.5 or None")
            choice, ranking = CHOICE[key]
            # appended without AnnotationLog.judge's re-read of the whole log: the pairs already
            # labelled were left out above, and the loop is the log's only writer in this mode
            log.append(make_judgement(annotator=name, item=content_id(prompt, [a, b]), prompt=prompt, responses=[a, b],
                                     shown=[0, 1], choice=choice, ranking=ranking))


def label_in_browser(config: IterateConfig, number: int, pool: CandidatePool, generator: CandidateGenerator,
                     log: AnnotationLog, quota: int) -> None:
    """Serve the labelling page while the candidates are sampled; return once the round's
    quota is labelled, every item is, or the user presses Ctrl-C (ending the round)."""
    from .labelling.cli import open_labelling_page

    server, address = open_labelling_page(pool, log.path, config.label_host, config.label_port, config.label_token,
                                          config.seed, config.label_guidelines)
    threading.Thread(target=server.serve_forever, name="labelling-page", daemon=True).start()
    generator.start()
    print(f"[iterate] round {number}: label {quota} pairs at {address} (Ctrl-C ends the round with the labels so far)",
          flush=True)
    shown = None
    try:
        while True:
            events = log.records()
            done, labelled = labels_in(events), {j["item"] for j in judgements(events)}
            if done != shown:
                print(f"[iterate] round {number}: {done}/{quota} labels", flush=True)
                shown = done
            if done >= quota or (pool.finished and all(item.id in labelled for item in pool.items())):
                break
            time.sleep(config.poll_seconds)
    except KeyboardInterrupt:
        print(f"[iterate] round {number}: ended by the user with {labels_in(log.records())} labels", flush=True)
    finally:
        generator.stop()
        server.shutdown()
        server.server_close()
        generator.join()


def label_round(config: IterateConfig, number: int, policy: str, prompts: list[Record], rater: Any) -> list[Record]:
    """Sample the round's candidates and get them labelled; returns the round's pairs."""
    folder = config.round_dir(number)
    generation = GenerationSettings(**(stage_init_args(config.ppo).get("generation") or {}))
    pool = CandidatePool(expected=len(prompts))
    generator = CandidateGenerator(policy, prompts, folder / "candidates.jsonl", pool,
                                   SamplingSettings(k=config.k, generation=generation, seed=config.seed + number))
    log = AnnotationLog(folder / "annotations.jsonl")
    if rater is None:
        label_in_browser(config, number, pool, generator, log, config.labels_per_round)
    else:
        generator.run()  # here, not in a thread: nothing to serve meanwhile
        if pool.error:
            raise RuntimeError(pool.error)
        label_with_rater(rater, config.rater, pool.items(), log, config.labels_per_round, config.rater_batch_size)
    if not judgements(log.records()):
        raise UserInputError(f"iterate: round {number} has no labels in {log.path}; label some, then run the command again")
    export_annotations(log.path, folder / "prefs.jsonl")
    return read_preferences(folder / "prefs.jsonl")


def run_round(config: IterateConfig, number: int, previous: dict[str, Any], prompts: list[Record], rater: Any) -> dict[str, Any]:
    from .evaluation import reward_model_accuracy
    from .tasks import label_agreement

    started = time.perf_counter()
    folder, first = config.round_dir(number), config.round_dir(0)
    sft, last_reward, last_policy = (previous["outputs"][stage] for stage in ("sft", "reward", "ppo"))
    critic = {"critic": last_critic(config, number)} if config.critic == "last" else {}  # checked before sampling
    slice_ = prompts[(number - 1) * config.prompts_per_round : number * config.prompts_per_round]
    fresh = label_round(config, number, last_policy, slice_, rater)
    max_length = stage_init_args(config.reward, "data").get("max_length") or 256
    fresh_accuracy = reward_model_accuracy(last_reward, fresh, max_length)  # before it trains on them
    judge = load_judge(config.judge)
    fresh_ceiling = label_agreement(fresh, judge) if judge is not None else None
    prepared = round(time.perf_counter() - started, 1)  # sampling, labelling and that measurement
    on_policy = [r for n in range(1, number + 1) for r in read_preferences(config.round_dir(n) / "prefs.jsonl")]
    labelled = [*read_preferences(first / "prefs_train.jsonl"), *on_policy * config.on_policy_weight]
    reward_train = write_jsonl(folder / "reward_train.jsonl", labelled)
    round_zero_reward = load_yaml(first / "configs" / "reward.yaml")
    reward_model: dict[str, Any] = {
        "model_name_or_path": sft if config.reward_refresh == "retrain" else last_reward,
        "likelihood_teacher": sft,
        "normalize_file": init_args(round_zero_reward).get("normalize_file"),
        **with_judge(config, config.reward),
    }
    trainer: dict[str, Any] = {}
    if config.reward_refresh == "continue" and config.refresh_steps is not None:
        interval = round_zero_reward.get("trainer", {}).get("val_check_interval")
        trainer = {"max_steps": config.refresh_steps}
        if isinstance(interval, int):
            trainer["val_check_interval"] = min(interval, config.refresh_steps)
    reward = round_stage_config(config.reward, "reward", folder, reward_model, trainer=trainer,
                                data={"train_file": str(reward_train), "val_file": str(first / "prefs_val.jsonl")})
    ppo_model = {"policy": last_policy, "reference": sft if config.reference == "sft" else last_policy,
                 "reward_model": str(folder / "reward" / "model"), **with_judge(config, config.ppo)}
    ppo = round_stage_config(config.ppo, "ppo", folder, {**ppo_model, **critic, **ppo_settings(config, number)})
    pipeline = pipeline_config(config, number, sft=str(first / "configs" / "sft.yaml"), reward=reward, ppo=ppo)
    outputs = {"reward": str(folder / "reward" / "model"), "ppo": str(folder / "ppo" / "policy")}
    timings = run_stages(pipeline, outputs, {stage: ["fit", "--config", path, OVERWRITE] for stage, path in
                                             (("reward", reward), ("ppo", ppo))})
    labels = labels_in(AnnotationLog(folder / "annotations.jsonl").records())
    return finish(pipeline, {"sft": sft, **outputs}, timings, extra={
        "round": number, "labels": labels, "labels_total": previous["labels_total"] + labels,
        "fresh_accuracy": fresh_accuracy, "fresh_ceiling": fresh_ceiling, "prepare_seconds": prepared,
    })


# --- the loop -------------------------------------------------------------------------------
def round_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The per-round table's row of a round's summary."""
    c = summary["comparison"]
    return {
        "round": summary["round"], "labels": summary["labels"], "labels_total": summary["labels_total"],
        "fresh_accuracy": summary["fresh_accuracy"], "fresh_ceiling": summary.get("fresh_ceiling"),
        "rm_val_accuracy": summary["reward"].get("val/accuracy"),
        "rho_policy": c["reward_gold_spearman"], "rho_sft": c["baseline_reward_gold_spearman"],
        "gold": c["gold_score"], "gold_sft": c["baseline_gold_score"], "win": c["gold_win_rate"],
        "validity": c["validity"], "kl": c["kl"],
        # this run's seconds: a round resumed after a kill counts only what it did after the kill
        "seconds": round(summary.get("prepare_seconds", 0.0) + sum(s for s in summary["stage_seconds"].values() if s), 1),
    }


COLUMNS = {
    "round": "round", "labels": "labels", "labels_total": "labels so far",
    "fresh_accuracy": "RM accuracy on the round's fresh pairs (before training on them)",
    "fresh_ceiling": "judge's agreement with those labels (their noise ceiling)",
    "rm_val_accuracy": "RM accuracy, offline val pairs", "rho_policy": "Spearman(RM, judge), policy samples",
    "gold": "gold score", "win": "win rate over SFT", "kl": "KL to SFT", "seconds": "seconds",
}


def write_loop_report(config: IterateConfig, rows: list[dict[str, Any]]) -> Path:
    """``rounds.json`` and ``report.md`` (a per-round table and plot) in ``run_dir``."""
    run_dir = Path(config.run_dir)
    write_json(run_dir / "rounds.json", rows)

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["# Online RLHF: per-round report", "",
             f"Rater: `{config.rater}`; {config.k} responses per prompt; reward refresh: {config.reward_refresh}; "
             f"reference: {config.reference}. Each round's own report is in `round_N/report.md`.", "",
             "| " + " | ".join(COLUMNS.values()) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(key)) for key in COLUMNS) + " |" for row in rows]
    series = {COLUMNS[key]: [(row["labels_total"], row[key]) for row in rows if row.get(key) is not None]
              for key in ("gold", "rho_policy", "fresh_accuracy", "win")}
    series = {name: points for name, points in series.items() if points}
    if series and plot(run_dir / "rounds.png", "Online RLHF: each round's policy and reward model", series,
                       xlabel="labels so far"):
        lines += ["", "![per-round figures](rounds.png)"]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_iterate(config: IterateConfig) -> list[dict[str, Any]]:
    """Run (or resume) every round; returns the per-round rows."""
    from .tasks import load_callable

    load_judge(config.judge)
    rater = None if config.rater == BROWSER else load_callable(config.rater, "iterate: rater")
    prompts = prompt_pool(config) if config.rounds else []
    rows, summary = [], None
    for number in range(config.rounds + 1):
        done = config.round_dir(number) / "summary.json"
        if done.exists():
            summary = json.loads(done.read_text(encoding="utf-8"))
            print(f"[iterate] round {number}: finished earlier ({done}), skipping")
        else:
            print(f"[iterate] round {number} of {config.rounds}", flush=True)
            summary = run_round_zero(config) if number == 0 else run_round(config, number, summary, prompts, rater)
        rows.append(round_row(summary))
        write_loop_report(config, rows)
    return rows


def iterate_command(argv: list[str]) -> int:
    run_iterate(parse_settings(IterateConfig, "rlhf-lightning iterate", __doc__, argv))
    return 0

