"""Where the coordinator's and the consumer's models run: `serve --device --dtype` for the
evaluation actors and the usage check, the model config for the pyfunc model."""

from __future__ import annotations

import pytest
import torch

from coordinator.tracking.pyfunc import PLACEMENT_DEFAULTS
from coordinator.tracking.replay import PYFUNC_CODE, PYFUNC_MODEL_CONFIG
from routing.stack import stack_experts
from routing.synthetic import random_bundle
from routing.version import save_router


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_spec):
    import mlflow

    root = tmp_path_factory.mktemp("pyfunc")
    weights = stack_experts([random_bundle(tiny_spec, f"e{i}", seed=i) for i in range(2)])
    save_router(weights, root / "version" / "router")
    # as the coordinator logs it (coordinator.tracking.replay)
    mlflow.pyfunc.save_model(root / "model", python_model=str(PYFUNC_CODE),
                             artifacts={"version": str(root / "version")},
                             model_config=PYFUNC_MODEL_CONFIG)
    return root / "model"


def test_the_logged_model_config_names_every_placement_key():
    assert PYFUNC_MODEL_CONFIG == PLACEMENT_DEFAULTS


@pytest.mark.parametrize("config, dtype", [
    (None, torch.float32),  # auto: float32 on a CPU-only machine
    ({"device": "cpu", "dtype": "bfloat16"}, torch.bfloat16),
])
def test_model_config_places_the_routed_base(saved_model, config, dtype):
    import mlflow

    if config is None and torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    model = mlflow.pyfunc.load_model(str(saved_model), model_config=config)
    base = model.unwrap_python_model().base
    assert base.model.dtype == dtype and base.device.type == "cpu"
    texts = model.predict(["Hello", "The film was"], params={"max_new_tokens": 3})
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


def test_unknown_dtype_in_the_model_config_is_refused(saved_model):
    import mlflow

    from protocol.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="--dtype must be one of"):
        mlflow.pyfunc.load_model(str(saved_model), model_config={"dtype": "int4"})


def test_serve_placement_reaches_the_usage_check(monkeypatch, tmp_path):
    from coordinator.checks import usage
    from coordinator.server import ServerConfig, start_assembly
    from routing.device import DEVICE_ENV, DTYPE_ENV

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    monkeypatch.setattr(usage, "_BASES", {})
    assert usage._base("tiny-llama").model.dtype == torch.float32  # unset: today's CPU fp32
    config = ServerConfig(store=tmp_path / "store", base="tiny-llama", device="cpu",
                          dtype="bfloat16", assembly=False)
    monkeypatch.setenv(DEVICE_ENV, "unset")  # registers the variables for restoring
    monkeypatch.setenv(DTYPE_ENV, "unset")
    assert start_assembly(config) is None  # records the placement, assembly or not
    monkeypatch.setattr(usage, "_BASES", {})
    assert usage._base("tiny-llama").model.dtype == torch.bfloat16


@pytest.mark.parametrize("field, value", [("device", "gpu"), ("dtype", "fp8")])
def test_serve_refuses_unknown_placements(tmp_path, field, value):
    from coordinator.server import ServerConfig
    from protocol.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=f"--{field} must be one of"):
        ServerConfig(store=tmp_path, base="tiny-llama", **{field: value})


def test_set_serving_placement_is_what_the_workers_read(monkeypatch):
    from routing.device import DEVICE_ENV, DTYPE_ENV, serving_placement, set_serving_placement

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    set_serving_placement("cpu", "bfloat16")
    assert serving_placement() == {"device": "cpu", "dtype": "bfloat16"}


def test_an_unknown_method_param_is_refused_with_the_methods_served(saved_model):
    import mlflow
    from mlflow.exceptions import MlflowException

    # the model's own predict: this test's saved model has no signature to carry params
    model = mlflow.pyfunc.load_model(str(saved_model)).unwrap_python_model()
    for method, expected in (("nonsense", "use one of"), ("retrieval", "per-example"),
                             ("single:nobody", "no expert named 'nobody'")):
        with pytest.raises(MlflowException, match=expected) as refused:
            model.predict(None, ["Hello"], params={"max_new_tokens": 1, "method": method})
        assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    (text,) = model.predict(None, ["Hello"], params={"max_new_tokens": 1, "method": "arrow"})
    assert isinstance(text, str) and model.routed == ("arrow", 2)


def test_batched_generation_equals_one_prompt_at_a_time(saved_model):
    import mlflow

    model = mlflow.pyfunc.load_model(str(saved_model)).unwrap_python_model()
    prompts = ["Hello", "The film was a long and", "A", "Review: fine. Sentiment:"]
    batched = model.predict(None, prompts, params={"max_new_tokens": 6})
    alone = [model.predict(None, [p], params={"max_new_tokens": 6})[0] for p in prompts]
    assert batched == alone and all(isinstance(t, str) for t in batched)
