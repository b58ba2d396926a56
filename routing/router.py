"""`route()`: turn a base model into the PHATGOOSE routed model (or a baseline), and back.

    model = route(base, bundles, method="phatgoose", top_k=2)   # in place, returns the model
    with routing_inputs(model, expert_index=torch.tensor([0, 3])):  # per-example methods
        logits = model(input_ids).logits
    unroute(model)                                               # the plain base model again

Methods: phatgoose (gate keys), phatgoose_centred (gate keys, inputs centred by the experts'
mean activations: a documented deviation, see routing.layers._centring_bias),
average_activation (mean activations as keys), arrow (|x . prototype|), uniform_merge,
single:<expert name>, retrieval (expert per example given at call time), smear (per-example
parameter-averaged expert). docs/methods.md has the formulas.

Per-token methods work unchanged with `generate()` and its KV cache. smear averages over the
tokens of each call, so under incremental decoding each new token gets its own merge: use it
for scoring (rank classification), where the whole sequence is one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from protocol.bundle import Bundle, check_gates_trained
from protocol.errors import FailedPrecondition, FingerprintMismatch, InvalidArgument
from routing.base import BaseModel
from routing.base import fingerprint as model_fingerprint
from routing.layers import RoutedLinear, RoutingState
from routing.methods import KEY_FIELDS_OF, METHODS, SHIPPED_KEY
from routing.stack import ModuleRouter, RouterWeights, stack_experts, with_ia3_prototypes

_STATE_ATTR = "gaggle_routing"


def route(model: nn.Module | BaseModel, experts: Iterable[Bundle] | RouterWeights,
          method: str = "phatgoose", top_k: int = 2, *, fingerprint: str | None = None,
          dispatch: str = "auto") -> nn.Module:
    """Replace every adapted nn.Linear of `model` by a RoutedLinear; returns the same model.

    model: a transformers model or a BaseModel (whose fingerprint is then used). A model
    routed before is unrouted first, so one base model serves every method in turn.
    experts: loaded bundles, or RouterWeights from `stack_experts` / `load_router` (which may
    hold keys only and page the adapters in, routing.paging).
    fingerprint: the base model's, when known; otherwise the one load_base recorded on the
    model, else computed from the weights.
    The routed layers keep the base's device and dtype; router scores are float32.
    dispatch: "auto", "dense" or "grouped" (see routing.layers for the trade-off).
    Raises FingerprintMismatch, FailedPrecondition (zero router keys) or InvalidArgument.
    """
    if isinstance(model, BaseModel):
        fingerprint = fingerprint or model.fingerprint
        model = model.model
    unroute(model)
    weights = experts if isinstance(experts, RouterWeights) else stack_experts(list(experts))
    mode, single = _parse_method(method, weights)
    if weights.load_fields is not None:  # a router opened with some key fields only
        weights.load_fields(KEY_FIELDS_OF.get(mode, ()))
    if top_k < 1:
        raise InvalidArgument(f"top_k must be at least 1, got {top_k}", field="top_k")
    if dispatch not in ("auto", "dense", "grouped"):
        raise InvalidArgument(f"dispatch must be auto, dense or grouped, got {dispatch!r}",
                              field="dispatch")
    # load_base stamps the checkpoint's fingerprint on the model: a bf16 load no longer
    # hashes to it
    known = fingerprint or getattr(model, "gaggle_fingerprint", None)
    check_fingerprint(weights, known or model_fingerprint(model))
    check_router_keys(weights, mode)
    state = RoutingState(config={"method": method, "top_k": top_k, "experts": weights.experts})
    position = {name: i for i, name in enumerate(weights.experts)}
    layers = {}  # all built before any is installed: a failure leaves the model untouched
    for name, module_router in weights.modules.items():
        linear = _linear(model, module_router)
        local_single = -1
        if mode == "single":
            if single not in module_router.experts:
                continue  # this expert does not adapt the module: the base layer stays
            local_single = module_router.experts.index(single)
        collection = [position[e] for e in module_router.experts]
        if mode == "arrow":
            module_router = with_ia3_prototypes(module_router, linear.weight,
                                                weights.adapters, collection)
        layers[name] = RoutedLinear(
            linear, module_router, method=mode, top_k=top_k, state=state,
            collection_index=collection, single=local_single, dispatch=dispatch,
            pool=weights.adapters)
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    setattr(model, _STATE_ATTR, state)
    return model


def unroute(model: nn.Module) -> nn.Module:
    """Put every RoutedLinear's base nn.Linear back; a model never routed is left as it is."""
    routed = [(name, module) for name, module in model.named_modules()
              if isinstance(module, RoutedLinear)]
    for name, module in routed:
        model.set_submodule(name, module.base)
    if hasattr(model, _STATE_ATTR):
        getattr(model, _STATE_ATTR).forget()
        delattr(model, _STATE_ATTR)
    return model


