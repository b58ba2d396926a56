"""`--target-modules` in peft's own form, and the peft config an expert trains with.

peft takes a list of names (each matching a module name or its last dotted parts), a regex
string (matched against the whole module name), or "all-linear". On the command line a comma
list or a single plain name is a list; anything else is a regex.
"""

from __future__ import annotations

import re

from torch import nn

from protocol.errors import InvalidArgument

_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
# The MLP's output projection under its common names: (IA)^3 scales its input, as peft's
# per-architecture defaults do, for model types peft has no default for (Phi-3, ...)
_MLP_OUTPUTS = ("down_proj", "dense_4h_to_h", "fc2", "w2")


def parse_target_modules(text: str | None) -> str | list[str] | None:
    """None (the method's default), "all-linear", a list of names, or a regex string."""
    if text is None:
        return None
    text = text.strip()
    if text == "all-linear":
        return text
    names = [part.strip() for part in text.split(",")]
    if all(_NAME.match(name) for name in names):
        return names
    if "," in text and not any(ch in text for ch in "()[]|*+?\\^$"):
        raise InvalidArgument(f"--target-modules {text!r}: a comma list holds plain module "
                              "names such as q_proj,v_proj", field="target-modules")
    try:
        re.compile(text)
    except re.error as err:
        raise InvalidArgument(f"--target-modules {text!r} is neither a comma list of module "
                              f"names nor a valid regex: {err}", field="target-modules") from None
    return text


def peft_config(method: str, rank: int, alpha: float, targets: str | list[str] | None,
                model: nn.Module):
    """The peft LoraConfig or IA3Config for an expert on `model`.

    LoRA defaults to every linear layer (PHATGOOSE's recipe); (IA)^3 to peft's per-
    architecture default (keys, values and the MLP's down projection on Llama), whose
    feed-forward modules scale their input. Custom (IA)^3 targets keep that split: a target
    in the default's feed-forward list (else the MLP's output projection) scales its input,
    any other its output.
    """
    from peft import IA3Config, LoraConfig
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3_DEFAULTS,
    )

    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                          target_modules=targets or "all-linear")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if targets is None:
        if model_type not in IA3_DEFAULTS:
            raise InvalidArgument(
                f"peft has no default (IA)^3 modules for model type {model_type!r}: name them "
                "with --target-modules (e.g. k_proj,v_proj,down_proj)", field="target-modules")
        return IA3Config()
    if targets == "all-linear":
        raise InvalidArgument("--target-modules all-linear is for LoRA; (IA)^3 needs names or "
                              "a regex", field="target-modules")
    feedforward = list(FEEDFORWARD.get(model_type, _MLP_OUTPUTS))
    if isinstance(targets, list):
        feedforward = [name for name in targets if name in feedforward]
    return IA3Config(target_modules=targets, feedforward_modules=feedforward)
