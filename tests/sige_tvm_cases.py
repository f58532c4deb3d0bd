"""Small ai.sige models and numpy references for the TVM tests (spec: docs/sige-ops.md)."""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIGE = "ai.sige"


# -- numpy references (used when sige_export.custom_ops has none) ---------------------------------
def _act(v, activation="identity", alpha=0.2):
    if activation == "identity":
        return v
    if activation == "relu":
        return np.maximum(v, 0)
    if activation == "leaky_relu":
        return np.where(v >= 0, v, alpha * v)
    if activation in ("silu", "swish"):
        return v / (1 + np.exp(-v))
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-v))
    if activation == "tanh":
        return np.tanh(v)
    if activation == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * v * (1 + erf(v / math.sqrt(2)))
    raise ValueError(activation)


def ref_pre(x, scale=None, shift=None, activation="identity", alpha=0.2, activation_first=0):
    x = x.astype(np.float64)
    s = 1.0 if scale is None else scale.astype(np.float64)
    t = 0.0 if shift is None else shift.astype(np.float64)
    if activation_first:
        return _act(x, activation, alpha) * s + t
    return _act(x * s + t, activation, alpha)


def ref_gather(x, idx, block, scale=None, shift=None, **pre):
    p = ref_pre(x, scale, shift, **pre)
    B, C, H, W = x.shape
    bh, bw = block
    N = idx.shape[0]
    y = np.zeros((B * N, C, bh, bw))
    for b in range(B):
        for n, (h, w) in enumerate(idx):
            for i in range(bh):
                for j in range(bw):
                    if 0 <= h + i < H and 0 <= w + j < W:
                        y[b * N + n, :, i, j] = p[b, :, h + i, w + j]
    return y


def ref_conv(g, w, bias=None, strides=(1, 1), group=1):
    BN, C, bh, bw = g.shape
    Co, Cg, kh, kw = w.shape
    sh, sw = strides
    oh, ow = (bh - kh) // sh + 1, (bw - kw) // sw + 1
    y = np.zeros((BN, Co, oh, ow))
    opg = Co // group
    for co in range(Co):
        gi = co // opg
        for i in range(oh):
            for j in range(ow):
                patch = g[:, gi * Cg:(gi + 1) * Cg, i * sh:i * sh + kh, j * sw:j * sw + kw]
                y[:, co, i, j] = np.einsum("nchw,chw->n", patch, w[co])
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def ref_scatter(blocks, base, idx, offset, stride, residual=None):
    y = base.astype(np.float64).copy()
    B, C, Ho, Wo = base.shape
    N = idx.shape[0]
    ph, pw = blocks.shape[2:]
    for b in range(B):
        for n, (h, w) in enumerate(idx):
            r0 = (h + offset[0]) // stride[0]
            c0 = (w + offset[1]) // stride[1]
            for i in range(ph):
                for j in range(pw):
                    r, c = r0 + i, c0 + j
                    if 0 <= r < Ho and 0 <= c < Wo:
                        y[b, :, r, c] = blocks[b * N + n, :, i, j] + (0 if residual is None else residual[b, :, r, c])
    return y


def ref_scatter_block_residual(blocks, base, idx, sblocks, sbase, sidx, offset, stride, soffset, sstride):
    y = ref_scatter(blocks, base, idx, offset, stride, residual=sbase)
    B, C, Ho, Wo = base.shape
    M = sidx.shape[0]
    ph, pw = sblocks.shape[2:]
    for b in range(B):
        for m, (h, w) in enumerate(sidx):
            r0 = (h + soffset[0]) // sstride[0]
            c0 = (w + soffset[1]) // sstride[1]
            for i in range(ph):
                for j in range(pw):
                    r, c = r0 + i, c0 + j
                    if 0 <= r < Ho and 0 <= c < Wo:
                        y[b, :, r, c] += sblocks[b * M + m, :, i, j] - sbase[b, :, r, c]
    return y


def scatter_map(idx, ph, pw, offset, stride, Ho, Wo):
    m = -np.ones((Ho, Wo), np.int32)
    for n, (h, w) in enumerate(idx):
        r0 = (h + offset[0]) // stride[0]
        c0 = (w + offset[1]) // stride[1]
        for i in range(ph):
            for j in range(pw):
                if 0 <= r0 + i < Ho and 0 <= c0 + j < Wo:
                    m[r0 + i, c0 + j] = n * ph * pw + i * pw + j
    return m


def grid_indices(H, W, block, stride, offset, rng, count):
    """``count`` distinct block origins of a block grid covering [H, W] (origins start at -offset)."""
    hs = list(range(-offset[0], H, stride[0]))
    ws = list(range(-offset[1], W, stride[1]))
    cells = [(h, w) for h in hs for w in ws if h > -block[0] and w > -block[1]]
    count = min(count, len(cells))
    pick = rng.choice(len(cells), size=count, replace=False) if count else []
    return np.array([cells[i] for i in sorted(pick)], dtype=np.int32).reshape(-1, 2)


# -- models -------------------------------------------------------------------------------------
def vi(name, shape, dt=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dt, shape)


def make_model(nodes, inputs, outputs, initializers=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(SIGE, 1)])
    m.ir_version = 10
    return m


def sige_node(op, inputs, outputs, **attrs):
    try:  # the op set's own builder when it exists (sets function overloads)
        from sige_export import custom_ops

        if hasattr(custom_ops, "make_node"):
            return custom_ops.make_node(op, inputs, outputs, **attrs)
    except Exception:
        pass
    return helper.make_node(op, inputs, outputs, domain=SIGE, **attrs)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)
