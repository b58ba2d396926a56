"""Evaluating router versions inside the coordinator: public tasks scored on Ray actors that
keep the base model loaded; the metrics go to the version's local record and to MLflow.

The actors never open the store: each expert's key shard and bundle go into Ray's object store
once (coordinator.ray_cluster.Shipper) and every actor reads them from there, a bundle only
when a token first picks its expert. The base model is loaded by name on the actor's node
(installed there, as in the image).

The evaluation set is a list of tasks from the public `tasks` registry (held-out tasks by
default), never contributor data. Records live beside the versions, so `versions` and
`promote` work with MLflow down::

    evaluations/<version_id>.json   {"version_id", "config_key", "metrics": {"accuracy", <task>}}
    evaluations/config.json         the evaluation config the coordinator last ran with
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import ray

from coordinator.ray_cluster import RayConfig, ShippedVersion, Shipper, ensure_ray, open_shipped
from coordinator.store.layout import Layout, atomic_write
from coordinator.store.versions import VersionStore
from protocol.errors import DeadlineExceeded, GaggleError, InvalidArgument, Unavailable
from routing.base import load_base
from routing.device import serving_placement
from routing.evaluate import evaluate
from routing.methods import TOKEN_METHODS
from routing.paging import DEFAULT_MAX_BYTES
from routing.router import route, unroute
from tasks.registry import HELD_OUT, TASKS, split

CONFIG_FILE = "config.json"
MEAN = "accuracy"  # the key of the mean over tasks (tag `eval.accuracy`)
DEFAULT_MAX_DROP = 0.01  # promote's threshold when no evaluation config says otherwise
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationConfig:
    """What every new version is evaluated on, and how; laptop-sized defaults."""

    tasks: tuple[str, ...] = HELD_OUT  # registry task names; public data, never a contributor's
    examples_per_task: int = 100  # the first N of each task's seeded test split
    method: str = "phatgoose"  # routing method evaluated (one of routing.methods.TOKEN_METHODS)
    top_k: int = 2  # experts mixed per token
    batch_size: int = 16  # prompts per forward
    max_length: int = 256  # tokens kept per prompt + choice
    actors: int = 1  # Ray actors, each holding one copy of the base model; tasks spread over them
    seed: int = 0  # the seed of tasks.registry.split
    timeout_s: float = 1800.0  # an evaluation running longer fails (actors restarted)
    max_drop: float = DEFAULT_MAX_DROP  # promote refuses a mean accuracy this far below champion

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            raise InvalidArgument(f"evaluation tasks must be a list of names, got the string "
                                  f"{self.tasks!r}", field="tasks")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise InvalidArgument(f"evaluation tasks must be registered task names, got "
                                  f"{list(self.tasks)}; choose from {', '.join(TASKS)}",
                                  field="tasks")
        if len(set(self.tasks)) != len(self.tasks):
            raise InvalidArgument(f"evaluation tasks repeat: {list(self.tasks)}", field="tasks")
        if self.method not in TOKEN_METHODS:
            raise InvalidArgument(f"evaluation method must be one of {TOKEN_METHODS}, got "
                                  f"{self.method!r}", field="method")
        for name in ("examples_per_task", "top_k", "batch_size", "actors"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidArgument(f"evaluation {name} must be a positive integer, got "
                                      f"{getattr(self, name)!r}", field=name)
        if self.max_length < 2 or self.timeout_s <= 0:
            raise InvalidArgument("evaluation max_length must be >= 2 and timeout_s > 0",
                                  field="max_length")
        if not -1.0 <= self.max_drop <= 1.0:
            raise InvalidArgument(f"max_drop is a difference of accuracies in [-1, 1], got "
                                  f"{self.max_drop}", field="max_drop")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> EvaluationConfig:
        """Read a `.toml` or `.json` file whose keys are this class's fields."""
        path = Path(path)
        try:
            raw = path.read_bytes()
            data = tomllib.loads(raw.decode()) if path.suffix == ".toml" else json.loads(raw)
        except (OSError, ValueError) as err:
            raise InvalidArgument(f"cannot read evaluation config {path}: {err}",
                                  field="eval_config") from None
        if not isinstance(data, dict):
            raise InvalidArgument(f"{path} must hold a table of settings", field="eval_config")
        return cls.from_json(data, source=str(path))

    @classmethod
    def from_json(cls, data: dict, source: str = "evaluation config") -> EvaluationConfig:
        data = {k.replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgument(f"{source}: unknown settings {unknown}; known: "
                                  f"{sorted(known)}", field="eval_config")
        try:
            return cls(**data)
        except TypeError as err:
            raise InvalidArgument(f"{source}: {err}", field="eval_config") from None

    def to_json(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks)}

    @property
    def key(self) -> str:
        """Identity of what the metrics mean: equal keys give comparable accuracies."""
        what = {k: v for k, v in self.to_json().items()
                if k not in ("batch_size", "actors", "timeout_s", "max_drop")}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


# ----- local records -----

def _eval_dir(store_root: str | os.PathLike) -> Path:
    return Layout.of(store_root).evaluations


