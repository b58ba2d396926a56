"""The usage check: the share of routed tokens each expert of a router version takes on fixed
public evaluation prompts, with the experts above a threshold flagged (routing capture), and
whether every output was finite. A version goes live only when it passes
(coordinator.checks.verdict).

A capturing gate (for instance one aligned with the mean activation of every module) wins the
router's first choice for nearly every token, whatever the input. We count, per module, the
share of tokens whose TOP-1 expert (the first of the top-k slots, the one with the largest
mixture weight) is each expert, and average it over the modules the expert adapts. An expert
is flagged when its share is at least `min_share` and at least `ratio` times the uniform share
1/E (also averaged over its modules).

The prompts are the first inputs of each held-out task's test split (tasks/): public text,
never a contributor's data. The report is written beside the version as `usage.json` and
becomes `usage.*` tags of the version's MLflow model version.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from coordinator.checks.usage_charts import write_usage_charts
from coordinator.store.layout import atomic_write
from coordinator.store.versions import VersionStore
from routing.base import load_base
from routing.device import serving_placement
from routing.layers import Cancelled
from routing.router import route, routing_state, unroute
from routing.trace import capture_routing
from tasks.registry import HELD_OUT, split

log = logging.getLogger(__name__)
USAGE_FILE = "usage.json"
_BASES: dict[str, object] = {}  # base model name -> loaded BaseModel (one per process)
# The key shards of the version checked last: the next version shares all but its newest
_SHARDS: dict = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class UsageConfig:
    """How expert usage is measured and when an expert is flagged."""

    # First test inputs of each held-out task, each cut to max_tokens tokens, routed in one
    # padded batch. About 600 tokens: every module's top-1 shares are then known to a few
    # percent, and the check costs one forward. Its cost is the base forward, the scores
    # against every key and one read of each expert some token picks (with random-like
    # routing over 1,000 rank-16 SmolLM2 experts, most of their 21 GB: bench.scale).
    prompts_per_task: int = 4
    max_tokens: int = 32
    batch_size: int = 64  # prompts per forward
    top_k: int = 2  # the router's k (only the top-1 slot is counted)
    ratio: float = 2.0  # flag at this multiple of the uniform share 1/E...
    min_share: float = 0.5  # ...and at least this share of the tokens
    # experts' adapter bytes paged in at once while measuring (routing.paging)
    max_adapter_bytes: int = 1 << 30


def evaluation_prompts(config: UsageConfig = UsageConfig()) -> list[str]:
    """The fixed public prompt set: the first test inputs of every held-out task."""
    return [example.input for task in HELD_OUT
            for example in split(task).test[:config.prompts_per_task]]


@dataclass
class Routed:
    """What one pass of the prompts through a routed model showed."""

    shares: dict[str, torch.Tensor]  # module -> (E_collection,) share of tokens won at top-1
    unrouted: dict[str, float]  # module -> share of tokens with no finite mixture weight
    experts: list[str]  # collection names
    tokens: int  # real (unpadded) tokens
    non_finite_logits: int  # real tokens with a NaN or infinite logit


def top1_shares(model, tokenizer, prompts: list[str], max_tokens: int,
                batch_size: int = 8) -> Routed:
    """Run a routed model on the prompts, `batch_size` at a time (right-padded: the padding
    is routed too, and left out of the counts). Per module, every real token counts once:
    for the expert of its top-1 slot, or as unrouted when its mixture weights are not
    finite, so each module's shares and its unrouted share add up to 1."""
    real, bad = [], 0
    with torch.inference_mode(), capture_routing(model) as trace:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], add_special_tokens=False,
                                padding=True, truncation=True, max_length=max_tokens,
                                return_tensors="pt")
            if encoded["input_ids"].numel():  # serve --device may put the model on a GPU
                mask = encoded["attention_mask"].to(model.device)
                logits = model(input_ids=encoded["input_ids"].to(model.device),
                               attention_mask=mask).logits
                bad += int((~torch.isfinite(logits).all(-1) & mask.bool()).sum())
                real.append(encoded["attention_mask"].reshape(-1).bool())
    mask = torch.cat(real) if real else torch.zeros(0, dtype=torch.bool)
    tokens = int(mask.sum())
    shares: dict[str, torch.Tensor] = {}
    unrouted: dict[str, float] = {}
    for module in trace.records:
        first = trace.choices(module)[:, 0][mask]  # (N,) top-1 collection id per real token
        unrouted[module] = float((first < 0).sum()) / max(tokens, 1)
        counts = torch.bincount(first[first >= 0], minlength=len(trace.experts)).double()
        shares[module] = counts / max(tokens, 1)
    return Routed(shares, unrouted, trace.experts, tokens, bad)


