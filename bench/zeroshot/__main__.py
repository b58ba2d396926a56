"""`python -m bench.zeroshot [--quick]`: PHATGOOSE against its baselines, through the real system.

1. Federation (bench.zeroshot.system): MLflow + coordinator processes on 127.0.0.1; each
   held-in task's contributor exports its own training file, trains in its own process
   (`gaggle-contributor train`, cached by content) and submits over gRPC; the coordinator
   assembles with Ray and tracks in MLflow; the newest version is exported.
2. Scoring (bench.zeroshot.scoring): every method on every task's test split, once.
3. Diagnostics on validation data (bench.zeroshot.diagnostics), then the report
   (results.json, results.md, means.png, heatmap.png) under bench/results[/quick|/tiny].
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from bench.zeroshot.config import CONTROLS, METHODS, PLANS, PRIVILEGED, Plan

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.zeroshot",
                                     description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="3 held-in + 2 held-out tasks, 40 test examples, short training")
    mode.add_argument("--tiny", action="store_true",
                      help="the random 2-layer model and a few steps (tests)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results[/MODE])")
    parser.add_argument("--workdir", type=Path,
                        help="store, logs and exported router (default runs/zeroshot-MODE-TIME)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-cache" / "experts",
                        help="content-addressed cache of trained bundles")
    parser.add_argument("--methods",
                        help="comma-separated subset of " + ",".join(METHODS) + " (default: "
                             "all of them; the full mode leaves out phatgoose_centred)")
    parser.add_argument("--test-examples", type=int,
                        help="score at most this many test examples per task (default: the "
                             "mode's; recorded in results.json)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train the experts and gates with this many training seeds and "
                             "score the post-hoc methods on each (the base model, privileged "
                             "methods and the diagnostics: first seed only)")
    parser.add_argument("--report-only", action="store_true",
                        help="only redraw results.md and the PNGs from OUT/results.json")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads of the main process, which embeds the "
                             "retrieval index (0: all cores, or 1 when the machine is already "
                             "busy); each scoring worker takes cores / workers")
    args = parser.parse_args(argv)
    unknown = sorted(set((args.methods or "").split(",")) - set(METHODS) - {""})
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    return args


def step(message: str) -> None:
    print(f"[zeroshot {time.strftime('%H:%M:%S')}] {message}", flush=True)


def benchmark(plan: Plan, args: argparse.Namespace, out: Path, workdir: Path) -> dict:
    import torch

    from bench.zeroshot import report
    from bench.zeroshot.retrieval import Encoder, RetrievalIndex
    from bench.zeroshot.scoring import DIAGNOSTICS, score_in_workers
    from routing.base import load_base
    from routing.precision import resolve
    from tasks.registry import split

    clock = WallClock(args.cache.parent / "wall" / f"{_digest(args.argv)}.json")
    torch.set_num_threads(_threads(args.threads))
    base = load_base(plan.base)
    base_fingerprint = base.fingerprint
    step(f"base model {plan.base}, fingerprint {base_fingerprint[:12]}")
    # The test splits, scored exactly once per method for the final table.
    tests = {t: split(t, plan.seed).test[:plan.test_examples]
             for t in (*plan.held_in, *plan.held_out)}
    methods = [m for m in args.methods.split(",") if m] if args.methods else list(plan.methods)
    if args.seeds > 1 and not args.methods:  # a seed study includes the random controls
        methods += [m for m in CONTROLS if m not in methods]
    system, planned, saved = federation(plan, args, workdir, base_fingerprint, tests,
                                        [*methods, DIAGNOSTICS])
    # bf16 weights where native: every method then runs in bf16 (about 2.5x faster with AMX);
    # log-probabilities stay float32.
    step(f"scoring in {resolve(plan.precision)}")
    if system["router"]:
        step(f"exported version {system['version_id']} to {system['router']}")
    began = time.monotonic()
    index = RetrievalIndex.from_files(Encoder(), planned.data, plan.retrieval_examples)
    seconds = {"retrieval_index": time.monotonic() - began}
    del base  # each scoring worker loads its own copy
    results, diagnosed, took = score_in_workers(plan, _router(system), planned.multitask,
                                                index, methods, tests, plan.parallel,
                                                progress=step, checkpoints=saved)
    seconds.update(took)
    summary = report.summarise(plan, results)
    rounds = [more_seed(replace(plan, train_seed=seed), args, workdir, base_fingerprint, index,
                        [m for m in methods if m not in (*PRIVILEGED, "base")], tests,
                        seconds)
              for seed in range(1, args.seeds)]
    payload = {"plan": plan.to_json(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(["python -m bench.zeroshot", *args.argv]),
               "wall_seconds": round(clock.total(), 1),
               **({"earlier_invocations_seconds": clock.earlier} if clock.earlier else {}),
               "load_average": list(os.getloadavg()),
               "test_examples": {t: len(v) for t, v in tests.items()},
               "system": system, "scored_on": saved.scored_on([*methods, DIAGNOSTICS]),
               "seconds": {k: round(v, 1) for k, v in seconds.items()},
               **summary, "diagnostics": diagnosed,
               **({"seeds": rounds} if rounds else {})}
    write_outputs(plan, payload, out)
    clock.finish()
    return payload


def more_seed(plan: Plan, args: argparse.Namespace, workdir: Path, fingerprint: str,
              index, methods: list[str], tests: dict, seconds: dict) -> dict:
    """One more round of the federation and the post-hoc methods with plan.train_seed."""
    from bench.zeroshot import report
    from bench.zeroshot.scoring import score_in_workers

    seed = plan.train_seed
    step(f"training seed {seed}: experts and gates anew")
    began = time.monotonic()
    system, planned, saved = federation(plan, args, workdir / f"seed-{seed}", fingerprint,
                                        tests, methods)
    seconds[f"seed_{seed}_federation"] = time.monotonic() - began
    results, _, took = score_in_workers(plan, _router(system), planned.multitask, index,
                                        methods, tests, plan.parallel, progress=step,
                                        diagnose=False, checkpoints=saved)
    seconds.update({f"seed_{seed}_{k}": v for k, v in took.items()})
    summary = report.summarise(plan, results)
    return {"train_seed": seed, "version_id": system["version_id"],
            "experts": [expert["bundle"] for expert in system["experts"]],
            "scored_on": saved.scored_on(methods),
            **{k: summary[k] for k in ("accuracy", "means", "correct", "predictions")}}


def federation(plan: Plan, args: argparse.Namespace, workdir: Path, fingerprint: str,
               tests: dict, jobs: list[str]):
    """A round's federation: train, submit, assemble and export, unless an earlier run of this
    command scored every one of `jobs` for it (then nothing is trained, and the round's saved
    description stands in). Returns (described system, recipes, the round's checkpoints)."""
    from bench.zeroshot.system import describe, describe_recipes, recipes, run_federation

    planned = recipes(plan, workdir, args.cache, fingerprint)
    saved = checkpoints(args, plan, planned, tests)
    if saved.complete(jobs):
        step(f"seed {plan.train_seed}: every job was scored by an earlier run "
             f"({saved.folder}); nothing to train")
        described = saved.system()
        if described is None:  # scored by a run that did not yet save descriptions
            described = describe_recipes(planned)
            saved.save_system(described)
        return described, planned, saved
    multitask = "multitask" in jobs and not saved.complete(["multitask"])
    described = describe(run_federation(plan, workdir, args.cache, fingerprint, planned,
                                        multitask))
    saved.save_system(described)
    return described, planned, saved


def _router(system: dict) -> Path | None:
    """The round's exported router; None for a recovered description (its jobs are all done)."""
    return Path(system["router"]) if system["router"] else None


def checkpoints(args: argparse.Namespace, plan: Plan, planned, tests: dict):
    """Where this round's finished scoring jobs are kept: beside the bundle cache, in a folder
    named by everything the scores depend on (the bundles' content keys, plan, test examples)."""
    from bench.zeroshot.scoring import Checkpoints

    depends = {"plan": plan.to_json(), "multitask": planned.multitask.name,
               "experts": [planned.bundles[task].name for task in plan.held_in],
               "tests": {t: [e.input for e in v] for t, v in tests.items()}}
    digest = hashlib.sha256(json.dumps(depends, sort_keys=True).encode()).hexdigest()[:24]
    return Checkpoints(args.cache.parent / "scores" / digest)


class WallClock:
    """The wall time of a command that may be killed and started again (it then resumes from
    the bundle cache and the scoring checkpoints).

    Every invocation keeps its elapsed seconds in `record` (one file per command line beside
    the cache), rewritten once a minute by a daemon thread, so a killed run leaves its time
    behind to the minute; the invocation that finishes reports the sum and removes the record.
    """

    def __init__(self, record: Path) -> None:
        self.record = record
        self.earlier = (json.loads(record.read_text(encoding="utf-8"))
                        if record.exists() else [])
        self.started = time.monotonic()
        self.finished = threading.Event()
        self.lock = threading.Lock()
        record.parent.mkdir(parents=True, exist_ok=True)
        self._write()  # before the thread starts, so nothing else writes the record this minute
        threading.Thread(target=self._keep, daemon=True).start()

    def _keep(self) -> None:
        while not self.finished.wait(60):
            self.save()

    def finish(self) -> None:
        with self.lock:
            self.finished.set()
            self.record.unlink(missing_ok=True)

    def save(self) -> None:
        with self.lock:
            if not self.finished.is_set():
                self._write()

    def _write(self) -> None:
        partial = self.record.with_suffix(".partial")
        partial.write_text(json.dumps([*self.earlier, round(self.elapsed(), 1)]),
                           encoding="utf-8")
        partial.replace(self.record)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def total(self) -> float:
        return sum(self.earlier) + self.elapsed()


def _digest(argv: list[str]) -> str:
    return hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:16]


