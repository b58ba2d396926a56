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
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes

from protocol.errors import FingerprintMismatch, GaggleError, InvalidBundle
from protocol.manifest import (
    ACTIVATIONS,
    ADAPTER,
    FORMAT_VERSION,
    GATES,
    MANIFEST,
    METHODS,
    MODULE_KINDS,
    Manifest,
    ModuleSpec,
    check_manifest,
    read_manifest,
    strict_json,
)
from protocol.names import preview

__all__ = ["ACTIVATIONS", "ADAPTER", "FORMAT_VERSION", "GATES", "MANIFEST", "METHODS",
           "MODULE_KINDS", "Manifest", "ModuleSpec", "BaseSpec", "Bundle", "load_bundle",
           "save_bundle", "validate_bundle", "validate_manifest", "validate_tensors"]

REQUIRED_FILES = (MANIFEST, ADAPTER, GATES)
OPTIONAL_FILES = (ACTIVATIONS,)
TENSOR_DTYPE = torch.float32
# What a tensor file's safetensors header may say besides its tensors: torch's and Hugging
# Face's writers put {"format": "pt"} there. Anything else would be stored free text.
ALLOWED_METADATA = {"format": ("pt",)}
MAX_HEADER_BYTES = 16 * 1024 * 1024
# A safetensors header is a closed schema too: every tensor entry holds these and no more,
# so the stored file carries no text beside its tensors.
TENSOR_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class BaseSpec:
    """What a bundle is checked against: the federation's base model."""

    name: str
    fingerprint: str  # sha256 over the base weights' names, shapes, dtypes and bytes
    linears: dict[str, tuple[int, int]]  # module name -> (d_in, d_out) for every nn.Linear
    # module name -> Frobenius norm of its weight W: what an expert's update is measured
    # against (check_update_norms); None when not known (a spec cached by an older gaggle)
    weight_norms: dict[str, float] | None = None


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
    """The LoRA rank r of a checked manifest; None for (IA)^3."""
    return manifest.peft["rank"] if manifest.method == "lora" else None


def lora_scaling(manifest: Manifest) -> float:
    """The LoRA scaling s in dW = s * B A (peft: lora_alpha / r); 1.0 for (IA)^3."""
    return float(manifest.peft["scaling"]) if manifest.method == "lora" else 1.0


def validate_manifest(manifest: Manifest, base: BaseSpec | None = None) -> None:
    """Check the manifest against the schema and, when given, the federation's base model."""
    check_manifest(manifest)
    if base is not None:
        validate_against_base(manifest, base)


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
    check_gates_trained(((m.name, bundle.gates[m.name]) for m in manifest.modules),
                        _untrained_gate)
    if bundle.activations is not None:
        _check_tensor_set(ACTIVATIONS, bundle.activations, vectors)


# A gate whose entries vary less than this (variance) is constant to the router: its layer
# norm, LN(v) = (v - mean v) / sqrt(var v + 1e-5), leaves a key of norm below 1% of a trained
# one's, so it scores every token alike. Trained gates vary by 1e-4 and more.
MIN_GATE_VARIANCE = 1e-9


def check_gates_trained(gates: Iterable[tuple[str, torch.Tensor]],
                        refuse: Callable[[str, int], GaggleError]) -> None:
    """Raise `refuse(first, count)` when gate vectors (d_in,) are zero or constant (the
    router's layer norm turns both into a zero key): the name of the first such gate of the
    (name, gate) pairs and how many there are.

    Gates start at zero and only move when the expert's delta is non-zero, so a zero gate was
    never trained. It scores every token the same for its expert: the coordinator refuses
    such a bundle, the contributor refuses to write one and the router to route with one.
    """
    zero = [name for name, gate in gates
            if not bool(gate.any()) or float(gate.double().var(unbiased=False))
            < MIN_GATE_VARIANCE]
    if zero:
        raise refuse(zero[0], len(zero))


# What fine-tuning from a base produces, as a bound: an expert's update of a module, ||dW||_F,
# at most this multiple of the base weight's ||W||_F. Trained LoRA and (IA)^3 experts change a
# module by a few percent of it, and even seeded noise at the scale of a fresh LoRA stays
# within tens of it; a hundred times the weight itself is nothing training made. The
# coordinator's `max_update_ratio` setting changes it.
MAX_UPDATE_RATIO = 100.0


