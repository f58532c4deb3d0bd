"""CPU schedule rules (x86 AVX-512/AVX2 and ARM NEON; the vector width comes from the target).

Rules (``default_rules`` tries SigeGatherScatter, GroupMoments, DepthwiseConv2d, DepthwiseBlocks, PointwiseBlocks,
Conv2dNCHW, Matmul, Attention, Generic; the first match wins, like ``s_tir.dlight``):

* ``Conv2dNCHW``  -- dense NCHW conv (TOPI ``pad_temp`` + ``conv2d_nchw`` + fused epilogue) and
  ``SigeSparseConv2d`` (``sige_gather`` + ``sige_conv`` + ``sige_bias``): output channels packed
  by the vector width, ``RH x RW`` outputs register-blocked (accumulators in registers), weights
  repacked to ``[Cout/V, Cin, kh, kw, V]``, the padded/gathered input tile computed per tile into
  a stack buffer (the gather is never materialised), tiles run in parallel.
* ``DepthwiseConv2d`` -- depthwise convs over wide images: vectorised along output rows (tried before
  ``Conv2dNCHW``, whose channel vectors would gather across planes).
* ``DepthwiseBlocks`` -- depthwise convs over gathered blocks (fused with a ``SigeScatterGather``) and tiny
  maps: a block per task, its tile stored channels-innermost.
* ``Matmul``      -- ``C[..., i, j] = sum_k A[..., i, k] B[..., k, j]``-like 1-reduction blocks with a
  static ``j`` of at least a vector (``i`` may be symbolic: an edit's changed tokens; a ragged last row or column
  tile computes from a copy of its operand): register tiles of up to 16 vector accumulators, column panels
  outermost.
* ``Attention`` (``attention.py``) -- ``softmax(q @ k^T * scale) @ v`` fused by the importer
  (``sige_te.attention_te``): a tile of 32 query rows per task, its scores never leave the core's caches.
* ``SigeGatherScatter`` -- gather/scatter ops: parallel over blocks x channels (scatters: channel planes
  outer); a two-stage gather's activation vectorised over each block.
* ``GroupMoments`` -- ``SigeTileMoments`` / ``SigeScatterMoments`` (group-norm statistics of an edit): one
  pass over the tiles (scattered blocks) per (batch, group), vector partial sums.
* ``Generic``     -- anything else: inline injective producers, parallel over the fused outer spatial
  loops, vectorise a static innermost spatial loop.
"""
from __future__ import annotations

import itertools
from typing import Optional

import tvm
from tvm import s_tir, tirx

from ..base import ScheduleRule

DATA_PAR = 0
COMM_REDUCE = 2


# -- helpers --------------------------------------------------------------------------------------
def vector_lanes(target, dtype_bits: int = 32) -> int:
    """float32 lanes of one SIMD register of ``target`` (16 AVX-512, 8 AVX2, 4 NEON)."""
    bits = 0
    try:
        from tvm.target import codegen

        bits = int(codegen.llvm_get_vector_width(target))
    except Exception:
        bits = 0
    if bits <= 0:
        mtriple = str(target.attrs.get("mtriple", "")) if target.attrs else ""
        bits = 128 if mtriple.startswith(("arm", "aarch64")) else 256
    return max(1, bits // dtype_bits)


def _static(e) -> Optional[int]:
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _root_blocks(sch):
    root = sch.get_sblock("root") if _has_block(sch, "root") else None
    if root is None:
        return []
    return list(sch.get_child_blocks(root))


def _has_block(sch, name):
    try:
        sch.get_sblock(name)
        return True
    except Exception:
        return False


def _iter_types(sch, block):
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _is_spatial(sch, block) -> bool:
    return all(t == DATA_PAR for t in _iter_types(sch, block))


def _loop_extent(sch, loop):
    return _static(sch.get(loop).extent)


def _largest_divisor(n: int, cap: int) -> int:
    for d in range(min(cap, n), 0, -1):
        if n % d == 0:
            return d
    return 1


def _buf(region):
    """The buffer of a read/write region (``.buffer`` before TVM 0.27, ``.source`` since)."""
    b = getattr(region, "buffer", None)
    return b if b is not None else region.source


def _output_buffers(func):
    names = set()
    bmap = getattr(func, "buffer_map", None)
    for p in func.params:
        b = bmap[p] if bmap is not None and p in bmap else p
        names.add(str(getattr(b, "name", getattr(b, "name_hint", b))))
    return names


def _buffer_elems(buf) -> Optional[int]:
    n = 1
    for d in buf.shape:
        v = _static(d)
        if v is None:
            return None
        n *= v
    return n


def _func_op(func) -> str:
    return str(func.attrs["sige.op"]) if func.attrs is not None and "sige.op" in func.attrs else ""


def _parallel_vectorize(sch, block, lanes: int, n_spatial: Optional[int] = None, vectorize: bool = True):
    """Fuse the leading spatial loops of ``block`` and parallelise them; vectorise a static innermost
    spatial loop (only when the block is purely spatial)."""
    loops = list(sch.get_loops(block))
    if not loops:
        return
    types = _iter_types(sch, block)
    if n_spatial is None:
        n_spatial = 0
        for t in types:
            if t != DATA_PAR:
                break
            n_spatial += 1
    n_spatial = min(n_spatial, len(loops))
    spatial_only = n_spatial == len(loops) == len(types)
    # only plain stores vectorise safely (no data-dependent conditions or lets in the body)
    vectorize = vectorize and isinstance(sch.get(block).body, tirx.BufferStore)
    vec = None
    if vectorize and spatial_only:
        ext = _loop_extent(sch, loops[-1])
        if ext is not None and ext >= lanes and ext % lanes == 0:
            outer, vec = sch.split(loops[-1], [None, lanes])
            loops = loops[:-1] + [outer]
        elif ext is not None and 1 < ext < lanes:
            vec = loops[-1]  # short static innermost loop: let LLVM use a narrower vector
            loops = loops[:-1]
            n_spatial -= 1
    outer = loops[:n_spatial] if spatial_only else loops[:n_spatial]
    if spatial_only and vec is not None and len(loops) > n_spatial:
        outer = loops  # includes the split outer of the vectorised loop
    if outer:
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)
    if vec is not None:
        sch.vectorize(vec)


