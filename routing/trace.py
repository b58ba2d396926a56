"""Opt-in routing trace: which experts each token picked at each module, and a usage heatmap.

    with capture_routing(model) as trace:
        model(input_ids)
    plot_usage(trace, "usage.png")     # layers x experts, share of top-k slots
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from routing.router import routing_state

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class RoutingTrace:
    """Captured choices: module -> list of (N, k) collection expert ids (-1: no expert)."""

    experts: list[str]  # collection expert names; ids index into this list
    records: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def choices(self, module: str) -> torch.Tensor:
        """(tokens over all captured calls, k) expert ids chosen at one module."""
        return torch.cat(self.records[module]) if module in self.records \
            else torch.empty(0, 1, dtype=torch.long)

    def usage(self) -> tuple[list[str], torch.Tensor]:
        """(layer labels, counts (L, experts)): top-k slots won per expert, per block.

        Modules of one transformer block ("...layers.<i>....") are summed into one row;
        modules outside blocks get a row of their own.
        """
        rows: dict[str, torch.Tensor] = {}
        for module, parts in self.records.items():
            ids = torch.cat(parts).reshape(-1)
            ids = ids[ids >= 0]
            label = _layer_label(module)
            counts = torch.bincount(ids, minlength=len(self.experts)).float()
            rows[label] = rows.get(label, torch.zeros(len(self.experts))) + counts
        labels = sorted(rows, key=_label_order)
        matrix = torch.stack([rows[k] for k in labels]) if labels \
            else torch.zeros(0, len(self.experts))
        return labels, matrix


def _layer_label(module: str) -> str:
    match = _LAYER_RE.search(module)
    return f"layer {int(match.group(1))}" if match else module


def _label_order(label: str) -> tuple[int, str]:
    return (int(label.split()[1]), "") if label.startswith("layer ") else (1 << 30, label)


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[RoutingTrace]:
    """Record the experts chosen per token per module during the calls inside the block."""
    state = routing_state(model)
    trace = RoutingTrace(experts=list(state.config.get("experts", [])))
    previous = state.trace
    state.trace = trace.records
    try:
        yield trace
    finally:
        state.trace = previous


def plot_usage(trace: RoutingTrace, path: str | Path, *, title: str | None = None) -> Path:
    """Draw expert usage per layer as a PNG heatmap (rows: layers, columns: experts).

    Each cell is the share of that layer's top-k slots won by the expert (rows sum to 1).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    from matplotlib import pyplot as plt

    labels, counts = trace.usage()
    if not labels:
        raise ValueError("the trace is empty: run the model inside capture_routing(model) "
                         "before plotting")
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1.0)
    width = min(4 + 0.25 * len(trace.experts), 40)
    height = min(2 + 0.3 * len(labels), 40)
    figure, axes = plt.subplots(figsize=(width, height))
    image = axes.imshow(shares.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    axes.set_yticks(range(len(labels)), labels)
    if len(trace.experts) <= 64:
        axes.set_xticks(range(len(trace.experts)), trace.experts, rotation=90)
    axes.set_xlabel("expert")
    axes.set_title(title or "share of top-k routing slots per layer")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png", dpi=100)
    plt.close(figure)
    return target
