"""A trained `TabularMLP` folded for inference: the same function in fewer, larger operations.

In eval mode the network is affine up to its first ReLU: each categorical feature's embedding
goes straight into the first linear layer, and batch norm only scales and shifts. So each
embedding table times its slice of the first layer's weights is a table of that layer's
contributions, one row per category; all of them stacked make one `embedding_bag` (a sum over the
features) in place of an embedding call per feature, a concatenation and a matrix product. Batch
norm goes into the linear layer before it, dropout (the identity in eval) goes away. What is left
is a few `linear` and `relu` calls without a module call each, which is most of the cost of a small
request. The outputs equal the module's up to float rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from jobs.model import TabularMLP


@dataclass(frozen=True)
class _Linear:
    weight: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class _ReLU:
    pass


@dataclass(frozen=True)
class FoldedMLP:
    """`TabularMLP.forward` for a module in eval mode, as `fold` builds it."""

    # Every feature's table of first-layer contributions, stacked; `offsets` is where each starts.
    contributions: torch.Tensor
    offsets: torch.Tensor
    # How many categories each feature's table has: a code beyond them would read the next one's.
    cardinalities: torch.Tensor
    first_numeric: _Linear
    rest: tuple[_Linear | _ReLU, ...]

    def __call__(self, x_cat: torch.Tensor, x_num: torch.Tensor) -> torch.Tensor:
        hidden = functional.linear(x_num, self.first_numeric.weight, self.first_numeric.bias)
        if x_cat.shape[1]:
            if bool(((x_cat < 0) | (x_cat >= self.cardinalities)).any()):
                raise IndexError("a categorical code is outside its embedding table")
            hidden = hidden + functional.embedding_bag(x_cat + self.offsets, self.contributions, mode="sum")
        for step in self.rest:
            hidden = (
                functional.linear(hidden, step.weight, step.bias)
                if isinstance(step, _Linear)
                else functional.relu(hidden)
            )
        return hidden


def _steps(mlp: nn.Sequential) -> list[_Linear | _ReLU]:
    """The dense layers as linear and ReLU steps, batch norm folded into the linear before it."""
    steps: list[_Linear | _ReLU] = []
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
            steps.append(_Linear(layer.weight.detach().clone(), bias.detach().clone()))
        elif isinstance(layer, nn.BatchNorm1d) and steps and isinstance(steps[-1], _Linear):
            steps[-1] = _fold_batch_norm(steps[-1], layer)
        elif isinstance(layer, nn.ReLU):
            steps.append(_ReLU())
        elif not isinstance(layer, nn.Dropout):
            raise TypeError(f"cannot fold a {type(layer).__name__} layer")
    return steps


def _fold_batch_norm(linear: _Linear, norm: nn.BatchNorm1d) -> _Linear:
    if norm.running_mean is None or norm.running_var is None:
        raise TypeError("cannot fold a batch norm without running statistics")
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    scale = weight / torch.sqrt(norm.running_var + norm.eps)
    return _Linear(linear.weight * scale[:, None], (linear.bias - norm.running_mean) * scale + bias)


@torch.no_grad()
def fold(module: TabularMLP) -> FoldedMLP:
    """The folded network of `module` as its weights are now (later changes to them are not
    seen). Raises TypeError for a network whose layers it does not know how to fold."""
    if module.training:
        raise TypeError("only a module in eval mode folds: training-mode batch norm and dropout are not affine")
    steps = _steps(module.mlp)
    first = steps[0]
    if not isinstance(first, _Linear):
        raise TypeError("the dense layers must start with a linear layer")
    embeddings = [layer for layer in module.embeddings if isinstance(layer, nn.Embedding)]
    tables: list[torch.Tensor] = []
    column = 0
    for embedding in embeddings:
        width = embedding.embedding_dim
        tables.append(embedding.weight @ first.weight[:, column : column + width].T)
        column += width
    sizes = torch.tensor([embedding.num_embeddings for embedding in embeddings], dtype=torch.int64)
    return FoldedMLP(
        contributions=torch.cat(tables).contiguous() if tables else torch.zeros(0, first.weight.shape[0]),
        offsets=sizes.cumsum(0) - sizes,
        cardinalities=sizes,
        first_numeric=_Linear(first.weight[:, column:].contiguous(), first.bias),
        rest=tuple(steps[1:]),
    )
