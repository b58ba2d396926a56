"""What a bundle holds, as lines of text: its manifest, files, modules and sizes."""

from __future__ import annotations

import json
from pathlib import Path

from protocol.bundle import MANIFEST, Bundle


def manifest_lines(root: Path) -> list[str]:
    """The manifest's header fields, even when the bundle does not validate."""
    try:
        raw = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return [f"manifest: unreadable ({root / MANIFEST})"]
    if not isinstance(raw, dict):
        return ["manifest: not a JSON object"]
    base = raw.get("base_model") if isinstance(raw.get("base_model"), dict) else {}
    fingerprint = str(base.get("fingerprint"))[:16]
    lines = [f"name:           {raw.get('name')}",
             f"method:         {raw.get('method')}",
             f"base model:     {base.get('name')} (fingerprint {fingerprint}...)",
             f"format version: {raw.get('format_version')}",
             f"peft:           {json.dumps(raw.get('peft'), sort_keys=True)}"]
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    lines += [f"training.{key}: {training[key]}" for key in sorted(training)]
    return lines


def file_lines(root: Path) -> list[str]:
    """Every file of the bundle folder with its size."""
    return ["files:"] + [f"  {path.name:26s} {path.stat().st_size:>12,d} bytes"
                         for path in sorted(root.iterdir())]


def module_lines(bundle: Bundle) -> list[str]:
    """A table of the adapted modules (kind, shape, parameters, gate norm), then totals."""
    params = {name: 0 for name in bundle.modules}
    for key, tensor in bundle.adapter.items():
        params[key.rsplit(".", 1)[0]] += tensor.numel()
    lines = [f"modules ({len(bundle.modules)}):",
             f"  {'name':48s} {'kind':8s} {'d_in':>6s} {'d_out':>6s} {'params':>9s} "
             f"{'|gate|':>8s}"]
    for module in bundle.manifest.modules:
        gate_norm = float(bundle.gates[module.name].norm())
        lines.append(f"  {module.name:48s} {module.kind:8s} {module.d_in:6d} {module.d_out:6d} "
                     f"{params[module.name]:9,d} {gate_norm:8.3f}")
    total = sum(params.values())
    gates = sum(t.numel() for t in bundle.gates.values())
    lines.append(f"adapter parameters: {total:,d}; gate parameters: {gates:,d}; "
                 f"activations: {'yes' if bundle.activations is not None else 'no'}")
    return lines
