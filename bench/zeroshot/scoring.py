"""Scoring every method on every task with rank classification (routing.evaluate).

One base model serves every method in turn: `route` swaps the adapted linears in place and
`unroute` puts the base back. Per-example methods get their inputs through the evaluation's
`before_batch` hook: retrieval an expert index per example, SMEAR a mask over the prompt and,
for the choices that continue it, the rows whose merged expert they reuse.

`score_in_workers` spreads the methods over worker processes, one CPU thread each: on the
2-core machine one bf16 scoring thread ran 0.107 s per boolq example and two threads in one
process 0.093 s, so two single-thread workers score about 1.7x as many examples per second.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.zeroshot.config import Plan
from bench.zeroshot.retrieval import Encoder, RetrievalIndex
from protocol.bundle import Bundle
from routing.base import BaseModel
from routing.controls import random_experts, random_gates
from routing.evaluate import EvalResult, _encode, evaluate
from routing.methods import TOKEN_METHODS
from routing.router import route, routing_inputs, unroute
from routing.stack import RouterWeights
from tasks.task import Example

Progress = Callable[[str], None]
RANDOMISE = {"random_experts": random_experts, "random_gates": random_gates}


@dataclass
class Collection:
    """Everything the methods route with."""

    weights: RouterWeights  # the exported router version (held-in experts)
    multitask: Bundle | None  # the privileged multitask LoRA, when a job scores it
    retrieval: RetrievalIndex  # the privileged example embeddings
    encoder: Encoder  # embeds retrieval queries


class Scorer:
    """Runs each method over a dict of task -> test examples; results[method][task]."""

    def __init__(self, base: BaseModel, collection: Collection, plan: Plan,
                 progress: Progress = print) -> None:
        self.base, self.collection, self.plan, self.progress = base, collection, plan, progress

    def _evaluate(self, examples: Sequence[Example], desc: str, **kwargs) -> EvalResult:
        return evaluate(self.base.model, self.base.tokenizer, examples,
                        batch_size=self.plan.eval_batch_size,
                        max_length=self.plan.eval_max_length, progress=False, desc=desc,
                        **kwargs)

    def run(self, method: str, tests: dict[str, list[Example]],
            done: dict[str, EvalResult] | None = None,
            on_task: Callable[[str, EvalResult], None] | None = None) -> dict[str, EvalResult]:
        """Accuracy of `method` on every task it applies to (oracle: held-in tasks only).

        done: tasks an interrupted run already scored (kept, not scored again); on_task is
        called with each task as soon as it is scored.
        """
        done = done or {}
        results: dict[str, EvalResult] = {}
        weights = self.collection.weights
        if method in TOKEN_METHODS:
            route(self.base, weights, method=method, top_k=2)
        elif method == "multitask":
            route(self.base, [self.collection.multitask], method="single:multitask")
        elif method in RANDOMISE:  # seeded by the plan, so a rerun draws the same tensors
            route(self.base, RANDOMISE[method](weights, seed=self.plan.seed), method="phatgoose",
                  top_k=2)
        elif method in ("smear", "retrieval"):
            route(self.base, weights, method=method)
        for task, examples in tests.items():
            if method == "oracle":
                if task not in weights.experts:
                    continue  # held-out: no expert of its own exists
                route(self.base, weights, method=f"single:{task}")
            desc = f"{method}/{task}"
            if task in done:
                results[task] = done[task]
                self.progress(f"{desc}: scored by an earlier run")
                continue
            if method == "retrieval":
                results[task] = self._retrieval(examples, desc)
            elif method == "smear":
                results[task] = self._smear(examples, desc)
            else:
                results[task] = self._evaluate(examples, desc)
            self.progress(f"{desc}: {results[task].accuracy:.3f} ({len(examples)} examples, "
                          f"{results[task].seconds:.0f} s)")
            if on_task is not None:
                on_task(task, results[task])
        unroute(self.base.model)
        return results

    def _retrieval(self, examples: Sequence[Example], desc: str) -> EvalResult:
        """Whole model, one expert per example: the one nearest to the prompt's embedding."""
        names = self.collection.retrieval.nearest(
            self.collection.encoder.embed([e.input for e in examples]))
        chosen = torch.tensor([self.collection.weights.expert_index(n) for n in names])
        with routing_inputs(self.base.model) as state:
            def pick(rows: list[int]) -> None:
                state.expert_index = chosen[rows]

            return self._evaluate(examples, desc, before_batch=pick)

    def _smear(self, examples: Sequence[Example], desc: str) -> EvalResult:
        """SMEAR-style: the merge weights come from the mean activation over the prompt.

        Each prompt runs once (routing.evaluate's shared prompt): its pass merges the experts
        from the prompt's own tokens (padding masked out), and its choices then continue the
        prompt's cache with that same merged expert (RoutingState.merge_rows), so every choice
        is scored by the expert chosen from the input alone, as SMEAR routes on the input
        sequence. This equals running each (prompt, choice) in full with the merge masked to
        the prompt, at a third to a fifth of the tokens.
        """
        prompts = PromptMask(self.base.tokenizer, examples, self.plan.eval_max_length)
        with routing_inputs(self.base.model) as state:
            prompt_rows: list[int] = []

            def before(rows: list[int]) -> None:
                nonlocal prompt_rows
                if len(set(rows)) < len(rows):  # the choices: each example's rows repeat
                    position = {example: i for i, example in enumerate(prompt_rows)}
                    state.attention_mask = None
                    state.merge_rows = torch.tensor([position[r] for r in rows])
                else:  # the prompts, one row per example
                    prompt_rows = rows
                    state.merge_rows = None
                    state.attention_mask = prompts.mask(rows)

            return self._evaluate(examples, desc, before_batch=before)


