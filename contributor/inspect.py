"""`gaggle-contributor inspect`: show a bundle's manifest, modules and sizes, and validate it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from protocol.bundle import MANIFEST, Bundle, load_bundle
from protocol.errors import GaggleError


def _describe_manifest(root: Path) -> None:
    """Print the manifest's header fields, even when the bundle does not validate."""
    try:
        raw = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        print(f"manifest: unreadable ({root / MANIFEST})")
        return
    if not isinstance(raw, dict):
        print("manifest: not a JSON object")
        return
    base = raw.get("base_model") if isinstance(raw.get("base_model"), dict) else {}
    print(f"name:           {raw.get('name')}")
    print(f"method:         {raw.get('method')}")
    fingerprint = str(base.get("fingerprint"))[:16]
    print(f"base model:     {base.get('name')} (fingerprint {fingerprint}...)")
    print(f"format version: {raw.get('format_version')}")
    print(f"peft:           {json.dumps(raw.get('peft'), sort_keys=True)}")
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    for key in sorted(training):
        print(f"training.{key}: {training[key]}")


def _describe_files(root: Path) -> None:
    print("files:")
    for path in sorted(root.iterdir()):
        print(f"  {path.name:26s} {path.stat().st_size:>12,d} bytes")


def _describe_modules(bundle: Bundle) -> None:
    params = {name: 0 for name in bundle.modules}
    for key, tensor in bundle.adapter.items():
        params[key.rsplit(".", 1)[0]] += tensor.numel()
    print(f"modules ({len(bundle.modules)}):")
    print(f"  {'name':48s} {'kind':8s} {'d_in':>6s} {'d_out':>6s} {'params':>9s} {'|gate|':>8s}")
    for module in bundle.manifest.modules:
        gate_norm = float(bundle.gates[module.name].norm())
        print(f"  {module.name:48s} {module.kind:8s} {module.d_in:6d} {module.d_out:6d} "
              f"{params[module.name]:9,d} {gate_norm:8.3f}")
    total = sum(params.values())
    gates = sum(t.numel() for t in bundle.gates.values())
    print(f"adapter parameters: {total:,d}; gate parameters: {gates:,d}; "
          f"activations: {'yes' if bundle.activations is not None else 'no'}")


def run_inspect_command(args: argparse.Namespace) -> int:
    """Print what a bundle holds; exit 0 if it validates, 1 if it does not."""
    root = Path(args.bundle)
    if not root.is_dir():
        print(f"error: {root} is not a bundle folder")
        return 1
    _describe_manifest(root)
    _describe_files(root)
    spec = None
    if args.base:
        from routing.base import load_base

        spec = load_base(args.base).spec()
    try:
        bundle = load_bundle(root, spec)
    except GaggleError as err:
        print(f"validates: NO: {err}")
        return 1
    _describe_modules(bundle)
    against = f" against base model {spec.name!r}" if spec is not None else \
        " (format only; pass --base to check the base model)"
    print(f"validates: yes{against}")
    print(f"expert id: {bundle.expert_id}")
    return 0