def routing_state(model: nn.Module) -> RoutingState:
    """The state shared by a routed model's layers; InvalidArgument if it is not routed."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise InvalidArgument("this model is not routed: call route(model, experts) first",
                              field="model")
    return state


@contextmanager
def routing_inputs(model: nn.Module, *, expert_index: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> Iterator[RoutingState]:
    """Per-example routing inputs for the calls made inside the block.

    expert_index: (batch,) collection positions (RouterWeights.experts order), for retrieval.
    attention_mask: (batch, seq) 1 for real tokens, so smear's sequence mean skips padding.
    """
    state = routing_state(model)
    previous = (state.expert_index, state.attention_mask, state.merge_rows)
    state.expert_index, state.attention_mask, state.merge_rows = expert_index, attention_mask, None
    try:
        yield state
    finally:
        state.expert_index, state.attention_mask, state.merge_rows = previous


def check_fingerprint(weights: RouterWeights, model_fingerprint: str) -> None:
    """Raise FingerprintMismatch unless the router's experts were trained on this model."""
    if weights.fingerprint != model_fingerprint:
        raise FingerprintMismatch(
            f"the router's experts were trained on base model {weights.base_model!r} with "
            f"fingerprint {weights.fingerprint[:12]}..., but the model given has fingerprint "
            f"{model_fingerprint[:12]}...: load that exact base model "
            f"(routing.base.load_base({weights.base_model!r}))",
            field="fingerprint",
        )


def check_router_keys(weights: RouterWeights, mode: str) -> None:
    """Raise FailedPrecondition when a method's router keys are missing or all zero.

    A zero key row gives the same score to every token, the classic sign of gates that were
    never trained or were lost when a checkpoint was reloaded.
    """
    if mode not in SHIPPED_KEY:
        return
    for name, module in weights.modules.items():
        keys = module.activations if mode == "average_activation" else module.keys
        if keys is None or (mode == "phatgoose_centred" and module.activations is None):
            raise FailedPrecondition(
                f"method {mode} needs every expert's mean activations, but module "
                f"{name} lacks them for some expert: repackage those experts with activations",
                field="activations")
        check_gates_trained(zip(module.experts, keys, strict=True),
                            _zero_keys(name, SHIPPED_KEY[mode]))


def _zero_keys(module: str, what: str) -> Callable[[str, int], FailedPrecondition]:
    def refuse(expert: str, count: int) -> FailedPrecondition:
        return FailedPrecondition(
            f"router keys are all zero: expert {expert!r} has a zero or constant {what} "
            "vector (a zero key once layer-normed) for "
            f"module {module}; its gate was not trained or was lost on reload; retrain the "
            "gate or re-export the router",
            field="keys")
    return refuse


def _parse_method(method: str, weights: RouterWeights) -> tuple[str, str | None]:
    if method.startswith("single:"):
        name = method.split(":", 1)[1]
        weights.expert_index(name)  # raises naming the experts
        return "single", name
    if method not in METHODS:
        raise InvalidArgument(f"unknown routing method {method!r}: use one of {list(METHODS)}",
                              field="method")
    return method, None


def _linear(model: nn.Module, router: ModuleRouter) -> nn.Linear:
    try:
        linear = model.get_submodule(router.name)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise InvalidArgument(f"module {router.name} is not an nn.Linear of this model: the "
                              "router was built for another architecture", field="modules")
    if not linear.weight.is_floating_point():  # e.g. bitsandbytes' packed 4-bit weights
        raise InvalidArgument(
            f"module {router.name} holds {linear.weight.dtype} weights ("
            f"{type(linear).__name__}): routing needs a float base; load it with --dtype "
            "bfloat16 instead of --quantize", field="modules")
    if (linear.in_features, linear.out_features) != (router.d_in, router.d_out):
        raise InvalidArgument(
            f"module {router.name} is ({linear.in_features} -> {linear.out_features}) but the "
            f"router expects ({router.d_in} -> {router.d_out})", field="modules")
    return linear
