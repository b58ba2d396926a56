"""Optional 4-bit base models through bitsandbytes (the `quant` extra), for bases too large to
hold in bf16: the frozen base weights are stored as NF4, adapters and gates train in float32.

bitsandbytes' 4-bit kernels need a CUDA device; everywhere else the option is refused with a
message saying what is missing, before anything is loaded.
"""

from __future__ import annotations

import importlib.util

import torch

from protocol.errors import InvalidArgument

QUANTIZE = ("4bit",)


def check_quantize(quantize: str | None, device: torch.device) -> None:
    """Refuse a quantisation this machine cannot run, naming what is missing."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise InvalidArgument(f"--quantize must be one of {list(QUANTIZE)}, got {quantize!r}",
                              field="quantize")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InvalidArgument(
            "--quantize 4bit needs the bitsandbytes package, which is not installed: "
            "pip install 'gaggle[quant]' on a machine with a CUDA GPU, or drop --quantize",
            field="quantize")
    if device.type != "cuda":
        raise InvalidArgument(
            f"--quantize 4bit runs on a CUDA GPU only, but the device is {device}: use "
            "--device cuda, or drop --quantize", field="quantize")


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for NF4 weights computed in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype)
