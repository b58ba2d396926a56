"""The MLflow pyfunc model of a router version: the base model routed among the version's
experts, generating text for a list of prompts.

Logged "from code" (this file is the model's code; the router folder is its artifact), so
loading it unpickles nothing. `mlflow.pyfunc.load_model("models:/gaggle-router@champion")`
and `mlflow models serve` both need `routing` importable (the gaggle package installed).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

ARTIFACT = "version"  # the artifact key holding the version folder (version.json, router/)
ROUTER_DIR = "router"  # the router folder inside it (coordinator.store.versions.ROUTER_DIR)
DEFAULTS = {"max_new_tokens": 32, "method": "phatgoose", "top_k": 2}
# Where the base runs, from the model config given at load time:
# mlflow.pyfunc.load_model(uri, model_config={"device": "cuda:1", "dtype": "bfloat16"}).
# "auto" is a GPU in bf16 where there is one, the CPU in float32 elsewhere (routing.device).
PLACEMENT_DEFAULTS = {"device": "auto", "dtype": "auto"}


class RouterModel(PythonModel):
    """Routed generation: `predict(["prompt", ...]) -> ["completion", ...]`."""

    def load_context(self, context) -> None:
        """Load the base on the model config's device and dtype, and route it."""
        from routing.base import load_base
        from routing.router import route
        from routing.version import load_router, read_router_manifest

        folder = Path(context.artifacts[ARTIFACT]) / ROUTER_DIR
        manifest = read_router_manifest(folder)
        self.version = manifest.get("metadata", {}).get("gaggle_version", {})
        placement = PLACEMENT_DEFAULTS | dict(getattr(context, "model_config", None) or {})
        self.base = load_base(manifest["base_model"], device=str(placement["device"]),
                              dtype=str(placement["dtype"]))
        self.weights = load_router(folder)
        self.routed = ("phatgoose", 2)
        route(self.base, self.weights, method="phatgoose", top_k=2)

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        """model_input: a list of prompts, a string, or a DataFrame whose first column holds
        them. params: max_new_tokens (32), method ("phatgoose"), top_k (2).

        model_input has no type hint on purpose: MLflow would replace the logged signature,
        which declares these params, with one inferred from the hint, which has none."""
        import torch

        from routing.router import route

        settings = DEFAULTS | (params or {})
        wanted = (str(settings["method"]), int(settings["top_k"]))
        if wanted != self.routed:
            route(self.base, self.weights, method=wanted[0], top_k=wanted[1])
            self.routed = wanted
        tokenizer, model = self.base.tokenizer, self.base.model
        outputs = []
        for prompt in _prompts(model_input):  # one at a time: no padding side effects
            encoded = tokenizer(prompt, return_tensors="pt").to(self.base.device)
            with torch.no_grad():
                generated = model.generate(
                    **encoded, max_new_tokens=int(settings["max_new_tokens"]),
                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
            new_tokens = generated[0, encoded["input_ids"].shape[1]:]
            outputs.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
        return outputs


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
