"""`python -m demo`: a local federation on one machine, every role a real process.

Starts an MLflow tracking server and the coordinator (gRPC, local Ray) on 127.0.0.1, gives
each contributor a token, lets each contributor train an expert on its own private task and
submit it, waits for the router versions, evaluates the newest version against the base model
on a held-out task, has the operator evaluate every version and promote the best (so the MLflow
UI shows a champion, metrics and a history), and prints a summary with the addresses of the
champion's version page and of an expert's run. Ctrl-C, or the end (unless --keep), stops every
process it started, by PID.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from demo.browser import INSTALL_HINT, chromium, page_urls, screenshot
from demo.processes import (
    LOOPBACK,
    ProcessGroup,
    free_port,
    run,
    start_mlflow,
    wait_until,
)
from demo.progress import FederationWatch


@dataclass(frozen=True)
class DemoPlan:
    """What the demo trains and evaluates; `--tiny` swaps in the random tiny model."""

    base: str
    contributors: tuple[tuple[str, str, str], ...]  # (contributor, task, method)
    held_out: str  # a task no contributor trains on
    train_examples: int  # private examples exported per contributor
    eval_examples: int  # held-out test examples scored per model
    promotion_examples: int  # held-out examples per version when choosing the champion
    train_flags: tuple[str, ...]  # extra flags for `gaggle-contributor train`


FULL = DemoPlan(
    base="smollm2-135m",
    contributors=(("alice", "tweet-sentiment", "lora"), ("bob", "bbc-topic", "lora"),
                  ("carol", "boolq", "ia3")),
    held_out="imdb-sentiment",
    train_examples=400,
    eval_examples=100,
    promotion_examples=32,
    # Three experts train at once on two cores: fewer steps than the contributor's defaults
    # (100 + 50) keep the whole demo near 15 minutes, and one thread each, because OpenMP
    # threads spin on oversubscribed cores (with the default of every core, three 2-thread
    # trainers ran 10-20 s a step instead of ~3).
    train_flags=("--steps", "60", "--gate-steps", "30", "--threads", "1"),
)
TINY = DemoPlan(
    base="tiny-llama",
    contributors=FULL.contributors,
    held_out=FULL.held_out,
    train_examples=24,
    eval_examples=16,
    promotion_examples=8,
    train_flags=("--steps", "4", "--gate-steps", "4", "--max-length", "64", "--threads", "1"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="use the random 2-layer model and a few steps (under 2 minutes)")
    parser.add_argument("--keep", action="store_true",
                        help="leave MLflow and the coordinator running at the end")
    parser.add_argument("--workdir", type=Path,
                        help="where the demo writes everything (default runs/demo-<time>)")
    parser.add_argument("--screenshots", type=Path, metavar="DIR",
                        help="at the end, save PNGs of the MLflow UI (the run list, an "
                             "expert's loss charts, the champion's version page) into DIR; "
                             "needs Debian's chromium package")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def gaggle(tool: str) -> str:
    return str(Path(sys.executable).with_name(f"gaggle-{tool}"))


class Demo:
    """One run of the local federation; owns its processes and working folder."""

    def __init__(self, plan: DemoPlan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.store = workdir / "store"
        self.logs = workdir / "logs"
        self.group = ProcessGroup(self.logs)
        self.address = ""
        self.tracking_uri = ""
        self.watch: FederationWatch | None = None  # set once the contributors start

    def step(self, message: str) -> None:
        print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def start_services(self) -> None:
        self.step(f"preparing base model {self.plan.base}")
        run([sys.executable, "-c", "import sys; from routing.base import load_base; "
             f"print(load_base({self.plan.base!r}).fingerprint)"], self.logs / "prepare.log")
        self.step("starting the MLflow tracking server")
        self.tracking_uri = start_mlflow(self.group, self.workdir / "mlflow", free_port())
        port = free_port()
        self.address = f"{LOOPBACK}:{port}"
        self.step(f"starting the coordinator on {self.address}")
        coordinator = self.group.start("coordinator", [
            gaggle("coordinator"), "serve", "--store", str(self.store), "--base",
            self.plan.base, "--host", LOOPBACK, "--port", str(port),
            "--tracking-uri", self.tracking_uri,
        ])
        from coordinator.service.health import check

        wait_until(lambda: check(self.address, timeout=1), 180, "the coordinator", coordinator)

    def contribute(self) -> list[dict]:
        """Each contributor: a token, its private data, train and submit, as processes."""
        jobs = []
        for name, task, method in self.plan.contributors:
            token = run([gaggle("coordinator"), "token", "add", name, "--store",
                         str(self.store)], self.logs / "tokens.log").strip().splitlines()[-1]
            home = self.workdir / "contributors" / name
            data = home / "train.jsonl"
            run([sys.executable, "-m", "tasks", "export", task, "--split", "train", "--out",
                 str(data), "--limit", str(self.plan.train_examples)], self.logs / f"{name}.log")
            jobs.append((name, task, method, token, home, data))
        self.step(f"{len(jobs)} contributors train their experts on their own data")
        self.watch = FederationWatch({name: home / "progress.jsonl"
                                      for name, _, _, _, home, _ in jobs},
                                     self.logs / "coordinator.log")
        trainers = [self.group.start(f"train-{name}", [
            gaggle("contributor"), "train", "--base", self.plan.base, "--data", str(data),
            "--method", method, "--out", str(home / "expert"), "--name", f"{name}-{task}",
            "--progress-file", str(home / "progress.jsonl"), *self.plan.train_flags,
        ]) for name, task, method, _, home, data in jobs]
        while any(trainer.poll() is None for trainer in trainers):
            self.watch.contributors()
            time.sleep(1.0)
        self.watch.contributors()
        for (name, *_), trainer in zip(jobs, trainers, strict=True):
            if trainer.wait() != 0:
                raise RuntimeError(f"contributor {name} failed to train; see "
                                   f"{self.logs / f'train-{name}.log'}")
        results = []
        for name, task, method, token, home, _ in jobs:
            self.step(f"{name} submits its {method} expert for {task}")
            output = run([gaggle("contributor"), "submit", str(home / "expert"),
                          "--coordinator", self.address, "--token", token],
                         self.logs / f"submit-{name}.log")
            results.append({"contributor": name, "task": task, "method": method,
                            "expert_id": output.strip().splitlines()[-1]})
            self.watch.coordinator()
        return results

    def wait_for_version(self, expected: int, timeout: float = 600) -> list[dict]:
        self.step("waiting for the coordinator to assemble a version with every expert")
        versions: list[dict] = []

        def complete() -> bool:
            nonlocal versions
            if self.watch is not None:
                self.watch.coordinator()
            versions = self.versions()
            # The version must also be current: the coordinator moves CURRENT last, after the
            # version's files and its usage report are written.
            return any(v["n_experts"] >= expected and "current" in v.get("aliases", [])
                       for v in versions)

        # Each poll starts a CLI process: poll every 2 s, not as fast as for a port.
        wait_until(complete, timeout, "a router version with every expert", interval=2.0)
        return versions

    def versions(self) -> list[dict]:
        output = run([gaggle("coordinator"), "versions", "--store", str(self.store),
                      "--tracking-uri", self.tracking_uri, "--json"],
                     self.logs / "versions.log")
        return json.loads(output)

    def promote_best(self, versions: list[dict]) -> str:
        """As an operator would: evaluate every version on the held-out task (recorded in
        MLflow), then promote the best; the champion's version id."""
        config = self.workdir / "eval.toml"
        config.write_text(f'tasks = ["{self.plan.held_out}"]\n'
                          f"examples_per_task = {self.plan.promotion_examples}\n")
        ids = [v["version_id"] for v in versions]
        self.step(f"the operator evaluates {len(ids)} versions and promotes the best")
        output = run([gaggle("coordinator"), "evaluate", *ids, "--store", str(self.store),
                      "--eval-config", str(config), "--tracking-uri", self.tracking_uri],
                     self.logs / "operator.log")
        scores = {found.group(1): float(found.group(2)) for found in re.finditer(
            r"^version (\w+): accuracy=([0-9.]+)", output, re.MULTILINE)}
        best = max(ids, key=lambda v: (scores.get(v, -1.0), ids.index(v)))
        run([gaggle("coordinator"), "promote", best, "--store", str(self.store),
             "--tracking-uri", self.tracking_uri], self.logs / "operator.log")
        return best

    def ui_pages(self) -> dict[str, str]:
        """Addresses of the run list, an expert's run and the champion's version page."""
        from mlflow import MlflowClient

        from coordinator.tracking.names import CHAMPION, EXPERIMENT, REGISTERED_MODEL

        client = MlflowClient(self.tracking_uri, self.tracking_uri)
        champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        run_ = next(r for r in client.search_runs([experiment.experiment_id])
                    if "expert_id" in r.data.tags)
        return page_urls(self.tracking_uri, experiment.experiment_id, run_.info.run_id,
                         REGISTERED_MODEL, champion.version)

    def screenshots(self, pages: dict[str, str], folder: Path) -> None:
        self.step(f"taking screenshots of the MLflow UI into {folder}")
        for name, url in pages.items():
            screenshot(url, folder / f"mlflow-{name.replace('_', '-')}.png")

    def evaluate(self, version: dict) -> dict[str, float]:
        """Accuracy of the base model and of the routed version on the held-out task."""
        exported = self.workdir / "exported" / version["version_id"]
        if not exported.exists():
            run([gaggle("coordinator"), "export", version["version_id"], "--store",
                 str(self.store), "--out", str(exported)], self.logs / "export.log")
        self.step(f"evaluating base and routed models on held-out {self.plan.held_out}")
        output = run([sys.executable, "-m", "demo.evaluate", "--base", self.plan.base,
                      "--router", str(exported), "--task", self.plan.held_out,
                      "--limit", str(self.plan.eval_examples)], self.logs / "evaluate.log")
        return json.loads(output.strip().splitlines()[-1])


