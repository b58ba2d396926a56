"""Tiny random causal LMs of several Hugging Face architecture families, saved as model
folders (safetensors + the byte-level tokenizer), for the architecture and dtype tests."""

from __future__ import annotations

from pathlib import Path

from routing.base import build_seeded, byte_tokenizer

# Families whose projections are nn.Linear: every one must train, route and generate.
FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gpt_neox")
_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 256}


def family_config(family: str, vocab: int, end: int):
    """A 2-layer, hidden-32 config of `family` (gpt2 too, for the Conv1D refusal)."""
    import transformers as tf

    ids = {"vocab_size": vocab, "bos_token_id": end, "eos_token_id": end, "pad_token_id": end}
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**_SIZES, **ids)
    config_class = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config,
                    "mistral": tf.MistralConfig, "phi3": tf.Phi3Config}[family]
    return config_class(**_SIZES, num_key_value_heads=2, **ids)


def save_family(family: str, folder: Path, seed: int = 0) -> Path:
    """Build a seeded random model of `family` and save it with its tokenizer to `folder`."""
    tokenizer = byte_tokenizer()
    model = build_seeded(family_config(family, len(tokenizer), tokenizer.eos_token_id), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
