"""The real federation for the benchmark: MLflow, a coordinator, one process per contributor.

Each contributor gets its own exported data file, trains with `gaggle-contributor train` in its
own process and submits over gRPC; the coordinator assembles with Ray and tracks in MLflow.
Trained bundles are cached by content (data bytes + flags + base fingerprint), so a re-run
submits the cached bundles instead of training again.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.zeroshot.config import Plan, content_key
from demo.__main__ import Demo, DemoPlan, gaggle
from demo.processes import LOOPBACK, free_port, run, start_mlflow, wait_until
from protocol.bundle import MANIFEST


@dataclass(frozen=True)
class Contribution:
    """One held-in task's contributor: its private data file and trained bundle."""

    task: str  # task name, also the expert's name
    data: Path  # the contributor's exported training file
    bundle: Path  # the cached bundle folder
    cached: bool  # True when the bundle was already on disk


@dataclass(frozen=True)
class Recipes:
    """What a round trains, known before it trains: each held-in task's data file, the multitask
    union, and the cache folder each bundle lands in (its content key, config.content_key)."""

    data: dict[str, Path]  # task -> the contributor's exported training file
    union: Path  # the multitask LoRA's data: every held-in file in one
    bundles: dict[str, Path]  # task -> its bundle folder in the cache
    multitask: Path  # the multitask LoRA's bundle folder in the cache


@dataclass(frozen=True)
class SystemRun:
    """What the federation produced: the exported router version and the contributions."""

    router: Path  # exported router folder of the newest version
    version: dict  # its entry from `gaggle-coordinator versions --json`
    contributions: list[Contribution]
    multitask: Path | None  # bundle of the privileged multitask LoRA, None when not trained
    seconds: dict[str, float]  # wall time per phase


def export_data(plan: Plan, task: str, out: Path, log: Path) -> Path:
    """Write a task's training split as contributor JSONL with `python -m tasks export`."""
    if not out.exists():
        run([sys.executable, "-m", "tasks", "export", task, "--split", "train", "--out",
             str(out), "--limit", str(plan.train_examples), "--seed", str(plan.seed)], log)
    return out


def union_file(files: list[Path], out: Path) -> Path:
    """The multitask data: every held-in contributor's records in one file (privileged)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for file in files:
            handle.write(file.read_text(encoding="utf-8"))
    return out


def recipes(plan: Plan, workdir: Path, cache: Path, fingerprint: str) -> Recipes:
    """Export each contributor's data and name the bundles it will train into."""
    logs = workdir / "logs"
    data = {task: export_data(plan, task, workdir / "contributors" / task / "train.jsonl",
                              logs / f"export-{task}.log") for task in plan.held_in}
    union = union_file(list(data.values()), workdir / "multitask" / "train.jsonl")
    flags = plan.train_flags()
    return Recipes(data, union,
                   {task: cache / content_key(file, flags, fingerprint)
                    for task, file in data.items()},
                   cache / content_key(union, multitask_flags(plan), fingerprint))


def multitask_flags(plan: Plan) -> list[str]:
    """The multitask LoRA trains like a contributor for the same budget as all of them."""
    flags = plan.train_flags(plan.multitask_steps)
    # Its gate is never used (it runs as a single expert), so one gate step suffices.
    flags[flags.index("--gate-steps") + 1] = "1"
    # Privileged and single-seed: every --seeds round reuses the first round's cached LoRA.
    flags[flags.index("--seed") + 1] = str(plan.seed)
    return [*flags, "--no-activations"]


