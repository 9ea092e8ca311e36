"""A tabular MLP: one embedding per categorical feature, standardised numerics, dense layers."""

from __future__ import annotations

import torch
from torch import nn


def embedding_dim(cardinality: int, cap: int) -> int:
    # The fast.ai rule of thumb, capped: small vocabularies need few dimensions.
    return max(2, min(cap, round(1.6 * cardinality**0.56)))


class TabularMLP(nn.Module):
    def __init__(
        self,
        cardinalities: list[int],
        n_numeric: int,
        n_outputs: int,
        hidden: list[int],
        dropout: float = 0.1,
        max_embedding_dim: int = 16,
    ) -> None:
        super().__init__()
        dims = [embedding_dim(card, max_embedding_dim) for card in cardinalities]
        self.embeddings = nn.ModuleList(
            [nn.Embedding(card, dim) for card, dim in zip(cardinalities, dims, strict=True)]
        )
        width = sum(dims) + n_numeric
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, n_outputs))
        self.mlp = nn.Sequential(*layers)
        self.n_categorical = len(cardinalities)

    def forward(self, x_cat: torch.Tensor, x_num: torch.Tensor) -> torch.Tensor:
        parts = [emb(x_cat[:, i]) for i, emb in enumerate(self.embeddings)]
        parts.append(x_num)
        return self.mlp(torch.cat(parts, dim=1))
