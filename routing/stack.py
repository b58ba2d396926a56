"""Stacking a collection of experts into per-module router tensors, with no model and no data.

`stack_experts(bundles)` turns loaded bundles into `RouterWeights`: for every adapted module the
experts that adapt it, their gate keys, Arrow prototypes, mean activations, LoRA factors
zero-padded to the largest rank, scalings and (IA)^3 vectors. Stacking one module only needs
that module's per-expert pieces (`module_pieces` + `stack_module`), so a coordinator can
spread the work over Ray tasks and assemble the result with `RouterWeights(...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from protocol.bundle import Bundle, lora_rank, lora_scaling
from protocol.errors import FingerprintMismatch, InvalidArgument
from routing.paging import AdapterPool

KINDS = ("lora", "ia3_out", "ia3_in")


@dataclass
class ExpertPiece:
    """One expert's tensors for one module, as stacking needs them."""

    expert: str  # expert (bundle) name
    kind: str  # "lora", "ia3_out" or "ia3_in"
    gate: torch.Tensor  # (d_in,) PHATGOOSE gate vector, used as router key
    activation: torch.Tensor | None = None  # (d_in,) mean module input, if shipped
    lora_A: torch.Tensor | None = None  # (r, d_in)
    lora_B: torch.Tensor | None = None  # (d_out, r)
    scaling: float = 1.0  # s in dW = s * B A; 1.0 for (IA)^3
    ia3: torch.Tensor | None = None  # (d_out,) for ia3_out, (d_in,) for ia3_in


@dataclass
class ModuleRouter:
    """The stacked experts of one module; E = number of experts adapting it.

    Rows are in `experts` order. Tensors of a kind no expert here has are None. LoRA rows of
    (IA)^3 experts and (IA)^3 rows of LoRA experts are zero, so every tensor is indexable by
    the same expert position.
    """

    name: str  # module path in the base model
    d_in: int
    d_out: int
    experts: list[str]  # (E,) expert names
    kinds: list[str]  # (E,) kind of each expert here
    keys: torch.Tensor | None  # (E, d_in) gate vectors (None: not loaded, see routing.keys)
    prototypes: torch.Tensor | None  # (E, d_in) Arrow prototypes; (IA)^3 rows zero (need W)
    scaling: torch.Tensor  # (E,) LoRA scaling s_e (1.0 for (IA)^3 experts)
    activations: torch.Tensor | None = None  # (E, d_in) when every expert shipped them
    lora_A: torch.Tensor | None = None  # (E, r_max, d_in), zero-padded
    lora_B: torch.Tensor | None = None  # (E, d_out, r_max), zero-padded
    ia3_out: torch.Tensor | None = None  # (E, d_out): l - 1 for ia3_out experts, else 0
    ia3_in: torch.Tensor | None = None  # (E, d_in): l - 1 for ia3_in experts, else 0
    # r_max when the factors are paged (RouterWeights.adapters) instead of held here
    paged_rank: int = 0

    @property
    def rank(self) -> int:
        return self.paged_rank if self.lora_A is None else self.lora_A.shape[1]

    @property
    def paged(self) -> bool:
        """Whether the experts' adapters live in a page pool rather than in this object."""
        return self.lora_A is None and self.ia3_out is None and self.ia3_in is None


@dataclass
class RouterWeights:
    """A whole stacked router: what `route()` applies and `save_router` exports."""

    base_model: str  # base model name the experts were trained on
    fingerprint: str  # that base model's weight fingerprint
    experts: list[str]  # every expert of the collection, in collection order
    modules: dict[str, ModuleRouter] = field(default_factory=dict)
    # Where paged modules read their experts' factors (routing.paging); None when every
    # module holds its tensors
    adapters: AdapterPool | None = None
    # Loads key fields (routing.keys.KEY_FIELDS) opened without, when a method needs them
    load_fields: Callable[[Sequence[str]], None] | None = field(default=None, repr=False)

    def expert_index(self, name: str) -> int:
        """Position of an expert in the collection; InvalidArgument naming the choices."""
        try:
            return self.experts.index(name)
        except ValueError:
            raise InvalidArgument(
                f"no expert named {name!r} in this router; experts are {self.experts[:20]}",
                field="expert",
            ) from None