class Trainer:
    """Runs `gaggle-contributor train` processes, a few at a time, into a content cache.

    `submit` queues jobs and starts the first few at once; `wait` keeps the queue moving until
    every job is done, so other work (starting the services) can overlap the training.
    """

    def __init__(self, demo: Demo, plan: Plan, cache: Path, fingerprint: str) -> None:
        self.demo, self.plan, self.cache, self.fingerprint = demo, plan, cache, fingerprint
        self.pending: list[tuple[str, Path, list[str], Path]] = []
        self.running: list[tuple[str, subprocess.Popen, Path]] = []

    def bundle_path(self, data: Path, flags: list[str]) -> Path:
        return self.cache / content_key(data, flags, self.fingerprint)

    def submit(self, name: str, data: Path, flags: list[str]) -> Path:
        """Queue a training job unless its bundle is cached; returns the bundle folder."""
        path = self.bundle_path(data, flags)
        if not (path / MANIFEST).exists():
            self.pending.append((name, data, flags, path))
        self._fill()
        return path

    def wait(self) -> None:
        """Run the queue to the end; RuntimeError naming the first contributor that failed."""
        while self.pending or self.running:
            time.sleep(0.5)
            for entry in [r for r in self.running if r[1].poll() is not None]:
                self.running.remove(entry)
                name, process, path = entry
                if process.returncode != 0:
                    raise RuntimeError(f"contributor {name} failed to train (exit "
                                       f"{process.returncode}); see {self.demo.logs}")
                _staging(path).rename(path)  # the cache only ever holds whole bundles
            self._fill()

    def _fill(self) -> None:
        while self.pending and len(self.running) < self.plan.parallel:
            name, data, flags, path = self.pending.pop(0)
            self.running.append((name, self._start(name, data, flags, path), path))

    def is_cached(self, data: Path, flags: list[str]) -> bool:
        return (self.bundle_path(data, flags) / MANIFEST).exists()

    def _start(self, name: str, data: Path, flags: list[str], path: Path) -> subprocess.Popen:
        staging = _staging(path)
        shutil.rmtree(staging, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.demo.step(f"contributor {name} trains on its own data ({data.name})")
        return self.demo.group.start(f"train-{name}", [
            gaggle("contributor"), "train", "--base", self.plan.base, "--data", str(data),
            "--out", str(staging), "--name", name, *flags])


def _staging(path: Path) -> Path:
    return path.with_name(path.name + ".training")


def run_federation(plan: Plan, workdir: Path, cache: Path, fingerprint: str,
                   planned: Recipes, multitask: bool = True) -> SystemRun:
    """Train every held-in expert (and the multitask LoRA when `multitask`: a round that does not
    score it need not spend 8 experts' worth of steps on it), submit the experts, export a
    version. Every process started here is stopped, by PID, before returning.
    """
    demo = Demo(DemoPlan(base=plan.base, contributors=(), held_out="", train_examples=0,
                         eval_examples=0, promotion_examples=0, train_flags=()),
                workdir)
    seconds: dict[str, float] = {}
    try:
        began = time.monotonic()
        trainer = Trainer(demo, plan, cache, fingerprint)
        flags = plan.train_flags()
        was_cached = [trainer.is_cached(file, flags) for file in planned.data.values()]
        # The longest job first, so the short ones fill the other slots around it.
        if multitask:
            trainer.submit("multitask", planned.union, multitask_flags(plan))
        bundles = [trainer.submit(task, file, flags) for task, file in planned.data.items()]
        start_services(demo)  # while the first contributors train
        seconds["services_ready"] = time.monotonic() - began  # from the start
        trainer.wait()
        seconds["training_done"] = time.monotonic() - began  # from the start
        began = time.monotonic()
        contributions = [Contribution(task, planned.data[task], bundle, cached)
                         for task, bundle, cached
                         in zip(plan.held_in, bundles, was_cached, strict=True)]
        submit_all(demo, contributions)
        versions = demo.wait_for_version(len(contributions))
        newest = max(versions, key=lambda v: (v["n_experts"], v["created_at"]))
        router = workdir / "exported" / newest["version_id"]
        if not router.exists():
            run([gaggle("coordinator"), "export", newest["version_id"], "--store",
                 str(demo.store), "--out", str(router)], demo.logs / "export.log")
        seconds["submit_assemble_export"] = time.monotonic() - began
        return SystemRun(router, newest, contributions, planned.multitask if multitask else None,
                         seconds)
    finally:
        demo.group.stop_all()


def start_services(demo: Demo) -> None:
    """MLflow, then the coordinator (gRPC, local Ray), both on 127.0.0.1.

    Demo.start_services without its first step: the benchmark has already loaded (and so
    converted and cached) the base model in its own process.
    """
    from coordinator.service.health import check

    demo.step("starting the MLflow tracking server")
    demo.tracking_uri = start_mlflow(demo.group, demo.workdir / "mlflow", free_port())
    port = free_port()
    demo.address = f"{LOOPBACK}:{port}"
    demo.step(f"starting the coordinator on {demo.address}")
    coordinator = demo.group.start("coordinator", [
        gaggle("coordinator"), "serve", "--store", str(demo.store), "--base", demo.plan.base,
        "--host", LOOPBACK, "--port", str(port), "--tracking-uri", demo.tracking_uri])
    wait_until(lambda: check(demo.address, timeout=1), 300, "the coordinator", coordinator)


def submit_all(demo: Demo, contributions: list[Contribution]) -> None:
    """Each contributor: a token from the operator, then `gaggle-contributor submit`."""
    for item in contributions:
        token = run([gaggle("coordinator"), "token", "add", item.task, "--store",
                     str(demo.store)], demo.logs / "tokens.log").strip().splitlines()[-1]
        demo.step(f"contributor {item.task} submits its expert over gRPC")
        run([gaggle("contributor"), "submit", str(item.bundle), "--coordinator", demo.address,
             "--token", token, "--quiet"], demo.logs / f"submit-{item.task}.log")


def describe(run_: SystemRun) -> dict:
    """The system part of the results JSON."""
    return {"version_id": run_.version["version_id"], "n_experts": run_.version["n_experts"],
            "router": str(run_.router),
            "experts": [{"task": c.task, "bundle": c.bundle.name, "cached": c.cached,
                         "training": _training_summary(c.bundle)}
                        for c in run_.contributions],
            "multitask": run_.multitask and {"bundle": run_.multitask.name,
                                             "training": _training_summary(run_.multitask)},
            "seconds": {k: round(v, 1) for k, v in run_.seconds.items()}}


RECOVERED = ("rebuilt from the round's recipes: its scores were kept but not its description "
             "(a run before descriptions were saved); the bundle names are the content keys "
             "the scores were computed with, the version, router and training summaries are "
             "unknown")


def describe_recipes(planned: Recipes) -> dict:
    """The system part for a round that was scored but whose description was lost: what its
    recipes determine, and null for what only its training could tell."""
    return {"version_id": None, "n_experts": len(planned.bundles), "router": None,
            "experts": [{"task": task, "bundle": bundle.name, "cached": None, "training": None}
                        for task, bundle in planned.bundles.items()],
            "multitask": {"bundle": planned.multitask.name, "training": None},
            "seconds": {}, "recovered": RECOVERED}


def _training_summary(bundle: Path) -> dict:
    manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    return manifest.get("training", {})