class PromptMask:
    """Masks over the prompt tokens of a batch of prompts (see routing.evaluate's shared
    prompt: one right-padded row per example)."""

    def __init__(self, tokenizer, examples: Sequence[Example], max_length: int) -> None:
        # The very encoding routing.evaluate uses, so prompt lengths match exactly.
        self.lengths = [len(item.prompt) for item in _encode(tokenizer, examples, max_length)]

    def mask(self, rows: list[int]) -> torch.Tensor:
        """rows: example index per row -> (rows, longest prompt) with 1 on prompt tokens."""
        lengths = torch.tensor([self.lengths[example] for example in rows])
        return (torch.arange(int(lengths.max())).unsqueeze(0) < lengths.unsqueeze(1)).long()


# Relative cost of each job, to hand out the longest first so the workers end together: SMEAR
# merges the experts' factors per example, routed methods cost more than the base.
_COST = {"smear": 1.6, "diagnostics": 2.2, "phatgoose": 1.5, "phatgoose_centred": 1.5,
         "average_activation": 1.5, "random_experts": 1.5, "random_gates": 1.5,
         "retrieval": 1.4, "arrow": 1.3, "base": 1.0,
         "multitask": 1.0, "uniform_merge": 0.9, "oracle": 0.7}
DIAGNOSTICS = "diagnostics"  # the job that runs bench.zeroshot.diagnostics.routing_diagnostics
SYSTEM_FILE = "_system.json"  # beside a round's jobs: its federation, described

_scorer: Scorer | None = None  # one per worker process, built by _start_worker
_tests: dict[str, list[Example]] = {}
_saved: Checkpoints | None = None  # where the worker keeps each task as it is scored


def _timestamped(message: str) -> None:
    print(f"[zeroshot {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _start_worker(plan: Plan, router: str, multitask: str | None, index: RetrievalIndex,
                  tests: dict[str, list[Example]], threads: int, saved: Path | None) -> None:
    """Load the base model (bf16 where native), the router and the baselines' inputs once."""
    global _scorer, _tests, _saved
    from protocol.bundle import load_bundle
    from routing.base import load_base
    from routing.precision import for_scoring
    from routing.version import load_router

    torch.set_num_threads(threads)
    base = load_base(plan.base)
    for_scoring(base.model, plan.precision)
    collection = Collection(task_named(load_router(router)),
                            load_bundle(multitask) if multitask else None, index, Encoder())
    _scorer = Scorer(base, collection, plan, progress=_timestamped)
    _tests = tests
    _saved = Checkpoints(saved)


