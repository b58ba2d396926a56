"""The benchmark's outputs: results JSON, a markdown table, a bar chart and a routing heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.zeroshot.config import CONTROLS, METHODS, PRIVILEGED, Plan
from bench.zeroshot.paired import (
    DRAWS,
    PairedDifference,
    balanced_accuracy,
    majority_rate,
    paired_difference,
    task_draws,
)
from routing.evaluate import EvalResult, bootstrap_task_mean
from tasks.registry import TASKS

LABELS = {"base": "base", "phatgoose": "PHATGOOSE", "phatgoose_centred": "PHATGOOSE centred†",
          "arrow": "Arrow",
          "average_activation": "avg act", "uniform_merge": "uniform merge",
          "smear": "SMEAR", "random_experts": "random experts‡", "random_gates": "random gates‡",
          "retrieval": "retrieval*", "multitask": "multitask*",
          "oracle": "oracle*"}


def summarise(plan: Plan, results: dict[str, dict[str, EvalResult]]) -> dict:
    """Per-task accuracy, per-example correctness, predictions and gold labels, and the group
    means with 95% CIs."""
    accuracy = {m: {t: r.accuracy for t, r in by_task.items()} for m, by_task in results.items()}
    correct = {m: {t: [int(c) for c in r.correct] for t, r in by_task.items()}
               for m, by_task in results.items()}
    predictions = {m: {t: [int(p) for p in r.predictions] for t, r in by_task.items()}
                   for m, by_task in results.items()}
    labels = {t: [int(y) for y in r.labels] for by_task in results.values()
              for t, r in by_task.items()}
    means: dict[str, dict] = {}
    for method, by_task in correct.items():
        means[method] = {}
        for group, tasks in (("held_in", plan.held_in), ("held_out", plan.held_out)):
            present = {t: by_task[t] for t in tasks if t in by_task}
            if present:
                ci = bootstrap_task_mean(present, seed=plan.seed)
                means[method][group] = {"mean": ci.mean, "low": ci.low, "high": ci.high}
    return {"accuracy": accuracy, "means": means, "correct": correct,
            "predictions": predictions, "labels": labels}


def markdown(plan: Plan, summary: dict, diagnostics: dict, header: list[str]) -> str:
    """Tasks x methods table with the held-in and held-out means, then the diagnostics."""
    methods = [m for m in METHODS if m in summary["accuracy"]]
    lines = [*header, "", "| task | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for group, tasks in (("held-in", plan.held_in), ("held-out", plan.held_out)):
        for task in tasks:
            cells = [_cell(summary["accuracy"][m].get(task)) for m in methods]
            lines.append(f"| {task} ({group}) | " + " | ".join(cells) + " |")
    for group, key in (("held-in", "held_in"), ("held-out", "held_out")):
        cells = []
        for method in methods:
            mean = summary["means"][method].get(key)
            cells.append("-" if mean is None else
                         f"**{mean['mean']:.3f}** [{mean['low']:.3f}, {mean['high']:.3f}]")
        lines.append(f"| **{group} mean** [95% CI] | " + " | ".join(cells) + " |")
    lines += ["", "\\* privileged: " + ", ".join(PRIVILEGED) + " use data or labels a "
              "data-free router never sees (example embeddings, all data in one place, the "
              "task's identity)."]
    if "phatgoose_centred" in methods:
        lines += ["", "† PHATGOOSE centred: PHATGOOSE's gate keys scored against each token "
                  "minus the mean of the experts' shipped mean activations, a deviation listed in "
                  "docs/methods.md (routing.layers._centring_bias explains why)."]
    if set(CONTROLS) & set(methods):
        lines += ["", "‡ controls: PHATGOOSE routing with each expert's adapter replaced by a "
                  "random one of the same shape and per-module norm (random experts), or with "
                  "random gate keys of the trained keys' per-module norms (random gates)."]
    lines += ["", *paired_table(plan, summary), "", *balance_table(plan, summary), ""]
    if summary.get("seeds"):
        lines += [*seed_table(plan, summary), "", *seed_task_table(plan, summary), ""]
    lines += own_share_table(plan, diagnostics.get("own_share", {}))
    return "\n".join(lines) + "\n"


def paired_table(plan: Plan, summary: dict, reference: str = "phatgoose") -> list[str]:
    """PHATGOOSE minus every other method, paired over the same test examples."""
    correct = summary["correct"]
    if reference not in correct:
        return []
    draws = task_draws({t: len(v) for t, v in correct[reference].items()})
    lines = [f"Paired differences, {LABELS[reference]} minus each method (mean accuracy over "
             f"tasks; 95% interval from {DRAWS} paired bootstrap draws that resample each "
             "task's test examples, the same draws for both methods; P = share of draws with "
             "difference <= 0):", "",
             "| method | held-in diff [95% CI] | P(diff <= 0) | held-out diff [95% CI] | "
             "P(diff <= 0) |", "|---|---:|---:|---:|---:|"]
    for method in (m for m in METHODS if m in correct and m != reference):
        cells = []
        for tasks in (plan.held_in, plan.held_out):
            mine = {t: correct[reference][t] for t in tasks if t in correct[reference]}
            theirs = {t: correct[method][t] for t in tasks if t in correct[method]}
            if not set(mine) & set(theirs):
                cells += ["-", "-"]
                continue
            d = paired_difference(mine, theirs, draws)
            cells += [f"{d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]", f"{d.p_not_better:.3f}"]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return lines


def seed_table(plan: Plan, summary: dict, reference: str = "phatgoose") -> list[str]:
    """Each post-hoc method's group means across training seeds, PHATGOOSE's lead in each seed,
    and in how many of them it leads (a higher mean) or leads surely (a paired 95% interval
    above zero)."""
    rounds = [summary, *summary["seeds"]]
    methods = [m for m in METHODS if all(m in r["means"] for r in rounds)]
    if reference not in methods:
        return []
    lines = [f"Across {len(rounds)} training seeds (experts, gates, data order; the test "
             "examples fixed): mean ± standard deviation of each group mean; "
             f"{LABELS[reference]} minus the method averaged over the seeds, with its paired "
             f"95% interval ({DRAWS} bootstrap draws of the test examples, the same draws for "
             "every seed and method, so it holds the examples' noise and not the seeds'); the "
             "difference in each seed, in seed order, which shows the seeds' noise; and in how "
             f"many seeds {LABELS[reference]} leads (higher mean) / leads surely (paired 95% "
             "interval above 0). The base model, the privileged methods and the diagnostics "
             "come from the first seed only.", "",
             "| method | held-in mean ± sd | held-in diff [95% CI] | per seed | leads "
             "| held-out mean ± sd | held-out diff [95% CI] | per seed | leads |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in methods:
        cells = []
        for key, tasks in (("held_in", plan.held_in), ("held_out", plan.held_out)):
            values = np.array([r["means"][method][key]["mean"] for r in rounds
                               if key in r["means"][method]])
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1):.3f}")
            if method == reference:
                cells += ["-", "-", "-"]
                continue
            d = seed_mean_difference(rounds, reference, method, tasks)
            cells.append(f"{d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
            each = [seed_difference(r, reference, method, tasks) for r in rounds]
            cells.append(", ".join(f"{e.diff:+.3f}" for e in each))
            higher, sure, n = sum(e.diff > 0 for e in each), sum(e.low > 0 for e in each), len(each)
            cells.append(f"{higher}/{n} / {sure}/{n}")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    if any("scored_on" in r for r in rounds):
        lines += ["", "Where each seed was scored (bf16 and fp32 scores differ in their last "
                  "digits): " + "; ".join(f"seed {r.get('train_seed', 0)}: {_where(r)}"
                                          for r in rounds) + "."]
    return lines


def seed_task_table(plan: Plan, summary: dict) -> list[str]:
    """Each post-hoc method's accuracy per task in every seed: where the seeds disagree."""
    rounds = [summary, *summary["seeds"]]
    methods = [m for m in METHODS if all(m in r["accuracy"] for r in rounds)]
    if not methods:
        return []
    lines = [f"Accuracy per task in each of the {len(rounds)} seeds, in seed order, and the "
             "largest minus the smallest (range):", "",
             "| task | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for group, tasks in (("held-in", plan.held_in), ("held-out", plan.held_out)):
        for task in tasks:
            cells = []
            for method in methods:
                values = [r["accuracy"][method].get(task) for r in rounds]
                if None in values:
                    cells.append("-")
                    continue
                cells.append(" / ".join(f"{v:.3f}" for v in values)
                             + f" ({max(values) - min(values):.3f})")
            lines.append(f"| {task} ({group}) | " + " | ".join(cells) + " |")
    return lines


def _where(round_: dict) -> str:
    machines = {(m["precision"], m["cpu"], m["cores"]) if m else None
                for m in round_.get("scored_on", {}).values()}
    return ", ".join("not recorded" if m is None else f"{m[0]} on {m[1]} ({m[2]} cores)"
                     for m in sorted(machines, key=str)) or "not recorded"


def seed_mean_difference(rounds: list[dict], reference: str, method: str,
                         tasks: tuple[str, ...]) -> PairedDifference:
    """`reference` minus `method`, each example's correctness averaged over the seeds first.

    Every seed scores the same test examples, so one bootstrap draw resamples them for all
    seeds at once; the interval is conditional on the seeds that were trained."""
    def seed_mean(method_: str) -> dict[str, np.ndarray]:
        return {t: np.mean([r["correct"][method_][t] for r in rounds], axis=0) for t in tasks}

    mine = seed_mean(reference)
    return paired_difference(mine, seed_mean(method),
                             task_draws({t: len(v) for t, v in mine.items()}))


def seed_difference(round_: dict, reference: str, method: str,
                    tasks: tuple[str, ...]) -> PairedDifference:
    """`reference` minus `method` in one seed, with its paired interval."""
    mine = {t: round_["correct"][reference][t] for t in tasks}
    theirs = {t: round_["correct"][method][t] for t in tasks}
    return paired_difference(mine, theirs, task_draws({t: len(v) for t, v in mine.items()}))


# Families whose choices are one fixed label set, so that a class is a label, not a position.
CLASSIFICATION_FAMILIES = ("sentiment", "topic", "qa-yesno")


def balance_table(plan: Plan, summary: dict) -> list[str]:
    """Balanced accuracy per method and the majority-class rate, per classification task."""
    tasks = [t for t in (*plan.held_in, *plan.held_out)
             if TASKS[t].family in CLASSIFICATION_FAMILIES]
    if "predictions" not in summary or "labels" not in summary:
        return ["Balanced accuracy: these results predate the recording of each example's "
                "prediction and gold label; a new run reports it."]
    predictions, labels = summary["predictions"], summary["labels"]
    methods = [m for m in METHODS if m in predictions]
    lines = ["Balanced accuracy (mean recall over the classes present) on the classification "
             "tasks, beside the majority-class rate (accuracy of always answering the most "
             "frequent gold label):", "",
             "| task | majority | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|---:|" + "---:|" * len(methods)]
    for task in (t for t in tasks if t in labels):
        cells = [_cell(balanced_accuracy(predictions[m][task], labels[task])
                       if task in predictions[m] else None) for m in methods]
        lines.append(f"| {task} | {majority_rate(labels[task]):.3f} | " + " | ".join(cells)
                     + " |")
    return lines


def own_share_table(plan: Plan, own_share: dict) -> list[str]:
    if not own_share:
        return []
    methods = list(own_share)
    # Results written before the scored-position share existed hold the overall one only.
    scored = all("scored" in own_share[m][t] for m in methods for t in plan.held_in)

    def cell(share: dict) -> str:
        return f"{share['overall']:.2f} / {share['scored']:.2f}" if scored \
            else f"{share['overall']:.2f}"

    what = ("all tokens / scored positions, i.e. the last prompt token and the answer tokens "
            "whose predictions rank classification scores" if scored else "all tokens")
    lines = ["Share of held-in validation tokens whose top-1 expert is the task's own "
             f"({what}; all layers; chance = 1/{len(plan.held_in)}):", "",
             "| task | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for task in plan.held_in:
        lines.append(f"| {task} | " + " | ".join(cell(own_share[m][task]) for m in methods)
                     + " |")
    return lines


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    from matplotlib import pyplot as plt

    return plt


def bar_chart(summary: dict, path: Path, title: str) -> Path:
    """Held-in and held-out means per method, with their 95% bootstrap intervals."""
    plt = _pyplot()
    methods = [m for m in METHODS if m in summary["means"]]
    figure, axes = plt.subplots(figsize=(1.1 * len(methods) + 2, 4))
    for offset, (key, label) in ((-0.2, ("held_in", "held-in")),
                                 (0.2, ("held_out", "held-out"))):
        xs, ys, errors = [], [], [[], []]
        for i, method in enumerate(methods):
            mean = summary["means"][method].get(key)
            if mean is not None:
                xs.append(i + offset)
                ys.append(mean["mean"])
                errors[0].append(mean["mean"] - mean["low"])
                errors[1].append(mean["high"] - mean["mean"])
        axes.bar(xs, ys, width=0.4, yerr=errors, capsize=3, label=label)
    axes.set_xticks(range(len(methods)), [LABELS[m] for m in methods], rotation=30, ha="right")
    axes.set_ylabel("mean accuracy over tasks")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    return path


def heatmap(usage: dict, experts: list[str], path: Path, title: str) -> Path:
    """One panel per held-out task: layers x experts, share of top-k slots (rows sum to 1)."""
    plt = _pyplot()
    tasks = list(usage)
    layers = max(len(u) for u in usage.values())
    figure, axes_row = plt.subplots(1, len(tasks), squeeze=False,
                                    figsize=(2 + (1 + 0.35 * len(experts)) * len(tasks),
                                             2 + 0.22 * layers))
    image = None
    for axes, task in zip(axes_row[0], tasks, strict=True):
        image = axes.imshow(usage[task], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        axes.set_xticks(range(len(experts)), experts, rotation=90)
        axes.set_yticks(range(len(usage[task])))
        axes.set_title(task)
        axes.set_xlabel("expert")
    axes_row[0][0].set_ylabel("layer")
    figure.suptitle(title)
    figure.colorbar(image, ax=list(axes_row[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