def module_pieces(bundle: Bundle) -> dict[str, ExpertPiece]:
    """Split a bundle into its per-module pieces (module name -> piece); tensors are shared."""
    manifest = bundle.manifest
    scaling = lora_scaling(manifest)
    lora_rank(manifest)  # validates the rank field
    pieces = {}
    for spec in manifest.modules:
        piece = ExpertPiece(expert=manifest.name, kind=spec.kind, gate=bundle.gates[spec.name],
                            scaling=scaling)
        if bundle.activations is not None:
            piece.activation = bundle.activations[spec.name]
        if spec.kind == "lora":
            piece.lora_A = bundle.adapter[f"{spec.name}.lora_A"]
            piece.lora_B = bundle.adapter[f"{spec.name}.lora_B"]
        else:
            piece.ia3 = bundle.adapter[f"{spec.name}.ia3"]
        pieces[spec.name] = piece
    return pieces


def arrow_prototype(lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of B A, from the factors: A (r, d_in), B (d_out, r) -> (d_in,).

    Batched too: A (E, r, d_in), B (E, d_out, r) -> (E, d_in). With thin QRs B = Q1 R1 and
    A^T = Q2 R2, B A = Q1 (R1 R2^T) Q2^T, so only the (r, r) core is decomposed and the
    right singular vectors are Q2 V. The sign is fixed so the largest-magnitude entry is
    positive (Arrow scores use |x . proto| anyway).
    """
    _, core_left = torch.linalg.qr(lora_B.double())  # (..., r, r)
    basis, core_right = torch.linalg.qr(lora_A.double().transpose(-1, -2))  # (..., d_in, r)
    _, _, vh = torch.linalg.svd(core_left @ core_right.transpose(-1, -2))
    top = (basis @ vh[..., 0, :].unsqueeze(-1)).squeeze(-1)  # (..., d_in)
    return _fix_sign(top).to(lora_A.dtype)


def _fix_sign(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each vector (last dim) so that its largest-magnitude entry is non-negative."""
    peak = vectors.gather(-1, vectors.abs().argmax(-1, keepdim=True))
    return torch.where(peak < 0, -vectors, vectors)


def stack_module(name: str, d_in: int, d_out: int, pieces: list[ExpertPiece]) -> ModuleRouter:
    """Stack the pieces of the experts adapting one module (in the given order)."""
    if not pieces:
        raise InvalidArgument(f"module {name}: no expert adapts it", field="modules")
    for piece in pieces:
        _check_piece(name, d_in, d_out, piece)
    count = len(pieces)
    kinds = [p.kind for p in pieces]
    keys = torch.stack([p.gate.float() for p in pieces])
    prototypes = torch.zeros(count, d_in)
    router = ModuleRouter(
        name=name, d_in=d_in, d_out=d_out, experts=[p.expert for p in pieces], kinds=kinds,
        keys=keys, prototypes=prototypes,
        scaling=torch.tensor([p.scaling for p in pieces], dtype=torch.float32),
    )
    if all(p.activation is not None for p in pieces):
        router.activations = torch.stack([p.activation.float() for p in pieces])
    lora = [i for i, p in enumerate(pieces) if p.kind == "lora"]
    if lora:
        rank = max(pieces[i].lora_A.shape[0] for i in lora)
        router.lora_A = torch.zeros(count, rank, d_in)
        # (E, d_out, r) as a view of row-major (E, r, d_out) storage: the layout the routed
        # layers compute with, so routing takes it without a copy
        router.lora_B = torch.zeros(count, rank, d_out).transpose(1, 2)
        for i in lora:  # a copy per expert at assembly time, not on the inference path
            r = pieces[i].lora_A.shape[0]
            router.lora_A[i, :r] = pieces[i].lora_A
            router.lora_B[i, :, :r] = pieces[i].lora_B
        rows = torch.tensor(lora)
        prototypes[rows] = arrow_prototype(router.lora_A[rows], router.lora_B[rows])
    for kind, size in (("ia3_out", d_out), ("ia3_in", d_in)):
        rows = [i for i, p in enumerate(pieces) if p.kind == kind]
        if rows:
            stacked = torch.zeros(count, size)
            for i in rows:
                stacked[i] = pieces[i].ia3.float() - 1.0
            setattr(router, kind, stacked)
    return router


def _check_piece(name: str, d_in: int, d_out: int, piece: ExpertPiece) -> None:
    """InvalidArgument naming the expert when a piece does not fit the module's shape."""
    if piece.kind not in KINDS:
        problem = f"kind {piece.kind!r} (expected one of {list(KINDS)})"
    elif tuple(piece.gate.shape) != (d_in,):
        problem = f"gate of shape {tuple(piece.gate.shape)} (expected ({d_in},))"
    elif piece.kind == "lora" and (
            piece.lora_A is None or piece.lora_B is None or piece.lora_A.dim() != 2
            or piece.lora_A.shape[1] != d_in
            or tuple(piece.lora_B.shape) != (d_out, piece.lora_A.shape[0])):
        shapes = [None if t is None else tuple(t.shape) for t in (piece.lora_A, piece.lora_B)]
        problem = f"LoRA factors of shapes {shapes} (expected (r, {d_in}) and ({d_out}, r))"
    elif piece.kind != "lora" and (piece.ia3 is None or tuple(piece.ia3.shape) != (
            d_out if piece.kind == "ia3_out" else d_in,)):
        problem = f"(IA)^3 vector of shape {None if piece.ia3 is None else piece.ia3.shape}"
    else:
        return
    raise InvalidArgument(f"expert {piece.expert!r} at module {name} "
                          f"(d_in={d_in}, d_out={d_out}) has {problem}", field="modules")


def stack_experts(bundles: list[Bundle], names: list[str] | None = None) -> RouterWeights:
    """Stack a collection of bundles (all on the same base model) into RouterWeights.

    names: what the router calls each expert (default: the bundles' own names; the
    coordinator passes its `contributor/name` keys).
    """
    if not bundles:
        raise InvalidArgument("no experts given: route over at least one bundle",
                              field="experts")
    first = bundles[0].manifest
    names = list(names) if names is not None else [b.name for b in bundles]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgument(f"expert names must be unique; repeated: {duplicates}",
                              field="experts")
    for bundle in bundles:
        if bundle.manifest.base_fingerprint != first.base_fingerprint:
            raise FingerprintMismatch(
                f"experts {first.name!r} and {bundle.name!r} were trained on different base "
                f"models (fingerprints {first.base_fingerprint[:12]}... and "
                f"{bundle.manifest.base_fingerprint[:12]}...): route only experts of one base",
                field="base_model.fingerprint",
            )
    by_module: dict[str, list[ExpertPiece]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for bundle, name in zip(bundles, names, strict=True):
        for module, piece in module_pieces(bundle).items():
            piece.expert = name
            by_module.setdefault(module, []).append(piece)
            spec = bundle.modules[module]
            shapes[module] = (spec.d_in, spec.d_out)
    modules = {name: stack_module(name, *shapes[name], pieces)
               for name, pieces in sorted(by_module.items())}
    return RouterWeights(base_model=first.base_model, fingerprint=first.base_fingerprint,
                         experts=names, modules=modules)


def concat_routers(parts: list[RouterWeights]) -> RouterWeights:
    """RouterWeights of consecutive expert chunks (stacked apart, e.g. on several workers),
    joined along the experts in order: the same router `stack_experts` gives for them all."""
    by_module: dict[str, list[ModuleRouter]] = {}
    for part in parts:
        for name, module in part.modules.items():
            by_module.setdefault(name, []).append(module)
    return RouterWeights(base_model=parts[0].base_model, fingerprint=parts[0].fingerprint,
                         experts=[e for p in parts for e in p.experts],
                         modules={name: concat_modules(by_module[name])
                                  for name in sorted(by_module)})


def concat_modules(parts: list[ModuleRouter]) -> ModuleRouter:
    """One module's ModuleRouters from consecutive expert chunks, joined along the experts.

    LoRA factors are zero-padded to the largest rank, and kinds a chunk lacks are zero rows,
    exactly as `stack_module` lays out a single stack.
    """
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    rank = max(p.rank for p in parts)

    def joined(field: str, width: tuple[int, ...], pad_dim: int | None = None):
        if all(getattr(p, field) is None for p in parts):
            return None
        blocks = []
        for p in parts:
            block = getattr(p, field)
            if block is None:
                block = torch.zeros(len(p.experts), *width)
            elif pad_dim is not None and block.shape[pad_dim] < rank:
                pad = [0, 0] * (block.dim() - 1 - pad_dim) + [0, rank - block.shape[pad_dim]]
                block = torch.nn.functional.pad(block, pad)
            blocks.append(block)
        return torch.cat(blocks)

    with_activations = all(p.activations is not None for p in parts)
    lora_B = joined("lora_B", (first.d_out, rank), pad_dim=2)
    if lora_B is not None:  # the (E, r, d_out) storage stack_module gives, as a view
        lora_B = lora_B.transpose(1, 2).contiguous().transpose(1, 2)
    return ModuleRouter(
        name=first.name, d_in=first.d_in, d_out=first.d_out,
        experts=[e for p in parts for e in p.experts],
        kinds=[k for p in parts for k in p.kinds],
        keys=torch.cat([p.keys for p in parts]),
        prototypes=torch.cat([p.prototypes for p in parts]),
        scaling=torch.cat([p.scaling for p in parts]),
        activations=joined("activations", (first.d_in,)) if with_activations else None,
        lora_A=joined("lora_A", (rank, first.d_in), pad_dim=1),
        lora_B=lora_B,
        ia3_out=joined("ia3_out", (first.d_out,)),
        ia3_in=joined("ia3_in", (first.d_in,)),
    )


def ia3_prototype(vector: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Arrow prototype of an (IA)^3 delta, which needs the base weight W (d_out, d_in).

    vector is l - 1: (d_out,) for ia3_out (dW = diag(l-1) W) or (d_in,) for ia3_in
    (dW = W diag(l-1)). Returns the top right singular vector of dW, (d_in,).
    """
    weight = weight.double()
    delta = vector.double().unsqueeze(1) * weight if kind == "ia3_out" \
        else weight * vector.double().unsqueeze(0)
    _, _, vh = torch.linalg.svd(delta, full_matrices=False)
    return _fix_sign(vh[0]).float()


def with_ia3_prototypes(router: ModuleRouter, weight: torch.Tensor,
                        adapters: AdapterPool | None = None,
                        collection: list[int] | None = None) -> ModuleRouter:
    """A copy whose (IA)^3 prototype rows are filled in: they depend on the base weight.
    A paged router's vectors are read from `adapters` (collection: each row's position)."""
    rows = [i for i, kind in enumerate(router.kinds) if kind != "lora"]
    if not rows:
        return router
    prototypes = router.prototypes.clone()
    for i in rows:  # once per (IA)^3 expert at build time, not on the inference path
        kind = router.kinds[i]
        if router.paged:
            vector = adapters.files.read(collection[i], f"{router.name}.ia3").float() - 1.0
        else:
            vector = (router.ia3_out if kind == "ia3_out" else router.ia3_in)[i]
        prototypes[i] = ia3_prototype(vector, weight.detach(), kind)
    return ModuleRouter(**{**router.__dict__, "prototypes": prototypes})
