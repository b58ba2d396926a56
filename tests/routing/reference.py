"""The slow, obvious routing of docs/methods.md: loops over tokens and experts, full matrices.

Kept in the tests only, as the yardstick the vectorised layers must match.
"""

from __future__ import annotations

import math

import torch

from routing.stack import ExpertPiece


def layer_norm(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + 1e-5)


def full_delta(piece: ExpertPiece, weight: torch.Tensor) -> torch.Tensor:
    """dW of one expert as a full (d_out, d_in) matrix."""
    if piece.kind == "lora":
        return piece.scaling * piece.lora_B @ piece.lora_A
    if piece.kind == "ia3_out":
        return torch.diag(piece.ia3 - 1.0) @ weight
    return weight @ torch.diag(piece.ia3 - 1.0)


def expert_delta(piece: ExpertPiece, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """delta_e(x) for one token x (d_in,), computed the way docs/methods.md writes it."""
    if piece.kind == "lora":
        return piece.scaling * (piece.lora_B @ (piece.lora_A @ x))
    if piece.kind == "ia3_out":
        return (piece.ia3 - 1.0) * (weight @ x)
    return weight @ ((piece.ia3 - 1.0) * x)


def top_right_singular_vector(matrix: torch.Tensor) -> torch.Tensor:
    _, _, vh = torch.linalg.svd(matrix.double())
    return vh[0].float()


def score(piece: ExpertPiece, weight: torch.Tensor, x: torch.Tensor, method: str,
          mean_input: torch.Tensor | None = None) -> float:
    if method == "arrow":
        return abs(float(x @ piece.prototype))
    if method == "phatgoose_centred":  # <x - mean input, LN(gate)>, at LN(x)'s scale
        scale = 1.0 / math.sqrt(float(x.var(unbiased=False)) + 1e-5)
        return float((x - mean_input) @ layer_norm(piece.gate)) * scale / math.sqrt(x.shape[0])
    key = piece.activation if method == "average_activation" else piece.gate
    return float(layer_norm(x) @ layer_norm(key)) / math.sqrt(x.shape[0])


def reference_routed_delta(pieces: list[ExpertPiece], weight: torch.Tensor, x: torch.Tensor,
                           method: str, top_k: int) -> torch.Tensor:
    """x (N, d_in) -> (N, d_out): sum over the top-k experts of softmax(kept) * delta_e(x_t)."""
    out = torch.zeros(x.shape[0], weight.shape[0])
    if method == "arrow":
        for piece in pieces:
            piece.prototype = top_right_singular_vector(full_delta(piece, weight))
    mean_input = torch.stack([piece.activation for piece in pieces]).mean(dim=0)
    for t in range(x.shape[0]):
        scores = [score(piece, weight, x[t], method, mean_input) for piece in pieces]
        kept = sorted(range(len(pieces)), key=lambda e: -scores[e])[:top_k]
        exps = [math.exp(scores[e] - scores[kept[0]]) for e in kept]
        for e, value in zip(kept, exps, strict=True):
            out[t] += value / sum(exps) * expert_delta(pieces[e], weight, x[t])
    return out
