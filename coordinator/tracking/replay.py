"""The MLflow side of each queued tracking call, written so that replaying a call is harmless.

Each function first looks in MLflow for what an earlier attempt of the same call created
(tagged with the call's id) and only does the part that is missing.

Versions go by reference in MLflow as in the store: an expert's run holds its bundle
(artifact folder `bundle/`) and key shard (`keys/`), each logged once; a version's logged
model holds its version.json and `sources.json`, which names the run of each expert, and the
model's code (coordinator.tracking.pyfunc) fetches what it routes with from those runs. Where
MLflow's artifact store is a local folder on the store's file system (the embedded setup),
the files are hard-linked into it, so the bytes are on disk once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import unquote, urlparse

from coordinator.store.experts import expert_key
from coordinator.store.layout import link_or_copy
from coordinator.store.objects import Objects
from coordinator.tracking.model_card import version_card, with_evaluation, with_promotion
from coordinator.tracking.names import (
    CHAMPION,
    MAX_TAG_CHARS,
    MODEL_NAME,
    REGISTERED_MODEL,
    TAG_EVAL_CONFIG,
    TAG_EVAL_PREFIX,
    TAG_OP,
    TAG_STATUS,
    TAG_VERSION,
)
from coordinator.tracking.queue import Op, OpQueue
from routing.version import EXPERTS_DIR, KEYS_DIR, VERSION_FILE, VersionManifest

PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")  # logged as an MLflow model from code
# The model config keys a consumer may override at load time (MLflow drops any key the logged
# model lacks): coordinator.tracking.pyfunc.PLACEMENT_DEFAULTS, the base's device and dtype.
PYFUNC_MODEL_CONFIG = {"device": "auto", "dtype": "auto", "max_adapter_bytes": 0}
_REQUIREMENTS = ("torch", "transformers", "peft", "safetensors", "mlflow")
_MAX_METRICS_PER_BATCH = 1000
SOURCES = "sources"  # the logged model's artifact naming each expert's run (sources.json)
BUNDLE_ARTIFACT = "bundle"  # an expert run's artifact folder holding its bundle
KEYS_ARTIFACT = "keys"  # ... and its key shard (logged when a version first needs it)
_ARTIFACT_OF = {EXPERTS_DIR: BUNDLE_ARTIFACT, KEYS_DIR: KEYS_ARTIFACT}


@dataclass(frozen=True)
class ExpertArtifacts:
    """Where the experts' files are (the store's objects) and which run holds each (noted
    in the tracking queue, per tracking URI)."""

    objects: Objects
    queue: OpQueue
    uri: str
    versions: Path  # the store's version folders (a queued call's path may be out of date)

    def ensure(self, client, run_id: str, expert_id: str, kinds: tuple[str, ...]) -> None:
        """Log the expert's objects of `kinds` into its run, each once."""
        noted = self.queue.expert_run(self.uri, expert_id)
        logged = noted[1] if noted and noted[0] == run_id else set()
        for kind in kinds:
            if kind in logged:
                continue
            _log_folder(client, run_id, self.objects.local_folder(kind, expert_id),
                        _ARTIFACT_OF[kind])
            logged.add(kind)
            self.queue.note_expert_run(self.uri, expert_id, run_id, logged)

    def run_of(self, client, experiment_id: str, expert_id: str) -> str:
        """The run id of an expert's run (noted, else searched by its op tag)."""
        from mlflow.exceptions import MlflowException

        noted = self.queue.expert_run(self.uri, expert_id)
        if noted:
            return noted[0]
        found = client.search_runs([experiment_id],
                                   filter_string=f"tags.`{TAG_OP}` = 'expert:{expert_id}'",
                                   max_results=1)
        if not found:
            raise MlflowException(f"expert {expert_id} has no run in MLflow: its expert call "
                                  "was never replayed", error_code="RESOURCE_DOES_NOT_EXIST")
        self.queue.note_expert_run(self.uri, expert_id, found[0].info.run_id, set())
        return found[0].info.run_id


