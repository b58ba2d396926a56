"""Training an expert (peft LoRA or (IA)^3) and its PHATGOOSE gate on private JSONL data.

Step 1 trains the expert with peft (AdamW, constant LR after a linear warmup, loss on target
tokens only). Step 2 freezes the base model and the expert and trains only one gate vector per
adapted module (routing.gate). The bundle is written atomically by protocol.bundle.save_bundle,
so an error at any point leaves nothing at --out.

Defaults (TrainConfig) keep PHATGOOSE's recipe (LoRA rank 16 on every linear layer, s = 1/r,
AdamW lr 5e-3 and weight decay 0, constant LR after 6% warmup; zero-initialised gates, AdamW
lr 5e-3) with fewer steps, to fit a few minutes on a 2-core CPU; bench/README.md has the step
costs behind them. What the gates learn, and the gate-training changes measured and not
adopted: docs/gates.md. The formulas: docs/methods.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contributor.data import (
    IGNORE_INDEX,
    TokenizedExample,
    batches,
    one_pass,
    read_jsonl,
    token_counts,
    tokenize,
)
from contributor.hardware import autocast_device, checkpointing, model_device, on_device
from contributor.package import (
    Expert,
    bundle_from_expert,
    check_trained,
    expert_from_peft,
    load_expert,
)
from contributor.progress import write_progress
from contributor.targets import parse_target_modules, peft_config
from protocol.bundle import Bundle, check_gates_trained, save_bundle, validate_bundle
from protocol.errors import InvalidArgument, TrainingDiverged
from protocol.manifest import MAX_CURVE_POINTS
from protocol.names import check_name
from routing.base import BaseModel, load_base
from routing.device import check_names
from routing.gate import gate_vectors, gated_experts, mean_input_activations
from routing.precision import autocast
from routing.precision import resolve as resolve_precision

_ACTIVATION_BATCH = 16  # no-grad passes afford larger batches than training steps


SCHEDULES = ("constant", "linear")


def lr_factor(step: int, steps: int, warmup_fraction: float, schedule: str) -> float:
    """The LR multiplier at optimiser step `step` (0-based) of `steps`: linear warmup, then
    constant, or a linear decay that reaches zero after the last step."""
    warmup = max(1, round(warmup_fraction * steps))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return (steps - step) / max(1, steps - warmup + 1)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; defaults fit a 2-core CPU with SmolLM2-135M (about 5 minutes)."""

    method: str = "lora"  # "lora" or "ia3"
    steps: int = 100  # expert optimiser steps (PHATGOOSE: 1000 on a GPU)
    rank: int = 16  # LoRA rank r, as in PHATGOOSE
    alpha: float = 1.0  # LoRA alpha: scaling s = alpha / r = 1/r, PHATGOOSE's recipe
    lr: float = 5e-3  # expert AdamW learning rate (weight decay 0)
    batch_size: int = 8  # examples per expert step and per gate micro-batch
    max_length: int = 64  # tokens per example (prompt cut from the start when longer)
    warmup_fraction: float = 0.06  # linear warmup share of each run
    schedule: str = "constant"  # after warmup: "constant" LR, or "linear" decay to zero
    gate_steps: int = 50  # gate optimiser steps (PHATGOOSE: 100; see docs/gates.md)
    gate_lr: float = 5e-3  # gate AdamW learning rate (weight decay 0), PHATGOOSE's
    gate_accumulation: int = 1  # micro-batches per gate step
    activations: bool = True  # ship mean module inputs for the Average Activation baseline
    activation_examples: int = 128  # examples averaged for those means (no-grad passes)
    seed: int = 0  # data order and LoRA initialisation
    threads: int = 0  # torch CPU threads; 0 = all cores, or 1 when the machine is busy
    precision: str = "auto"  # matmuls: bf16 autocast where native (routing.precision), or fp32
    device: str = "auto"  # base model's: auto (a GPU if any), cpu, cuda[:N], mps
    dtype: str = "auto"  # base weights: auto (bf16 on a GPU), float32, bfloat16, float16
    target_modules: str | None = None  # peft names/regex (contributor.targets); None: default
    gradient_checkpointing: bool = False  # recompute block activations: less memory, slower
    quantize: str | None = None  # "4bit": NF4 base via bitsandbytes (CUDA, the quant extra)
    progress_file: str | None = None  # each step also as a JSON line here (contributor.progress)

    def __post_init__(self) -> None:
        if self.method not in ("lora", "ia3"):
            raise InvalidArgument(f"--method must be lora or ia3, got {self.method!r}",
                                  field="method")
        for flag, value in (("steps", self.steps), ("rank", self.rank),
                            ("batch-size", self.batch_size), ("gate-steps", self.gate_steps),
                            ("gate-accumulation", self.gate_accumulation),
                            ("activation-examples", self.activation_examples)):
            if value < 1:
                raise InvalidArgument(f"--{flag} must be at least 1, got {value}", field=flag)
        for flag, value in (("lr", self.lr), ("gate-lr", self.gate_lr), ("alpha", self.alpha)):
            if not (math.isfinite(value) and value > 0):
                raise InvalidArgument(f"--{flag} must be a positive number, got {value}",
                                      field=flag)
        if self.threads < 0:
            raise InvalidArgument(f"--threads must be 0 (automatic) or more, got {self.threads}",
                                  field="threads")
        resolve_precision(self.precision)  # rejects unknown names with a clear error
        check_names(self.device, self.dtype)
        if self.quantize is not None and self.method == "ia3":
            raise InvalidArgument("--quantize 4bit trains LoRA experts only: an input-scaled "
                                  "(IA)^3 module needs the base weights in float",
                                  field="quantize")
        parse_target_modules(self.target_modules)
        if self.schedule not in SCHEDULES:
            raise InvalidArgument(f"--schedule must be one of {', '.join(SCHEDULES)}, got "
                                  f"{self.schedule!r}", field="schedule")
        if self.max_length < 2:
            raise InvalidArgument(f"--max-length must be at least 2, got {self.max_length}",
                                  field="max-length")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Map the CLI flags that were given onto TrainConfig's defaults."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {key: value for key, value in vars(args).items()
             if key in fields and value is not None}
    if getattr(args, "no_activations", False):
        given["activations"] = False
    given["gradient_checkpointing"] = bool(getattr(args, "gradient_checkpointing", False))
    return TrainConfig(**given)