def summary(plan: DemoPlan, experts: list[dict], versions: list[dict],
            scores: dict[str, float], tracking_uri: str, seconds: float,
            mlflow_root: Path | None = None, pages: dict[str, str] | None = None) -> str:
    lines = ["", "gaggle local federation: summary", "",
             "| contributor | task | method | expert id |", "|---|---|---|---|"]
    lines += [f"| {e['contributor']} | {e['task']} | {e['method']} | {e['expert_id'][:12]} |"
              for e in experts]
    lines += ["", "| version | experts | aliases |", "|---|---|---|"]
    lines += [f"| {v['version_id'][:12]} | {v['n_experts']} | {','.join(v.get('aliases', []))} |"
              for v in versions]
    lines += ["", f"| held-out task ({plan.held_out}, {scores['n']} examples) | accuracy |",
              "|---|---|",
              f"| base model ({plan.base}) | {scores['base']:.3f} |",
              f"| PHATGOOSE, newest version (k=2) | {scores['phatgoose']:.3f} |",
              "", f"MLflow UI: {tracking_uri}  (experiment 'gaggle', model 'gaggle-router')"]
    if pages is not None:
        lines += [f"  the champion's version page: {pages['version']}",
                  f"  an expert's run (loss curves): {pages['expert_run']}"]
    lines += [f"wall time: {seconds / 60:.1f} min"]
    if mlflow_root is not None:
        # Without --keep the server stops with the demo; its data stays in the workdir.
        lines += ["", "The UI stops with the demo (--keep keeps it up). Browse it later with:",
                  f"  mlflow server --backend-store-uri sqlite:///{mlflow_root / 'mlflow.db'} "
                  f"--artifacts-destination {mlflow_root / 'artifacts'} --host 127.0.0.1 "
                  "--port 5000 --workers 1"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.screenshots and chromium() is None:
        print(f"--screenshots needs Chromium: {INSTALL_HINT}", file=sys.stderr)
        return 2
    plan = TINY if args.tiny else FULL
    workdir = args.workdir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(plan, workdir)
    started = time.monotonic()
    # SIGTERM (e.g. from `timeout`) takes the same path as Ctrl-C, so the finally block
    # below still stops every child.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        demo.start_services()
        experts = demo.contribute()
        versions = demo.wait_for_version(len(experts))
        newest = max(versions, key=lambda v: (v["n_experts"], v["created_at"]))
        scores = demo.evaluate(newest)
        demo.promote_best(versions)
        versions, pages = demo.versions(), demo.ui_pages()
        if args.screenshots:
            demo.screenshots(pages, args.screenshots)
        print(summary(plan, experts, versions, scores, demo.tracking_uri,
                      time.monotonic() - started,
                      mlflow_root=None if args.keep else workdir / "mlflow",
                      pages=pages), flush=True)
        if args.keep:
            demo.step("--keep: services stay up; stop them with Ctrl-C")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        demo.step("interrupted")
        return 130
    except (RuntimeError, TimeoutError) as err:
        print(f"demo failed: {err}\nlogs: {demo.logs}", file=sys.stderr)
        return 1
    finally:
        demo.group.stop_all()
        demo.step("stopped every process the demo started")
    return 0


if __name__ == "__main__":
    sys.exit(main())