def _around(sch, block) -> tuple[list, list]:
    """The root blocks before and after ``block``."""
    blocks = _root_blocks(sch)
    i = next(k for k, b in enumerate(blocks) if sch.get(b).same_as(sch.get(block)))
    return blocks[:i], blocks[i + 1:]


def _accumulate_locally(sch, conv, epilogue: list):
    """Accumulate ``conv`` in a local buffer (registers once tiled) and inline the elementwise ``epilogue``
    chain into its write-back; returns the write-back block (to place per tile)."""
    chain = [sch.cache_write(conv, 0, "local")] + list(epilogue)
    for b in chain[:-1]:
        sch.compute_inline(b)
    return chain[-1]


def _producers(sch, block, before: list) -> list:
    """The blocks of ``before`` that write a buffer ``block`` reads (its data producers)."""
    reads = [_buf(r) for r in sch.get(block).reads]
    return [b for b in before if any(_buf(w).same_as(r) for w in sch.get(b).writes for r in reads)]


def _inline_except(sch, blocks: list, keep: list) -> None:
    """Inline ``blocks`` into their consumers, except those in ``keep`` (a block that cannot be inlined stays)."""
    kept = [sch.get(k) for k in keep]
    for b in blocks:
        if not any(sch.get(b).same_as(k) for k in kept):
            try:
                sch.compute_inline(b)
            except Exception:
                pass


def _find_conv(sch):
    """The root block with 4 spatial and 3 reduction iterators (an NCHW conv), or None."""
    for b in _root_blocks(sch):
        if _iter_types(sch, b) == [DATA_PAR] * 4 + [COMM_REDUCE] * 3:
            return b
    return None


def _match_conv(func, target):
    """``(schedule, conv, blocks before, blocks after)`` for a CPU PrimFunc of one NCHW conv between spatial
    producers and an elementwise epilogue; None otherwise."""
    if not isinstance(func, tirx.PrimFunc) or "cpu" not in target.keys:
        return None
    sch = s_tir.Schedule(func)
    conv = _find_conv(sch)
    if conv is None:
        return None
    before, after = _around(sch, conv)
    if any(not _is_spatial(sch, b) for b in before + after):
        return None
    return sch, conv, before, after