def task_named(weights: RouterWeights) -> RouterWeights:
    """The router with each expert named by its contributor, which in this benchmark is the
    task it trained on: the coordinator names experts "contributor/name", while the oracle,
    retrieval and the diagnostics look experts up by task."""
    def rename(names: list[str]) -> list[str]:
        return [name.split("/", 1)[0] for name in names]

    modules = {k: replace(m, experts=rename(m.experts)) for k, m in weights.modules.items()}
    return replace(weights, experts=rename(weights.experts), modules=modules)


def _run_job(job: str) -> tuple[str, object, float]:
    from bench.zeroshot.diagnostics import routing_diagnostics

    assert _scorer is not None and _saved is not None, "worker not started"
    began = time.monotonic()
    if job == DIAGNOSTICS:
        out = routing_diagnostics(_scorer.base, _scorer.collection.weights, _scorer.plan)
        return job, out, time.monotonic() - began
    here = machine(_scorer.plan)
    done = _saved.tasks(job, here)
    out = _scorer.run(job, _tests, done,
                      on_task=lambda task, result: _saved.save_task(job, task, result, here))
    # the job's time: this run's, plus the earlier run's tasks (their evaluation time)
    return job, out, time.monotonic() - began + sum(r.seconds for r in done.values())


def machine(plan: Plan) -> dict:
    """Where scores are computed: the precision the plan resolves to here, and the CPU model.
    Scores from bf16 and fp32 runs differ in the last digits, so a round resumed on another
    machine records which of its jobs ran where."""
    from routing.precision import resolve

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(encoding="utf-8").splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines
                  if line.startswith("model name")), "unknown")
    return {"precision": resolve(plan.precision), "cpu": model, "cores": os.cpu_count()}


