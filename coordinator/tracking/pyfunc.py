"""The MLflow pyfunc model of a router version: the base model routed among the version's
experts, generating text for a list of prompts.

Logged "from code" (this file is the model's code; the version folder is its artifact), so
loading it unpickles nothing. `mlflow.pyfunc.load_model("models:/gaggle-router@champion")`
and `mlflow models serve` both need `routing` importable (the gaggle package installed).

A version by reference carries no expert's tensors: `sources.json` names the MLflow run that
holds each expert's key shard and bundle. Loading fetches every key shard (the router scores
every expert) and each bundle only when a token first picks that expert, then pages its
adapter in within `max_adapter_bytes` (routing.paging). It works wherever the tracking
server is reachable. A local artifact store is read in place, with no copy.
"""

from __future__ import annotations

import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

ARTIFACT = "version"  # the artifact key holding the version folder (version.json, ...)
SOURCES = "sources"  # ... and the one naming each expert's run (sources.json)
STACKED_DIR = "router"  # a format-1 version folder's stacked router (routing.version)
DEFAULTS = {"max_new_tokens": 32, "method": "phatgoose", "top_k": 2}
# Where the base runs and how much adapter memory it pages, from the model config given at
# load time: mlflow.pyfunc.load_model(uri, model_config={"device": "cuda:1",
# "max_adapter_bytes": 4e9}). "auto" is a GPU in bf16 where there is one, the CPU in float32
# elsewhere (routing.device); the paging default is routing.paging.DEFAULT_MAX_BYTES.
PLACEMENT_DEFAULTS = {"device": "auto", "dtype": "auto", "max_adapter_bytes": 0}
_DOWNLOADS = 8  # key shards fetched at once
BATCH = 32  # prompts generated together


class RouterModel(PythonModel):
    """Routed generation: `predict(["prompt", ...]) -> ["completion", ...]`."""

    def load_context(self, context) -> None:
        """Load the base on the model config's device and dtype, and route it."""
        from routing.base import load_base
        from routing.router import route

        placement = PLACEMENT_DEFAULTS | dict(getattr(context, "model_config", None) or {})
        self.weights = _router(context, int(float(placement["max_adapter_bytes"])))
        self.base = load_base(self.weights.base_model, device=str(placement["device"]),
                              dtype=str(placement["dtype"]))
        self.routed = ("phatgoose", 2)
        self._lock = threading.Lock()
        route(self.base, self.weights, method="phatgoose", top_k=2)

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        """model_input: a list of prompts, a string, or a DataFrame whose first column holds
        them. params: max_new_tokens (32), method ("phatgoose"), top_k (2).

        model_input has no type hint on purpose: MLflow would replace the logged signature,
        which declares these params, with one inferred from the hint, which has none."""
        settings = DEFAULTS | (params or {})
        wanted = (str(settings["method"]), int(settings["top_k"]))
        prompts = _prompts(model_input)
        with self._lock:  # one request at a time: routing and paging state are shared
            if wanted != self.routed:
                self._route(*wanted)
            return [text for start in range(0, len(prompts), BATCH) for text in self._generate(
                prompts[start:start + BATCH], int(settings["max_new_tokens"]))]

    def _generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy generation for prompts as one left-padded batch (the KV cache serves all
        of them; padding is masked out, so each equals its own one-prompt generation)."""
        import torch

        tokenizer, model = self.base.tokenizer, self.base.model
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(self.base.device)
        finally:
            tokenizer.padding_side = side
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def _route(self, method: str, top_k: int) -> None:
        """Route with another method, or refuse it with a 400 that says what is accepted
        (a generic error otherwise, under `mlflow models serve`)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from protocol.errors import GaggleError
        from routing.methods import TOKEN_METHODS
        from routing.router import route

        accepted = [*TOKEN_METHODS, "single:<contributor/name>"]
        try:
            if method not in TOKEN_METHODS and not method.startswith("single:"):
                raise ValueError(f"method {method!r} is not served here: use one of "
                                 f"{accepted} (retrieval and smear need per-example inputs: "
                                 "route the model yourself, see routing.router)")
            route(self.base, self.weights, method=method, top_k=top_k)
        except (GaggleError, ValueError) as err:
            route(self.base, self.weights, method=self.routed[0], top_k=self.routed[1])
            raise MlflowException(str(err)[:1000],
                                  error_code=INVALID_PARAMETER_VALUE) from None
        self.routed = (method, top_k)


def _router(context, max_adapter_bytes: int):
    """The version's RouterWeights: a stacked router folder (format 1) read whole, or keys
    fetched from the experts' runs and adapters paged in from their bundles on demand."""
    from routing.paging import DEFAULT_MAX_BYTES
    from routing.version import (
        KEY_FILE,
        VERSION_FILE,
        VersionManifest,
        load_stacked,
        open_router,
    )

    folder = Path(context.artifacts[ARTIFACT])
    if (folder / STACKED_DIR).is_dir():  # a version that holds its experts' tensors
        return load_stacked(folder / STACKED_DIR)
    manifest = VersionManifest.read(folder / VERSION_FILE)
    runs = json.loads(Path(context.artifacts[SOURCES]).read_text(encoding="utf-8"))
    fetch = _RunFiles(runs)
    with ThreadPoolExecutor(_DOWNLOADS) as pool:  # every key shard is needed: fetch them now
        shards = dict(zip(manifest.expert_ids, pool.map(
            lambda i: fetch.folder(i, "keys") / KEY_FILE, manifest.expert_ids), strict=True))
    return open_router(manifest, key_shard=shards.__getitem__,
                       bundle=lambda i: fetch.folder(i, "bundle"),
                       max_adapter_bytes=max_adapter_bytes or DEFAULT_MAX_BYTES)


class _RunFiles:
    """An expert's artifact folder (`bundle`, `keys`) from its run: read in place from a local
    artifact store, else downloaded once into a scratch folder kept while the model lives."""

    def __init__(self, runs: dict[str, str]) -> None:
        self.runs = runs
        self._scratch = tempfile.TemporaryDirectory(prefix="gaggle-experts-")

    def folder(self, expert_id: str, artifact: str) -> Path:
        from urllib.parse import unquote, urlparse

        run = mlflow.get_run(self.runs[expert_id])
        parsed = urlparse(run.info.artifact_uri)
        if parsed.scheme == "file" and Path(unquote(parsed.path), artifact).is_dir():
            return Path(unquote(parsed.path), artifact)
        target = Path(self._scratch.name) / expert_id
        if not (target / artifact).is_dir():
            mlflow.artifacts.download_artifacts(run_id=self.runs[expert_id],
                                                artifact_path=artifact, dst_path=str(target))
        return target / artifact


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # a pandas DataFrame or Series
        column = model_input.iloc[:, 0] if model_input.ndim == 2 else model_input
        return [str(v) for v in column.tolist()]
    if isinstance(model_input, dict):
        return [str(v) for v in next(iter(model_input.values()))]
    return [str(v) for v in model_input]


mlflow.models.set_model(RouterModel())