def usage_report(routed: Routed, members: dict[str, list[str]], prompts: int,
                 config: UsageConfig = UsageConfig()) -> dict:
    """Per expert: mean top-1 share over the modules it adapts, the uniform share there, and
    whether it is flagged; and how many tokens had a non-finite logit or no finite mixture
    (either fails the version). members: module -> names of the experts adapting it."""
    shares, experts = routed.shares, routed.experts
    per_expert: dict[str, dict] = {}
    for index, name in enumerate(experts):
        modules = [m for m in shares if name in members.get(m, [])]
        if not modules:
            continue
        share = sum(float(shares[m][index]) for m in modules) / len(modules)
        uniform = sum(1.0 / len(members[m]) for m in modules) / len(modules)
        flagged = share >= config.min_share and share >= config.ratio * uniform
        per_expert[name] = {"share": round(share, 4), "uniform": round(uniform, 4),
                            "modules": len(modules), "flagged": flagged}
    by_layer = shares_by_layer(shares, experts, members)
    by_layer["unrouted"] = _by_layer(routed.unrouted, by_layer["layers"])
    return {"slot": "top-1", "prompts": prompts, "tokens": routed.tokens,
            "config": asdict(config), "experts": per_expert, "by_layer": by_layer,
            "non_finite_logits": routed.non_finite_logits,
            "unrouted_share": round(max(routed.unrouted.values(), default=0.0), 4),
            "flagged": sorted(n for n, e in per_expert.items() if e["flagged"])}


def _by_layer(values: dict[str, float], layers: list[int]) -> list[float]:
    """A per-module value averaged over the modules of each layer (in `layers` order)."""
    grouped: dict[int, list[float]] = {}
    for module, value in values.items():
        found = _LAYER_RE.search(module)
        grouped.setdefault(int(found.group(1)) if found else -1, []).append(value)
    return [round(sum(grouped[i]) / len(grouped[i]), 4) if grouped.get(i) else 0.0
            for i in layers]


_LAYER_RE = re.compile(r"\.(\d+)\.")
MAX_CHART_EXPERTS = 40  # the heatmap shows the experts with the largest shares


def shares_by_layer(shares: dict[str, torch.Tensor], experts: list[str],
                    members: dict[str, list[str]]) -> dict:
    """{"layers": [i], "experts": [name], "shares": [[share]] (layer x expert)}: each expert's
    top-1 share averaged over the modules of each layer it adapts (None where it adapts none),
    for the MAX_CHART_EXPERTS experts with the largest overall share."""
    layers: dict[int, list[str]] = {}
    for module in shares:
        found = _LAYER_RE.search(module)
        layers.setdefault(int(found.group(1)) if found else -1, []).append(module)
    overall = {i: float(sum(shares[m][i] for m in shares)) for i in range(len(experts))}
    kept = sorted(overall, key=lambda i: -overall[i])[:MAX_CHART_EXPERTS]
    rows = []
    for layer in sorted(layers):
        row = []
        for i in kept:
            values = [float(shares[m][i]) for m in layers[layer]
                      if experts[i] in members.get(m, [])]
            row.append(round(sum(values) / len(values), 4) if values else None)
        rows.append(row)
    return {"layers": sorted(layers), "experts": [experts[i] for i in kept], "shares": rows}


def measure_router(weights, base, config: UsageConfig = UsageConfig(),
                   prompts: list[str] | None = None,
                   cancel: Callable[[], bool] | None = None) -> dict:
    """The usage report of RouterWeights on a loaded BaseModel (routed, then unrouted).
    cancel: polled between layers; when True, routing.layers.Cancelled is raised."""

    prompts = evaluation_prompts(config) if prompts is None else prompts
    model = route(base, weights, method="phatgoose", top_k=config.top_k)
    routing_state(model).cancel = cancel
    try:
        routed = top1_shares(model, base.tokenizer, prompts, config.max_tokens,
                             config.batch_size)
    finally:
        unroute(model)
    members = {name: list(module.experts) for name, module in weights.modules.items()}
    return usage_report(routed, members, len(prompts), config)


def cached_usage(versions: VersionStore, version_id: str) -> dict | None:
    """The usage report a version's check left in its folder, or None if it never ran."""
    path = versions.folder(version_id) / USAGE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def version_usage(versions: VersionStore, version_id: str,
                  config: UsageConfig = UsageConfig(),
                  cancel: Callable[[], bool] | None = None) -> dict:
    """The usage report of a version: read from its folder's usage.json, else measured once
    and written there. A failure is reported as {"error": ...} and not cached; the only
    exception raised is routing.layers.Cancelled, when `cancel` stops the measurement."""
    folder = versions.folder(version_id)
    path = folder / USAGE_FILE
    cached = cached_usage(versions, version_id)
    if cached is not None:
        return cached
    try:
        weights = versions.router(version_id, max_adapter_bytes=config.max_adapter_bytes,
                                  shard_cache=_SHARDS)
        with _LOCK:  # one measurement at a time: the base model is shared
            report = measure_router(weights, _base(weights.base_model), config, cancel=cancel)
    except Cancelled:
        raise
    except Exception as err:  # the check must never stop a version from being tracked
        log.exception("measuring expert usage of %s failed", folder)
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    if report["flagged"]:
        log.warning("version %s: experts %s take more than their share of the tokens "
                    "(routing capture)", version_id, report["flagged"])
    write_usage_charts(report, folder)  # before usage.json: it marks the check done
    atomic_write(path, (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
    return report


def _base(name: str):
    if name not in _BASES:

        _BASES.clear()  # keep one base model in memory at most
        _BASES[name] = load_base(name, **serving_placement())  # serve --device / --dtype
    return _BASES[name]