def check_update_norms(bundle: Bundle, base: BaseSpec, max_ratio: float = MAX_UPDATE_RATIO
                       ) -> None:
    """InvalidBundle naming the module when an update is beyond `max_ratio` times the base
    weight's norm: LoRA ||s B A||_F (from the factors), (IA)^3 max|l - 1| (a bound on
    ||dW||_F / ||W||_F, since dW scales W's rows or columns by l - 1)."""
    if base.weight_norms is None or max_ratio <= 0:
        return
    scaling = lora_scaling(bundle.manifest)
    for module in bundle.manifest.modules:
        if module.kind == "lora":
            left = bundle.adapter[f"{module.name}.lora_B"].double() * scaling
            right = bundle.adapter[f"{module.name}.lora_A"].double()
            update = float(((left.T @ left) * (right @ right.T)).sum().clamp_min(0).sqrt())
            ratio = update / max(base.weight_norms.get(module.name, 0.0), 1e-12)
        else:
            ratio = float((bundle.adapter[f"{module.name}.ia3"].double() - 1).abs().max())
        if not ratio <= max_ratio:  # NaN-safe
            raise InvalidBundle(
                f"{ADAPTER}: the update of module {module.name} is {ratio:.3g} times the base "
                f"weight's norm, beyond the {max_ratio:g} that fine-tuning from this base "
                "stays far below: retrain the expert (a smaller learning rate or scaling)",
                field=ADAPTER)


def _untrained_gate(module: str, count: int) -> InvalidBundle:
    # Accepting it would break every later version: the router refuses zero keys.
    return InvalidBundle(
        f"{GATES}: the gate of module {module} is all zero or constant (variance below "
        f"{MIN_GATE_VARIANCE:g}), so the router's layer norm makes it a zero key: it was never "
        "trained and would break routing for every version holding this expert: "
        "retrain the gate with gaggle-contributor gate on a trained adapter",
        field=GATES,
    )


def _check_tensor_set(file: str, tensors: dict[str, torch.Tensor],
                      expected: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        what = "a module without a gate" if file == GATES else "missing tensors"
        raise InvalidBundle(f"{file}: {what}: {[preview(k) for k in missing[:3]]} (of "
                            f"{len(missing)})", field=file)
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise InvalidBundle(
            f"{file}: unknown tensors {[preview(k) for k in extra[:3]]} (of {len(extra)}): "
            "every tensor must belong to a module listed in manifest.modules",
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
    _check_header(path)
    try:
        return load_safetensors_file(path) if mapped else load_safetensors_bytes(
            path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise InvalidBundle(f"{path.name} is not a valid safetensors file: {str(err)[:200]}",
                            field=path.name) from None


def _check_header(path: Path) -> None:
    """Read a safetensors header as strictly as a manifest (no duplicate keys, no nesting
    past the format's), and refuse `__metadata__` beyond ALLOWED_METADATA: the file is
    stored as sent, so its metadata must not carry text."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise InvalidBundle(f"{path.name} is not a valid safetensors file: its header "
                                "length is out of range", field=path.name)
        text = handle.read(length)
    try:
        header = strict_json(text.decode("utf-8"), max_depth=3)
    except ValueError as err:  # UnicodeDecodeError is a ValueError too
        raise InvalidBundle(f"{path.name} is not a valid safetensors file: its header is not "
                            f"valid: {str(err)[:200]}", field=path.name) from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is not None and not (isinstance(metadata, dict) and all(
            value in ALLOWED_METADATA.get(key, ()) for key, value in metadata.items())):
        raise InvalidBundle(
            f"{path.name}: the header's __metadata__ may hold only {ALLOWED_METADATA}, got "
            f"{preview(metadata)}: save the tensors without metadata", field=path.name)
    for name, entry in (header.items() if isinstance(header, dict) else ()):
        if name != "__metadata__" and not (isinstance(entry, dict)
                                           and set(entry) == TENSOR_ENTRY_KEYS):
            raise InvalidBundle(
                f"{path.name}: the header entry of tensor {preview(name)} must hold exactly "
                f"{sorted(TENSOR_ENTRY_KEYS)}, got {preview(entry)}: save the tensors with "
                "safetensors' own writer", field=path.name)


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
            f"bundle: missing files {missing}, extra files {[f[:40] for f in extra[:5]]}; "
            "a bundle holds "
            f"{', '.join(REQUIRED_FILES)} and optionally {ACTIVATIONS}",
            field="files",
        )
    manifest = read_manifest(root / MANIFEST)
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
        # The canonical bytes, so that the expert id is the sha256 of manifest.json itself.
        (staging / MANIFEST).write_bytes(bundle.manifest.canonical_bytes())
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