def _threads(requested: int) -> int:
    """0 means every core, unless the load is already at the core count: OpenMP threads that
    spin on oversubscribed cores make a 2-thread forward far slower than a 1-thread one."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] >= cores else cores


def write_outputs(plan: Plan, payload: dict, out: Path) -> None:
    from bench.zeroshot import report

    report.write_json(out / "results.json", payload)
    header = [f"# Zero-shot benchmark ({plan.name} mode)", "",
              f"`{payload['command']}` on {payload['date']}, wall time "
              f"{payload['wall_seconds'] / 60:.1f} min (load average at the end "
              f"{payload['load_average'][0]:.1f}); base {plan.base}; "
              f"{len(plan.held_in)} held-in experts (LoRA r={plan.rank}, {plan.steps} steps, "
              f"{plan.gate_steps} gate steps), test examples per task: "
              + ", ".join(f"{t} {n}" for t, n in payload["test_examples"].items()) + ".",
              "", *notes(plan)]
    (out / "results.md").write_text(
        report.markdown(plan, payload, payload["diagnostics"], header), encoding="utf-8")
    report.bar_chart(payload, out / "means.png",
                     f"{plan.base}: mean accuracy, 95% bootstrap CI ({plan.name})")
    usage = payload["diagnostics"]["held_out_usage"]
    if usage:
        report.heatmap(usage, payload["diagnostics"]["experts"], out / "heatmap.png",
                       "PHATGOOSE: share of top-2 slots per layer, held-out validation tokens")


def notes(plan: Plan) -> list[str]:
    """How to read the table: what is fixed, what is scaled down, what each baseline does."""
    lines = [
        "- Splits are fixed by seed " + str(plan.seed) + " (tasks.registry.split); no "
        "hyperparameter was tuned: the docs/methods.md recipe and this plan were fixed before any "
        "test example was scored, and validation examples serve only the routing diagnostics.",
        "- PHATGOOSE, Arrow and average activation route per token and module with top-2; "
        "SMEAR merges the experts' parameters per example with softmax weights over the gate "
        "keys, from the mean activation over the prompt's tokens.",
        f"- Retrieval embeds up to {plan.retrieval_examples} training inputs per expert with "
        "all-MiniLM-L6-v2 and sends each test prompt to the expert of its nearest one.",
        f"- Multitask: one LoRA on the union of the held-in training files, "
        f"{plan.multitask_steps} steps",
    ]
    same = plan.steps * len(plan.held_in)
    lines[-1] += (" (the same budget as the experts together)." if plan.multitask_steps == same
                  else f" (scaled down from the same-budget {same} steps to fit the mode).")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in results.json
    plan = PLANS["quick" if args.quick else "tiny" if args.tiny else "full"]
    if args.test_examples:
        plan = replace(plan, test_examples=args.test_examples)
    results = ROOT / "bench" / "results"
    out = args.out or (results if plan.name == "full" else results / plan.name)
    if args.report_only:
        payload = json.loads((out / "results.json").read_text(encoding="utf-8"))
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["plan"].items()}
        write_outputs(Plan(**saved), payload, out)
        print((out / "results.md").read_text(encoding="utf-8"))
        return 0
    workdir = (args.workdir or ROOT / "runs" / time.strftime(
        f"zeroshot-{plan.name}-%Y%m%d-%H%M%S")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # SIGTERM takes the Ctrl-C path, so every child process is stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        payload = benchmark(plan, args, out, workdir)
    except KeyboardInterrupt:
        step("interrupted")
        return 130
    except (RuntimeError, TimeoutError) as err:
        print(f"zeroshot benchmark failed: {err}\nlogs: {workdir / 'logs'}", file=sys.stderr)
        return 1
    print((out / "results.md").read_text(encoding="utf-8"))
    step(f"done in {payload['wall_seconds'] / 60:.1f} min; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
