"""Whether a checked version may go live, and which experts a failed check names.

A version goes live (current, `latest` in MLflow, promotable) only when its usage check ran,
every logit on the public prompts is finite and every token found a finite mixture, and no
expert takes more than the flag allows (coordinator.checks.usage). The experts a failure
names are quarantined: left out of new versions until an operator releases them.
- Non-finite outputs: the experts new in this version (added, or replaced under their name)
  against the version it would follow; the older ones were already live without them.
- Routing capture: the flagged experts.
- A usage check that could not run names nobody: the version is rejected, the next one is
  checked again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from routing.version import VersionManifest

MAX_NAMES = 5  # expert names quoted in a reason


@dataclass(frozen=True)
class Verdict:
    """The outcome of a version's checks."""

    live: bool
    reason: str = ""  # one line, for `versions` and MLflow
    # expert id -> why it is quarantined, in a line about it alone (its contributor reads it)
    culprits: dict[str, str] = field(default_factory=dict)


def judge(manifest: VersionManifest, usage: dict, parent: VersionManifest | None) -> Verdict:
    """The verdict of a version's usage report; `parent` is the live version it follows."""
    if "error" in usage:
        return Verdict(False, f"its usage check did not run ({usage['error'][:200]})")
    bad = int(usage.get("non_finite_logits", 0))
    unrouted = float(usage.get("unrouted_share", 0.0))
    if bad or unrouted:
        before = set(parent.expert_ids) if parent else set()
        new = [e for e in manifest.experts if e.expert_id not in before]
        why = (f"{bad} of {usage.get('tokens', 0)} tokens on the public prompts gave "
               f"non-finite logits (unrouted share {unrouted:.2f})")
        return Verdict(False, f"{why}; new in it: {_names(e.name for e in new)}",
                       {e.expert_id: f"the first version with it failed: {why}" for e in new})
    flagged = set(usage.get("flagged", []))
    if flagged:
        named = [e for e in manifest.experts if e.name in flagged]
        share = {e.expert_id: usage["experts"][e.name]["share"] for e in named}
        shares = ", ".join(f"{e.name} {share[e.expert_id]:.2f}" for e in named[:MAX_NAMES])
        return Verdict(False, f"routing capture: {shares} of the top-1 choices on the public "
                              "prompts, over the flag",
                       {i: f"it took {s:.2f} of the top-1 routing choices on the public "
                           "prompts, over the flag (routing capture)" for i, s in share.items()})
    return Verdict(True)


def _names(names) -> str:
    names = list(names)
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "") \
        if names else "none"
