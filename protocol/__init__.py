"""The contract both roles share: the expert bundle, its validation, the errors, the gRPC API."""

from protocol.bundle import (
    FORMAT_VERSION,
    BaseSpec,
    Bundle,
    Manifest,
    ModuleSpec,
    load_bundle,
    save_bundle,
    validate_bundle,
)
from protocol.errors import GaggleError

__all__ = [
    "FORMAT_VERSION",
    "BaseSpec",
    "Bundle",
    "GaggleError",
    "Manifest",
    "ModuleSpec",
    "load_bundle",
    "save_bundle",
    "validate_bundle",
]