def load_training_base(name: str, config: TrainConfig) -> BaseModel:
    """The base model on the config's device, in its dtype (optionally 4-bit)."""
    return load_base(name, device=config.device, dtype=config.dtype, quantize=config.quantize)


def set_threads(requested: int) -> int:
    """Set torch's CPU threads; with 0, use every core unless the machine is already busy.

    OpenMP threads spin at each barrier: on cores oversubscribed by other processes a 2-thread
    step was measured 10x slower than a 1-thread one, so a busy machine gets one thread.
    """
    if requested == 0:
        cores = os.cpu_count() or 1
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= cores
        requested = 1 if busy else cores
    torch.set_num_threads(requested)
    return requested


# Architectures whose logits are exactly lm_head(final hidden state): no logit scaling or
# soft-capping, so the loss may apply the head to the target positions only.
_PLAIN_HEAD_MODELS = ("llama", "mistral", "qwen2", "qwen3")


def target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over target positions (labels != -100).

    batch: input_ids, attention_mask, labels (batch, seq). Equal to the transformers loss;
    for plain-head models the vocabulary projection runs on target positions only, which
    saves about a fifth of a SmolLM2 step (its head is 49152 x 576).
    """
    if getattr(model.config, "model_type", None) not in _PLAIN_HEAD_MODELS:
        return model(**batch).loss
    hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (targets, vocab)
    return F.cross_entropy(logits.float(), labels[keep])


def _optimise(model: nn.Module, params: list[nn.Parameter],
              data: Iterator[dict[str, torch.Tensor]], steps: int, lr: float,
              config: TrainConfig, desc: str, accumulation: int = 1) -> list[float]:
    """AdamW (wd 0) with the config's warmup and schedule; returns the loss of each step."""
    from tqdm import tqdm

    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: lr_factor(step, steps, config.warmup_fraction, config.schedule))
    losses: list[float] = []
    device, cast = model_device(model), autocast_device(model)
    with tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True) as bar, \
            checkpointing(model, config.gradient_checkpointing):
        for _ in range(steps):
            total = 0.0
            for _ in range(accumulation):
                with autocast(config.precision, cast):  # forward only; backward follows dtypes
                    loss = target_loss(model, on_device(next(data), device)) / accumulation
                loss.backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise TrainingDiverged(f"{desc} loss became {total} at step {len(losses) + 1}: "
                                       "lower the learning rate", field="lr")
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}")
            bar.update()
            if config.progress_file:
                rate = bar.format_dict.get("rate") or 0.0
                write_progress(config.progress_file, desc, len(losses), steps, total,
                               (steps - len(losses)) / rate if rate else None)
    return losses