def _log_folder(client, run_id: str, folder: Path, artifact_path: str) -> None:
    """Log a folder's files under `artifact_path` of a run: hard links into a local artifact
    store on the same file system (one copy of the bytes on disk), else an upload."""
    local = local_artifact_dir(client.get_run(run_id).info.artifact_uri)
    if local is None:
        client.log_artifacts(run_id, str(folder), artifact_path)
        return
    for child in sorted(folder.iterdir()):
        target = local / artifact_path / child.name
        if not target.exists():
            link_or_copy(child, target)


def local_artifact_dir(uri: str) -> Path | None:
    """The local folder of a `file:` (or plain path) artifact URI; None for anything remote."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri.startswith("/"):
        return Path(uri)
    return None


def replay_expert_run(client, experiment_id: str, op: Op,
                      artifacts: ExpertArtifacts | None = None) -> None:
    """One finished run per expert: params, loss curves as metrics, id and contributor as
    tags, and its bundle as artifacts."""
    from mlflow.entities import Metric, Param

    payload = op.payload
    found = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_OP}` = '{op.op_id}'",
                               max_results=1)
    if found and found[0].info.status == "FINISHED":
        return
    accepted = int(payload.get("created_at_ms") or time.time() * 1000)
    run = found[0] if found else client.create_run(
        experiment_id, run_name=expert_key(payload["contributor"], payload["name"]),
        start_time=payload.get("start_ms", accepted),
        tags={TAG_OP: op.op_id, "expert_id": payload["expert_id"],
              "contributor": payload["contributor"]},
    )
    run_id = run.info.run_id
    if not run.data.params:
        params = [Param(k, str(v)) for k, v in sorted(payload["params"].items())]
        client.log_batch(run_id, params=params)
    end = payload.get("end_ms", accepted)
    if not run.data.metrics:
        metrics = [Metric(key, float(value), end, step)
                   for key, values in sorted(payload["metrics"].items())
                   for step, value in enumerate(values)]
        for start in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + _MAX_METRICS_PER_BATCH])
    if artifacts is not None and artifacts.objects.exists(EXPERTS_DIR, payload["expert_id"]):
        noted = artifacts.queue.expert_run(artifacts.uri, payload["expert_id"])
        if noted is None or noted[0] != run_id:
            artifacts.queue.note_expert_run(artifacts.uri, payload["expert_id"], run_id, set())
        artifacts.ensure(client, run_id, payload["expert_id"], (EXPERTS_DIR,))
    client.set_terminated(run_id, "FINISHED", end_time=end)


def find_model_version(client, version_id: str):
    """The `gaggle-router` model version of a router version, or None."""
    found = client.search_model_versions(
        f"name = '{REGISTERED_MODEL}' and tags.`{TAG_VERSION}` = '{version_id}'")
    return found[0] if found else None


def replay_router_version(client, experiment_id: str, op: Op,
                          artifacts: ExpertArtifacts | None = None) -> None:
    """Log the version folder as a pyfunc model and register it as a `gaggle-router` version.

    A version by reference logs no expert's tensors: each expert's bundle and key shard are
    made sure of in its own run, and `sources.json` names those runs."""
    import mlflow
    from mlflow.exceptions import MlflowException

    payload = op.payload
    if find_model_version(client, payload["version_id"]) is not None:
        return
    folder = Path(payload["folder"])
    if artifacts is not None and (artifacts.versions / payload["version_id"]).is_dir():
        folder = artifacts.versions / payload["version_id"]  # the store may have moved
    if not folder.is_dir():
        raise MlflowException(f"router version folder {folder} is gone; cannot log it",
                              error_code="RESOURCE_DOES_NOT_EXIST")
    sources = _expert_sources(client, experiment_id, folder, artifacts)
    try:
        client.create_registered_model(REGISTERED_MODEL, description=(
            "PHATGOOSE routers assembled by the gaggle coordinator; alias 'champion' marks the "
            "promoted version, 'latest' resolves to the newest."))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model = _logged_model(client, experiment_id, op)
    if model is None:
        mlflow.set_experiment(experiment_id=experiment_id)
        # params in the signature, so predict(..., params={"max_new_tokens": 8}) is honoured
        signature = mlflow.models.infer_signature(
            ["a prompt"], ["a completion"], params={"max_new_tokens": 32,
                                                    "method": "phatgoose", "top_k": 2})
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
            # No input example: it would load the whole routed model while logging.
            warnings.filterwarnings("ignore", category=UserWarning)
            logged = {"version": str(folder)}
            if sources is not None:
                logged[SOURCES] = os.path.join(scratch, f"{SOURCES}.json")
                Path(logged[SOURCES]).write_text(json.dumps(sources, indent=1))
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(PYFUNC_CODE),
                artifacts=logged, pip_requirements=_requirements(),
                tags={TAG_OP: op.op_id}, signature=signature,
                model_config=PYFUNC_MODEL_CONFIG,
            )
        model_id, source = info.model_id, info.model_uri
    else:
        model_id, source = model.model_id, f"models:/{model.model_id}"
    client.create_model_version(REGISTERED_MODEL, source=source, tags=version_tags(payload),
                                model_id=model_id, description=version_card(payload))


def _expert_sources(client, experiment_id: str, folder: Path,
                    artifacts: ExpertArtifacts | None) -> dict[str, str] | None:
    """expert id -> run id for a version by reference (its bundle and key shard logged
    there); None for a version folder that holds its tensors (format 1)."""
    manifest = VersionManifest.read(folder / VERSION_FILE)
    if manifest.format == 1 or artifacts is None:
        return None
    sources = {}
    for expert_id in manifest.expert_ids:
        run_id = artifacts.run_of(client, experiment_id, expert_id)
        artifacts.ensure(client, run_id, expert_id, (EXPERTS_DIR, KEYS_DIR))
        sources[expert_id] = run_id
    return sources


def _logged_model(client, experiment_id: str, op: Op):
    """A model an interrupted earlier attempt already logged (uploaded and ready), or None."""
    found = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"tags.`{TAG_OP}` = '{op.op_id}'")
    ready = [m for m in found if str(m.status).endswith("READY")]
    return ready[0] if ready else None


def replay_promotion(client, op: Op) -> None:
    """Point alias `champion` at the model version of a router version."""
    from mlflow.exceptions import MlflowException

    model_version = find_model_version(client, op.payload["version_id"])
    if model_version is None:
        raise MlflowException(
            f"router version {op.payload['version_id']} has no model version in "
            f"{REGISTERED_MODEL}", error_code="RESOURCE_DOES_NOT_EXIST")
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, model_version.version)
    if "sequence" in op.payload:  # promotions queued before the history was kept have none
        card = client.get_registered_model(REGISTERED_MODEL).description or ""
        client.update_registered_model(REGISTERED_MODEL, description=with_promotion(
            card, op.payload, op.payload["sequence"]))


def replay_rejection(client, experiment_id: str, op: Op) -> None:
    """A finished run named for the rejected version, tagged rejected with the reason: the
    version is visible in MLflow but never a registered model version."""
    payload = op.payload
    found = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_OP}` = '{op.op_id}'",
                               max_results=1)
    if found and found[0].info.status == "FINISHED":
        return
    run = found[0] if found else client.create_run(
        experiment_id, run_name=f"rejected version {payload['version_id']}",
        start_time=payload["at_ms"],
        tags={TAG_OP: op.op_id, TAG_VERSION: payload["version_id"], TAG_STATUS: "rejected",
              "reason": _cut(payload["reason"]), "diff": _cut(payload["diff"] or ""),
              "parent_version": payload["parent"] or "",
              "quarantined": _cut(",".join(payload["culprits"])),
              "mlflow.note.content": f"**Rejected**: {payload['reason']}"})
    client.set_terminated(run.info.run_id, "FAILED", end_time=payload["at_ms"])


def replay_evaluation(client, experiment_id: str, op: Op) -> None:
    """Tag the version's model version with `eval.*` and log the metrics in an evaluation run
    (linked to the logged model, so its page shows them too)."""
    from mlflow.exceptions import MlflowException

    record = op.payload
    model_version = find_model_version(client, record["version_id"])
    if model_version is None:
        raise MlflowException(
            f"router version {record['version_id']} has no model version in "
            f"{REGISTERED_MODEL} to attach its evaluation to",
            error_code="RESOURCE_DOES_NOT_EXIST")
    found = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_OP}` = '{op.op_id}'",
                               max_results=1)
    if not (found and found[0].info.status == "FINISHED"):
        _log_evaluation_run(client, experiment_id, op, record, model_version,
                            found[0] if found else None)
    # The tags go last and the mean last of all: a reader that sees `eval.accuracy` sees every
    # other eval tag and the finished run with its metrics. (A replay sets them again.)
    client.update_model_version(REGISTERED_MODEL, model_version.version, description=(
        with_evaluation(model_version.description or "", record)))
    tags = {f"{TAG_EVAL_PREFIX}{k}": repr(float(v)) for k, v in record["metrics"].items()}
    tags[TAG_EVAL_CONFIG] = record["config_key"]
    mean = f"{TAG_EVAL_PREFIX}accuracy"
    for key, value in sorted(tags.items(), key=lambda kv: (kv[0] == mean, kv[0])):
        client.set_model_version_tag(REGISTERED_MODEL, model_version.version, key, value)


def _log_evaluation_run(client, experiment_id: str, op: Op, record: dict, model_version,
                        run) -> None:
    """The evaluation run: the config as params, the metrics linked to the logged model."""
    from mlflow.entities import Metric, Param

    run = run or client.create_run(
        experiment_id, run_name=f"eval-{record['version_id']}",
        tags={TAG_OP: op.op_id, TAG_VERSION: record["version_id"],
              TAG_EVAL_CONFIG: record["config_key"]})
    run_id = run.info.run_id
    if not run.data.params:
        config = record["config"]
        params = [Param(k, _cut(",".join(v) if isinstance(v, list) else str(v)))
                  for k, v in sorted(config.items())]
        client.log_batch(run_id, params=params)
    if not run.data.metrics:
        stamp = int(time.time() * 1000)
        model_id = getattr(model_version, "model_id", None)
        metrics = [Metric(key, float(value), stamp, 0, model_id=model_id)
                   for key, value in sorted(record["metrics"].items())]
        client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, "FINISHED")


def version_tags(payload: dict) -> dict[str, str]:
    """The model version's tags: size, members, lineage and a one-line diff."""
    return {
        TAG_VERSION: payload["version_id"],
        "n_experts": str(payload["n_experts"]),
        "expert_ids": _cut(",".join(payload["expert_ids"])),
        "expert_names": _cut(",".join(payload["expert_names"])),
        "contributors": _cut(",".join(sorted(set(payload["contributors"])))),
        "parent_version": payload["parent"] or "",
        "diff": _cut(payload["diff"]),
        "base_model": payload["base"],
    } | _usage_tags(payload)


