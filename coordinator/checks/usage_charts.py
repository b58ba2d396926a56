"""Pictures of a version's expert usage (coordinator.checks.usage's report), written beside it so
that MLflow shows them with the logged model: a layer x expert heatmap of top-1 shares, and
each expert's share against its uniform share, flagged experts in red."""

from __future__ import annotations

from pathlib import Path

HEATMAP = "usage_heatmap.png"
SHARES = "usage_shares.png"


def write_usage_charts(report: dict, folder: Path) -> list[Path]:
    """Draw both charts of a usage report into `folder`; the paths written."""
    import matplotlib  # 1.4 s to import: only when a version's usage is first measured

    matplotlib.use("Agg")  # no display on servers and in CI
    from matplotlib import pyplot as plt

    written = []
    by_layer = report.get("by_layer") or {}
    if by_layer.get("experts"):
        written.append(_heatmap(plt, by_layer, folder / HEATMAP))
    if report.get("experts"):
        written.append(_shares(plt, report["experts"], folder / SHARES))
    return written


def _heatmap(plt, by_layer: dict, path: Path) -> Path:
    experts, layers = by_layer["experts"], by_layer["layers"]
    values = [[float("nan") if v is None else v for v in row] for row in by_layer["shares"]]
    figure, axes = plt.subplots(figsize=(2.5 + 0.35 * len(experts), 1.5 + 0.2 * len(layers)))
    image = axes.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(experts)), experts, rotation=90)
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_title("top-1 share of routed tokens")
    figure.colorbar(image, ax=axes)
    return _save(plt, figure, path)


def _shares(plt, experts: dict, path: Path) -> Path:
    names = sorted(experts, key=lambda n: -experts[n]["share"])[:40]
    figure, axes = plt.subplots(figsize=(2.5 + 0.35 * len(names), 3.5))
    colours = ["tab:red" if experts[n]["flagged"] else "tab:blue" for n in names]
    axes.bar(range(len(names)), [experts[n]["share"] for n in names], color=colours,
             label="share (red: flagged)")
    axes.plot(range(len(names)), [experts[n]["uniform"] for n in names], "k_",
              markersize=14, label="uniform share")
    axes.set_xticks(range(len(names)), names, rotation=90)
    axes.set_ylabel("top-1 share")
    axes.legend()
    return _save(plt, figure, path)


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=90)
    plt.close(figure)
    return path
