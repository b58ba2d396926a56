"""The expert bundle: a directory with a JSON manifest and safetensors files, and its validation.

Layout of a bundle directory::

    manifest.json            format version, name, base model, method, modules, file hashes
    adapter.safetensors      "<module>.lora_A" (r, d_in) and "<module>.lora_B" (d_out, r)
                             or "<module>.ia3" (d_out,) for output-scaled / (d_in,) input-scaled
    gates.safetensors        "<module>" (d_in,): the PHATGOOSE gate vector of each module
    activations.safetensors  optional, "<module>" (d_in,): mean module input over training tokens

Both roles load bundles through `load_bundle` and check them with `validate_bundle`, so the
contributor sees exactly the errors the coordinator would answer with. Only JSON and
safetensors are ever parsed: nothing a contributor sends is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes

from protocol.errors import FingerprintMismatch, InvalidBundle

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ADAPTER = "adapter.safetensors"
GATES = "gates.safetensors"
ACTIVATIONS = "activations.safetensors"
REQUIRED_FILES = (MANIFEST, ADAPTER, GATES)
OPTIONAL_FILES = (ACTIVATIONS,)
METHODS = ("lora", "ia3")
# How each kind of module adds its delta (METHODS.md): a LoRA product, or an (IA)^3 vector
# scaling the module's output (k/v projections) or its input (feed-forward down projection).
MODULE_KINDS = {"lora": ("lora",), "ia3": ("ia3_out", "ia3_in")}
TENSOR_DTYPE = torch.float32
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted `nn.Linear` of the base model."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "lora", "ia3_out" (scales W x) or "ia3_in" (scales x before W)
    d_in: int  # input features of the base linear layer
    d_out: int  # output features of the base linear layer


@dataclass(frozen=True)
class BaseSpec:
    """What a bundle is checked against: the federation's base model."""

    name: str
    fingerprint: str  # sha256 over the base weights' names, shapes, dtypes and bytes
    linears: dict[str, tuple[int, int]]  # module name -> (d_in, d_out) for every nn.Linear


@dataclass
class Manifest:
    """The JSON description of a bundle. Holds no text, labels or samples of the data."""

    name: str
    base_model: str
    base_fingerprint: str
    method: str  # "lora" or "ia3"
    peft: dict  # lora: rank, alpha, scaling, target_modules; ia3: target/feedforward modules
    modules: list[ModuleSpec]
    training: dict = field(default_factory=dict)  # numbers only: steps, losses, counts, time
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, set on save
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        out = asdict(self)
        out["base_model"] = {"name": self.base_model, "fingerprint": self.base_fingerprint}
        del out["base_fingerprint"]
        return out

    @classmethod
    def from_json(cls, raw: object) -> Manifest:
        """Parse and type-check a decoded manifest; raise InvalidBundle naming the field."""
        if not isinstance(raw, dict):
            raise InvalidBundle("manifest.json must hold a JSON object", field="manifest")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise InvalidBundle(
                f"manifest.format_version is {version!r}; this gaggle reads version "
                f"{FORMAT_VERSION}: repackage the bundle with a matching gaggle-contributor",
                field="format_version",
            )
        expected = {"format_version", "name", "base_model", "method", "peft", "modules",
                    "training", "files"}
        unknown = set(raw) - expected
        missing = expected - set(raw)
        if unknown or missing:
            raise InvalidBundle(
                f"manifest fields: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                "a manifest holds exactly " + ", ".join(sorted(expected)),
                field="manifest",
            )
        base = _expect(raw["base_model"], dict, "base_model")
        modules = [_module_from_json(m, i) for i, m in
                   enumerate(_expect(raw["modules"], list, "modules"))]
        return cls(
            name=_expect(raw["name"], str, "name"),
            base_model=_expect(base.get("name"), str, "base_model.name"),
            base_fingerprint=_expect(base.get("fingerprint"), str, "base_model.fingerprint"),
            method=_expect(raw["method"], str, "method"),
            peft=_expect(raw["peft"], dict, "peft"),
            modules=modules,
            training=_expect(raw["training"], dict, "training"),
            files=_expect(raw["files"], dict, "files"),
            format_version=version,
        )

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def expert_id(self) -> str:
        """Content address of the bundle: sha256 of the canonical manifest, which holds the
        sha256 of every tensor file, so it names the tensors' bytes too."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


@dataclass
class Bundle:
    """A loaded expert: its manifest and tensors (all float32, on CPU)."""

    manifest: Manifest
    adapter: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor]
    activations: dict[str, torch.Tensor] | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def expert_id(self) -> str:
        """Content address: the manifest's (Manifest.expert_id)."""
        return self.manifest.expert_id

    @property
    def modules(self) -> dict[str, ModuleSpec]:
        return {m.name: m for m in self.manifest.modules}


