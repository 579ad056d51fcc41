"""Targets, reference selection and the contrastive score, checked against their definitions and the oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget
from torch import nn

from finercam.errors import InvalidArgumentError, InvalidTypeError
from finercam.objectives import (
    References,
    contrast_terms,
    finer_score,
    resolve_targets,
    select_references,
)


def test_targets_default_to_top_prediction_and_accept_int_list_tensor() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0]])
    assert resolve_targets(None, logits).tolist() == [1, 0]
    assert resolve_targets(2, logits).tolist() == [2, 2]
    assert resolve_targets([0, 2], logits).tolist() == [0, 2]
    assert resolve_targets(torch.tensor([2, 1]), logits).tolist() == [2, 1]


@pytest.mark.parametrize(
    ("targets", "error", "fragment"),
    [
        (3, InvalidArgumentError, "target class 3"),
        ([0, 5], InvalidArgumentError, "classes are 0..2"),
        ([0], InvalidArgumentError, "batch has 2 images"),
        ([0.5, 1], InvalidTypeError, "integer"),
        (torch.tensor([0.0, 1.0]), InvalidTypeError, "dtype"),
        ("cat", InvalidTypeError, "str"),
    ],
)
def test_bad_targets_are_named(targets: object, error: type[Exception], fragment: str) -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(error, match=fragment):
        resolve_targets(targets, logits)  # type: ignore[arg-type]


def test_nearest_is_closest_logit_and_never_the_target_even_on_ties() -> None:
    # Classes 0, 2 and 3 tie with the target 1: the target must still be excluded (grad-cam's tie bug).
    logits = torch.tensor([[5.0, 5.0, 5.0, 5.0, 1.0, 4.5]])
    refs = select_references("nearest", logits, torch.tensor([1]), 3)
    assert refs.indices.tolist() == [[0, 2, 3]]
    # A non-top target may get references that score above it (official behaviour).
    logits = torch.tensor([[9.0, 1.0, 1.4, 0.0, 8.0]])
    refs = select_references("nearest", logits, torch.tensor([2]), 2)
    assert refs.indices.tolist() == [[1, 3]]


@pytest.mark.parametrize("strategy", ["nearest", "top", "weights"])
def test_masked_classes_are_never_references(strategy: str) -> None:
    # A class the model masks with -inf is no look-alike: it is never chosen, and rows run short (-1) rather than
    # pick it; the target is still excluded by index.
    inf = float("inf")
    logits = torch.tensor([[0.0, 0.5, -inf, 0.2], [0.3, 0.5, -inf, -inf]])
    weights = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.01], [0.0, 1.0]])  # class 2 is the most similar row
    refs = select_references(strategy, logits, torch.tensor([0, 1]), 3, weights).indices
    expected = {"nearest": [[3, 1, -1], [0, -1, -1]], "top": [[1, 3, -1], [0, -1, -1]],
                "weights": [[1, 3, -1], [0, -1, -1]]}[strategy]
    assert refs.tolist() == expected
    with pytest.raises(InvalidArgumentError, match=r"NaN for image\(s\) \[1\]"):
        select_references(strategy, torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0]]), torch.tensor([0, 0]), 2,
                          weights[:3])


def test_a_masked_target_or_explicit_reference_is_refused() -> None:
    logits = torch.tensor([[0.0, 0.5, -float("inf"), 0.2]])
    with pytest.raises(InvalidArgumentError, match=r"target class 2 of image 0 has logit -inf"):
        select_references("nearest", logits, torch.tensor([2]), 2)
    with pytest.raises(InvalidArgumentError, match=r"reference class 2 of image 0 has logit -inf"):
        select_references([[1, 2]], logits, torch.tensor([0]), 2)


@pytest.mark.parametrize("aggregation", ["mean", "softmax"])
def test_padding_next_to_an_infinite_logit_stays_finite(aggregation: str) -> None:
    # Ragged rows pad with -1, which gathers class 0; class 0 at -inf must not turn 0 * inf into NaN.
    logits = torch.tensor([[-float("inf"), 1.0, 2.0, 0.5], [-float("inf"), 0.0, 3.0, 1.0]], requires_grad=True)
    refs = select_references([[1, 3], [3]], logits, torch.tensor([2, 2]), 2)
    u, v = contrast_terms(logits, torch.tensor([2, 2]), refs, aggregation)
    (u - 0.6 * v).sum().backward()
    assert bool(u.isfinite().all() and v.isfinite().all() and logits.grad.isfinite().all())  # type: ignore[union-attr]
    if aggregation == "mean":
        assert torch.allclose(v, torch.tensor([0.75, 1.0]))


def test_top_is_the_highest_other_classes() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 5.0, 1.0]])
    assert select_references("top", logits, torch.tensor([3]), 3).indices.tolist() == [[1, 2, 4]]
    assert select_references("top", logits, torch.tensor([1]), 3).indices.tolist() == [[3, 2, 4]]


def test_weights_ranks_by_cosine_similarity_of_classifier_rows() -> None:
    weights = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    logits = torch.zeros(1, 5)
    refs = select_references("weights", logits, torch.tensor([0]), 3, weights)
    assert refs.indices.tolist() == [[1, 4, 2]]
    with pytest.raises(InvalidArgumentError, match="classifier_weights"):
        select_references("weights", logits, torch.tensor([0]), 3, None)


def test_fewer_classes_than_t_and_a_single_class() -> None:
    logits = torch.randn(2, 3)
    targets = resolve_targets(None, logits)
    refs = select_references("nearest", logits, targets, 5)
    assert refs.indices.shape == (2, 2)
    assert not (refs.indices == targets[:, None]).any()
    single = select_references("nearest", torch.randn(2, 1), torch.zeros(2, dtype=torch.long), 3)
    assert single.indices.shape == (2, 0)
    _, v = contrast_terms(torch.randn(2, 1), torch.zeros(2, dtype=torch.long), single, "softmax")
    assert torch.equal(v, torch.zeros(2))


def test_explicit_references_ragged_lists_are_padded_and_validated() -> None:
    logits = torch.randn(2, 6)
    targets = torch.tensor([0, 1])
    refs = select_references([[1, 2, 3], [4]], logits, targets, 3)
    assert refs.indices.tolist() == [[1, 2, 3], [4, -1, -1]]
    assert refs.strategy == "explicit"
    with pytest.raises(InvalidArgumentError, match="expected a list of 2 lists"):
        select_references([[1, 2]], logits, targets, 3)
    with pytest.raises(InvalidArgumentError, match=r"shape \(3, 2\); expected \(B, T\) = \(2, T\)"):
        select_references(torch.ones(3, 2, dtype=torch.long), logits, targets, 3)
    with pytest.raises(InvalidArgumentError, match="its target class 1"):
        select_references([[2], [1, 3]], logits, targets, 3)
    with pytest.raises(InvalidArgumentError, match="reference class 9"):
        select_references([[2], [9]], logits, targets, 3)
    with pytest.raises(InvalidArgumentError, match="repeat a class"):
        select_references([[2, 2], [3]], logits, targets, 3)
    with pytest.raises(InvalidArgumentError, match="unknown reference strategy 'closest'"):
        select_references("closest", logits, targets, 3)


def test_explicit_references_in_other_containers_and_bad_kinds() -> None:
    logits = torch.randn(2, 6)
    targets = torch.tensor([0, 1])
    expected = [[2, 3], [4, 5]]
    for given in (np.array(expected), [torch.tensor([2, 3]), np.array([4, 5])], torch.tensor(expected)):
        assert select_references(given, logits, targets, 3).indices.tolist() == expected
    # -1 is padding inside the engine, never a class a user may give (in either form).
    for bad in ([[-1], [2]], torch.tensor([[-1], [2]])):
        with pytest.raises(InvalidArgumentError, match=r"reference class .*-1 .*classes are 0\.\.5"):
            select_references(bad, logits, targets, 3)
    for bad, name in ((3, "int 3"), (None, "NoneType None"), (2.5, "float")):
        with pytest.raises(InvalidTypeError, match=f"references must be a strategy name.*got {name}.*num_references="):
            select_references(bad, logits, targets, 3)
    with pytest.raises(InvalidTypeError, match=r"references\[0\] is int 2; expected a list of classes"):
        select_references([2, 3], logits, targets, 3)
    with pytest.raises(InvalidTypeError, match=r"must be integer classes; got \[2\.0\]"):
        select_references([torch.tensor([2.0]), [3]], logits, targets, 3)


def test_mean_aggregation_is_paper_eq8_with_ragged_rows() -> None:
    logits = torch.tensor([[1.0, 2.0, 4.0, 8.0], [3.0, 5.0, 7.0, 11.0]])
    targets = torch.tensor([0, 3])
    refs = References(torch.tensor([[1, 2, 3], [0, -1, -1]]), "explicit")
    score = finer_score(logits, targets, refs, gamma=0.5, aggregation="mean")
    expected = torch.tensor([1.0 - 0.5 * (2 + 4 + 8) / 3, 11.0 - 0.5 * 3.0])
    torch.testing.assert_close(score, expected)


@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0, 2.0])
def test_softmax_aggregation_equals_grad_cam_finer_weighted_target_with_gradients(gamma: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 4, 6])
    rows = [[1, 2, 3], [0, 6, 5], [2, 3, 1]]
    ours = finer_score(logits, targets, References(torch.tensor(rows), "explicit"), gamma, "softmax")
    oracle = torch.stack(
        [FinerWeightedTarget(int(c), r, gamma)(logits[i]) for i, (c, r) in enumerate(zip(targets, rows, strict=True))]
    )
    torch.testing.assert_close(ours, oracle, rtol=1e-12, atol=1e-12)
    # The probabilities are not detached: gradients agree too.
    (ours_grad,) = torch.autograd.grad(ours.sum(), logits)
    (oracle_grad,) = torch.autograd.grad(oracle.sum(), logits)
    torch.testing.assert_close(ours_grad, oracle_grad, rtol=1e-12, atol=1e-12)


def test_a_classifier_module_without_weight_points_at_its_linear_layer() -> None:
    from finercam.objectives import classifier_matrix

    head = nn.Sequential(nn.Dropout(), nn.Linear(4, 5))
    with pytest.raises(InvalidTypeError, match=r"a Sequential, which has no \.weight; .*<this module>\[1\]"):
        classifier_matrix(head, 5)
    with pytest.raises(InvalidTypeError, match=r"a ReLU, which has no \.weight; pass the model's final nn\.Linear"):
        classifier_matrix(nn.ReLU(), 5)
    assert classifier_matrix(head[1], 5) is head[1].weight


def test_targets_take_arrays_and_zero_d_tensors_like_references() -> None:
    logits = torch.randn(2, 5)
    expected = torch.tensor([1, 2])
    for targets in (np.array([1, 2]), [torch.tensor(1), torch.tensor(2)], [np.int64(1), np.array(2)], expected):
        assert torch.equal(resolve_targets(targets, logits), expected)
    assert torch.equal(resolve_targets(np.int64(3), logits), torch.tensor([3, 3]))
    with pytest.raises(InvalidTypeError, match="integer class indices"):
        resolve_targets(np.array([1.0, 2.0]), logits)
    with pytest.raises(InvalidTypeError, match="integer class indices"):
        resolve_targets([torch.tensor(1.0), torch.tensor(2.0)], logits)
