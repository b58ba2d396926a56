"""Does an expert trained with the contributor's defaults beat the base model on its task?

Exports a task's train split as contributor JSONL, runs the real `gaggle-contributor train`
on it with every default (only --base, --data, --method and --out are given), then
rank-classifies the task's test examples with the base model and with the base model plus
that one expert at full strength, and prints both accuracies with 95% bootstrap intervals,
the example counts and the training's wall time:

    python -m bench.expert_gain [--task tweet-sentiment] [--train-examples 1000]
                                [--test-examples 120] [--method lora]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol.bundle import load_bundle
from routing.base import load_base
from routing.evaluate import bootstrap_ci, evaluate
from routing.router import route, unroute
from tasks.registry import split
from tasks.task import write_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.expert_gain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="tweet-sentiment",
                        help="registered task (default: %(default)s)")
    parser.add_argument("--base", default="smollm2-135m", help="base model (default: %(default)s)")
    parser.add_argument("--method", default="lora", choices=("lora", "ia3"))
    parser.add_argument("--train-examples", type=int, default=1000,
                        help="train examples given to the contributor (default: %(default)s)")
    parser.add_argument("--test-examples", type=int, default=120,
                        help="test examples scored (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    splits = split(args.task, args.seed)
    test = splits.test[:args.test_examples]
    with tempfile.TemporaryDirectory(prefix="gaggle-gain-") as folder:
        data, out = Path(folder) / "train.jsonl", Path(folder) / "expert"
        written = write_jsonl(splits.train[:args.train_examples], data)
        command = [sys.executable, "-m", "contributor.cli", "train", "--base", args.base,
                   "--data", str(data), "--method", args.method, "--out", str(out),
                   "--name", args.task]
        began = time.perf_counter()
        subprocess.run(command, check=True)
        train_seconds = time.perf_counter() - began
        bundle = load_bundle(out)

    base = load_base(args.base)
    figures = {"task": args.task, "method": args.method, "train_examples": written,
               "test_examples": len(test), "train_seconds": round(train_seconds, 1),
               "expert_steps": bundle.manifest.training.get("expert_steps"),
               "gate_steps": bundle.manifest.training.get("gate_steps")}
    for label in ("base", "expert"):
        if label == "expert":
            route(base, [bundle], method=f"single:{args.task}")
        result = evaluate(base.model, base.tokenizer, test, desc=label)
        interval = bootstrap_ci([float(c) for c in result.correct])
        figures[label] = {"accuracy": round(result.accuracy, 4),
                          "ci95": [round(interval.low, 4), round(interval.high, 4)]}
    unroute(base.model)
    print(f"{args.task}: {written} train examples, {len(test)} test examples, "
          f"training {train_seconds / 60:.1f} min ({figures['expert_steps']} expert and "
          f"{figures['gate_steps']} gate steps)")
    for label in ("base", "expert"):
        low, high = figures[label]["ci95"]
        print(f"  {label:6s} accuracy {figures[label]['accuracy']:.3f} [{low:.3f}, {high:.3f}]")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
