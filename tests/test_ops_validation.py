"""Bad inputs to the ai.sige ops give a ValueError naming the problem (validate_inputs, the numpy
references and the OpRun classes under onnx.reference)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

from sige_export import custom_ops as co
from sige_export.custom_ops.testing import model_from_nodes, run_reference
from sige_export.mask import block_indices, snap_block

F = np.float32


def z(*shape: int, dtype: Any = F) -> np.ndarray:
    return np.zeros(shape, dtype)


IDX = np.array([[0, 0], [-2, 3]], np.int32)
GATHER = ("SigeGather", [z(1, 3, 8, 8), IDX], {"block": 4})
CONV = ("SigeSparseConv2d", [z(1, 4, 8, 8), IDX, z(6, 2, 3, 3)], {"block": 6, "group": 2})
SCATTER = ("SigeScatter", [z(2, 3, 2, 2), z(1, 3, 6, 6), np.array([[0, 0], [2, 2]], np.int32)], {})
SG = ("SigeScatterGather", [z(2, 3, 2, 2), z(1, 3, 6, 6), np.full((6, 6), -1, np.int32), IDX], {"block": 4})
RES = ("SigeScatterWithBlockResidual", [z(1, 3, 2, 2), z(1, 3, 6, 6), np.array([[0, 0]], np.int32),
                                         z(1, 3, 4, 4), z(1, 3, 6, 6), np.array([[2, 2]], np.int32)], {})
SMOM = ("SigeScatterMoments", [z(2, 4, 2, 2), z(1, 4, 6, 6), np.array([[0, 0], [2, 2]], np.int32), z(1, 2, 1)],
        {"groups": 2})
MOM = ("SigeTileMoments", [z(1, 4, 8, 8), z(1, 4, 8, 8), IDX, z(1, 2, 1)], {"block": 4, "groups": 2})


def with_input(case: tuple[str, list[Any], dict[str, Any]], i: int, value: Any,
               **attrs: Any) -> tuple[str, list[Any], dict[str, Any]]:
    op, arrays, base_attrs = case
    arrays = list(arrays) + [None] * (i + 1 - len(arrays))
    arrays[i] = value
    return op, arrays, {**base_attrs, **attrs}


BAD: list[tuple[str, tuple[str, list[Any], dict[str, Any]], str]] = [
    ("gather x rank", with_input(GATHER, 0, z(3, 8, 8)), r"'x' must have rank 4"),
    ("gather x dtype", with_input(GATHER, 0, z(1, 3, 8, 8, dtype=np.int32)), r"'x' must be a float"),
    ("gather indices int64", with_input(GATHER, 1, IDX.astype(np.int64)), r"indices must be int32, got int64"),
    ("gather indices [N,3]", with_input(GATHER, 1, z(2, 3, dtype=np.int32)), r"must have shape \[N, 2\], got \[2, 3\]"),
    ("gather indices rank 1", with_input(GATHER, 1, z(2, dtype=np.int32)), r"indices must have shape \[N, 2\]"),
    ("gather below halo", with_input(GATHER, 1, np.array([[-4, 0]], np.int32)),
     r"indices\[0\].*outside the image plus halo"),
    ("gather past image", with_input(GATHER, 1, np.array([[0, 0], [0, 8]], np.int32)),
     r"indices\[1\].*outside the image"),
    ("gather scale channels", with_input(GATHER, 2, z(4, 1, 1)), r"scale of shape \[4, 1, 1\] is not broadcastable"),
    ("gather shift spatial", with_input(GATHER, 3, z(1, 3, 7, 8)), r"shift .*not broadcastable.*\[1, 3, 8, 8\]"),
    ("gather scale rank 5", with_input(GATHER, 2, z(1, 1, 3, 1, 1)), r"scale .*not broadcastable"),
    ("gather frame", with_input(GATHER, 1, IDX, downsample=3), r"x's H = 8 times upsample 1 is not divisible by downsample 3"),
    ("gather resample spatial scale", with_input(GATHER, 2, z(1, 3, 8, 8), upsample=2),
     r"scale of shape \[1, 3, 8, 8\] has a spatial extent; with upsample/downsample"),
    ("gather downsampled past frame", with_input(GATHER, 1, np.array([[4, 0]], np.int32), downsample=2),
     r"does not overlap the 4x4 image"),
    ("conv upsample 0", with_input(CONV, 1, IDX, upsample=(0, 1)), r"'upsample' must be positive"),
    ("conv weight channels", with_input(CONV, 2, z(6, 4, 3, 3)), r"channel mismatch: weight \[6, 4, 3, 3\]"),
    ("conv weight rank", with_input(CONV, 2, z(6, 2, 3)), r"'weight' must have rank 4"),
    ("conv cout vs group", with_input(CONV, 2, z(5, 2, 3, 3)), r"output channels 5 are not divisible by group 2"),
    ("conv bias", with_input(CONV, 3, z(5)), r"bias must have shape \[6\]"),
    ("conv kernel > block", with_input(CONV, 2, z(6, 2, 7, 7)), r"kernel 7x7 is larger than the block 6x6"),
    ("conv indices", with_input(CONV, 1, np.array([[8, 0]], np.int32)), r"outside the image plus halo"),
    ("scatter channels", with_input(SCATTER, 0, z(2, 4, 2, 2)),
     r"channel mismatch: blocks have 4 channels, base has 3"),
    ("scatter batch", with_input(SCATTER, 0, z(3, 3, 2, 2)), r"blocks batch 3 != base batch 1 \* number of indices 2"),
    ("scatter base rank", with_input(SCATTER, 1, z(3, 6, 6)), r"'base' must have rank 4"),
    ("scatter residual", with_input(SCATTER, 3, z(1, 3, 6, 5)), r"residual shape \[1, 3, 6, 5\] != base shape"),
    ("scatter outside", with_input(SCATTER, 2, np.array([[0, 0], [6, 0]], np.int32)),
     r"indices\[1\].*outside the image plus halo.*lands at \[6, 0\]"),
    ("scatter outside offset", with_input(SCATTER, 2, np.array([[0, 0], [-3, 0]], np.int32), offset=1),
     r"indices\[1\].*outside"),
    ("scatter indices float", with_input(SCATTER, 2, z(2, 2)), r"indices must be int32, got float32"),
    ("sg map dtype", with_input(SG, 2, np.full((6, 6), -1, np.int64)), r"scatter_map must be int32"),
    ("sg map shape", with_input(SG, 2, np.full((6, 5), -1, np.int32)), r"scatter_map shape \[6, 5\] != base spatial"),
    ("sg map values", with_input(SG, 2, np.full((6, 6), 8, np.int32)), r"scatter_map values must be in \[-1, 8\)"),
    ("sg channels", with_input(SG, 0, z(2, 2, 2, 2)), r"channel mismatch"),
    ("sg gather outside", with_input(SG, 3, np.array([[6, 0]], np.int32)), r"outside the image plus halo"),
    ("sg shift", with_input(SG, 5, z(2, 3, 1, 1)), r"shift .*not broadcastable"),
    ("res shortcut base", with_input(RES, 4, z(1, 3, 6, 7)), r"shortcut_base shape \[1, 3, 6, 7\] != base shape"),
    ("res shortcut channels", with_input(RES, 3, z(1, 2, 4, 4)), r"channel mismatch: shortcut_blocks"),
    ("res shortcut indices", with_input(RES, 5, np.array([[2, 2]], np.int64)), r"shortcut_indices must be int32"),
    ("res shortcut outside", with_input(RES, 5, np.array([[9, 2]], np.int32)), r"shortcut_indices\[0\].*outside"),
    ("moments original shape", with_input(MOM, 1, z(1, 4, 8, 7)), r"original shape \[1, 4, 8, 7\] != x shape"),
    ("moments groups", with_input(MOM, 0, z(1, 4, 8, 8), groups=3), r"4 channels, not a multiple of groups=3"),
    ("moments mean shape", with_input(MOM, 3, z(1, 2)), r"'mean' must have rank 3"),
    ("moments mean groups", with_input(MOM, 3, z(1, 4, 1)), r"mean must have shape \[B, groups, 1\] = \[1, 2, 1\]"),
    ("moments tile outside", with_input(MOM, 2, np.array([[0, 8]], np.int32)), r"indices\[0\].*outside the image"),
    ("moments groups 0", with_input(MOM, 0, z(1, 4, 8, 8), groups=0), r"'groups' must be >= 1"),
    ("scatter moments shift", with_input(SMOM, 5, z(1, 4, 6, 6)), r"shift of shape \[1, 4, 6, 6\] is not per channel"),
    ("scatter moments mean", with_input(SMOM, 3, z(1, 4, 1)), r"mean must have shape \[B, groups, 1\] = \[1, 2, 1\]"),
    ("scatter moments outside", with_input(SMOM, 2, np.array([[0, 0], [6, 0]], np.int32)), r"indices\[1\].*outside"),
    ("scatter moments batch", with_input(SMOM, 0, z(3, 4, 2, 2)), r"blocks batch 3 != base batch 1"),
    ("bad attribute", with_input(GATHER, 0, z(1, 3, 8, 8), activation="mish"), r"'activation' must be one of"),
    ("unknown attribute", with_input(GATHER, 0, z(1, 3, 8, 8), stride=2), r"unknown attribute\(s\) \['stride'\]"),
]


@pytest.mark.parametrize("case,pattern", [(c, p) for _, c, p in BAD], ids=[n for n, _, _ in BAD])
def test_bad_input_is_named(case: tuple[str, list[Any], dict[str, Any]], pattern: str) -> None:
    op, arrays, attrs = case
    with pytest.raises(ValueError, match=pattern):
        co.validate_inputs(op, arrays, attrs)
    with pytest.raises(ValueError, match=pattern):
        co.reference(op, *arrays, **attrs)


UPSAMPLED = with_input(GATHER, 1, np.array([[15, 0], [-3, 15]], np.int32), upsample=2)  # a 16x16 frame


@pytest.mark.parametrize("case", [GATHER, CONV, SCATTER, SG, RES, MOM, SMOM, UPSAMPLED], ids=lambda c: c[0])
def test_good_inputs_pass(case: tuple[str, list[Any], dict[str, Any]]) -> None:
    op, arrays, attrs = case
    co.validate_inputs(op, arrays, attrs)
    assert co.reference(op, *arrays, **attrs).shape == tuple(co.infer_shape(op, [a.shape for a in arrays], attrs)[0])


def test_reference_evaluator_raises_the_same_error() -> None:
    feeds = {"x": z(1, 3, 8, 8), "i": np.array([[0, 0], [0, 9]], np.int32)}
    model = model_from_nodes([co.make_node("SigeGather", ["x", "i"], ["y"], block=4)], feeds, ["y"])
    with pytest.raises(ValueError, match=r"SigeGather: indices\[1\] = \[0, 9\] is outside the image plus halo"):
        run_reference(model, feeds)


@pytest.mark.parametrize("fn,pattern", [
    (lambda: block_indices(np.zeros((8, 8), bool), snap_block(6, 3, 1, 1), in_hw=(8, 9)),
     r"mask size 8x8 does not match the input size 8x9"),
    (lambda: co.infer_shape("SigeGather", [(1, 3, 8), (2, 2)], {"block": 4}), r"'x' must have rank 4"),
    (lambda: co.make_node("SigeScatter", ["a", "b", "c", "d", "e"], ["y"]), r"5 inputs given, at most 4"),
])
def test_other_errors(fn: Callable[[], Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        fn()
