"""`python -m demo.evaluate`: base model against a routed router version on one task.

Prints one JSON line: {"task", "n", "base", "phatgoose", "seconds"}. A consumer does the same
with `routing.load_router` + `routing.router.route` on an exported version.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.evaluate", description=__doc__)
    parser.add_argument("--base", required=True, help="base model name")
    parser.add_argument("--router", required=True, help="an exported router version folder")
    parser.add_argument("--task", required=True, help="task name (python -m tasks list)")
    parser.add_argument("--limit", type=int, default=100, help="test examples to score")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token and module")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 weights where the CPU runs bf16 natively (~2.5x faster)")
    args = parser.parse_args(argv)

    from routing.base import load_base
    from routing.evaluate import evaluate
    from routing.precision import for_scoring
    from routing.router import route, unroute
    from routing.version import load_router
    from tasks.registry import split

    began = time.perf_counter()
    base = load_base(args.base)
    for_scoring(base.model, args.precision)
    examples = split(args.task).test[: args.limit]
    plain = evaluate(base.model, base.tokenizer, examples, desc="base")
    route(base, load_router(args.router), method="phatgoose", top_k=args.top_k)
    routed = evaluate(base.model, base.tokenizer, examples, desc="phatgoose")
    unroute(base.model)
    print(json.dumps({"task": args.task, "n": len(examples), "base": plain.accuracy,
                      "phatgoose": routed.accuracy,
                      "seconds": round(time.perf_counter() - began, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
