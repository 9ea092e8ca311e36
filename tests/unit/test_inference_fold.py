"""The folded network predictions run through (jobs/inference.py): the trained module's function
for any shape of tabular task, and no silent look-up outside a feature's own categories."""

from __future__ import annotations

import pytest
import torch

from jobs.inference import fold
from jobs.model import TabularMLP

pytestmark = pytest.mark.unit


def _trained_like(cardinalities: list[int], n_numeric: int, hidden: list[int], n_outputs: int = 3) -> TabularMLP:
    """Random weights and batch-norm statistics far from their initial 0 and 1, in eval mode."""
    torch.manual_seed(len(cardinalities) * 10 + n_numeric)
    module = TabularMLP(cardinalities, n_numeric, n_outputs, hidden, dropout=0.5, max_embedding_dim=6)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.7)
        for layer in module.mlp:
            if isinstance(layer, torch.nn.BatchNorm1d):
                assert layer.running_mean is not None and layer.running_var is not None
                layer.running_mean.normal_(0, 2)
                layer.running_var.uniform_(0.1, 5)
    return module.eval()


def _inputs(cardinalities: list[int], n_numeric: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    x_cat = (
        torch.stack([torch.randint(0, c, (rows,), generator=generator) for c in cardinalities], dim=1)
        if cardinalities
        else torch.zeros(rows, 0, dtype=torch.int64)
    )
    return x_cat, torch.randn(rows, n_numeric, generator=generator)


@pytest.mark.parametrize(
    ("cardinalities", "n_numeric", "hidden"),
    [
        ([9, 3, 17, 2], 5, [16, 8]),  # the usual shape: embeddings, numerics, two normalised layers
        ([9, 3], 4, []),  # no hidden layer: the first linear layer is the output
        ([], 6, [12]),  # numeric features only
        ([5, 40], 0, [12, 6]),  # categorical features only
    ],
)
@pytest.mark.parametrize("rows", [1, 257])
def test_the_folded_network_computes_what_the_module_computes(cardinalities, n_numeric, hidden, rows):
    module = _trained_like(cardinalities, n_numeric, hidden)
    x_cat, x_num = _inputs(cardinalities, n_numeric, rows)
    with torch.inference_mode():
        expected = module(x_cat, x_num)
    folded = fold(module)(x_cat, x_num)
    assert folded.shape == expected.shape
    assert torch.allclose(folded, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(folded.argmax(dim=1), expected.argmax(dim=1))


def test_a_code_beyond_its_feature_s_categories_is_refused_not_read_from_the_next_table():
    module = _trained_like([4, 7], 2, [8])
    x_cat, x_num = _inputs([4, 7], 2, 3)
    network = fold(module)
    for bad in (4, -1):  # 4 would land on the second feature's first row in the stacked table
        wrong = x_cat.clone()
        wrong[1, 0] = bad
        with pytest.raises(IndexError, match="outside its embedding table"):
            network(wrong, x_num)


def test_the_fold_is_of_the_weights_at_the_time_and_only_of_an_eval_module():
    module = _trained_like([4], 2, [8])
    x_cat, x_num = _inputs([4], 2, 5)
    network = fold(module)
    before = network(x_cat, x_num)
    with torch.no_grad():
        for parameter in module.mlp.parameters():
            parameter.add_(1.0)
    assert torch.equal(network(x_cat, x_num), before)
    with pytest.raises(TypeError, match="eval mode"):
        fold(module.train())
