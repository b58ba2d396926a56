"""Experts' adapters paged into a bounded pool, as S-LoRA and Punica serve thousands of LoRA
adapters: the router holds every expert's keys, but a token's adapter compute touches only
its top-k experts, so only the factors of experts some token picked need to be in memory.

Each routed module owns a `ModulePages`: slabs of `capacity` slots, one expert's factors per
slot (LoRA A (S, r, d_in) and B (S, r, d_out) row-major as the routed layers compute with
them, (IA)^3 vectors (S, d)), on the base layer's device and dtype. A forward asks for the
experts its tokens picked; the missing ones are read from their bundle's
`adapter.safetensors` by byte offset (never the whole file) into the least recently used
slots. When one call picks more experts than a module has slots, the layer runs them in
chunks of `capacity` (routing.layers), so any bound gives the same outputs, only slower.

The bound is in bytes over every module (`AdapterPool(max_bytes=...)`, counted in float32):
each module gets the same number of slots, `max_bytes` divided by what one expert's factors
take in all modules, and never more than it has experts. A module's slabs are allocated whole
when it first pages an expert in (zeroed pages cost no memory until a slot is filled), so
memory stays within the bound with no copy from growing.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from protocol.errors import InvalidArgument
from protocol.manifest import ADAPTER

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of adapter factors: about 50 rank-16 SmolLM2 experts
_OPEN_FILES = 64  # adapter files kept open between reads
_DTYPES = {"F32": (torch.float32, 4), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2)}


class AdapterFiles:
    """Reads single tensors out of experts' `adapter.safetensors` files by byte offset.

    locate: collection position -> the expert's bundle folder (it may fetch the bundle the
    first time, e.g. from MLflow); called once per expert.
    """

    def __init__(self, locate: Callable[[int], str | os.PathLike]) -> None:
        self.locate = locate
        self._headers: dict[int, tuple[Path, int, dict]] = {}
        self._open: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # tensors read so far (a benchmark figure)

    def read(self, position: int, name: str) -> torch.Tensor:
        """Tensor `name` of expert `position`, as a new float CPU tensor."""
        with self._lock:
            path, start, entry = self._entry(position, name)
            out = torch.empty(tuple(entry["shape"]), dtype=_DTYPES[entry["dtype"]][0])
            self._pread(position, path, start, entry, out)
            return out

    def read_into(self, position: int, name: str, out: torch.Tensor) -> None:
        """Tensor `name` of expert `position` into `out`: read straight into its memory when
        it is a contiguous CPU tensor of the stored dtype and shape, else read and copied."""
        with self._lock:
            path, start, entry = self._entry(position, name)
            direct = (out.device.type == "cpu" and out.is_contiguous()
                      and out.dtype == _DTYPES[entry["dtype"]][0]
                      and tuple(out.shape) == tuple(entry["shape"]))
            if direct:
                self._pread(position, path, start, entry, out)
                return
        out.copy_(self.read(position, name))

    def _entry(self, position: int, name: str) -> tuple[Path, int, dict]:
        path, start, header = self._header(position)
        entry = header.get(name)
        if entry is None:
            raise InvalidArgument(f"{path} holds no tensor {name!r}: the bundle does not "
                                  "match its key shard", field="adapter")
        return path, start, entry

    def _pread(self, position: int, path: Path, start: int, entry: dict,
               out: torch.Tensor) -> None:
        begin, end = entry["data_offsets"]
        if end - begin != out.numel() * _DTYPES[entry["dtype"]][1]:
            raise InvalidArgument(f"{path}: a tensor has {end - begin} bytes for shape "
                                  f"{tuple(out.shape)}", field="adapter")
        handle = self._handle(position, path)
        got = os.preadv(handle.fileno(), [memoryview(out.view(torch.uint8).numpy())],
                        start + begin) if out.numel() else 0
        if got != end - begin:
            raise InvalidArgument(f"{path} is shorter than its header says", field="adapter")
        self.reads += 1

    def _header(self, position: int) -> tuple[Path, int, dict]:
        if position not in self._headers:
            path = Path(self.locate(position)) / ADAPTER
            with open(path, "rb") as handle:
                length = struct.unpack("<Q", handle.read(8))[0]
                header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            self._headers[position] = (path, 8 + length, header)
        return self._headers[position]

    def _handle(self, position: int, path: Path):
        handle = self._open.pop(position, None) or open(path, "rb")  # noqa: SIM115
        self._open[position] = handle
        while len(self._open) > _OPEN_FILES:
            self._open.popitem(last=False)[1].close()
        return handle

    def close(self) -> None:
        with self._lock:
            for handle in self._open.values():
                handle.close()
            self._open.clear()


class AdapterPool:
    """The page pool of one routed model: every module's slabs, within `max_bytes`."""

    def __init__(self, files: AdapterFiles, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise InvalidArgument(f"the paging bound must be positive, got {max_bytes} bytes",
                                  field="max_adapter_bytes")
        self.files = files
        self.max_bytes = int(max_bytes)
        self.modules: dict[str, ModulePages] = {}
        self._expert_bytes = 0  # one expert's factors over every module, at 4 bytes a value

    def plan(self, routers: list) -> None:
        """Size the slots from the modules' shapes (ModuleRouters with their kinds and rank)."""
        self._expert_bytes = sum(_slot_values(m) * 4 for m in routers)
        if self._expert_bytes > self.max_bytes:
            raise InvalidArgument(
                f"the paging bound {self.max_bytes} bytes holds not even one expert's adapter "
                f"({self._expert_bytes} bytes over every module): raise max_adapter_bytes",
                field="max_adapter_bytes")

    @property
    def slots(self) -> int:
        """Slots per module: the bound over one expert's bytes."""
        return self.max_bytes // max(self._expert_bytes, 1)

    def module(self, router, collection_index: list[int], *, rank: int,
               device: torch.device, dtype: torch.dtype) -> ModulePages:
        """The pages of one routed module, its LoRA slabs `rank` wide (the routed layer may
        pad the experts' rank); created on first use, replaced when placed elsewhere."""
        pages = self.modules.get(router.name)
        if pages is None or (pages.rank, pages.device, pages.dtype) != (rank, device, dtype):
            pages = ModulePages(self.files, router, collection_index,
                                min(self.slots, len(router.experts)), rank, device, dtype)
            self.modules[router.name] = pages
        return pages

    def resident_bytes(self) -> int:
        """Bytes the slabs hold now."""
        return sum(p.resident_bytes() for p in self.modules.values())


class ModulePages:
    """The slots of one module: which expert each holds, and least-recently-used eviction."""

    def __init__(self, files: AdapterFiles, router, collection_index: list[int], capacity: int,
                 rank: int, device: torch.device, dtype: torch.dtype) -> None:
        self.files = files
        self.name = router.name
        self.kinds = list(router.kinds)
        self.collection = list(collection_index)  # local position -> collection position
        self.capacity = max(1, capacity)
        self.rank = rank
        self.d_in, self.d_out = router.d_in, router.d_out
        self.device, self.dtype = device, dtype
        kinds = set(self.kinds)
        shapes = {"lora_A": (self.rank, self.d_in), "lora_B_t": (self.rank, self.d_out),
                  "ia3_out": (self.d_out,), "ia3_in": (self.d_in,)}
        present = {"lora_A": "lora" in kinds, "lora_B_t": "lora" in kinds,
                   "ia3_out": "ia3_out" in kinds, "ia3_in": "ia3_in" in kinds}
        self._shapes = {k: shapes[k] for k, used in present.items() if used}
        self.slabs: dict[str, torch.Tensor] = {}
        self.size = 0  # slots used so far (up to capacity)
        count = len(self.kinds)
        self.slot_of = torch.full((count,), -1, dtype=torch.long)  # local position -> slot
        self.owner = torch.full((self.capacity,), -1, dtype=torch.long)  # slot -> position
        self.last_used = torch.zeros(self.capacity, dtype=torch.long)
        self._tick = 0
        self._slot_of_device: torch.Tensor | None = None

    def has(self, name: str) -> bool:
        """Whether some expert here has factor `name` (lora_A, lora_B_t, ia3_out, ia3_in)."""
        return name in self._shapes

    def tensor(self, name: str) -> torch.Tensor | None:
        """Slab `name`, or None if no expert has it (allocated at the first load)."""
        return self.slabs.get(name) if name in self._shapes else None

    def chunks(self, needed: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """For sorted local positions `needed`, (positions, slot_of) per chunk of at most
        `capacity`, each chunk made resident before it is yielded. slot_of: (E,) slot of
        every local position, -1 when not resident, on the slabs' device."""
        needed = needed.cpu()
        for start in range(0, needed.numel(), self.capacity):
            part = needed[start:start + self.capacity]
            yield part, self.load(part)

    def load(self, needed: torch.Tensor) -> torch.Tensor:
        """Make local positions `needed` (at most `capacity`, distinct, CPU) resident;
        returns slot_of on the slabs' device."""
        slots = self.slot_of[needed]
        missing = needed[slots < 0]
        if missing.numel():
            self._fill(missing.tolist(), self._victims(slots[slots >= 0], missing.numel()))
            self._slot_of_device = None
        self._tick += 1
        self.last_used[self.slot_of[needed]] = self._tick
        if self._slot_of_device is None:
            self._slot_of_device = self.slot_of.to(self.device)
        return self._slot_of_device

    def _victims(self, keep: torch.Tensor, count: int) -> list[int]:
        """`count` slots to fill: never used ones first, then free ones, then the least
        recently used of those not in `keep`."""
        if not self.slabs:
            self.slabs = {name: torch.zeros(self.capacity, *shape, dtype=self.dtype,
                                            device=self.device)
                          for name, shape in self._shapes.items()}
        fresh = min(count, self.capacity - self.size)
        victims = list(range(self.size, self.size + fresh))
        self.size += fresh
        if count > fresh:
            order = self.last_used[:self.size].clone()
            order[self.owner[:self.size] < 0] = -1
            order[keep] = torch.iinfo(torch.long).max
            order[victims] = torch.iinfo(torch.long).max
            victims += torch.argsort(order, stable=True)[:count - fresh].tolist()
        return victims

    def _fill(self, positions: list[int], slots: list[int]) -> None:
        for position, slot in zip(positions, slots, strict=True):
            previous = int(self.owner[slot])
            if previous >= 0:
                self.slot_of[previous] = -1
            self._read(position, slot)
            self.owner[slot] = position
            self.slot_of[position] = slot

    def _read(self, position: int, slot: int) -> None:
        """Copy one expert's factors for this module into a slot: A read straight into the
        slab, B through its transpose; the padded rank and other kinds' rows zeroed."""
        expert, kind = self.collection[position], self.kinds[position]
        for name in self._shapes:  # rows of the kinds this expert is not (mixed modules)
            if not name.startswith("lora" if kind == "lora" else kind):
                self.slabs[name][slot].zero_()
        if kind == "lora":
            lora_B = self.files.read(expert, f"{self.name}.lora_B")  # (d_out, r_e)
            rank = lora_B.shape[1]
            self.files.read_into(expert, f"{self.name}.lora_A", self.slabs["lora_A"][slot, :rank])
            self.slabs["lora_B_t"][slot, :rank] = lora_B.T
            if rank < self.rank:
                self.slabs["lora_A"][slot, rank:] = 0
                self.slabs["lora_B_t"][slot, rank:] = 0
        else:
            self.slabs[kind][slot] = self.files.read(expert, f"{self.name}.ia3").float() - 1.0

    def resident_bytes(self) -> int:
        """Bytes of the slots in use (the slabs' untouched rest costs no memory)."""
        return sum(t[:self.size].numel() * t.element_size() for t in self.slabs.values())


def _slot_values(router) -> int:
    """Values one slot of this module holds (LoRA A and B at the padded rank, (IA)^3)."""
    kinds = set(router.kinds)
    values = router.rank * (router.d_in + router.d_out) if "lora" in kinds else 0
    values += router.d_out if "ia3_out" in kinds else 0
    values += router.d_in if "ia3_in" in kinds else 0
    return values
