"""Model cards: the markdown MLflow shows for a router version and for the registered model.

A version's card says who contributed what, what changed since its parent, how the
experts share the routed tokens and, once evaluated, how good it is. The registered model's
card keeps the champion's history, one row per promotion (who, when, from which version to
which, with the evaluation figures): MLflow itself keeps only where an alias points now.
Pure functions of the tracking payloads, so the cards are tested without a server.
"""

from __future__ import annotations

EVALUATION_HEADING = "## Evaluation"
HISTORY_HEADING = "## Champion history"
_HISTORY_HEADER = ("| # | when (UTC) | by | from | to | mean accuracy |\n"
                   "|---:|---|---|---|---|---:|")
MAX_CARD_ROWS = 200  # experts listed in full; the rest are counted


def version_card(payload: dict) -> str:
    """The card of a router version (a coordinator.tracking.tracker.version_payload)."""
    experts = payload.get("experts") or [
        {"name": n, "contributor": c, "method": "", "expert_id": i} for n, c, i in
        zip(payload["expert_names"], payload["contributors"], payload["expert_ids"],
            strict=True)]
    lines = [f"# Router version `{payload['version_id']}`", "",
             f"PHATGOOSE router over {len(experts)} expert(s) of base model "
             f"`{payload['base']}`.", "",
             f"- parent version: `{payload['parent']}`" if payload.get("parent")
             else "- parent version: none (the first version)",
             f"- changes: {payload.get('diff') or 'none'}", "",
             "## Experts", "", "| expert | contributor | method | expert id |",
             "|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['contributor']} | {e.get('method', '')} | "
              f"`{e['expert_id'][:12]}` |" for e in experts[:MAX_CARD_ROWS]]
    if len(experts) > MAX_CARD_ROWS:
        lines.append(f"| ... {len(experts) - MAX_CARD_ROWS} more | | | |")
    lines += ["", *usage_section(payload.get("usage") or {})]
    return "\n".join(lines).rstrip() + "\n"


def usage_section(report: dict) -> list[str]:
    """Each expert's top-1 share of routed tokens on public prompts (coordinator.checks.usage)."""
    if not report:
        return []
    if "error" in report:
        return ["## Usage", "", f"The usage check failed: {report['error']}"]
    flagged = report.get("flagged") or []
    lines = ["## Usage", "",
             f"Top-1 share of {report.get('tokens', 0)} routed tokens per module, averaged "
             "over the modules each expert adapts; flagged: "
             f"{', '.join(flagged) if flagged else 'none'}.", "",
             "| expert | share | uniform share | flagged |", "|---|---:|---:|---|"]
    experts = sorted(report.get("experts", {}).items(), key=lambda kv: -kv[1]["share"])
    lines += [f"| {name} | {e['share']:.3f} | {e['uniform']:.3f} | "
              f"{'yes' if e['flagged'] else ''} |" for name, e in experts[:MAX_CARD_ROWS]]
    return lines


def with_evaluation(card: str, record: dict) -> str:
    """The card with its evaluation section set to a coordinator.checks.evaluation record (replacing
    an earlier one, so replaying the call gives the same card)."""
    body = card.split(f"\n{EVALUATION_HEADING}\n", 1)[0].rstrip()
    metrics = record["metrics"]
    rows = [f"| {task} | {value:.4f} |" for task, value in sorted(metrics.items())]
    return "\n".join([body, "", EVALUATION_HEADING, "",
                      f"Config `{record['config_key']}`.", "",
                      "| task | accuracy |", "|---|---:|", *rows]) + "\n"


def with_promotion(card: str, promotion: dict, number: int) -> str:
    """The registered model's card with one more champion-history row (once per promotion:
    a row already there for `number` is not added again)."""
    marker = f"| {number} |"
    if any(line.startswith(marker) for line in card.splitlines()):
        return card
    if HISTORY_HEADING not in card:
        card = f"{card.rstrip()}\n\n{HISTORY_HEADING}\n\n{_HISTORY_HEADER}\n"
    mean = promotion.get("mean_accuracy")
    by = promotion.get("by", "") + (" (forced)" if promotion.get("forced") else "")
    row = (f"{marker} {promotion.get('at', '')} | {by} | "
           f"{promotion.get('from') or '-'} | {promotion['version_id']} | "
           f"{'' if mean is None else f'{mean:.4f}'} |")
    return f"{card.rstrip()}\n{row}\n"