def train_expert(base: BaseModel, examples: list[TokenizedExample],
                 config: TrainConfig) -> tuple[Expert, list[float]]:
    """Train a peft expert on `base.model`; the base model is restored before returning."""
    from peft import get_peft_model

    torch.manual_seed(config.seed)
    settings = peft_config(config.method, config.rank, config.alpha,
                           parse_target_modules(config.target_modules), base.model)
    with warnings.catch_warnings():
        # peft calls a transformers API deprecated in v5; the warning is noise to a contributor.
        warnings.filterwarnings("ignore", category=FutureWarning)
        # autocast_adapter_dtype (peft's default) keeps the adapter float32 on a bf16 base
        try:
            peft_model = get_peft_model(base.model, settings)
        except ValueError as err:  # peft's word on targets that match nothing or no linear
            raise InvalidArgument(f"cannot adapt {config.target_modules or 'the default'} "
                                  f"modules: {err}", field="target-modules") from None
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        data = batches(examples, config.batch_size, base.tokenizer.pad_token_id, config.seed)
        # The peft layers sit inside the transformers model, so train through it directly.
        losses = _optimise(peft_model.get_base_model(), params, data, config.steps, config.lr,
                           config, "expert")
        expert = expert_from_peft(peft_model)
    finally:
        peft_model.unload()  # removes the peft layers without merging: base weights untouched
    return expert, losses


