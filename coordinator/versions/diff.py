"""`diff` between two router versions, in the spirit of Git-Theta: experts added, removed and
changed (same name, new content), and for a changed expert which modules changed and by how
much (relative norm of the change of its delta, and of its gate).

A changed expert is read from its bundle in the store (a version by reference keeps its
experts' bundles as long as the version is kept), or from a format-1 version's stacked router.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from coordinator.store.versions import VersionStore, expert_changes
from protocol.bundle import load_bundle, lora_scaling
from routing.version import EXPERTS_DIR, STACKED_DIR, VersionManifest, load_stacked


@dataclass(frozen=True)
class ModuleChange:
    """How one module of a changed expert moved."""

    module: str
    status: str  # "changed", "unchanged", "added" (only in new), "removed" (only in old)
    delta: float | None = None  # ||dW_new - dW_old||_F / ||dW_old||_F (inf if old was 0)
    gate: float | None = None  # ||v_new - v_old|| / ||v_old||
    kinds: str = ""  # "lora", or "lora -> ia3_out" when the kind changed


@dataclass
class VersionDiff:
    """Expert-level and module-level changes from version `old` to `new`."""

    old: str
    new: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[ModuleChange]] = field(default_factory=dict)  # name -> modules
    expert_ids: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"old": self.old, "new": self.new, "added": self.added, "removed": self.removed,
                "changed": {name: [asdict(m) for m in modules]
                            for name, modules in self.changed.items()},
                "expert_ids": {k: list(v) for k, v in self.expert_ids.items()}}


# A change below this relative norm is float noise from re-saving, not a real change.
_TOLERANCE = 1e-6


def diff_versions(store_root: str | Path, old: str, new: str) -> VersionDiff:
    """Compare two versions of a store (ids or unique prefixes)."""
    versions = VersionStore(store_root)
    old, new = versions.resolve(old), versions.resolve(new)
    before, after = versions.manifest(old), versions.manifest(new)
    changes = expert_changes(before, after)
    result = VersionDiff(old=old, new=new, added=changes["added"], removed=changes["removed"])
    ids_before = {e.name: e.expert_id for e in before.experts}
    ids_after = {e.name: e.expert_id for e in after.experts}
    for name in result.added + result.removed:
        result.expert_ids[name] = (ids_before.get(name), ids_after.get(name))
    for name, old_id, new_id in changes["changed"]:
        result.expert_ids[name] = (old_id, new_id)
        result.changed[name] = module_changes(_parts(versions, before, name, old_id),
                                              _parts(versions, after, name, new_id))
    return result


def _parts(versions: VersionStore, manifest: VersionManifest, name: str,
           expert_id: str) -> dict[str, dict]:
    """module -> {"kind", "gate", "delta"} of one expert of a version."""
    if manifest.format == 1:
        return _expert_modules(load_stacked(versions.folder(manifest.version_id) / STACKED_DIR),
                               name)
    bundle = load_bundle(versions.objects.local_folder(EXPERTS_DIR, expert_id))
    scaling = lora_scaling(bundle.manifest)
    parts = {}
    for spec in bundle.manifest.modules:
        if spec.kind == "lora":
            delta = (scaling * bundle.adapter[f"{spec.name}.lora_B"],
                     bundle.adapter[f"{spec.name}.lora_A"])
        else:
            delta = ((bundle.adapter[f"{spec.name}.ia3"] - 1.0).unsqueeze(1), torch.ones(1, 1))
        parts[spec.name] = {"kind": spec.kind, "gate": bundle.gates[spec.name], "delta": delta}
    return parts


def module_changes(old_parts: dict[str, dict], new_parts: dict[str, dict]) -> list[ModuleChange]:
    """Per-module change between one expert's parts in two versions."""
    out = []
    for module in sorted(set(old_parts) | set(new_parts)):
        if module not in new_parts:
            out.append(ModuleChange(module, "removed", kinds=old_parts[module]["kind"]))
        elif module not in old_parts:
            out.append(ModuleChange(module, "added", kinds=new_parts[module]["kind"]))
        else:
            out.append(_compare(module, old_parts[module], new_parts[module]))
    return out


def _expert_modules(router, name: str) -> dict[str, dict]:
    """module -> {"kind", "gate", "delta"} for expert `name`; delta as low-rank factors."""
    parts = {}
    for module_name, module in router.modules.items():
        if name not in module.experts:
            continue
        row = module.experts.index(name)
        kind = module.kinds[row]
        if kind == "lora":
            # dW = s B A = left @ right with left (d_out, r), right (r, d_in)
            delta = (module.scaling[row] * module.lora_B[row], module.lora_A[row])
        else:
            vector = (module.ia3_out if kind == "ia3_out" else module.ia3_in)[row]
            delta = (vector.unsqueeze(1), torch.ones(1, 1))  # (l - 1) as a (n, 1) matrix
        parts[module_name] = {"kind": kind, "gate": module.keys[row], "delta": delta}
    return parts


def _compare(module: str, old: dict, new: dict) -> ModuleChange:
    gate = _relative(torch.linalg.vector_norm(new["gate"] - old["gate"]),
                     torch.linalg.vector_norm(old["gate"]))
    if old["kind"] != new["kind"]:
        return ModuleChange(module, "changed", delta=None, gate=gate,
                            kinds=f"{old['kind']} -> {new['kind']}")
    (left_new, right_new), (left_old, right_old) = new["delta"], old["delta"]
    # ||L1 R1 - L0 R0||_F from the factors: stack them into one low-rank product.
    difference = _lowrank_norm(torch.cat([left_new, -left_old], dim=1),
                               torch.cat([right_new, right_old], dim=0))
    delta = _relative(difference, _lowrank_norm(left_old, right_old))
    status = "changed" if max(delta, gate) > _TOLERANCE else "unchanged"
    return ModuleChange(module, status, delta=delta, gate=gate, kinds=old["kind"])


def _lowrank_norm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """||left @ right||_F without forming it: left (m, r), right (r, n)."""
    left, right = left.double(), right.double()
    squared = ((left.T @ left) * (right @ right.T)).sum()
    return squared.clamp_min(0).sqrt()


def _relative(change: torch.Tensor, reference: torch.Tensor) -> float:
    if float(reference) == 0.0:
        return 0.0 if float(change) == 0.0 else float("inf")
    return float(change / reference)