def _write_json(path: Path, data: dict) -> None:
    """Replace `path` atomically: a reader sees the old record or the new one, whole."""
    atomic_write(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def read_evaluation(store_root: str | os.PathLike, version_id: str) -> dict | None:
    """The local evaluation record of a version, or None."""
    try:
        return json.loads((_eval_dir(store_root) / f"{version_id}.json").read_text("utf-8"))
    except (FileNotFoundError, ValueError):
        return None


def save_active_config(store_root: str | os.PathLike, config: EvaluationConfig) -> None:
    _write_json(_eval_dir(store_root) / CONFIG_FILE, config.to_json())


def active_config(store_root: str | os.PathLike) -> EvaluationConfig | None:
    """The evaluation config the coordinator of this store last ran with, or None."""
    path = _eval_dir(store_root) / CONFIG_FILE
    if not path.is_file():
        return None
    return EvaluationConfig.from_json(json.loads(path.read_text("utf-8")), source=str(path))


# ----- Ray actors -----

class EvalWorker:
    """Ray actor body: one base model, loaded once, evaluating router versions in turn."""

    def __init__(self, base: str) -> None:
        self.base = load_base(base, **serving_placement())  # serve --device / --dtype
        self._examples: dict[tuple[str, int, int], list] = {}

    def fingerprint(self) -> str:
        return self.base.fingerprint

    def evaluate(self, shipped: ShippedVersion, tasks: list[str],
                 config: dict) -> dict[str, dict]:
        """Route the base model with a version (as coordinator.ray_cluster ships it: keys
        now, each expert's bundle when first picked) and rank-classify each task's test
        examples.

        Returns {task: {"accuracy", "n", "seconds"}}; the base model is unrouted after.
        """
        with tempfile.TemporaryDirectory(prefix="gaggle-router-") as scratch:
            weights = open_shipped(shipped, Path(scratch), DEFAULT_MAX_BYTES)
            return self._evaluate(weights, tasks, config)

    def _evaluate(self, weights, tasks: list[str], config: dict) -> dict[str, dict]:
        model = route(self.base, weights, method=config["method"], top_k=config["top_k"])
        out = {}
        try:
            for task in tasks:
                examples = self._test_examples(task, config["seed"], config["examples_per_task"])
                result = evaluate(model, self.base.tokenizer, examples,
                                  batch_size=config["batch_size"],
                                  max_length=config["max_length"], progress=False, desc=task)
                out[task] = {"accuracy": result.accuracy, "n": len(examples),
                             "seconds": result.seconds}
        finally:
            unroute(model)
        return out

    def _test_examples(self, task: str, seed: int, n: int) -> list:
        if (task, seed, n) not in self._examples:
            self._examples[(task, seed, n)] = split(task, seed).test[:n]
        return self._examples[(task, seed, n)]


class EvalPool:
    """The evaluation actors of one coordinator, started on first use and kept across versions.

    Actors ask Ray for no CPU while running (Ray's default for actors), so they never starve
    the assembly tasks of a small local Ray.
    """

    def __init__(self, config: EvaluationConfig,
                 ray_config: RayConfig | None = None) -> None:
        self.config = config
        self.ray_config = ray_config or RayConfig()
        self._actors: list = []
        self._base: str | None = None
        self._shipper = Shipper()

    def run(self, versions: VersionStore, version_id: str, base: str) -> dict[str, dict]:
        """Per-task results of one version, the tasks spread over the actors.

        Each expert's files go into the object store once (kept for later versions); every
        actor gets the references.
        """
        actors = self.start(base)
        shares = [list(self.config.tasks[i::len(actors)]) for i in range(len(actors))]
        settings = self.config.to_json()
        router = self._shipper.ship(versions, version_id)
        refs = [actor.evaluate.remote(router, share, settings)
                for actor, share in zip(actors, shares, strict=True) if share]
        try:
            parts = ray.get(refs, timeout=self.config.timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()  # the stuck actors would hold the next evaluation too
            raise DeadlineExceeded(f"evaluation took longer than timeout_s="
                                   f"{self.config.timeout_s:g} s: raise it or lower "
                                   "examples_per_task", field="timeout_s") from None
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, GaggleError):
                raise err.cause from None
            raise
        except ray.exceptions.RayActorError as err:
            self.shutdown()
            raise Unavailable(f"an evaluation actor died ({err}); it restarts on the next "
                              "version", field="actors") from None
        return {task: result for part in parts for task, result in part.items()}

    def start(self, base: str) -> list:
        """The actors for base model `base`, created (loading it) unless they already run."""
        if self._actors and self._base == base:
            return self._actors
        self.shutdown()
        ensure_ray(self.ray_config)
        worker = ray.remote(EvalWorker).options(**self.ray_config.ray_options())
        count = min(self.config.actors, len(self.config.tasks))
        self._actors = [worker.remote(base) for _ in range(count)]
        self._base = base
        return self._actors

    def shutdown(self) -> None:
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone, or Ray stopped: nothing left to free
                pass
        self._actors, self._base = [], None


# ----- one version -----

def evaluate_version(store_root: str | os.PathLike, version_id: str, pool: EvalPool,
                     tracker=None, *, base: str | None = None) -> dict:
    """Evaluate a version on the pool, write its local record and queue its MLflow tags.

    tracker: a `coordinator.tracking.tracker.Tracker` (None: local record only). base: the
    base model to load (default: the version's declared one; routing checks the fingerprint
    either way). Returns the record.
    """
    config = pool.config
    versions = VersionStore(store_root)
    manifest = versions.manifest(version_id)
    started = time.perf_counter()
    results = pool.run(versions, version_id, base or manifest.base_model)
    metrics = {task: float(results[task]["accuracy"]) for task in config.tasks}
    metrics[MEAN] = sum(metrics[t] for t in config.tasks) / len(config.tasks)
    record = {
        "version_id": version_id, "config_key": config.key, "config": config.to_json(),
        "metrics": metrics, "n_examples": {t: results[t]["n"] for t in config.tasks},
        "seconds": time.perf_counter() - started,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(_eval_dir(store_root) / f"{version_id}.json", record)
    if tracker is not None:
        tracker.record_evaluation(record)
    return record


def needs_evaluation(store_root: str | os.PathLike, version_id: str,
                     config: EvaluationConfig) -> bool:
    """True unless the version already holds an evaluation under this config."""
    record = read_evaluation(store_root, version_id)
    return record is None or record.get("config_key") != config.key
