"""Where and in which dtype a base model runs: `--device auto|cpu|cuda[:N]|mps` and
`--dtype auto|float32|bfloat16|float16`.

`auto` picks the first accelerator there is (CUDA, then Apple's MPS, else the CPU) and, for the
dtype, bfloat16 on a CUDA device that supports it and float32 everywhere else, which is what
every model ran in before these choices existed. Only the base model's weights take the
dtype: adapters and gates train and ship in float32, and router scores are float32 too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: checking the names costs nothing at start-up
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype for a base model."""

    device: torch.device  # where the base weights and every forward pass live
    dtype: torch.dtype  # the base weights' dtype (adapters and gates stay float32)

    def describe(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for a `--device` value; InvalidArgument when it is absent here."""
    import torch

    if not isinstance(name, str) or not _DEVICE_PATTERN.match(name):
        raise InvalidArgument(f"--device must be one of {', '.join(DEVICES)}, got {name!r}",
                              field="device")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise InvalidArgument(
                f"--device {name}: this machine has {count} CUDA device(s); use --device cpu "
                "or auto", field="device")
    if device.type == "mps" and not _mps_available():
        raise InvalidArgument("--device mps: Apple's MPS backend is not available here; use "
                              "--device cpu or auto", field="device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The base weights' dtype for a `--dtype` value on `device` (auto: bf16 on a CUDA GPU
    that supports it, float32 elsewhere)."""
    import torch

    if name not in DTYPES:
        raise InvalidArgument(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}",
                              field="dtype")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    """Both choices at once; the dtype's `auto` depends on the device chosen."""
    where = resolve_device(device)
    return Placement(where, resolve_dtype(dtype, where))


def check_names(device: str, dtype: str) -> None:
    """Refuse unknown `--device` / `--dtype` spellings without touching any device."""
    if not isinstance(device, str) or not _DEVICE_PATTERN.match(device):
        raise InvalidArgument(f"--device must be one of {', '.join(DEVICES)}, got {device!r}",
                              field="device")
    if dtype not in DTYPES:
        raise InvalidArgument(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}",
                              field="dtype")


# How a coordinator's `serve --device --dtype` reaches the places it runs models (the Ray
# evaluation actors, the usage check): environment variables, which the local Ray workers
# inherit from the process that starts Ray. Unset: the CPU in float32.
DEVICE_ENV, DTYPE_ENV = "GAGGLE_DEVICE", "GAGGLE_DTYPE"


def serving_placement() -> dict[str, str]:
    """load_base's device and dtype for the models a coordinator runs."""
    import os

    return {"device": os.environ.get(DEVICE_ENV, "cpu"),
            "dtype": os.environ.get(DTYPE_ENV, "float32")}


def set_serving_placement(device: str, dtype: str) -> None:
    """Record `serve`'s choice for this process and the Ray workers it starts."""
    import os

    check_names(device, dtype)
    os.environ[DEVICE_ENV], os.environ[DTYPE_ENV] = device, dtype


def model_placement(model: torch.nn.Module) -> Placement:
    """Where a loaded model's weights are, and their floating dtype."""
    weight = next(p for p in model.parameters() if p.is_floating_point())
    return Placement(weight.device, weight.dtype)


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