def _expect(value: object, kind: type, name: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidBundle(
            f"manifest.{name} must be a {kind.__name__}, got {type(value).__name__}", field=name
        )
    return value


def _module_from_json(raw: object, index: int) -> ModuleSpec:
    where = f"modules[{index}]"
    raw = _expect(raw, dict, where)
    if set(raw) != {"name", "kind", "d_in", "d_out"}:
        raise InvalidBundle(
            f"manifest.{where} must have exactly name, kind, d_in, d_out; got {sorted(raw)}",
            field=where,
        )
    return ModuleSpec(
        name=_expect(raw["name"], str, f"{where}.name"),
        kind=_expect(raw["kind"], str, f"{where}.kind"),
        d_in=_expect(raw["d_in"], int, f"{where}.d_in"),
        d_out=_expect(raw["d_out"], int, f"{where}.d_out"),
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_adapter_shapes(module: ModuleSpec, rank: int | None) -> dict[str, tuple[int, ...]]:
    """The adapter tensors a module must have, with their shapes."""
    if module.kind == "lora":
        return {f"{module.name}.lora_A": (rank, module.d_in),
                f"{module.name}.lora_B": (module.d_out, rank)}
    if module.kind == "ia3_out":
        return {f"{module.name}.ia3": (module.d_out,)}
    return {f"{module.name}.ia3": (module.d_in,)}


def lora_rank(manifest: Manifest) -> int | None:
    if manifest.method != "lora":
        return None
    rank = manifest.peft.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidBundle(
            f"manifest.peft.rank must be a positive integer for a LoRA expert, got {rank!r}",
            field="peft.rank",
        )
    return rank


def lora_scaling(manifest: Manifest) -> float:
    """The LoRA scaling s in dW = s * B A (peft: lora_alpha / r); 1.0 for (IA)^3."""
    if manifest.method != "lora":
        return 1.0
    scaling = manifest.peft.get("scaling")
    if not isinstance(scaling, int | float) or isinstance(scaling, bool) \
            or not _finite(scaling) or scaling <= 0:
        raise InvalidBundle(
            f"manifest.peft.scaling must be a positive finite number, got {scaling!r}",
            field="peft.scaling",
        )
    return float(scaling)


def validate_manifest(manifest: Manifest, base: BaseSpec | None = None) -> None:
    """Check the manifest on its own and, when given, against the federation's base model."""
    if not _NAME_RE.match(manifest.name):
        raise InvalidBundle(
            f"manifest.name {manifest.name!r} is not allowed: use 1-64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit",
            field="name",
        )
    if manifest.method not in METHODS:
        raise InvalidBundle(
            f"manifest.method {manifest.method!r} is unknown: use one of {list(METHODS)}",
            field="method",
        )
    if not _SHA_RE.match(manifest.base_fingerprint):
        raise InvalidBundle("manifest.base_model.fingerprint must be 64 lowercase hex digits",
                            field="base_model.fingerprint")
    lora_rank(manifest)
    lora_scaling(manifest)
    if not manifest.modules:
        raise InvalidBundle("manifest.modules is empty: an expert adapts at least one module",
                            field="modules")
    seen: set[str] = set()
    for module in manifest.modules:
        _validate_module(module, manifest.method, seen)
    _validate_training(manifest.training)
    if base is not None:
        validate_against_base(manifest, base)


def _validate_module(module: ModuleSpec, method: str, seen: set[str]) -> None:
    if not _MODULE_RE.match(module.name) or len(module.name) > 256:
        raise InvalidBundle(
            f"module name {module.name[:80]!r} is not a dotted module path "
            "(letters, digits, '_' and '.')",
            field="modules",
        )
    if module.name in seen:
        raise InvalidBundle(f"module {module.name} is listed twice in manifest.modules",
                            field="modules")
    seen.add(module.name)
    if module.kind not in MODULE_KINDS[method]:
        raise InvalidBundle(
            f"module {module.name} has kind {module.kind!r}; a {method} expert's modules are "
            f"one of {list(MODULE_KINDS[method])}",
            field="modules",
        )
    if not (0 < module.d_in <= 1 << 20 and 0 < module.d_out <= 1 << 20):
        raise InvalidBundle(f"module {module.name} has implausible shape "
                            f"d_in={module.d_in}, d_out={module.d_out}", field="modules")


def _validate_training(training: dict) -> None:
    # Only numbers (or lists of numbers) are allowed here, so no text from the data can ride
    # along in the training summary.
    for key, value in training.items():
        values = value if isinstance(value, list) else [value]
        ok = _NAME_RE.match(key) and len(values) <= 10_000 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and _finite(v)
            for v in values
        )
        if not ok:
            raise InvalidBundle(
                f"manifest.training[{key[:40]!r}] must be a finite number or a list of "
                "numbers under a short name: the training summary carries no text",
                field="training",
            )


def _finite(value: int | float) -> bool:
    """math.isfinite that says False, instead of raising, for ints too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def validate_against_base(manifest: Manifest, base: BaseSpec) -> None:
    if manifest.base_fingerprint != base.fingerprint:
        raise FingerprintMismatch(
            f"the expert was trained on base model {manifest.base_model!r} with fingerprint "
            f"{manifest.base_fingerprint[:12]}..., but this federation's base model "
            f"{base.name!r} has fingerprint {base.fingerprint[:12]}...: retrain it on "
            f"--base {base.name}",
            field="base_model.fingerprint",
        )
    for module in manifest.modules:
        shape = base.linears.get(module.name)
        if shape is None:
            raise InvalidBundle(
                f"module {module.name} is not a linear layer of base model {base.name}: "
                "adapt only the base model's nn.Linear modules",
                field="modules",
            )
        if shape != (module.d_in, module.d_out):
            raise InvalidBundle(
                f"module {module.name} declares (d_in, d_out)=({module.d_in}, {module.d_out}) "
                f"but the base layer is {shape}",
                field="modules",
            )


def validate_tensors(bundle: Bundle) -> None:
    """Check every tensor: present, no extras, right shape, float32, finite; gates non-zero."""
    manifest = bundle.manifest
    rank = lora_rank(manifest)
    expected_adapter: dict[str, tuple[int, ...]] = {}
    for module in manifest.modules:
        expected_adapter.update(expected_adapter_shapes(module, rank))
    vectors = {m.name: (m.d_in,) for m in manifest.modules}
    _check_tensor_set(ADAPTER, bundle.adapter, expected_adapter)
    _check_tensor_set(GATES, bundle.gates, vectors)
    _check_gates_trained(bundle.gates, manifest.modules)
    if bundle.activations is not None:
        _check_tensor_set(ACTIVATIONS, bundle.activations, vectors)


def _check_gates_trained(gates: dict[str, torch.Tensor], modules: list[ModuleSpec]) -> None:
    """Refuse a gate vector (d_in,) that is all zero.

    Gates start at zero and only move when the expert's delta is non-zero, so a zero gate was
    never trained. It scores every token the same for this expert, and the router refuses such
    keys (routing.router.check_router_keys): accepting it would break every later version.
    """
    for module in modules:
        if not bool(gates[module.name].any()):
            raise InvalidBundle(
                f"{GATES}: the gate of module {module.name} is all zero, so it was never "
                "trained and would break routing for every version holding this expert: "
                "retrain the gate with gaggle-contributor gate on a trained adapter",
                field=GATES,
            )


def _check_tensor_set(file: str, tensors: dict[str, torch.Tensor],
                      expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        what = "a module without a gate" if file == GATES else "missing tensors"
        raise InvalidBundle(f"{file}: {what}: {missing[:5]} (of {len(missing)})", field=file)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise InvalidBundle(
            f"{file}: unknown tensors {extra[:5]} (of {len(extra)}): every tensor must belong "
            "to a module listed in manifest.modules",
            field=file,
        )
    for key, shape in expected.items():
        tensor = tensors[key]
        if tensor.dtype != TENSOR_DTYPE:
            raise InvalidBundle(f"{file}: tensor {key} has dtype {tensor.dtype}; expected "
                                "float32 (convert with .float() before saving)", field=file)
        if tuple(tensor.shape) != shape:
            raise InvalidBundle(f"{file}: tensor {key} has shape {tuple(tensor.shape)}; "
                                f"expected {shape}", field=file)
        # A finite sum proves every element finite (NaN and Inf propagate through it) and is
        # ~20x cheaper than the elementwise check, which runs only when the sum is not finite.
        if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise InvalidBundle(f"{file}: tensor {key} holds NaN or Inf values", field=file)


def validate_bundle(bundle: Bundle, base: BaseSpec | None = None) -> None:
    """Validate manifest and tensors; against the federation's base model when given."""
    validate_manifest(bundle.manifest, base)
    validate_tensors(bundle)


def _read_safetensors(path: Path, mapped: bool = False) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_file(path) if mapped else load_safetensors_bytes(
            path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise InvalidBundle(f"{path.name} is not a valid safetensors file: {err}",
                            field=path.name) from None


def load_bundle(path: str | os.PathLike, base: BaseSpec | None = None, *,
                known_sha256: Mapping[str, str] | None = None,
                mapped: bool = False) -> Bundle:
    """Load a bundle directory, verify file hashes and validate everything.

    Raises InvalidBundle (or FingerprintMismatch when `base` is given) naming the problem.
    `known_sha256` (file name -> sha256) holds hashes the caller computed over these very
    bytes (the coordinator hashes each file as it streams in), so the files are not read a
    second time; they are checked against manifest.files all the same. `mapped` reads the
    tensors through safetensors' file loader (a private memory map in current versions)
    instead of into memory: for checking one large bundle, not for holding many at once.
    """
    root = Path(path)
    if not root.is_dir():
        raise InvalidBundle(f"{root} is not a bundle directory (expected a folder holding "
                            f"{', '.join(REQUIRED_FILES)})", field="path")
    present = {p.name for p in root.iterdir()}
    missing = [f for f in REQUIRED_FILES if f not in present]
    extra = sorted(present - set(REQUIRED_FILES) - set(OPTIONAL_FILES))
    if missing or extra:
        raise InvalidBundle(
            f"bundle {root}: missing files {missing}, extra files {extra}; a bundle holds "
            f"{', '.join(REQUIRED_FILES)} and optionally {ACTIVATIONS}",
            field="files",
        )
    manifest = _read_manifest(root / MANIFEST)
    tensor_files = sorted(present - {MANIFEST})
    if sorted(manifest.files) != tensor_files:
        raise InvalidBundle(
            f"manifest.files lists {sorted(manifest.files)} but the bundle holds "
            f"{tensor_files}",
            field="files",
        )
    for name in tensor_files:
        known = (known_sha256 or {}).get(name)
        if (known or sha256_file(root / name)) != manifest.files[name]:
            raise InvalidBundle(f"{name}: sha256 does not match manifest.files: the file was "
                                "changed or corrupted after packaging", field=name)
    validate_manifest(manifest, base)
    bundle = Bundle(
        manifest=manifest,
        adapter=_read_safetensors(root / ADAPTER, mapped),
        gates=_read_safetensors(root / GATES, mapped),
        activations=(_read_safetensors(root / ACTIVATIONS, mapped) if ACTIVATIONS in present
                     else None),
    )
    validate_tensors(bundle)
    return bundle


def _read_manifest(path: Path) -> Manifest:
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise InvalidBundle(f"manifest.json is larger than {MAX_MANIFEST_BYTES} bytes",
                            field="manifest")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:
        # ValueError covers bad UTF-8, bad JSON and integers of thousands of digits;
        # RecursionError a nesting bomb ("[[[[...").
        raise InvalidBundle(f"manifest.json is not valid UTF-8 JSON: {str(err)[:200]}",
                            field="manifest") from None
    return Manifest.from_json(raw)


def save_bundle(bundle: Bundle, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Validate and write a bundle atomically: into a sibling temp folder, then one rename.

    Fills `manifest.files` with the sha256 of each tensor file. A crash leaves either nothing
    at `path` or a complete bundle.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists: choose another output folder or "
                              "remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    validate_manifest(bundle.manifest)
    validate_tensors(bundle)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        files = {ADAPTER: bundle.adapter, GATES: bundle.gates}
        if bundle.activations is not None:
            files[ACTIVATIONS] = bundle.activations
        for name, tensors in files.items():
            data = {k: v.detach().to("cpu", TENSOR_DTYPE).contiguous() for k, v in
                    sorted(tensors.items())}
            (staging / name).write_bytes(save_safetensors_bytes(data))
            bundle.manifest.files[name] = sha256_file(staging / name)
        manifest_text = json.dumps(bundle.manifest.to_json(), indent=2, sort_keys=True)
        (staging / MANIFEST).write_text(manifest_text + "\n", encoding="utf-8")
        for child in staging.iterdir():
            fsync_path(child)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: so that a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
