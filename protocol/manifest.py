"""The expert manifest: one closed, versioned JSON schema, read strictly, every value bounded.

Schema, format_version 1 (every key required, no other key allowed, at any level)::

    format_version  1
    name            the expert's name (protocol.names.NAME_RULE)
    base_model      {"name": label, "fingerprint": 64 lowercase hex digits}
                    The label is informational (printable ASCII, at most 256 characters):
                    the fingerprint is the base's identity, and the coordinator records its own
                    base name for everything it builds.
    method          "lora" or "ia3"
    peft            lora: {"rank": 1..1024, "alpha": number, "scaling": number in (0, 1024],
                           "target_modules": [module suffix, ...]}
                    ia3:  {"target_modules": [...], "feedforward_modules": [...]}
    modules         1..16384 of {"name": dotted module path, "kind", "d_in", "d_out"}
    training        numeric figures under the names in TRAINING_FIELDS, none other
    files           {tensor file name: sha256}

Strings are pattern-checked and bounded; numbers are finite and small enough to stay finite
in float32 (every number here may meet a float32 tensor). Nesting deeper than the schema's
and duplicate keys are refused before the JSON becomes Python objects, so no parser's choice
between two values of one key (or its recursion limit) matters. The expert id is the sha256
of `canonical_bytes()`, which is also exactly what `save_bundle` writes and what the
coordinator stores: the id covers every stored byte of the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import InvalidBundle
from protocol.names import NAME_RULE, is_name, preview

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ADAPTER = "adapter.safetensors"
GATES = "gates.safetensors"
ACTIVATIONS = "activations.safetensors"
TENSOR_FILES = (ADAPTER, GATES, ACTIVATIONS)
METHODS = ("lora", "ia3")
# How each kind of module adds its delta (docs/methods.md): a LoRA product, or an (IA)^3 vector
# scaling the module's output (k/v projections) or its input (feed-forward down projection).
MODULE_KINDS = {"lora": ("lora",), "ia3": ("ia3_out", "ia3_in")}
PEFT_FIELDS = {"lora": ("alpha", "rank", "scaling", "target_modules"),
               "ia3": ("feedforward_modules", "target_modules")}

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 3  # root -> modules -> one module; root -> peft / training -> a list
MAX_MODULES = 16_384  # a 70B Llama adapts 80 layers x 7 linears = 560
MAX_TARGETS = 256  # peft target_modules / feedforward_modules entries
MAX_RANK = 1024
MAX_SCALING = 1024.0  # LoRA's s in dW = s B A; peft's alpha/r and rsLoRA stay far below
MAX_DIM = 1 << 20  # d_in, d_out of one linear layer
MAX_NUMBER = 1e30  # |x| of any number: finite in float32 (max 3.4e38) with room to multiply
MAX_COUNT = 2**53  # integers stay exact as float64
MAX_CURVE_POINTS = 1000  # loss curves: one point per step, subsampled past this
MAX_BASE_NAME = 256
MAX_MODULE_NAME = 256  # a module path's characters (peft targets, adapted modules)

_BASE_NAME_RE = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,255}$")  # MAX_BASE_NAME printable
# A dotted module path; the lookahead bounds its length.
_MODULE_RE = re.compile(rf"^(?=.{{1,{MAX_MODULE_NAME}}}$)[A-Za-z0-9_]+(\.[A-Za-z0-9_]+){{0,31}}$")
SHA256_RE = re.compile(r"[0-9a-f]{64}")  # a sha256 digest (expert ids, files): fullmatch it

# The training figures a manifest may carry, each with its kind: numbers only, so no text
# from the private data can ride along, and names from this list only, so a key cannot spell
# text either (the keys become MLflow metric names).
COUNT, FLAG, NUMBER, CURVE = "count", "flag", "number", "curve"
TRAINING_FIELDS = {
    "examples": COUNT,  # training examples
    "tokens": COUNT,  # all tokens of those examples
    "target_tokens": COUNT,  # tokens the loss is on
    "activation_tokens": COUNT,  # tokens behind the mean activations
    "expert_steps": COUNT,
    "gate_steps": COUNT,
    "expert_loss_first": NUMBER,
    "expert_loss_final": NUMBER,
    "gate_loss_first": NUMBER,
    "gate_loss_final": NUMBER,
    "expert_loss_curve": CURVE,  # loss per step (evenly subsampled past MAX_CURVE_POINTS)
    "gate_loss_curve": CURVE,
    "bf16": FLAG,  # matmuls ran under bf16 autocast
    "lr_decay": FLAG,  # linear learning-rate decay instead of constant
    "expert_seconds": NUMBER,
    "wall_seconds": NUMBER,
    "started_at": NUMBER,  # unix seconds, the contributor's clock
    "finished_at": NUMBER,
}


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted `nn.Linear` of the base model."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "lora", "ia3_out" (scales W x) or "ia3_in" (scales x before W)
    d_in: int  # input features of the base linear layer
    d_out: int  # output features of the base linear layer


@dataclass
class Manifest:
    """The JSON description of a bundle. Holds no text, labels or samples of the data."""

    name: str
    base_model: str
    base_fingerprint: str
    method: str  # "lora" or "ia3"
    peft: dict  # PEFT_FIELDS[method]
    modules: list[ModuleSpec]
    training: dict = field(default_factory=dict)  # TRAINING_FIELDS
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, set on save
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version, "name": self.name,
            "base_model": {"name": self.base_model, "fingerprint": self.base_fingerprint},
            "method": self.method, "peft": dict(self.peft),
            "modules": [{"name": m.name, "kind": m.kind, "d_in": m.d_in, "d_out": m.d_out}
                        for m in self.modules],
            "training": dict(self.training), "files": dict(self.files),
        }

    @classmethod
    def from_json(cls, raw: object) -> Manifest:
        """Check a decoded manifest against the schema; InvalidBundle naming the field."""
        raw = _object(raw, "manifest", ("base_model", "files", "format_version", "method",
                                        "modules", "name", "peft", "training"))
        if type(raw["format_version"]) is not int or raw["format_version"] != FORMAT_VERSION:
            raise InvalidBundle(
                f"manifest.format_version is {preview(raw['format_version'])}; this gaggle "
                f"reads version {FORMAT_VERSION}: repackage the bundle with a matching "
                "gaggle-contributor", field="format_version")
        name = raw["name"]
        if not is_name(name):
            raise InvalidBundle(f"manifest.name {preview(name)} is not allowed: use "
                                f"{NAME_RULE}", field="name")
        method = raw["method"]
        if method not in METHODS:
            raise InvalidBundle(f"manifest.method {preview(method)} is unknown: use one of "
                                f"{list(METHODS)}", field="method")
        base = _object(raw["base_model"], "base_model", ("fingerprint", "name"))
        return cls(
            name=name,
            base_model=_string(base["name"], _BASE_NAME_RE, "base_model.name",
                               f"printable ASCII, at most {MAX_BASE_NAME} characters"),
            base_fingerprint=_string(base["fingerprint"], SHA256_RE, "base_model.fingerprint",
                                     "64 lowercase hex digits"),
            method=method,
            peft=_peft(raw["peft"], method),
            modules=_modules(raw["modules"], method),
            training=_training(raw["training"]),
            files=_files(raw["files"]),
        )

    def canonical_bytes(self) -> bytes:
        """The manifest as stored and hashed: sorted keys, no whitespace, ASCII."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()

    @property
    def expert_id(self) -> str:
        """Content address of the bundle: sha256 of the canonical manifest, which holds the
        sha256 of every tensor file, so it names the tensors' bytes too."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


def check_manifest(manifest: Manifest) -> None:
    """Check a manifest built in code against the schema, through its JSON form: the one
    path every manifest takes, whether it was read from a file or packaged here."""
    Manifest.from_json(manifest.to_json())


def parse_manifest(data: bytes) -> Manifest:
    """Read manifest.json's bytes strictly: size, depth and duplicate keys first, then the
    schema. Raises InvalidBundle naming what is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise InvalidBundle(f"manifest.json is {len(data)} bytes, over the limit of "
                            f"{MAX_MANIFEST_BYTES}", field="manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidBundle("manifest.json is not valid UTF-8", field="manifest") from None
    try:
        raw = strict_json(text, MAX_DEPTH)
    except ValueError as err:
        raise InvalidBundle(f"manifest.json is not valid UTF-8 JSON: {err}",
                            field="manifest") from None
    return Manifest.from_json(raw)


def strict_json(text: str, max_depth: int) -> object:
    """json.loads for untrusted text: refuses nesting deeper than `max_depth` (checked before
    parsing), duplicate keys, NaN and Infinity. ValueError says which, in at most ~200
    characters."""
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"it nests {depth} levels deep, more than the {max_depth} allowed")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except ValueError as err:  # bad JSON, a duplicate key, NaN, or an int of 4,300+ digits
        raise ValueError(str(err)[:200]) from None


