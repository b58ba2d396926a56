"""The routing methods by name: the one registry that route(), the routed layers and callers use.

Formulas: docs/methods.md. `single:<expert name>` names its
expert in the method string itself.
"""

from __future__ import annotations

# Per-token top-k: every token is scored against one key per expert.
SCORED_METHODS = ("phatgoose", "phatgoose_centred", "arrow", "average_activation")
# Routed from the tokens alone with fixed router tensors: no expert named by the caller, no
# merge per call (smear), no expert per example (retrieval).
TOKEN_METHODS = (*SCORED_METHODS, "uniform_merge")
# Every method route() accepts.
METHODS = (*TOKEN_METHODS, "retrieval", "smear", "single:<expert name>")
# Methods whose keys are vectors a contributor shipped, and which vector: route() refuses a
# zero row of them (arrow's keys come from the LoRA weights, not from a shipped vector).
SHIPPED_KEY = {"phatgoose": "gate", "phatgoose_centred": "gate", "smear": "gate",
               "average_activation": "mean activation"}
# The plain top-k method over each kind of shipped key (gates, mean activations): the pair
# compared when asking whether the keys tell the experts apart.
KEY_METHODS = ("phatgoose", "average_activation")
# The key shard fields (routing.keys) each method scores with; the rest need none.
KEY_FIELDS_OF = {"phatgoose": ("keys",), "phatgoose_centred": ("keys", "activations"),
                 "arrow": ("prototypes",), "average_activation": ("activations",),
                 "smear": ("keys",)}