def _usage_tags(payload: dict) -> dict[str, str]:
    """`usage.*` tags: each expert's share of routed tokens, the flagged (capturing)
    experts (coordinator.checks.usage); none for payloads queued before the check existed."""
    if not payload.get("usage"):
        return {}
    return usage_tags(payload["usage"], MAX_TAG_CHARS)


def usage_tags(report: dict, max_chars: int = MAX_TAG_CHARS) -> dict[str, str]:
    """MLflow tags of a usage report: the flagged experts and each expert's top-1 share."""
    if "error" in report:
        return {"usage.error": report["error"]}
    experts = report["experts"]
    shares = ",".join(f"{name}={e['share']:.3f}" for name, e in sorted(experts.items()))
    if len(shares) > max_chars:
        shares = shares[:max_chars - 20] + " ... (cut)"
    return {"usage.slot": report["slot"], "usage.flagged": ",".join(report["flagged"]),
            "usage.max_share": f"{max((e['share'] for e in experts.values()), default=0):.4f}",
            "usage.shares": shares}


def _cut(text: str) -> str:
    if len(text) <= MAX_TAG_CHARS:
        return text
    kept = text[:MAX_TAG_CHARS - 40]
    return f"{kept} ... (+{len(text) - len(kept)} more characters)"


def _requirements() -> list[str]:
    pins = []
    for name in _REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins
