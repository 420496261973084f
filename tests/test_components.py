"""Connected components of binary masks (the engine's pruning step), against hand-labelled cases."""

from __future__ import annotations

import pytest
import torch

from monai_medcam.components import connected_components, largest_components


def _groups(labels: torch.Tensor) -> list[set[tuple[int, ...]]]:
    """The components as sets of pixel coordinates, sorted by their first pixel."""
    groups: dict[int, set] = {}
    for index in labels.nonzero().tolist():
        groups.setdefault(int(labels[tuple(index)]), set()).add(tuple(index))
    return sorted(groups.values(), key=min)


def test_components_in_2d_join_through_corners():
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, 0, 0:2, 0:2] = 1  # a 2 x 2 square...
    mask[0, 0, 2, 2] = 1  # ...and a pixel touching its corner: one component of 5
    mask[0, 0, 0, 5] = mask[0, 0, 1, 5] = 1  # a vertical pair
    mask[0, 0, 5, 0] = 1  # a lone pixel
    mask[1, 0, 3, 1:5] = 1  # image 1: one bar
    labels = connected_components(mask)
    assert labels.shape == mask.shape and labels.dtype == torch.long
    assert ((labels > 0) == (mask > 0)).all()
    assert _groups(labels[0, 0]) == [
        {(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)},
        {(0, 5), (1, 5)},
        {(5, 0)},
    ]
    assert _groups(labels[1, 0]) == [{(3, 1), (3, 2), (3, 3), (3, 4)}]


def test_components_in_3d_and_a_long_winding_one():
    mask = torch.zeros(1, 1, 4, 4, 4)
    mask[0, 0, 0, 0, 0] = mask[0, 0, 1, 1, 1] = 1  # touching at a corner: one component
    mask[0, 0, 3, 3, 3] = 1
    assert [len(g) for g in _groups(connected_components(mask)[0, 0])] == [2, 1]
    # a serpentine through a 9 x 9 image: one component although its ends are 41 pixels apart
    snake = torch.zeros(1, 1, 9, 9)
    snake[0, 0, 0::2, :] = 1
    snake[0, 0, 1::4, 8] = 1
    snake[0, 0, 3::4, 0] = 1
    labels = connected_components(snake)
    assert len(_groups(labels[0, 0])) == 1 and labels.count_nonzero() == snake.count_nonzero() == 49


def test_largest_components_in_order_and_padded():
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, 0, 0, 0] = 1
    mask[0, 0, 2:5, 2:5] = 1
    mask[0, 0, 0, 3:5] = 1
    labels = connected_components(mask)
    order = largest_components(labels, 4)
    assert order.shape == (2, 4)
    sizes = [int((labels[0] == i).sum()) for i in order[0].tolist() if i]
    assert sizes == [9, 2, 1] and order[0, 3] == 0
    assert order[1].tolist() == [0, 0, 0, 0]  # an empty mask has no components
    # equal sizes: the lower label first (a component's label is its highest pixel index)
    tie = torch.zeros(1, 1, 4, 4)
    tie[0, 0, 3, 3] = tie[0, 0, 0, 0] = tie[0, 0, 0, 2] = 1
    assert largest_components(connected_components(tie), 3).tolist() == [[1, 3, 16]]


def test_components_reject_a_bad_shape():
    with pytest.raises(ValueError, match=r"mask must have shape \(B, 1, H, W\[, D\]\), got \(6, 6\)"):
        connected_components(torch.zeros(6, 6))
