"""TE / TIR definitions of the ``ai.sige`` ops (docs/sige-ops.md), unscheduled.

Every function here builds the *computation* only; the per-target rules in
``tvm_schedules.cpu`` / ``tvm_schedules.cuda`` schedule it. Block (``sblock``) names are part of
the contract with the rules:

* ``sige_gather``  -- pre-op'ed, zero-padded gather of blocks, ``[B*N, C, bh, bw]``; with an activation
  that maps 0 to 0, ``sige_gather_raw`` (loads + affine) followed by ``sige_gather`` (activation)
* ``sige_conv``    -- the convolution over gathered blocks (reduction over ``rc, rh, rw``)
* ``sige_bias``    -- bias epilogue of ``sige_conv``
* ``sige_scatter_copy`` / ``sige_scatter`` / ``sige_shortcut`` -- scatter ops
* ``sige_scatter_gather`` -- fused scatter+gather
* ``sige_tile_moments`` / ``sige_scatter_moments`` -- ``[2, B, G, 1]`` group sums over tiles / scattered
  blocks (reduction over ``rn, rc, ri, rj``)

The block count ``N`` is symbolic (an int64 ``tir.Var``): one compiled kernel serves every
mask; inner loop nests stay static (per block ``C x bh x bw``), only the outer block loop is
dynamic. Functions carry the attribute ``sige.op`` so the schedule rules can dispatch on it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import tvm
from tvm import te, tirx as tir

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "swish", "sigmoid", "tanh", "gelu")


@dataclass(frozen=True)
class PreOp:
    """``pre(x) = act(x*scale + shift)`` (or ``act(x)*scale + shift`` when activation_first)."""

    activation: str = "identity"
    alpha: float = 0.2
    activation_first: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")

    @staticmethod
    def from_attrs(attrs: dict) -> "PreOp":
        act = attrs.get("activation", "identity")
        if isinstance(act, bytes):
            act = act.decode()
        return PreOp(str(act), float(attrs.get("alpha", 0.2)), bool(int(attrs.get("activation_first", 0))))


def _act(v, pre: PreOp):
    a = pre.activation
    f32 = "float32"
    if a == "identity":
        return v
    if a == "relu":
        return tir.max(v, tir.const(0.0, f32))
    if a == "leaky_relu":
        return tir.Select(v >= tir.const(0.0, f32), v, v * tir.const(pre.alpha, f32))
    if a in ("silu", "swish"):
        return v * tir.sigmoid(v)
    if a == "sigmoid":
        return tir.sigmoid(v)
    if a == "tanh":
        return tir.tanh(v)
    if a == "gelu":
        return tir.const(0.5, f32) * v * (tir.const(1.0, f32) + tir.erf(v * tir.const(1.0 / math.sqrt(2.0), f32)))
    raise ValueError(a)


def _bcast(t: Optional[te.Tensor], idx: Sequence):
    """Load ``t`` broadcast (numpy rules, right-aligned) to a rank-len(idx) index."""
    if t is None:
        return None
    shape = list(t.shape)
    assert len(shape) <= len(idx), f"cannot broadcast rank {len(shape)} to rank {len(idx)}"
    off = len(idx) - len(shape)
    sub = []
    for k, d in enumerate(shape):
        if isinstance(d, (int, tir.IntImm)) and int(d) == 1:
            sub.append(tir.const(0, "int64"))
        else:
            sub.append(idx[off + k])
    return t(*sub)


def _apply_pre(v, pre: PreOp, scale, shift, idx):
    s = _bcast(scale, idx)
    t = _bcast(shift, idx)

    def affine(u):
        if s is not None:
            u = u * s
        if t is not None:
            u = u + t
        return u

    return affine(_act(v, pre)) if pre.activation_first else _act(affine(v), pre)


# act(0) == 0: the zero padding outside the image may be applied before the activation
_ZERO_PRESERVING = ("relu", "leaky_relu", "silu", "swish", "tanh", "gelu")


def _gather_compute(shape, element, pre: PreOp, name: str) -> te.Tensor:
    """``te.compute`` of a pre-op'ed gather; ``element(pre_part, bn, c, i, j)`` loads one value and applies
    ``pre_part``. With an activation mapping 0 to 0 (applied after the affine) it runs in two stages:
    ``name + "_raw"`` (loads + affine) and ``name`` (the activation): over a block's contiguous outputs the
    activation vectorises (SiLU's exp in vector registers), fused with the per-element index arithmetic
    of the loads it does not."""
    if pre.activation not in _ZERO_PRESERVING or pre.activation_first:
        return te.compute(shape, lambda *i: element(pre, *i), name=name)
    affine = PreOp("identity")
    raw = te.compute(shape, lambda *i: element(affine, *i), name=name + "_raw")
    return te.compute(shape, lambda *i: _act(raw(*i), pre), name=name)


def _i64(e):
    return e if e.dtype == "int64" else tir.Cast("int64", e)


def concat_load(xs: Sequence[te.Tensor], b, c, h, w):
    """``concat(xs, axis=1)[b, c, h, w]`` without materialising the concatenation (channel select)."""
    offs, o = [], 0
    for t in xs:
        offs.append(o)
        o += int(t.shape[1])
    v = None
    for t, off in zip(xs, offs):
        cl = tir.max(tir.min(c - off, int(t.shape[1]) - 1), 0)
        val = t[b, cl, h, w]
        v = val if v is None else tir.if_then_else(c >= off, val, v)
    return v


@dataclass(frozen=True)
class Frame:
    """What a gather reads: x resized (nearest, asymmetric, floor: ``frame[r] = x[r * down // up]`` per axis), and
    outside it 0 (after the pre-ops), its mirror image (``reflect``) or its border (``edge``)."""

    up: tuple[int, int] = (1, 1)
    down: tuple[int, int] = (1, 1)
    padding: str = "zeros"

    def __post_init__(self):
        if self.padding not in ("zeros", "reflect", "edge"):
            raise ValueError(f"unknown padding_mode {self.padding!r}; known: zeros, reflect, edge")

    @staticmethod
    def from_attrs(attrs: dict) -> "Frame":
        padding = attrs.get("padding_mode", "zeros")
        return Frame(tuple(int(v) for v in attrs.get("upsample", (1, 1))),
                     tuple(int(v) for v in attrs.get("downsample", (1, 1))),
                     padding.decode() if isinstance(padding, bytes) else str(padding))

    def size(self, h: int, w: int) -> tuple[int, int]:
        return int(h) * self.up[0] // self.down[0], int(w) * self.up[1] // self.down[1]

    def source(self, axis: int, r):
        u, d = self.up[axis], self.down[axis]
        r = r * d if d != 1 else r
        return tir.floordiv(r, u) if u != 1 else r

    def outside(self, r, n: int):
        """The position read for ``r`` of an axis of length ``n`` (custom_ops ``padded_position``), always valid."""
        if self.padding == "reflect":
            r = (n - 1) - tir.abs((n - 1) - tir.abs(r))
        return tir.max(tir.min(r, n - 1), 0)


def gather_te(x, indices: te.Tensor, block: Sequence[int], pre: PreOp = PreOp(),
              scale: Optional[te.Tensor] = None, shift: Optional[te.Tensor] = None, name: str = "sige_gather",
              frame: Frame = Frame()):
    """``y[b*N+n, c, i, j] = pre(frame)[b, c, h_n+i, w_n+j]``, 0 outside the frame unless it pads otherwise
    (``x``, or ``x`` resized by ``frame``; scale/shift per channel then). ``x`` may be a list of tensors: their
    channel concatenation, read in place (never materialised)."""
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    x = xs[0]
    B = x.shape[0]
    H, W = frame.size(x.shape[2], x.shape[3])
    C = sum(int(t.shape[1]) for t in xs)
    N = indices.shape[0]
    bh, bw = int(block[0]), int(block[1])

    def load(part: PreOp, b, c, h, w):
        h, w = frame.source(0, h), frame.source(1, w)
        xv = x[b, c, h, w] if len(xs) == 1 else concat_load(xs, b, c, h, w)
        return _apply_pre(xv, part, scale, shift, (b, c, h, w))

    def f(part: PreOp, bn, c, i, j):
        b = tir.floordiv(bn, N)
        n = tir.floormod(bn, N)
        h0, w0 = _i64(indices[n, 0]), _i64(indices[n, 1])
        h, w = h0 + i, w0 + j
        # Two paths, chosen per block: a block inside the image loads at addresses affine in the column (a row
        # vectorises); one crossing the border loads clamped (always valid) addresses and zeroes the outside
        # by a multiply (a guarded load or a select would stop the row from vectorising, and the simplifier
        # would drop the clamps of a select's loads).
        interior = tir.all(h0 >= 0, h0 + bh <= H, w0 >= 0, w0 + bw <= W)
        border = load(part, b, c, frame.outside(h, H), frame.outside(w, W))
        if frame.padding == "zeros":
            border = border * tir.Cast(x.dtype, tir.all(h >= 0, h < H, w >= 0, w < W))
        return tir.if_then_else(interior, load(part, b, c, h, w), border)

    return _gather_compute((B * N, C, bh, bw), f, pre, name)


def sparse_conv2d_te(x, indices, weight, bias=None, scale=None, shift=None, *, block, strides=(1, 1), group=1,
                     pre: PreOp = PreOp(), frame: Frame = Frame()):
    """SigeSparseConv2d = Conv(SigeGather(x, indices), weight, bias, pads=0, strides, group)."""
    return block_conv_te(gather_te(x, indices, block, pre, scale, shift, frame=frame), weight, bias,
                         strides=strides, group=group)


def block_conv_te(g, weight, bias=None, *, strides=(1, 1), group=1):
    """Conv (pads 0) over gathered blocks ``g`` [B*N, C, bh, bw], computed by a gather stage (``sige_gather``
    or ``sige_scatter_gather``) of the same function (the schedules compute it per tile)."""
    BN, C, bh, bw = g.shape
    packed = len(weight.shape) == 5
    if packed:  # pre-packed [Cout/v, Cin, kh, kw, v] (tvm_schedules.packing)
        cov, Cg, kh, kw, pv = (int(d) for d in weight.shape)
        Cout = cov * pv
        if int(group) != 1:
            raise ValueError("SigeSparseConv2d: packed weights need group=1")
    else:
        Cout, Cg, kh, kw = (int(d) for d in weight.shape)
    sh, sw = int(strides[0]), int(strides[1])
    oh, ow = (int(bh) - kh) // sh + 1, (int(bw) - kw) // sw + 1
    group = int(group)
    if Cout % group or int(C) != Cg * group:
        raise ValueError(f"SigeSparseConv2d: channels {int(C)} / weight {weight.shape} inconsistent with group={group}")
    opg = Cout // group
    rc = te.reduce_axis((0, Cg), name="rc")
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")

    def conv(bn, co, i, j):
        ci = rc if group == 1 else tir.floordiv(co, opg) * Cg + rc
        wv = weight[tir.floordiv(co, pv), rc, rh, rw, tir.floormod(co, pv)] if packed else weight[co, rc, rh, rw]
        return te.sum(g[bn, ci, i * sh + rh, j * sw + rw] * wv, axis=[rc, rh, rw])

    y = te.compute((BN, Cout, oh, ow), conv, name="sige_conv")
    if bias is not None:
        y = te.compute((BN, Cout, oh, ow), lambda bn, co, i, j: y[bn, co, i, j] + bias[co], name="sige_bias")
    return y


def conv2d_packed_te(x, weight, bias=None, *, pads=(0, 0, 0, 0), strides=(1, 1)):
    """ONNX Conv (group 1, dilation 1) with weights pre-packed ``[Cout/v, Cin, kh, kw, v]``: zero padding
    (``pad_temp``, only when ``pads`` are not all 0) + ``conv2d_nchw`` (+ ``T_add`` bias)."""
    B, C, H, W = x.shape
    cov, Ci, kh, kw, v = (int(d) for d in weight.shape)
    Cout = cov * v
    pt, pl, pb, pr = (int(p) for p in pads)
    sh, sw = int(strides[0]), int(strides[1])
    if int(C) != Ci:
        raise ValueError(f"Conv: input channels {C} != packed weight {tuple(weight.shape)}")
    if any((pt, pl, pb, pr)):
        def pad(b, c, h, w):
            inside = tir.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
            return tir.if_then_else(inside, x[b, c, h - pt, w - pl], tir.const(0.0, x.dtype))

        xp = te.compute((B, C, H + pt + pb, W + pl + pr), pad, name="pad_temp")
    else:
        xp = x
    Hp, Wp = xp.shape[2], xp.shape[3]
    oh = tir.floordiv(Hp - kh, sh) + 1
    ow = tir.floordiv(Wp - kw, sw) + 1
    rc = te.reduce_axis((0, Ci), name="rc")
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    y = te.compute((B, Cout, oh, ow), lambda b, co, i, j: te.sum(
        xp[b, rc, i * sh + rh, j * sw + rw] * weight[tir.floordiv(co, v), rc, rh, rw, tir.floormod(co, v)],
        axis=[rc, rh, rw]), name="conv2d_nchw")
    if bias is not None:
        y = te.compute((B, Cout, oh, ow), lambda b, co, i, j: y[b, co, i, j] + bias[co], name="T_add")
    return y


def _moments_compute(B, groups: int, extents: Sequence, values, name: str) -> te.Tensor:
    """``[2, B, groups, 1]``: over reduce axes of ``extents`` (blocks, channels of a group, rows, columns), the
    sums of ``d = new - old`` and ``d * (new + old - 2 m)``; ``values(b, g, rn, rc, ri, rj)`` gives
    ``(new, old, inside, m)`` (elements not ``inside`` count 0) with loads valid for every element, so an
    element counts by a multiply (vectorisable), not a guarded load."""
    axes = [te.reduce_axis((0, e), name=n) for n, e in zip(("rn", "rc", "ri", "rj"), extents)]

    def term(s, b, g):
        new, old, inside, m = values(b, g, *axes)
        d = new - old
        v = tir.if_then_else(s == 0, d, d * (new + old - m - m))
        # a multiply, not a select: under a select's condition the simplifier drops the clamps that keep the
        # loads of elements outside the image valid
        return v * tir.Cast("float32", inside)

    return te.compute((2, B, int(groups), 1), lambda s, b, g, u: te.sum(term(s, b, g), axis=axes), name=name)


def tile_moments_te(x, original, indices: te.Tensor, mean: te.Tensor, *, block: Sequence[int], groups: int):
    """SigeTileMoments: ``y[0, b, g, 0] = sum(x - original)``, ``y[1, b, g, 0] = sum((x - original) *
    (x + original - 2 mean[b, g, 0]))`` over the tiles, the group's channels and the tile pixels (0 outside
    the image). ``x`` / ``original`` may be lists of tensors: their channel concatenation, read in place."""
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    os_ = list(original) if isinstance(original, (list, tuple)) else [original]
    B, _, H, W = xs[0].shape
    per_group = sum(int(t.shape[1]) for t in xs) // int(groups)
    th, tw = int(block[0]), int(block[1])
    # A tile crossing the border is read through the window of its size shifted into the image: the same
    # in-image elements (the sums ignore order) at addresses affine in the column, so rows vectorise.
    shifted = int(H) >= th and int(W) >= tw

    def load(parts, b, c, h, w):
        return parts[0][b, c, h, w] if len(parts) == 1 else concat_load(parts, b, c, h, w)

    def values(b, g, rn, rc, ri, rj):
        h0, w0 = _i64(indices[rn, 0]), _i64(indices[rn, 1])
        c = g * per_group + rc
        if shifted:
            h = tir.max(tir.min(h0, H - th), 0) + ri
            w = tir.max(tir.min(w0, W - tw), 0) + rj
            inside = tir.all(h >= h0, h < h0 + th, w >= w0, w < w0 + tw)
        else:
            h, w = h0 + ri, w0 + rj
            inside = tir.all(h >= 0, h < H, w >= 0, w < W)
            h, w = tir.max(tir.min(h, H - 1), 0), tir.max(tir.min(w, W - 1), 0)
        return load(xs, b, c, h, w), load(os_, b, c, h, w), inside, mean[b, g, 0]

    return _moments_compute(B, groups, (indices.shape[0], per_group, th, tw), values, "sige_tile_moments")


def scatter_moments_te(blocks, base, indices: te.Tensor, mean: te.Tensor, scale=None, shift=None, *,
                       offset: Sequence[int], stride: Sequence[int], groups: int):
    """SigeScatterMoments: the group sums of ``d = pre(block) - pre(base)`` and ``d * (pre(block) + pre(base) -
    2 mean)`` over the scattered blocks' in-image elements (``pre(v) = v * scale + shift`` per channel)."""
    B, C, Ho, Wo = base.shape
    N = indices.shape[0]
    per_group = int(C) // int(groups)
    oh, ow = (int(v) for v in offset)
    sh, sw = (int(v) for v in stride)

    def values(b, g, rn, rc, ri, rj):
        c = g * per_group + rc
        r0 = tir.floordiv(_i64(indices[rn, 0]) + oh, sh)
        q0 = tir.floordiv(_i64(indices[rn, 1]) + ow, sw)
        r, q = r0 + ri, q0 + rj
        at = (b, c, tir.const(0, "int64"), tir.const(0, "int64"))
        new = blocks[b * N + rn, c, ri, rj]
        # a block inside the image reads its base rows at addresses affine in the column (vectorised); one
        # crossing the border reads clamped addresses (always valid; the outside counts 0)
        interior = tir.all(r0 >= 0, r0 + int(blocks.shape[2]) <= Ho, q0 >= 0, q0 + int(blocks.shape[3]) <= Wo)
        old = tir.if_then_else(interior, base[b, c, r, q],
                               base[b, c, tir.max(tir.min(r, Ho - 1), 0), tir.max(tir.min(q, Wo - 1), 0)])
        if scale is not None:
            new, old = new * _bcast(scale, at), old * _bcast(scale, at)
        if shift is not None:
            new, old = new + _bcast(shift, at), old + _bcast(shift, at)
        return new, old, tir.all(r >= 0, r < Ho, q >= 0, q < Wo), mean[b, g, 0]

    return _moments_compute(B, groups, (N, per_group, int(blocks.shape[2]), int(blocks.shape[3])), values,
                            "sige_scatter_moments")


def _pick(cond, a, b):
    """``a`` where ``cond`` else ``b`` (float32) by bit masks: both evaluated (their loads must be valid), no
    branch and no select (under a select's condition the simplifier may drop the clamps of its operands)."""
    mask = tir.const(0, "int32") - tir.Cast("int32", cond)
    bits = tir.bitwise_or(tir.bitwise_and(tir.reinterpret("int32", a), mask),
                          tir.bitwise_and(tir.reinterpret("int32", b), tir.bitwise_not(mask)))
    return tir.reinterpret("float32", bits)


def scatter_gather_te(blocks, base, scatter_map, indices, *, block, pre: PreOp = PreOp(), scale=None, shift=None,
                      vector_pixels: bool = False):
    """SigeScatterGather: gather from the virtual scatter of ``blocks`` into ``base`` (via ``scatter_map``).

    ``vector_pixels``: the consumer vectorises over a window's pixels (a 1x1 conv over its blocks:
    ``cpu.pointwise_blocks``), so each pixel picks its source by bit masks; otherwise by a branch per pixel,
    which loads only the side it takes (vectors of channels per pixel, or scalar code)."""
    B, C, Ho, Wo = base.shape
    BN1, _, ph, pw = blocks.shape
    N = indices.shape[0]
    bh, bw = int(block[0]), int(block[1])
    N1 = tir.floordiv(BN1, B)
    php = int(ph) * int(pw)

    aligned_windows = (bh, bw) == (int(ph), int(pw))

    def f(part: PreOp, bn, c, i, j):
        b = tir.floordiv(bn, N)
        n = tir.floormod(bn, N)
        h0, w0 = _i64(indices[n, 0]), _i64(indices[n, 1])
        h, w = h0 + i, w0 + j
        inside = tir.all(h >= 0, h < Ho, w >= 0, w < Wo)
        hc = tir.max(tir.min(h, Ho - 1), 0)
        wc = tir.max(tir.min(w, Wo - 1), 0)
        s = _i64(scatter_map[hc, wc])
        sc = tir.max(s, 0)
        m = tir.floordiv(sc, php)
        r = tir.floormod(sc, php)
        bv = blocks[tir.max(tir.min(b * N1 + m, BN1 - 1), 0), c, tir.floordiv(r, pw), tir.floormod(r, pw)]
        if vector_pixels:  # a branch on a per-lane condition would keep the whole tile scalar
            v = _apply_pre(_pick(s >= 0, bv, base[b, c, hc, wc]), part, scale, shift, (b, c, hc, wc))
            v = _pick(inside, v, tir.const(0.0, base.dtype))
        else:
            v = _apply_pre(tir.if_then_else(s >= 0, bv, base[b, c, hc, wc]), part, scale, shift, (b, c, hc, wc))
            v = tir.if_then_else(inside, v, tir.const(0.0, base.dtype))
        if not aligned_windows:
            return v
        # A window of the scattered blocks' size inside the image is one whole block when its corners are that
        # block's first and last elements, and all base when no corner is covered (a block overlapping a window
        # of its size covers one of its corners): both read rows at addresses affine in the column (the 1x1
        # convs after a 3x3 conv, whose grids coincide).
        interior = tir.all(h0 >= 0, h0 + bh <= Ho, w0 >= 0, w0 + bw <= Wo)
        h1 = tir.max(tir.min(h0 + (bh - 1), Ho - 1), 0)
        w1 = tir.max(tir.min(w0 + (bw - 1), Wo - 1), 0)
        h0c, w0c = tir.max(tir.min(h0, Ho - 1), 0), tir.max(tir.min(w0, Wo - 1), 0)
        first, last = _i64(scatter_map[h0c, w0c]), _i64(scatter_map[h1, w1])
        whole = tir.all(interior, first >= 0, tir.floormod(first, php) == 0, last == first + (php - 1))
        empty = tir.all(interior, first < 0, last < 0, scatter_map[h0c, w1] < 0, scatter_map[h1, w0c] < 0)
        # (the branches run only for windows inside the image: their unclamped rows are valid there)
        block_v = _apply_pre(blocks[tir.max(tir.min(b * N1 + tir.floordiv(first, php), BN1 - 1), 0), c, i, j],
                             part, scale, shift, (b, c, h, w))
        base_v = _apply_pre(base[b, c, h, w], part, scale, shift, (b, c, h, w))
        return tir.if_then_else(whole, block_v, tir.if_then_else(empty, base_v, v))

    return _gather_compute((B * N, C, bh, bw), f, pre, "sige_scatter_gather")


# -- scatter ops: TIR (data-dependent writes) ---------------------------------------------------
def copy_primfunc(B, C, Ho, Wo):
    """``y = base``: the full-map copy that SigeScatter's output starts from (one ``memcpy`` per plane on CPU)
    when the scatter does not write into a working copy."""
    from tvm.script import tirx as T

    B, C, Ho, Wo = (int(v) for v in (B, C, Ho, Wo))

    @T.prim_func(private=True, s_tir=True)
    def copy(base: T.Buffer((B, C, Ho, Wo), "float32"), y: T.Buffer((B, C, Ho, Wo), "float32")):
        T.func_attr({"tirx.noalias": True, "sige.op": "SigeScatter"})
        for b, c, h, w in T.grid(B, C, Ho, Wo):
            with T.sblock("sige_scatter_copy"):
                vb, vc, vh, vw = T.axis.remap("SSSS", [b, c, h, w])
                y[vb, vc, vh, vw] = base[vb, vc, vh, vw]
    return copy


def pad_primfunc(B, C, H, W, pads, mode: str, dtype: str = "float32"):
    """ONNX Pad ``reflect`` / ``edge`` of H and W (``pads``: top, left, bottom, right): each output row copies one
    source row whole (a vector loop: the generic schedules vectorise it; TOPI's ``mirror_pad`` picks the source of
    every element: 2.5 ms for 128 x 130 x 130 here), then fills its left and right borders."""
    from tvm.script import tirx as T

    B, C, H, W = (int(v) for v in (B, C, H, W))
    pt, pl, pb, pr = (int(p) for p in pads)
    Ho, Wo = H + pt + pb, W + pl + pr
    src = Frame(padding=mode).outside

    @T.prim_func(private=True, s_tir=True)
    def pad(x: T.Buffer((B, C, H, W), dtype), y: T.Buffer((B, C, Ho, Wo), dtype)):
        T.func_attr({"tirx.noalias": True})
        for b, c, h, w in T.grid(B, C, Ho, W):
            with T.sblock("pad_rows"):
                vb, vc, vh, vw = T.axis.remap("SSSS", [b, c, h, w])
                y[vb, vc, vh, pl + vw] = x[vb, vc, src(vh - pt, H), vw]
        for b, c, h, w in T.grid(B, C, Ho, pl):
            with T.sblock("pad_left"):
                vb, vc, vh, vw = T.axis.remap("SSSS", [b, c, h, w])
                y[vb, vc, vh, vw] = x[vb, vc, src(vh - pt, H), src(vw - pl, W)]
        for b, c, h, w in T.grid(B, C, Ho, pr):
            with T.sblock("pad_right"):
                vb, vc, vh, vw = T.axis.remap("SSSS", [b, c, h, w])
                y[vb, vc, vh, pl + W + vw] = x[vb, vc, src(vh - pt, H), src(W + vw, W)]
    return pad


def _block_row_macro():
    """TVMScript macro: ``dst[b, c, r, q + j] = value(j)`` for ``j < width`` inside ``[0, Ho) x [0, Wo)``; a row
    inside the image is one vector store, a row crossing the border checks each element."""
    from tvm.script import tirx as T

    @T.macro(hygienic=False)
    def block_row(dst, b_, c_, r_, q_, width, Ho_, Wo_, value):
        if r_ >= 0 and r_ < Ho_:
            if q_ >= 0 and q_ + width <= Wo_:
                for j_ in T.vectorized(width):
                    dst[b_, c_, r_, q_ + j_] = value(j_)
            else:
                for j_ in range(width):
                    if q_ + j_ >= 0 and q_ + j_ < Wo_:
                        dst[b_, c_, r_, q_ + j_] = value(j_)

    return block_row


def scatter_primfunc(B, C, Ho, Wo, ph, pw, offset, stride, has_residual: bool, shortcut=None):
    """SigeScatter (``shortcut is None``) / SigeScatterWithBlockResidual, in place on argument 1 (``y``, equal
    to ``base`` on entry: ``R.call_tir_inplace``): only the blocks are written, one block row at a time.
    ``y`` is a fresh copy of the base (:func:`copy_primfunc`) or a working copy of a cached base that
    :func:`restore_primfunc` puts back. Arguments: blocks, y, indices[, residual] (SigeScatter); blocks, y,
    indices, shortcut_blocks, shortcut_base, shortcut_indices (with block residual)."""
    from tvm.script import tirx as T

    block_row = _block_row_macro()
    B, C, Ho, Wo, ph, pw = (int(v) for v in (B, C, Ho, Wo, ph, pw))
    oh, ow = (int(v) for v in offset)
    sh, sw = (int(v) for v in stride)

    if shortcut is None and not has_residual:
        @T.prim_func(private=True, s_tir=True)
        def scatter(var_blocks: T.handle, y: T.Buffer((B, C, Ho, Wo), "float32"), var_idx: T.handle):
            T.func_attr({"tirx.noalias": True, "sige.op": "SigeScatter"})
            N = T.int64()
            blocks = T.match_buffer(var_blocks, (B * N, C, ph, pw), "float32")
            idx = T.match_buffer(var_idx, (N, 2), "int32")
            for b, n, c, i in T.grid(B, N, C, ph):
                with T.sblock("sige_scatter"):
                    vb, vn, vc, vi = T.axis.remap("SSSS", [b, n, c, i])
                    T.reads(blocks[vb * N + vn, vc, vi, 0:pw], idx[vn, 0:2])
                    T.writes(y[vb, vc, 0:Ho, 0:Wo])
                    r = T.floordiv(T.Cast("int64", idx[vn, 0]) + oh, sh) + vi
                    q = T.floordiv(T.Cast("int64", idx[vn, 1]) + ow, sw)
                    block_row(y, vb, vc, r, q, pw, Ho, Wo, lambda j: blocks[vb * N + vn, vc, vi, j])
        return scatter

    if shortcut is None:
        @T.prim_func(private=True, s_tir=True)
        def scatter_res(var_blocks: T.handle, y: T.Buffer((B, C, Ho, Wo), "float32"), var_idx: T.handle,
                        residual: T.Buffer((B, C, Ho, Wo), "float32")):
            T.func_attr({"tirx.noalias": True, "sige.op": "SigeScatter"})
            N = T.int64()
            blocks = T.match_buffer(var_blocks, (B * N, C, ph, pw), "float32")
            idx = T.match_buffer(var_idx, (N, 2), "int32")
            for b, n, c, i in T.grid(B, N, C, ph):
                with T.sblock("sige_scatter"):
                    vb, vn, vc, vi = T.axis.remap("SSSS", [b, n, c, i])
                    T.reads(blocks[vb * N + vn, vc, vi, 0:pw], idx[vn, 0:2], residual[vb, vc, 0:Ho, 0:Wo])
                    T.writes(y[vb, vc, 0:Ho, 0:Wo])
                    r = T.floordiv(T.Cast("int64", idx[vn, 0]) + oh, sh) + vi
                    q = T.floordiv(T.Cast("int64", idx[vn, 1]) + ow, sw)
                    block_row(y, vb, vc, r, q, pw, Ho, Wo,
                              lambda j: blocks[vb * N + vn, vc, vi, j] + residual[vb, vc, r, q + j])
        return scatter_res

    sph, spw, soff, sstr = shortcut
    sph, spw = int(sph), int(spw)
    soh, sow = (int(v) for v in soff)
    ssh, ssw = (int(v) for v in sstr)

    @T.prim_func(private=True, s_tir=True)
    def scatter_block_res(var_blocks: T.handle, y: T.Buffer((B, C, Ho, Wo), "float32"), var_idx: T.handle,
                          var_sblocks: T.handle, sbase: T.Buffer((B, C, Ho, Wo), "float32"), var_sidx: T.handle):
        T.func_attr({"tirx.noalias": True, "sige.op": "SigeScatterWithBlockResidual"})
        N = T.int64()
        M = T.int64()
        blocks = T.match_buffer(var_blocks, (B * N, C, ph, pw), "float32")
        idx = T.match_buffer(var_idx, (N, 2), "int32")
        sblocks = T.match_buffer(var_sblocks, (B * M, C, sph, spw), "float32")
        sidx = T.match_buffer(var_sidx, (M, 2), "int32")
        for b, n, c, i in T.grid(B, N, C, ph):
            with T.sblock("sige_scatter"):
                vb, vn, vc, vi = T.axis.remap("SSSS", [b, n, c, i])
                T.reads(blocks[vb * N + vn, vc, vi, 0:pw], idx[vn, 0:2], sbase[vb, vc, 0:Ho, 0:Wo])
                T.writes(y[vb, vc, 0:Ho, 0:Wo])
                r = T.floordiv(T.Cast("int64", idx[vn, 0]) + oh, sh) + vi
                q = T.floordiv(T.Cast("int64", idx[vn, 1]) + ow, sw)
                block_row(y, vb, vc, r, q, pw, Ho, Wo,
                          lambda j: blocks[vb * N + vn, vc, vi, j] + sbase[vb, vc, r, q + j])
        for b, m, c, i in T.grid(B, M, C, sph):
            with T.sblock("sige_shortcut"):
                vb, vm, vc, vi = T.axis.remap("SSSS", [b, m, c, i])
                # y is read-modify-written at positions no other iteration touches (shortcut blocks never
                # overlap); leaving it out of T.reads keeps the block data-parallel so the rules can
                # parallelise / bind it.
                T.reads(sblocks[vb * M + vm, vc, vi, 0:spw], sidx[vm, 0:2], sbase[vb, vc, 0:Ho, 0:Wo])
                T.writes(y[vb, vc, 0:Ho, 0:Wo])
                r = T.floordiv(T.Cast("int64", sidx[vm, 0]) + soh, ssh) + vi
                q = T.floordiv(T.Cast("int64", sidx[vm, 1]) + sow, ssw)
                block_row(y, vb, vc, r, q, spw, Ho, Wo,
                          lambda j: y[vb, vc, r, q + j] + sblocks[vb * M + vm, vc, vi, j] - sbase[vb, vc, r, q + j])
    return scatter_block_res


def restore_primfunc(B, C, Ho, Wo, ph, pw, offset, stride):
    """``work[b, :, region_n] = cache[b, :, region_n]`` for the regions an in-place scatter with these
    ``indices`` / ``offset`` / ``stride`` / block ``ph x pw`` wrote (in place on argument 0: work, cache,
    indices). Blocks are read through ``indices`` only: no blocks tensor, so any ``N`` works."""
    from tvm.script import tirx as T

    block_row = _block_row_macro()
    B, C, Ho, Wo, ph, pw = (int(v) for v in (B, C, Ho, Wo, ph, pw))
    oh, ow = (int(v) for v in offset)
    sh, sw = (int(v) for v in stride)

    @T.prim_func(private=True, s_tir=True)
    def restore(work: T.Buffer((B, C, Ho, Wo), "float32"), cache: T.Buffer((B, C, Ho, Wo), "float32"),
                var_idx: T.handle):
        T.func_attr({"tirx.noalias": True, "sige.op": "SigeScatter"})
        N = T.int64()
        idx = T.match_buffer(var_idx, (N, 2), "int32")
        for b, n, c, i in T.grid(B, N, C, ph):
            with T.sblock("sige_scatter"):
                vb, vn, vc, vi = T.axis.remap("SSSS", [b, n, c, i])
                T.reads(idx[vn, 0:2], cache[vb, vc, 0:Ho, 0:Wo])
                T.writes(work[vb, vc, 0:Ho, 0:Wo])
                r = T.floordiv(T.Cast("int64", idx[vn, 0]) + oh, sh) + vi
                q = T.floordiv(T.Cast("int64", idx[vn, 1]) + ow, sw)
                block_row(work, vb, vc, r, q, pw, Ho, Wo, lambda j: cache[vb, vc, r, q + j])
    return restore


def scatter_elements_primfunc(shape, dtype: str = "float32"):
    """ONNX ScatterElements (no reduction) along the middle axis of ``data`` [A, N, P] (any axis of any tensor,
    reshaped) with ``R`` updates on it (symbolic: an edit's changed tokens): a copy of ``data``, then one store per
    update, as blocks the generic schedules parallelise (TOPI's scatter_elements is one serial loop nest)."""
    from tvm.script import tirx as T

    A, N, P = (int(v) for v in shape)

    @T.prim_func(private=True, s_tir=True)
    def scatter(var_data: T.handle, var_idx: T.handle, var_upd: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int64()
        data = T.match_buffer(var_data, (A, N, P), dtype)
        idx = T.match_buffer(var_idx, (A, R, P), "int64")
        upd = T.match_buffer(var_upd, (A, R, P), dtype)
        out = T.match_buffer(var_out, (A, N, P), dtype)
        for a, n, p in T.grid(A, N, P):
            with T.sblock("scatter_base"):
                va, vn, vp = T.axis.remap("SSS", [a, n, p])
                out[va, vn, vp] = data[va, vn, vp]
        for a, r, p in T.grid(A, R, P):
            with T.sblock("scatter_rows"):
                va, vr, vp = T.axis.remap("SSS", [a, r, p])
                out[va, idx[va, vr, vp], vp] = upd[va, vr, vp]
    return scatter


ATTENTION_ROWS = 32  # query rows per tile: the innermost axis of every per-tile stage (two AVX-512 vectors)


def attention_te(q, k, v, scale: float, rows: int = ATTENTION_ROWS):
    """``softmax(scale * q @ k^T, axis=-1) @ v`` for ``q`` [B, H, M, D], ``k`` [B, H, N, D], ``v`` [B, H, N, Dv]
    (``M`` may be symbolic; ``scale`` is folded into ``q``), a tile of ``rows`` queries at a time: each stage is
    indexed by the tile ``t`` and keeps the tile's rows innermost (``[..., t, j, r]``), so the schedule computes a
    tile's scores ``[N, rows]`` in a scratch that stays in cache, never the ``[M, N]`` matrix, and every row-wise
    step (max, ``exp``, sum, the product with ``v``) is a vector operation over the rows.

    Blocks (the contract with ``cpu.attention``): ``attention_rows`` (``q``'s tile transposed and scaled, zeros
    past ``M``), ``attention_scores``, ``attention_max``, ``attention_probs`` (unnormalised ``exp``),
    ``attention_sum``, ``attention_weighted`` (``probs @ v``, ``[..., t, c, r]``) and ``attention`` (``[B, H, M,
    Dv]``, the weighted sum over the row's sum)."""
    B, H, M, D = q.shape
    N, Dv = k.shape[2], v.shape[3]
    # floordiv(M - 1) + 1, not floordiv(M + rows - 1): compute-at proves the last row's tile in range only so
    tiles = -(-int(M) // rows) if isinstance(M, (int, tir.IntImm)) else tir.floordiv(M - 1, rows) + 1
    sc = tir.const(float(scale), q.dtype)
    qt = te.compute((B, H, tiles, D, rows),
                    lambda b, h, t, d, r: tir.if_then_else(t * rows + r < M, q[b, h, t * rows + r, d] * sc,
                                                           tir.const(0, q.dtype)), name="attention_rows")
    d = te.reduce_axis((0, D), name="d")
    s = te.compute((B, H, tiles, N, rows), lambda b, h, t, j, r: te.sum(qt[b, h, t, d, r] * k[b, h, j, d], axis=d),
                   name="attention_scores")
    jm = te.reduce_axis((0, N), name="jm")
    mx = te.compute((B, H, tiles, rows), lambda b, h, t, r: te.max(s[b, h, t, jm, r], axis=jm), name="attention_max")
    e = te.compute((B, H, tiles, N, rows), lambda b, h, t, j, r: te.exp(s[b, h, t, j, r] - mx[b, h, t, r]),
                   name="attention_probs")
    js = te.reduce_axis((0, N), name="js")
    total = te.compute((B, H, tiles, rows), lambda b, h, t, r: te.sum(e[b, h, t, js, r], axis=js),
                       name="attention_sum")
    j = te.reduce_axis((0, N), name="j")
    o = te.compute((B, H, tiles, Dv, rows), lambda b, h, t, c, r: te.sum(e[b, h, t, j, r] * v[b, h, j, c], axis=j),
                   name="attention_weighted")
    return te.compute((B, H, M, Dv), lambda b, h, i, c: o[b, h, tir.floordiv(i, rows), c, tir.floormod(i, rows)]
                      / total[b, h, tir.floordiv(i, rows), tir.floormod(i, rows)], name="attention")