def train_gates(base: BaseModel, expert: Expert, examples: list[TokenizedExample],
                config: TrainConfig) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """Train one zero-initialised gate per module with base and expert frozen.

    Returns gates (module -> (d_in,)), mean activations (or None) and summary numbers.
    """
    from tqdm import tqdm

    pad = base.tokenizer.pad_token_id
    summary: dict[str, float | int] = {}
    with gated_experts(base.model, expert.modules, expert.adapter, expert.scaling) as layers:
        params = [layer.gate for layer in layers.values()]
        data = batches(examples, config.batch_size, pad, config.seed + 1)
        losses = _optimise(base.model, params, data, config.gate_steps, config.gate_lr, config,
                           "gate", accumulation=config.gate_accumulation)
        gates = gate_vectors(layers)
        summary.update(_loss_summary("gate", losses))
        activations = None
        if config.activations:
            subset = examples[:config.activation_examples]
            passes = tqdm(one_pass(subset, _ACTIVATION_BATCH, pad), desc="activations",
                          unit="batch", total=-(-len(subset) // _ACTIVATION_BATCH),
                          file=sys.stderr, dynamic_ncols=True)
            with autocast(config.precision, autocast_device(base.model)):
                activations, tokens = mean_input_activations(base.model, layers, passes)
            summary["activation_tokens"] = tokens
    return gates, activations, summary


def _recipe_flags(config: TrainConfig, base: BaseModel) -> dict[str, int]:
    """The manifest's numeric record of how training ran: bf16 matmuls or base, LR decay."""
    weights = next(base.model.parameters()).dtype
    bf16 = resolve_precision(config.precision) == "bf16" or weights == torch.bfloat16
    return {"bf16": int(bf16),
            "lr_decay": int(config.schedule == "linear")}


def _loss_summary(prefix: str, losses: list[float]) -> dict[str, float | int | list]:
    tail = losses[-min(10, len(losses)):]  # final loss: mean of the last steps, less noisy
    return {f"{prefix}_steps": len(losses), f"{prefix}_loss_first": losses[0],
            f"{prefix}_loss_final": sum(tail) / len(tail),
            f"{prefix}_loss_curve": loss_curve(losses)}


def loss_curve(losses: list[float], points: int = MAX_CURVE_POINTS) -> list[float]:
    """The per-step losses, evenly subsampled to at most `points` (the manifest's bound),
    rounded to 5 significant digits: the curve's shape, not a fingerprint of the data."""
    stride = max(1, -(-len(losses) // points))
    return [float(f"{loss:.5g}") for loss in losses[::stride]]


def _check_output(out: str, name: str | None) -> tuple[Path, str]:
    target = Path(out)
    if target.exists():
        raise InvalidArgument(f"--out {target} already exists: choose a new folder or remove "
                              "the old one", field="out")
    name = name if name is not None else target.name
    check_name(name, "expert name", "name", " (set --name)")
    return target, name


def check_gates_moved(gates: dict[str, torch.Tensor]) -> None:
    """Refuse to ship gates (module -> (d_in,)) that training left at exactly zero.

    A gate gets gradient only through its module's delta: a zero gate means that module's
    expert delta is zero, and the coordinator would refuse the bundle anyway.
    """
    check_gates_trained(gates.items(), _gate_left_at_zero)


def _gate_left_at_zero(module: str, count: int) -> InvalidArgument:
    more = f" (and {count - 1} more modules)" if count > 1 else ""
    return InvalidArgument(
        f"gate training left the gate of module {module}{more} all zero: the "
        "expert's delta there is zero, so the gate got no gradient; train the expert so "
        "that every adapted module changes (more --steps, or a trained --adapter)",
        field="gate")


def _write(expert: Expert, base: BaseModel, name: str, out: Path, gates: dict,
           activations: dict | None, training: dict) -> Bundle:
    spec = base.spec()
    bundle = bundle_from_expert(expert, spec, name, gates=gates, activations=activations,
                                training=training)
    validate_bundle(bundle, spec)
    save_bundle(bundle, out)
    return bundle


def train_bundle(base_name: str, data: str, out: str, name: str | None,
                 config: TrainConfig) -> Bundle:
    """`gaggle-contributor train`: expert, then gate, then an atomic write of the bundle
    folder `out`; returns the bundle written."""
    target, name = _check_output(out, name)
    set_threads(config.threads)
    records = read_jsonl(data)
    base = load_training_base(base_name, config)
    started, started_at = time.perf_counter(), time.time()
    examples = tokenize(records, base.tokenizer, config.max_length)
    expert, losses = train_expert(base, examples, config)
    expert_seconds = time.perf_counter() - started
    gates, activations, gate_summary = train_gates(base, expert, examples, config)
    check_gates_moved(gates)
    training = {**token_counts(examples), **_loss_summary("expert", losses), **gate_summary,
                **_recipe_flags(config, base),
                "expert_seconds": round(expert_seconds, 2),
                "wall_seconds": round(time.perf_counter() - started, 2),
                "started_at": round(started_at, 3), "finished_at": round(time.time(), 3)}
    return _write(expert, base, name, target, gates, activations, training)


def recycle_bundle(base_name: str, adapter: str, data: str, out: str, name: str | None,
                   config: TrainConfig) -> Bundle:
    """`gaggle-contributor gate`: a saved peft adapter (or a bundle's expert) with a newly
    trained gate, written atomically to the bundle folder `out`; returns the bundle written."""
    target, name = _check_output(out, name)
    set_threads(config.threads)
    records = read_jsonl(data)
    base = load_training_base(base_name, config)
    expert = load_expert(adapter, base)
    check_trained(expert, adapter)  # a zero delta would leave the gate at zero
    started, started_at = time.perf_counter(), time.time()
    examples = tokenize(records, base.tokenizer, config.max_length)
    gates, activations, gate_summary = train_gates(base, expert, examples, config)
    check_gates_moved(gates)
    training = {**token_counts(examples), "expert_steps": 0, **gate_summary,
                **_recipe_flags(config, base),
                "wall_seconds": round(time.perf_counter() - started, 2),
                "started_at": round(started_at, 3), "finished_at": round(time.time(), 3)}
    return _write(expert, base, name, target, gates, activations, training)