# -- rules ----------------------------------------------------------------------------------------
class Conv2dNCHW(ScheduleRule):
    """Register-blocked NCHW conv (dense and SIGE sparse)."""

    name = "cpu.conv2d_nchw"

    def __init__(self, tiles: tuple[tuple[int, int], ...] = ((2, 8), (4, 4)), small_pixels: int = 1024):
        # register tiles (output rows x columns, one vector of output channels), the first that fills 16
        # accumulators wins: 2 x 8 beat 4 x 4 by 2-10% on every dense conv measured (ddpm/gaugan shapes,
        # 16x32 to 256x512); 4 x 4 outputs (convs over gathered blocks) keep 4 x 4
        self.tiles = tiles
        self.small_pixels = small_pixels  # output pixels below which channel groups go outer

    def apply(self, func, target):
        matched = _match_conv(func, target)  # [data producer] conv [elementwise epilogue chain]
        if matched is None:
            return None
        sch, conv, before, after = matched
        lanes = vector_lanes(target)
        loops = sch.get_loops(conv)
        n, co, oh, ow, rc, rh, rw = loops
        cout, eh, ew = _loop_extent(sch, co), _loop_extent(sch, oh), _loop_extent(sch, ow)
        if None in (cout, eh, ew):
            return None
        conv_block = sch.get(conv)
        weight_buf = _buf(conv_block.reads[1]) if len(conv_block.reads) >= 2 else None
        prepacked = weight_buf is not None and len(weight_buf.shape) == 5 and _static(weight_buf.shape[4]) is not None
        v = _static(weight_buf.shape[4]) if prepacked else _largest_divisor(cout, lanes)
        th, tw = max(((_largest_divisor(eh, a), _largest_divisor(ew, b)) for a, b in self.tiles),
                     key=lambda t: t[0] * t[1])  # max() keeps the first of equal products
        if (_loop_extent(sch, rh), _loop_extent(sch, rw)) == (1, 1) and ew >= 8 and _largest_divisor(ew, 16) >= 8:
            # pointwise conv over a wide image: a 1 x 16 row of outputs reads whole cache lines of each
            # input channel (a 4 x 4 tile touches four lines for 16 bytes each)
            th, tw = 1, _largest_divisor(ew, 16)
        # weights: repack (unless pre-packed at export: tvm_schedules.packing) to [Cout/V, Cin/g, kh, kw, V] so each (ci, kh, kw) loads one vector
        if weight_buf is not None and len(weight_buf.shape) == 4 and not prepacked:
            widx = next(k for k, r in enumerate(conv_block.reads) if _buf(r).same_as(weight_buf))
            wread = sch.cache_read(conv, widx, "global")
            sch.transform_layout(wread, ("write", 0), lambda a, b, c, d: (a // v, b, c, d, a % v))
            wl = sch.get_loops(wread)
            sch.parallel(sch.fuse(*wl[:2]))

        last = _accumulate_locally(sch, conv, after)

        # output-channel vectors per tile: tiles of fewer than 16 pixels (2 x 2 outputs of a stride-2 conv over
        # gathered blocks) take several, so 16 independent accumulators hide the FMA latency
        cov = _largest_divisor(cout // v, max(1, 16 // (th * tw)))
        co_o, co_i = sch.split(co, [None, v * cov])
        co_v, co_i = sch.split(co_i, [None, v])
        oh_o, oh_i = sch.split(oh, [None, th])
        ow_o, ow_i = sch.split(ow, [None, tw])
        # Few output pixels per weight pass (gathered blocks: a symbolic block count; small images):
        # output-channel groups outer, so one group's weights [Cin, kh, kw, V] stay in L1/L2 while every
        # block/tile streams by (the input tile is re-gathered per group: ~36 loads per 4608 FLOPs).
        # Large images: spatial tile outer (its input tile is gathered/padded once), all groups inner.
        # Not for SIGE gathers (data-dependent reads with the pre-op: SiLU etc. per element): re-gathering
        # per group costs more than the weight reuse wins there.
        n_ext = _loop_extent(sch, n)
        gathers = any(sch.get(b).name_hint.startswith(("sige_gather", "sige_scatter_gather")) for b in before)
        channels_outer = ((n_ext is None or n_ext * eh * ew <= self.small_pixels) and (cout // v) >= 2
                          and not gathers)
        if channels_outer:
            sch.reorder(co_o, n, oh_o, ow_o, rc, rh, rw, oh_i, ow_i, co_v, co_i)
        else:
            sch.reorder(n, oh_o, ow_o, co_o, rc, rh, rw, oh_i, ow_i, co_v, co_i)
        # the accumulator tile [RH, RW, V] is laid out with channels innermost
        sch.transform_layout(conv, ("write", 0), lambda a, b, c, d: (a, c, d, b))

        # data producer (pad / gather / scatter-gather): per tile into a stack buffer (small dense images: once)
        producers = _producers(sch, conv, before)
        raw = {sch.get(b).name_hint: b for b in before if sch.get(b).name_hint.endswith("_raw")}
        staged = [(p, raw[sch.get(p).name_hint + "_raw"]) for p in producers if sch.get(p).name_hint + "_raw" in raw]
        _inline_except(sch, before, producers + [r for _, r in staged])
        pointwise = (_loop_extent(sch, rh), _loop_extent(sch, rw)) == (1, 1)
        for p in producers:
            if channels_outer and not gathers:
                # small image, every channel group sweeps it: zero-pad it once (per tile, each group would
                # pad it again; 5-11% on 1024-channel 3x3 convs at 8x16 to 16x32)
                _parallel_vectorize(sch, p, lanes)
                continue
            stage = next((r for q, r in staged if sch.get(q).same_as(sch.get(p))), None)
            tile = [p] + ([stage] if stage is not None else [])
            if pointwise and sch.get(p).name_hint == "sige_scatter_gather" and _channel_vector_tile(sch, tile, ow_o, lanes):
                continue
            sch.compute_at(p, ow_o, preserve_unit_loops=True)
            sch.set_scope(p, 0, "local")
            if stage is not None:  # the tile's loads, then its activation over contiguous [C, th', tw'] vectors
                sch.compute_at(stage, ow_o, preserve_unit_loops=True)
                sch.set_scope(stage, 0, "local")
                _tile_rows(sch, stage)
                if _vectorize_flat(sch, p, 3, lanes):
                    continue
            _tile_rows(sch, p)

        sch.reverse_compute_at(last, ow_o if channels_outer else co_o, preserve_unit_loops=True)
        # epilogue: loops (co, i, j) of the tile; vectorise along j when possible
        eloops = sch.get_loops(last)[-4:]
        try:
            sch.unroll(eloops[-2])
        except Exception:
            pass

        sch.unroll(rw)
        sch.unroll(oh_i)
        sch.unroll(ow_i)
        sch.unroll(co_v)
        sch.vectorize(co_i)
        outer = sch.fuse(co_o, n, oh_o, ow_o) if channels_outer else sch.fuse(n, oh_o, ow_o)
        sch.parallel(outer)
        sch.decompose_reduction(conv, rc)  # init inherits the vectorised/unrolled inner loops
        return sch


class PointwiseBlocks(ScheduleRule):
    """A 1x1 conv over a scatter-gather's blocks, vectorised over a block's pixels (4 x 4: one vector of 16 lanes,
    or several): per block, the gathered tile [C, 16] on the stack (a window that is one whole scattered block, or
    all base, loads a vector per row: ``sige_te.scatter_gather_te``), then 16 vectors of accumulators (output
    channels x pixels), each input channel one load per pixel vector and broadcast-weight FMAs; the output is
    written in NCHW order, no transpose."""

    name = "cpu.pointwise_blocks"

    def apply(self, func, target):
        matched = _match_conv(func, target)
        if matched is None:
            return None
        sch, conv, before, after = matched
        lanes = vector_lanes(target)
        n, co, oh, ow, rc, rh, rw = sch.get_loops(conv)
        cout, eh, ew = _loop_extent(sch, co), _loop_extent(sch, oh), _loop_extent(sch, ow)
        if None in (cout, eh, ew) or (_loop_extent(sch, rh), _loop_extent(sch, rw)) != (1, 1) or (eh * ew) % lanes:
            return None
        producers = _producers(sch, conv, before)
        if len(producers) != 1 or sch.get(producers[0]).name_hint != "sige_scatter_gather":
            return None
        tile = producers[0]
        stage = next((b for b in before if sch.get(b).name_hint == "sige_scatter_gather_raw"), None)
        _inline_except(sch, before, [tile] + ([stage] if stage is not None else []))
        last = _accumulate_locally(sch, conv, after)
        chunk = _largest_divisor(cout, max(1, 16 * lanes // (eh * ew)))  # 16 vectors of accumulators
        co_o, co_i = sch.split(co, [None, chunk])
        sch.reorder(n, co_o, rc, rh, rw, co_i, oh, ow)
        for t in [tile] + ([stage] if stage is not None else []):  # consumer first
            sch.compute_at(t, n, preserve_unit_loops=True)
            sch.set_scope(t, 0, "local")
            if not _vectorize_flat(sch, t, 2, lanes):
                return None
        sch.reverse_compute_at(last, co_o, preserve_unit_loops=True)
        if not _vectorize_flat(sch, last, 2, lanes):
            return None
        px_o, px = sch.split(sch.fuse(oh, ow), [None, lanes])
        sch.vectorize(px)
        sch.unroll(px_o)
        sch.unroll(co_i)
        sch.parallel(n)
        sch.decompose_reduction(conv, rc)
        return sch


class DepthwiseConv2d(ScheduleRule):
    """Depthwise NCHW conv over a wide image (``Cin/group == 1``): vectorised along the output row, a
    ``th x 2V`` register tile per channel, the zero-padded input rows of one band in a stack buffer. (The
    channel-vector layout of ``Conv2dNCHW`` gathers across planes for every tap: 3x slower here.)"""

    name = "cpu.depthwise_conv2d"

    def __init__(self, rh: int = 4):
        self.rh = rh

    def apply(self, func, target):
        matched = _match_conv(func, target)
        if matched is None:
            return None
        sch, conv, before, after = matched
        if any(sch.get(b).name_hint.startswith(("sige_gather", "sige_scatter_gather")) for b in before):
            return None
        n, co, oh, ow, rc, rh, rw = sch.get_loops(conv)
        eh, ew = _loop_extent(sch, oh), _loop_extent(sch, ow)
        lanes = vector_lanes(target)
        if _loop_extent(sch, rc) != 1 or None in (eh, ew, _loop_extent(sch, co)) or ew % lanes:
            return None
        tw = 2 * lanes if ew % (2 * lanes) == 0 else lanes
        th = _largest_divisor(eh, self.rh)
        last = _accumulate_locally(sch, conv, after)
        oh_o, oh_i = sch.split(oh, [None, th])
        ow_o, ow_i = sch.split(ow, [None, tw])
        ow_v, ow_l = sch.split(ow_i, [None, lanes])
        sch.reorder(n, co, oh_o, ow_o, rc, rh, rw, oh_i, ow_v, ow_l)
        producers = _producers(sch, conv, before)
        _inline_except(sch, before, producers)
        for p in producers:  # the padded rows of one band of output rows, per channel
            sch.compute_at(p, oh_o, preserve_unit_loops=True)
            sch.set_scope(p, 0, "local")
        sch.reverse_compute_at(last, ow_o, preserve_unit_loops=True)
        el = sch.get_loops(last)
        _, e_v = sch.split(el[-1], [None, lanes])
        sch.vectorize(e_v)
        sch.unroll(rh)
        sch.unroll(rw)
        sch.unroll(oh_i)
        sch.unroll(ow_v)
        sch.vectorize(ow_l)
        sch.parallel(sch.fuse(n, co))
        sch.decompose_reduction(conv, rc)
        return sch


class DepthwiseBlocks(ScheduleRule):
    """Depthwise NCHW conv over many small images (the gathered blocks of a sparse edit; tiny dense maps):
    one image per task, its input tile copied (or gathered: ``SigeScatterGather`` fused) channels-innermost
    into a stack buffer, then per vector of channels the whole ``oh x ow`` output in registers, so every tap
    is one vector load and one FMA. (With ``Conv2dNCHW``'s layout each tap gathers 16 values from 16 channel
    planes: 3x slower than onnxruntime.)"""

    name = "cpu.depthwise_blocks"

    def __init__(self, max_outputs: int = 16):
        self.max_outputs = max_outputs  # accumulator vectors of one tile

    def apply(self, func, target):
        matched = _match_conv(func, target)
        if matched is None:
            return None
        sch, conv, before, after = matched
        n, co, oh, ow, rc, rh, rw = sch.get_loops(conv)
        cout, eh, ew = _loop_extent(sch, co), _loop_extent(sch, oh), _loop_extent(sch, ow)
        lanes = vector_lanes(target)
        if None in (cout, eh, ew) or _loop_extent(sch, rc) != 1 or eh * ew > self.max_outputs or cout % lanes:
            return None
        reads = sch.get(conv).reads
        if len(reads) < 2:
            return None
        data, weight = _buf(reads[0]), _buf(reads[1])
        if len(weight.shape) != 4 or _static(weight.shape[1]) != 1 or _static(data.shape[1]) != cout:
            return None  # not depthwise (Cin/group == 1, one input channel per output channel)
        names = {sch.get(b).name_hint: b for b in before}
        gather = next((b for name, b in names.items() if name in ("sige_gather", "sige_scatter_gather")), None)
        if gather is None:  # blocks in memory (or a tiny dense map, its zero padding read through)
            for b in before:
                sch.compute_inline(b)
            tiles = [sch.cache_read(conv, 0, "local")]
        else:  # fused with its gather (SigeScatterGather + depthwise Conv): computed per tile, in registers/stack
            raw = names.get(sch.get(gather).name_hint + "_raw")
            tiles = [gather] + ([raw] if raw is not None else [])
        wread = sch.cache_read(conv, 1, "global")
        sch.transform_layout(wread, ("write", 0), lambda a, b, c, d: (a // lanes, b, c, d, a % lanes))
        sch.parallel(sch.fuse(*sch.get_loops(wread)[:2]))
        last = _accumulate_locally(sch, conv, after)
        sch.transform_layout(conv, ("write", 0), lambda a, b, c, d: (a, c, d, b))
        co_o, co_i = sch.split(co, [None, lanes])
        sch.reorder(n, co_o, rc, rh, rw, oh, ow, co_i)
        # the block's tile, for all its channels (one source lookup per pixel: 1.2x against one per vector of
        # channels on GAN Compression's scatter-gather depthwise convs)
        _channel_vector_tile(sch, tiles, n, lanes)
        sch.reverse_compute_at(last, co_o, preserve_unit_loops=True)
        el = sch.get_loops(last)
        for lp in el[-2:]:
            _unroll_short(sch, lp)
        for lp in (rh, rw, oh, ow):
            sch.unroll(lp)
        sch.vectorize(co_i)
        sch.parallel(n)
        sch.decompose_reduction(conv, rc)
        return sch


def _matmul_width(ej: int, lanes: int) -> Optional[tuple[int, bool]]:
    """Output columns per register tile and whether the last tile is ragged: two vectors, one, or a whole short
    row of half-vectors (attention heads of 40: 5 x 8); else the vector count that pads ``j`` least (77 keys of a
    cross-attention: 5 tiles of 16, the last one ragged). None for fewer columns than a vector."""
    for width in (2 * lanes, lanes):
        if ej % width == 0:
            return width, False
    half = max(lanes // 2, 1)
    if ej % half == 0 and ej <= 4 * lanes:
        return ej, False
    # one ragged tile only: its local buffers would be cut to the ``ej`` columns it covers
    fits = [w for w in (2 * lanes, lanes) if ej > w]
    return (min(fits, key=lambda w: (-ej % w, -w)), True) if fits else None


def _operand_indexed_by(sch, block, position: int) -> Optional[int]:
    """The read index of the one operand whose region depends on the block's iterator at ``position`` (-3: the
    matmul's output row, -2: its column); None when not exactly one."""
    blk = sch.get(block)
    var = blk.iter_vars[position].var
    found = []
    for n, region in enumerate(blk.reads):
        if _buf(region).same_as(_buf(blk.writes[0])):
            continue
        if any(v.same_as(var) for r in region.region for v in tirx.analysis.undefined_vars(r.min)):
            found.append(n)
    return found[0] if len(found) == 1 else None


class Matmul(ScheduleRule):
    """``C[..., i, j] = sum_k A[..., i, k] B[..., k, j]`` (one reduction, ``j`` the contiguous output axis):
    register tiles of ``TI x JV`` accumulators (JV one or two vectors, or a short row), the ``k`` loop inside,
    column panels outermost so a panel of ``B`` stays in cache while all rows pass over it. ``i`` may be
    symbolic (the changed tokens of an edit): a ragged last row tile computes from a copy of ``A``'s rows and
    only its write-back is predicated."""

    name = "cpu.matmul"
    ACCUMULATORS = 16  # of the 32 vector registers (AVX-512): the rest hold B's vectors and A's broadcasts

    def apply(self, func, target):
        if not isinstance(func, tirx.PrimFunc) or "cpu" not in target.keys:
            return None
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        red = [b for b in blocks if not _is_spatial(sch, b)]
        if len(red) != 1:
            return None
        mm = red[0]
        types = _iter_types(sch, mm)
        if types[-1] != COMM_REDUCE or types.count(COMM_REDUCE) != 1 or len(types) < 3:
            return None
        loops = sch.get_loops(mm)
        if len(loops) != len(types):
            return None
        ei, ej = _loop_extent(sch, loops[-3]), _loop_extent(sch, loops[-2])
        lanes = vector_lanes(target)
        width = _matmul_width(ej, lanes) if ej is not None else None
        if width is None:
            return None
        jv, ragged_cols = width
        before, after = _around(sch, mm)
        if any(not _is_spatial(sch, b) for b in before + after):
            return None
        for b in before:
            try:
                sch.compute_inline(b)
            except Exception:
                pass
        a_index = _operand_indexed_by(sch, mm, -3)
        b_index = _operand_indexed_by(sch, mm, -2)
        if ragged_cols and b_index is None:
            return None
        last = _accumulate_locally(sch, mm, after)
        *batch, i, j, k = sch.get_loops(mm)
        # a short row (40) is 5 half-vectors: LLVM lowers a 40-lane vector through the stack
        vec = lanes if jv % lanes == 0 else max(lanes // 2, 1)
        ti = max(1, min(8, self.ACCUMULATORS // (jv // vec)))
        if ei is not None:  # a divisor of the rows if one is close to the tile, else a ragged last tile
            divisor = _largest_divisor(ei, ti)
            ti = divisor if 2 * divisor > ti else min(ti, ei)
        ragged = ei is None or ei % ti != 0
        if ragged and a_index is None:
            return None
        # A ragged last tile would predicate every FMA (accumulators then live in memory): it computes all its
        # rows (columns) from a copy of A's rows (B's columns), those past the end never read, and writes back
        # the valid ones.
        io, ii = sch.split(i, [None, ti], disable_predication=ragged)
        jo, ji = sch.split(j, [None, jv], disable_predication=ragged_cols)
        jm, ji = sch.split(ji, [None, vec])
        sch.reorder(*batch, jo, io, k, ii, jm, ji)
        panels = 1
        for lp in [*batch, jo]:
            panels *= _loop_extent(sch, lp) or 1
        # enough column panels (x batch) to share among the threads; otherwise rows are split too
        if panels >= 8:
            outer = sch.fuse(*batch, jo)
        else:
            outer = io = sch.fuse(*batch, jo, io)
        sch.parallel(outer)
        if ragged_cols:
            cols = sch.cache_read(mm, b_index, "local")
            sch.compute_at(cols, outer, preserve_unit_loops=True)
        if ragged:
            rows = sch.cache_read(mm, a_index, "local")
            sch.compute_at(rows, io, preserve_unit_loops=True)
        sch.reverse_compute_at(last, io, preserve_unit_loops=True)
        sch.unroll(ii)
        sch.unroll(jm)
        sch.vectorize(ji)
        *_, wj = sch.get_loops(last)
        sch.vectorize(sch.split(wj, [None, vec])[1])
        sch.decompose_reduction(mm, k)
        return sch


def _memcpy_intrin(h: int, w: int) -> str:
    """TensorIntrin: copy one contiguous float32 ``[h, w]`` plane with libc ``memcpy``."""
    from tvm.script import tirx as T

    name = f"sige_cpu_memcpy_f32_{h}x{w}"
    try:
        s_tir.TensorIntrin.get(name)
        return name
    except Exception:
        pass

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle):
        A = T.match_buffer(a, (h, w), "float32", offset_factor=1)
        B = T.match_buffer(b, (h, w), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:h, 0:w])
            T.writes(B[0:h, 0:w])
            for i, j in T.grid(h, w):
                with T.sblock("copy"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    B[vi, vj] = A[vi, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle):
        A = T.match_buffer(a, (h, w), "float32", offset_factor=1)
        B = T.match_buffer(b, (h, w), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(A[0:h, 0:w])
            T.writes(B[0:h, 0:w])
            T.evaluate(T.call_extern("handle", "memcpy", B.access_ptr("w"), A.access_ptr("r"), T.uint64(h * w * 4)))

    try:
        s_tir.TensorIntrin.register(name, desc, impl)
    except Exception:
        s_tir.TensorIntrin.get(name)  # registered concurrently
    return name


def _memcpy_planes(sch, block) -> bool:
    """``y[b, c, :, :] = base[b, c, :, :]``: one libc ``memcpy`` per (b, c) plane, planes in parallel (25-40%
    faster than the vectorised element loop on full-resolution caches: glibc's copy streams at memory
    bandwidth). False (schedule untouched) when not applicable."""
    loops = sch.get_loops(block)
    if len(loops) != 4:
        return False
    blk = sch.get(block)
    bufs = [_buf(r) for r in blk.reads] + [_buf(w) for w in blk.writes]
    if any(str(b.dtype) != "float32" for b in bufs):
        return False
    h, w = _loop_extent(sch, loops[2]), _loop_extent(sch, loops[3])
    if h is None or w is None:
        return False
    trial = sch.copy()
    try:
        tl = trial.get_loops(trial.get_sblock(blk.name_hint))
        bc = trial.fuse(tl[0], tl[1])
        trial.parallel(bc)
        trial.tensorize(tl[2], _memcpy_intrin(h, w))
    except Exception:
        return False
    l0 = sch.get_loops(block)
    bc = sch.fuse(l0[0], l0[1])
    sch.parallel(bc)
    sch.tensorize(l0[2], _memcpy_intrin(h, w))
    return True


def _unroll_short(sch, loop, limit: int = 16) -> None:
    e = _loop_extent(sch, loop)
    if e is not None and e <= limit:
        sch.unroll(loop)


def _channel_vector_tile(sch, stages: list, loop, lanes: int) -> bool:
    """Compute a tile (its stages, consumer first: a gather / scatter-gather and its ``_raw`` loads, or a local
    copy) at ``loop`` channels-innermost, vectors of channels per pixel: a scatter-gather looks up the source of
    a pixel (a block or the base) once for all of them, not per element (1.7x on GAN Compression's depthwise
    convs, 1.8x on its pointwise ones; 3x3 dense-channel convs lose by it: their broadcasts then read 36 cache
    lines per input channel). False (untouched) unless the channels fill vectors."""
    channels = [_static(_buf(sch.get(t).writes[0]).shape[1]) for t in stages]
    if any(c is None or c % lanes for c in channels):
        return False
    for t in stages:
        sch.transform_layout(t, ("write", 0), lambda a, b, c, d: (a, c, d, b))
        sch.compute_at(t, loop, preserve_unit_loops=True)
        sch.set_scope(t, 0, "local")
        tl = sch.get_loops(t)
        sch.reorder(*tl[-2:], tl[-3])
        tl = sch.get_loops(t)
        cv_o, cv = sch.split(tl[-1], [None, lanes])
        sch.vectorize(cv)
        sch.unroll(cv_o)
        sch.unroll(tl[-2])
    return True


def _tile_rows(sch, block) -> None:
    """The innermost (column) loop of a tile's loads: vectorised for a gather (a block inside the image reads
    contiguous rows: ``sige_te.gather_te``), unrolled otherwise (scatter-gathers and pads select per element)."""
    loop = sch.get_loops(block)[-1]
    if sch.get(block).name_hint in ("sige_gather", "sige_gather_raw"):
        sch.vectorize(loop)
    else:
        _unroll_short(sch, loop)


def _vectorize_flat(sch, block, n: int, lanes: int) -> bool:
    """Fuse the innermost ``n`` (static) loops of ``block``, split by ``lanes`` and vectorise; False (untouched)
    when their extent is not a multiple of ``lanes``."""
    loops = sch.get_loops(block)[-n:]
    total = 1
    for lp in loops:
        e = _loop_extent(sch, lp)
        if e is None:
            return False
        total *= e
    if total % lanes:
        return False
    _, v = sch.split(sch.fuse(*loops), [None, lanes])
    sch.vectorize(v)
    return True


class SigeGatherScatter(ScheduleRule):
    """SigeGather / SigeScatterGather / SigeScatter(+BlockResidual): parallel over (blocks x channels)."""

    name = "cpu.sige_gather_scatter"
    OPS = ("SigeGather", "SigeScatterGather", "SigeScatter", "SigeScatterWithBlockResidual")

    def apply(self, func, target):
        if not isinstance(func, tirx.PrimFunc) or _func_op(func) not in self.OPS:
            return None
        sch = s_tir.Schedule(func)
        lanes = vector_lanes(target)
        for b in _root_blocks(sch):
            name = sch.get(b).name_hint
            loops = sch.get_loops(b)
            if name == "sige_scatter_copy":
                if not _memcpy_planes(sch, b):
                    _parallel_vectorize(sch, b, lanes)
            elif name.endswith("_raw"):
                continue  # scheduled with its activation stage
            elif len(loops) >= 4 and _has_block(sch, name + "_raw"):
                # one gathered block at a time: its loads + affine (stack), then the activation, vectorised
                # over the block's contiguous C x bh x bw outputs
                stage = sch.get_sblock(name + "_raw")
                sch.parallel(loops[0])
                sch.compute_at(stage, loops[0], preserve_unit_loops=True)
                sch.set_scope(stage, 0, "local")
                _unroll_short(sch, sch.get_loops(stage)[-1])
                if not _vectorize_flat(sch, b, 3, lanes):
                    _unroll_short(sch, sch.get_loops(b)[-1])
            elif len(loops) == 4 and name in ("sige_scatter", "sige_shortcut"):  # (b, n, c, block row)
                sch.reorder(loops[0], loops[2], loops[1])
                sch.parallel(sch.fuse(loops[0], loops[2]))  # channel planes outer: no division by N
            elif len(loops) >= 4:
                fused = sch.fuse(loops[0], loops[1])
                sch.parallel(fused)
                _unroll_short(sch, loops[-1])
            else:
                _parallel_vectorize(sch, b, lanes)
        return sch


class GroupMoments(ScheduleRule):
    """SigeTileMoments / SigeScatterMoments: one (batch, group) per parallel task; both sums in one pass over
    its tiles (blocks), into partial sums per tile column and sum (two vectors over the tile row)."""

    name = "cpu.group_moments"
    OPS = ("SigeTileMoments", "SigeScatterMoments")

    def apply(self, func, target):
        if not isinstance(func, tirx.PrimFunc) or _func_op(func) not in self.OPS:
            return None
        sch = s_tir.Schedule(func)
        block = next(b for b in _root_blocks(sch) if not _is_spatial(sch, b))
        rf = sch.rfactor(sch.get_loops(block)[-1], 4)  # [2, B, G, 1, bw] partial sums
        s, bb, g, u, rn, rc, ri, rj = sch.get_loops(rf)
        sch.reorder(bb, g, u, rn, rc, ri, s, rj)
        task = sch.fuse(bb, g, u)
        sch.parallel(task)
        sch.reverse_compute_at(block, task)
        sch.set_scope(rf, 0, "local")
        sch.vectorize(rj)  # loads affine in the column (sige_te.tile_moments_te, scatter_moments_te)
        sch.decompose_reduction(rf, rn)
        sch.unroll(s)
        return sch


class Generic(ScheduleRule):
    """Fallback for injective and reduction functions: inline injective producers, parallel outer
    spatial loops, vectorise a static innermost spatial loop."""

    name = "cpu.generic"

    def apply(self, func, target):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        if not blocks:
            return None
        lanes = vector_lanes(target)
        outputs = _output_buffers(func)
        # inline spatial blocks that are not outputs (into their consumers), except small ones feeding a
        # large output (per-channel GroupNorm scale/shift: rsqrt(var + eps) * gamma ...): inlined, they would
        # be recomputed for every element; materialised, they cost a few hundred scalar ops
        out_elems = _buffer_elems(_buf(sch.get(blocks[-1]).writes[0])) if sch.get(blocks[-1]).writes else None
        small: set[str] = set()
        for b in blocks[:-1]:
            blk = sch.get(b)
            if not _is_spatial(sch, b) or any(str(_buf(w).name) in outputs for w in blk.writes):
                continue
            n = _buffer_elems(_buf(blk.writes[0])) if blk.writes else None
            if out_elems and n and n * 64 <= out_elems and out_elems >= 65536:
                small.add(blk.name_hint)
                continue
            try:
                sch.compute_inline(b)
            except Exception:
                pass
        # long reductions (GroupNorm mean/variance over C/G x H x W): vectorised partial sums (rfactor)
        done: set[str] = set()
        for b in _root_blocks(sch):
            name = sch.get(b).name_hint
            if _is_spatial(sch, b):
                continue
            trial = sch.copy()
            try:
                if _vectorized_reduction(trial, trial.get_sblock(name), lanes):
                    sch = trial
                    done.add(name)
            except Exception:
                pass
        for b in _root_blocks(sch):
            if sch.get(b).name_hint in done | small or sch.get(b).name_hint.endswith("_rf"):
                continue
            types = _iter_types(sch, b)
            n_reduce = len(types) - len(list(itertools.takewhile(lambda t: t == DATA_PAR, types)))
            try:
                _parallel_vectorize(sch, b, lanes)
            except Exception:
                pass
            if n_reduce and all(t == COMM_REDUCE for t in types[-n_reduce:]):
                # the init before the reduction loops: inside them it would never run for an extent of 0
                # (a grid without active blocks) and the output would keep what the memory pool held
                try:
                    sch.decompose_reduction(b, sch.get_loops(b)[-n_reduce])
                except Exception:
                    pass
        return sch


def _vectorized_reduction(sch, block, lanes: int, min_extent: int = 256) -> bool:
    """``spatial... x reduce...`` with a long static reduction: split the fused reduction by the vector
    width, rfactor the lanes (vector partial sums), parallelise the spatial loops. False if not applicable."""
    loops = list(sch.get_loops(block))
    types = _iter_types(sch, block)
    if len(loops) != len(types):
        return False
    nsp = 0
    for t in types:
        if t != DATA_PAR:
            break
        nsp += 1
    red = loops[nsp:]
    if not red or any(t != COMM_REDUCE for t in types[nsp:]):
        return False
    exts = [_loop_extent(sch, lp) for lp in red]
    if None in exts:
        return False
    total = 1
    for e in exts:
        total *= e
    if total < min_extent or total % lanes:
        return False
    r = sch.fuse(*red) if len(red) > 1 else red[0]
    _, ri = sch.split(r, [None, lanes])
    rf = sch.rfactor(ri, 0)
    rf_loops = list(sch.get_loops(rf))
    # rf loops: spatial..., r_outer, r_inner(lanes); partial sums init before r_outer, vector body
    # vector partial sums: a [lanes] accumulator on the stack, fully unrolled (LLVM keeps it in a
    # register and vectorises the contiguous loads; TIR vectorize refuses loops under a reduction block)
    # parallel before decompose_reduction (a subtree holding the init block has no compact dataflow); the
    # final cross-lane sum goes under the same parallel loop (compute_at), so each thread owns its
    # partial sums
    sp = rf_loops[:nsp]
    fused = None
    if sp:
        fused = sch.fuse(*sp) if len(sp) > 1 else sp[0]
        sch.parallel(fused)
        sch.reverse_compute_at(block, fused)
    sch.set_scope(rf, 0, "local")
    sch.decompose_reduction(rf, sch.get_loops(rf)[-2])
    sch.unroll(sch.get_loops(rf)[-1])
    return True


def default_rules():
    from .attention import Attention

    return [SigeGatherScatter(), GroupMoments(), DepthwiseConv2d(), DepthwiseBlocks(), PointwiseBlocks(), Conv2dNCHW(),
            Matmul(), Attention(), Generic()]


__all__ = ["Conv2dNCHW", "DepthwiseConv2d", "DepthwiseBlocks", "PointwiseBlocks", "Matmul", "SigeGatherScatter", "GroupMoments", "Generic",
           "default_rules", "vector_lanes"]
