"""The pipeline report: TensorBoard scalars in, Markdown and PNG plots out.

Plots need matplotlib (``pip install rlhf-lightning[report]``); without it the report is
written without them and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

Scalars = dict[str, dict[str, list[tuple[int, float]]]]

PLOTS = {
    "ppo_scores.png": ("PPO: reward-model score and gold score", ["objective/scores", "eval/score", "eval/gold_score"]),
    "ppo_kl.png": ("PPO: KL to the reference and KL coefficient", ["objective/kl", "eval/kl", "objective/kl_coef"]),
    "ppo_quality.png": ("PPO: gold win rate over SFT and validity", ["eval/gold_win_rate", "eval/validity", "eval/ref_validity"]),
    "sft_loss.png": ("SFT: loss", ["train/loss", "val/loss"]),
    "reward_accuracy.png": ("Reward model: accuracy", ["train/accuracy", "val/accuracy", "val/gold_accuracy"]),
}
OVEROPTIMISATION = "ppo_gold_vs_kl.png"
PLOT_STAGE = {"ppo_scores.png": "ppo", "ppo_kl.png": "ppo", "ppo_quality.png": "ppo", "sft_loss.png": "sft",
              "reward_accuracy.png": "reward"}


def read_scalars(run_dir: Path) -> Scalars:
    """``{stage: {tag: [(step, value), ...]}}`` from the event files of each stage's sub-run."""
    scalars: Scalars = {}
    for stage_dir in sorted(p for p in Path(run_dir).iterdir() if p.is_dir()) if Path(run_dir).is_dir() else []:
        tags: dict[str, list[tuple[int, float]]] = {}
        for events in sorted(stage_dir.glob("events.out.tfevents*")):
            accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                tags.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        if tags:
            scalars[stage_dir.name] = {tag: sorted(values) for tag, values in tags.items()}
    return scalars


def against(scalars: dict[str, list[tuple[int, float]]], x_tag: str, y_tag: str) -> list[tuple[float, float]]:
    """``(x, y)`` points of two tags logged at the same steps, in step order."""
    xs = dict(scalars.get(x_tag, []))
    return [(xs[step], y) for step, y in scalars.get(y_tag, []) if step in xs]


def plot(path: Path, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str = "step") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for tag, values in series.items():
        axis.plot([s for s, _ in values], [v for _, v in values], marker="o" if len(values) < 15 else None,
                  markersize=3, label=tag)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(run_dir: Path, summary: dict[str, Any], scalars: Scalars) -> Path:
    """Write ``report.md`` and its plots into ``run_dir``."""
    run_dir = Path(run_dir)
    images = []
    for name, (title, tags) in PLOTS.items():
        stage = scalars.get(PLOT_STAGE[name], {})
        series = {tag: stage[tag] for tag in tags if tag in stage}
        if series and plot(run_dir / name, title, series):
            images.append((title, name))
    # Gao et al. (2022)'s over-optimisation curve: gold and proxy score against KL to SFT, at
    # each validation. A gold curve that bends down while the proxy climbs is over-optimisation.
    ppo = scalars.get("ppo", {})
    curve = {f"{tag} vs eval/kl": against(ppo, "eval/kl", tag) for tag in ("eval/gold_score", "eval/score")}
    curve = {label: points for label, points in curve.items() if points}
    title = "PPO: score against KL to SFT (over-optimisation)"
    if "eval/gold_score vs eval/kl" in curve and plot(run_dir / OVEROPTIMISATION, title, curve, xlabel="KL(policy || SFT), nats"):
        images.append((title, OVEROPTIMISATION))
    c, policy = summary["comparison"], summary.get("policy_stage", "ppo").upper()

    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [
        "# RLHF run report",
        "",
        f"{policy} policy against the SFT policy on {c['num_prompts']} held-out prompts (same sampling seed).",
        "",
        f"| metric | {policy} | SFT |",
        "|---|---|---|",
        f"| gold win rate ({policy} over SFT) | {fmt(c['gold_win_rate'])} | |",
        f"| gold score | {fmt(c['gold_score'])} | {fmt(c['baseline_gold_score'])} |",
        f"| validity (the judge's check) | {fmt(c['validity'])} | {fmt(c['baseline_validity'])} |",
        f"| reward-model score | {fmt(c['score'])} | {fmt(c['baseline_score'])} |",
        f"| Spearman(reward model, gold) on these samples | {fmt(c['reward_gold_spearman'])} "
        f"| {fmt(c['baseline_reward_gold_spearman'])} |",
        f"| response length (tokens) | {fmt(c['response_length'])} | {fmt(c['baseline_response_length'])} |",
        f"| KL({policy} ‖ SFT) per response | {fmt(c['kl'])} | |",
        "",
        "## Stages",
        "",
        f"- SFT validation loss: {fmt(summary['sft'].get('val/loss'))}",
        f"- Reward model: held-out accuracy {fmt(summary['reward'].get('val/accuracy'))} "
        f"(ceiling set by label noise: {fmt(summary['reward'].get('label_ceiling'))}), "
        f"accuracy against the gold annotator {fmt(summary['reward'].get('val/gold_accuracy'))}, "
        f"Spearman with gold scores {fmt(summary['reward'].get('val/gold_spearman'))}",
        "",
    ]
    if images:
        lines += ["## Curves", ""] + [f"![{title}]({name})" for title, name in images] + [""]
    else:
        lines += ["(No plots: install matplotlib, `pip install rlhf-lightning[report]`.)", ""]
    lines += ["## Samples (same prompt, same seed)", "", f"| prompt | SFT | {policy} |", "|---|---|---|"]
    for row in summary["samples"]:
        cells = [row["prompt"], row["baseline_response"], row["response"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