def read_manifest(path: Path) -> Manifest:
    """Read and check a manifest.json file (its size first, before reading it in)."""
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InvalidBundle(f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes",
                            field="manifest")
    return parse_manifest(path.read_bytes())


# One token per match: a JSON string (to its closing quote, or to the end of the text when it
# never closes) or a bracket. Each character is matched once, so the scan stays linear even
# for text built to make a string pattern retry from every quote.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def json_depth(text: str) -> int:
    """The deepest nesting of objects and arrays in JSON text, without parsing it (so a
    nesting bomb costs one linear scan, not a recursion)."""
    depth = deepest = 0
    for token in _TOKENS.findall(text):
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {preview(key)} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


# -- fields ------------------------------------------------------------------------------

def _object(raw: object, where: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(raw, dict):
        raise InvalidBundle(f"manifest.{where} must be a JSON object, got "
                            f"{type(raw).__name__}", field=where)
    missing, unknown = sorted(set(keys) - set(raw)), sorted(set(raw) - set(keys))
    if missing or unknown:
        raise InvalidBundle(
            f"manifest.{where}: missing {[preview(k) for k in missing[:5]]}, unknown "
            f"{[preview(k) for k in unknown[:5]]}; it holds exactly {', '.join(keys)}",
            field=where)
    return raw


def _string(value: object, pattern: re.Pattern, where: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidBundle(f"manifest.{where} {preview(value)} is not allowed: use {rule}",
                            field=where)
    return value


def _integer(value: object, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidBundle(f"manifest.{where} must be an integer in [{low}, {high}], got "
                            f"{preview(value)}", field=where)
    return value


def _number(value: object, where: str, low: float = -MAX_NUMBER,
            high: float = MAX_NUMBER) -> int | float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and _finite(value) \
        and low <= value <= high
    if not ok:
        raise InvalidBundle(f"manifest.{where} must be a finite number in [{low:g}, "
                            f"{high:g}], got {preview(value)}", field=where)
    return value


def _finite(value: int | float) -> bool:
    """math.isfinite that says False, instead of raising, for ints too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _peft(raw: object, method: str) -> dict:
    peft = _object(raw, "peft", PEFT_FIELDS[method])
    for key in ("target_modules", "feedforward_modules"):
        if key in peft:
            _target_list(peft[key], f"peft.{key}")
    if method == "lora":
        _integer(peft["rank"], "peft.rank", 1, MAX_RANK)
        _number(peft["alpha"], "peft.alpha")
        scaling = _number(peft["scaling"], "peft.scaling", 0.0, MAX_SCALING)
        if scaling == 0:
            raise InvalidBundle("manifest.peft.scaling must be positive, got 0",
                                field="peft.scaling")
    return peft


def _target_list(raw: object, where: str) -> None:
    if not isinstance(raw, list) or len(raw) > MAX_TARGETS:
        raise InvalidBundle(f"manifest.{where} must be a list of at most {MAX_TARGETS} module "
                            "names", field=where)
    for index, value in enumerate(raw):
        _string(value, _MODULE_RE, f"{where}[{index}]",
                f"a dotted module name of at most {MAX_MODULE_NAME} characters")


def _modules(raw: object, method: str) -> list[ModuleSpec]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_MODULES:
        raise InvalidBundle(f"manifest.modules must list 1 to {MAX_MODULES} adapted modules",
                            field="modules")
    modules, seen = [], set()
    for index, entry in enumerate(raw):
        where = f"modules[{index}]"
        entry = _object(entry, where, ("d_in", "d_out", "kind", "name"))
        name = _string(entry["name"], _MODULE_RE, f"{where}.name",
                       f"a dotted module path (letters, digits, '_' and '.') of at most "
                       f"{MAX_MODULE_NAME} characters")
        if name in seen:
            raise InvalidBundle(f"manifest.{where}.name {preview(name)} is listed twice",
                                field="modules")
        seen.add(name)
        if entry["kind"] not in MODULE_KINDS[method]:
            raise InvalidBundle(
                f"manifest.{where}.kind {preview(entry['kind'])}: a {method} expert's modules "
                f"are one of {list(MODULE_KINDS[method])}", field="modules")
        modules.append(ModuleSpec(name, entry["kind"],
                                  _integer(entry["d_in"], f"{where}.d_in", 1, MAX_DIM),
                                  _integer(entry["d_out"], f"{where}.d_out", 1, MAX_DIM)))
    return modules


def _training(raw: object) -> dict:
    if not isinstance(raw, dict):
        raise InvalidBundle("manifest.training must be a JSON object", field="training")
    unknown = sorted(set(raw) - set(TRAINING_FIELDS))
    if unknown:
        raise InvalidBundle(
            f"manifest.training: unknown figures {[preview(k) for k in unknown[:5]]}: the "
            "training summary carries no text, only the figures named in "
            "protocol.manifest.TRAINING_FIELDS", field="training")
    for key, value in raw.items():
        kind, where = TRAINING_FIELDS[key], f"training.{key}"
        if kind == COUNT:
            _integer(value, where, 0, MAX_COUNT)
        elif kind == FLAG:
            _integer(value, where, 0, 1)
        elif kind == NUMBER:
            _number(value, where)
        elif not isinstance(value, list) or len(value) > MAX_CURVE_POINTS:
            raise InvalidBundle(f"manifest.{where} must be a list of at most "
                                f"{MAX_CURVE_POINTS} numbers", field="training")
        else:
            for index, point in enumerate(value):
                _number(point, f"{where}[{index}]")
    return raw


def _files(raw: object) -> dict[str, str]:
    if not isinstance(raw, dict) or not set(raw) <= set(TENSOR_FILES):
        raise InvalidBundle(f"manifest.files must map tensor files ({', '.join(TENSOR_FILES)})"
                            " to their sha256", field="files")
    for name, digest in raw.items():
        _string(digest, SHA256_RE, f"files.{name}", "64 lowercase hex digits")
    return raw