class Checkpoints:
    """Finished scoring jobs on disk, so an interrupted run scores only what is missing.

    One JSON file per job in a folder whose name the caller derives from everything the
    scores depend on (the bundles, the plan, the test examples). While a job runs, each task
    it has scored waits in `JOB.tasks/TASK.json`, so an interrupt loses at most the task under
    way (a job takes 20-35 min on 2 cores, a task 1-6); the job's file replaces them. Every
    file is written whole (temporary name, then rename) or not at all.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def load(self, job: str) -> tuple[object, float] | None:
        path = self._path(job)
        if path is None or not path.exists():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        out = saved["out"]
        if job != DIAGNOSTICS:
            out = {task: EvalResult(**result) for task, result in out.items()}
        return out, saved["seconds"]

    def save(self, job: str, out: object, seconds: float, scored_on: dict | None = None) -> None:
        path = self._path(job)
        if path is None:
            return
        if job != DIAGNOSTICS:
            out = {task: _plain(r) for task, r in out.items()}
        _write(path, {"out": out, "seconds": seconds, "scored_on": scored_on})
        shutil.rmtree(self.folder / f"{job}.tasks", ignore_errors=True)

    def save_task(self, job: str, task: str, result: EvalResult, scored_on: dict) -> None:
        """One task of an unfinished job."""
        if self.folder is not None:
            _write(self.folder / f"{job}.tasks" / f"{task}.json",
                   {"out": _plain(result), "scored_on": scored_on})

    def tasks(self, job: str, scored_on: dict) -> dict[str, EvalResult]:
        """The tasks of an unfinished job that an interrupted run scored in the same precision
        (a job's tasks are never mixed across bf16 and fp32)."""
        folder = None if self.folder is None else self.folder / f"{job}.tasks"
        if folder is None or not folder.is_dir():
            return {}
        saved = {path.stem: json.loads(path.read_text(encoding="utf-8"))
                 for path in sorted(folder.glob("*.json"))}
        return {task: EvalResult(**entry["out"]) for task, entry in saved.items()
                if entry["scored_on"]["precision"] == scored_on["precision"]}

    def scored_on(self, jobs: Sequence[str]) -> dict[str, dict | None]:
        """Each finished job's precision and CPU (None: scored before they were recorded)."""
        return {job: json.loads(path.read_text(encoding="utf-8")).get("scored_on")
                for job in jobs if (path := self._path(job)) is not None and path.exists()}

    def complete(self, jobs: Sequence[str]) -> bool:
        """Whether every one of `jobs` has finished in an earlier run."""
        return self.folder is not None and all(self._path(job).exists() for job in jobs)

    def system(self) -> dict | None:
        """The round's federation as `system.describe` gave it, once saved."""
        path = None if self.folder is None else self.folder / SYSTEM_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path and path.exists() else None

    def save_system(self, described: dict) -> None:
        if self.folder is None:
            return
        _write(self.folder / SYSTEM_FILE, described, indent=1)

    def _path(self, job: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{job}.json"


def _plain(result: EvalResult) -> dict:
    return {"scores": result.scores, "predictions": result.predictions,
            "labels": result.labels, "seconds": result.seconds}


def _write(path: Path, content: dict, indent: int | None = None) -> None:
    """Write `content` as JSON whole or not at all (a temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(content, indent=indent), encoding="utf-8")
    partial.replace(path)


def score_in_workers(plan: Plan, router: Path | None, multitask: Path, index: RetrievalIndex,
                     methods: Sequence[str], tests: dict[str, list[Example]], workers: int,
                     progress: Progress = _timestamped, diagnose: bool = True,
                     checkpoints: Checkpoints | None = None) -> tuple[dict, dict, dict]:
    """Score `methods` and run the routing diagnostics in `workers` spawned processes.

    Returns (results[method][task], diagnostics, seconds per job). Every worker loads its own
    copy of the base model (bf16 SmolLM2: about 0.3 GB). A failed job or an interrupt stops
    every worker before the error propagates. Jobs found in `checkpoints` are not run again
    (their seconds are the ones measured when they ran).
    """
    checkpoints = checkpoints or Checkpoints(None)
    results: dict[str, dict] = {}
    diagnosed: dict = {}
    seconds: dict[str, float] = {}

    def finished(job: str, out: object, took: float) -> None:
        nonlocal diagnosed
        seconds[job if job == DIAGNOSTICS else f"score_{job}"] = took
        if job == DIAGNOSTICS:
            diagnosed = out
        else:
            results[job] = out

    jobs = []
    for job in sorted([*methods, *([DIAGNOSTICS] if diagnose else [])],
                      key=lambda job: -_COST.get(job, 1.0)):
        saved = checkpoints.load(job)
        if saved is None:
            jobs.append(job)
        else:
            progress(f"{job}: scored by an earlier run ({checkpoints.folder})")
            finished(job, *saved)
    if not jobs:
        return {m: results[m] for m in methods}, diagnosed, seconds
    if router is None:
        raise ValueError(f"{', '.join(jobs)} still to score, but the round has no exported "
                         "router: delete its _system.json to train it again")
    workers = max(1, min(workers, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker,
                               initargs=(plan, str(router),
                                         str(multitask) if "multitask" in jobs else None,
                                         index, tests, threads, checkpoints.folder))
    progress(f"scoring {len(jobs)} jobs in {workers} worker processes, {threads} "
             f"thread(s) each")
    try:
        pending = {pool.submit(_run_job, job) for job in jobs}
        while pending:
            # FIRST_COMPLETED, so each job is saved as it ends (FIRST_EXCEPTION waits for all
            # of them unless one fails: an interrupt then lost every finished job's scores)
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job, out, took = future.result()  # re-raises a worker's error here
                checkpoints.save(job, out, took, machine(plan))
                finished(job, out, took)
    except BaseException:
        # An error or an interrupt: stop the unfinished jobs instead of waiting for them.
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return {m: results[m] for m in methods}, diagnosed, seconds
