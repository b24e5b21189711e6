"""Hand schedules of the LUT kernels, parametrised by a few knobs, plus a generic CPU
schedule for the rest of a compiled model.

Read-accumulate: a ``rows x cols`` tile of ``y`` lives in vector registers while the
loop over codebooks ``c`` reads table rows ``T[c, code, m-tile]`` (contiguous in ``m``);
the outer loop runs over column tiles so one column slice of the table stays in cache
for every row; column x row tiles are split across threads. ``knob_space`` lists the
tile sizes tuning may choose from (:mod:`lutnn.tvm.tuning`). For int8 tables with K=16
the space also holds the in-register shuffle kernels the target's CPU supports
(:mod:`lutnn.tvm.shuffle`, knob ``kernel``), so tuning picks gather or shuffle per shape.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

from tvm import tirx
from tvm.s_tir import Schedule, ScheduleError
from tvm.target import Target

from .encode_rows import KERNEL as ENCODE_ROWS_KERNEL
from .encode_rows import encode_rows_func
from .kernels import EncodeSpec, KernelSpec, LookupSpec, kernel_func
from .shuffle import col_choices, shuffle_func, shuffle_kernels
from .target import simd_bytes

ROW_CHOICES = (1, 2, 4, 6, 8)
VECTORS_PER_TILE = (1, 2, 3, 4, 6, 8)
C_TILE_CHOICES = (1, 2, 4)
C_BLOCK_CHOICES = (0, 16, 32)
# Shuffle kernels used untuned, where the CPU has them (measured faster than gather, docs/shuffle_kernel.md)
DEFAULT_SHUFFLE = ("vpermb512",)


@dataclass(frozen=True)
class Knobs:
    rows: int = 4  # lookup: output rows per register tile
    cols: int = 32  # lookup: output columns per register tile
    c_block: int = 0  # lookup: codebooks per pass over y (0 = all: y tile stays in registers)
    c_tile: int = 1  # encode, k-vectorised: codebooks per parallel step
    enc_rows: int = 0  # encode: rows per vector (n-vectorised); 0 = vectorise over k instead
    # lookup: "gather" (table rows from memory) or a shuffle.SHUFFLE_KERNELS name;
    # encode: "gather" (scheduled TIR) or encode_rows.KERNEL (rows in lanes, in-register transpose)
    kernel: str = "gather"


@dataclass(frozen=True)
class KernelFamily:
    """A kernel kind defined outside this module (e.g. :mod:`lutnn.tvm.conv`): what it computes,
    its knobs and its schedule, so tuning and the database treat it like the built-in kernels."""

    func: Callable[[Any], tirx.PrimFunc]
    knob_space: Callable[[Any, Target], list[Knobs]]
    default_knobs: Callable[[Any, Target], Knobs]
    schedule: Callable[[Schedule, Any, Target, Knobs], None]
    random_inputs: Callable[[Any, int], list]  # valid arguments (outputs last) for timing


FAMILIES: dict[type, KernelFamily] = {}


def register_family(spec_type: type, family: KernelFamily) -> None:
    FAMILIES[spec_type] = family


def _lanes(m: int, dtype_bytes: int, target: Target) -> int:
    """Largest power-of-two vector length (<= one register) dividing ``m``; 1 = scalar."""
    lanes = simd_bytes(target) // dtype_bytes
    while lanes > 1 and m % lanes:
        lanes //= 2
    return lanes


def _acc_lanes(spec: LookupSpec, target: Target) -> int:
    return _lanes(spec.m, 2 if spec.acc_dtype == "int16" else 4, target)


def knob_space(spec: KernelSpec, target: Target) -> list[Knobs]:
    if type(spec) in FAMILIES:
        return FAMILIES[type(spec)].knob_space(spec, target)
    if isinstance(spec, EncodeSpec):
        lanes = simd_bytes(target) // 4
        xpose = [Knobs(enc_rows=r, kernel=ENCODE_ROWS_KERNEL) for r in (lanes, lanes // 2) if r >= 4]
        by_rows = [Knobs(enc_rows=r) for r in (lanes, 2 * lanes) if spec.n % r == 0]
        return xpose + by_rows + [Knobs(c_tile=t) for t in C_TILE_CHOICES if spec.c % t == 0]
    lanes = _acc_lanes(spec, target)
    cols = [lanes * v for v in VECTORS_PER_TILE if spec.m % (lanes * v) == 0] or [spec.m]
    rows = [r for r in ROW_CHOICES if r <= spec.n]
    blocks = [b for b in C_BLOCK_CHOICES if b < spec.c]
    gather = [Knobs(rows=r, cols=c, c_block=b) for r, c, b in itertools.product(rows, cols, blocks)]
    return gather + _shuffle_space(spec, target)


def _shuffle_space(spec: LookupSpec, target: Target) -> list[Knobs]:
    return [Knobs(rows=0, cols=c, c_block=0, kernel=k) for k in shuffle_kernels(spec, target) for c in col_choices(spec)]


def default_knobs(spec: KernelSpec, target: Target, gather_only: bool = False) -> Knobs:
    """~16 accumulator registers (4 rows x 4 vectors) and codebook blocks of 32 (16 for int8):
    measured faster than register-resident y for every D=768 shape on a Zen 3 (L1 32 KiB)."""
    if type(spec) in FAMILIES:
        return FAMILIES[type(spec)].default_knobs(spec, target)
    if isinstance(spec, EncodeSpec):
        return knob_space(spec, target)[0]  # rows in vector lanes (2-3x faster than k in lanes)
    shuffle = [k for k in _shuffle_space(spec, target) if k.kernel in DEFAULT_SHUFFLE]
    if shuffle and not gather_only:
        return shuffle[0]
    lanes = _acc_lanes(spec, target)
    space = knob_space(spec, target)
    cols = max((k.cols for k in space if k.cols <= 4 * lanes), default=space[0].cols)
    block = 32 if spec.table_dtype == "float32" else 16
    c_block = block if spec.c > block else 0
    return Knobs(rows=min(4, spec.n), cols=cols, c_block=c_block)


def _vectorize_inner(sch: Schedule, block, lanes: int, skip: int = 1) -> None:
    """Fuse a block's loops below the first ``skip`` and vectorise ``lanes`` of them."""
    loops = sch.get_loops(block)[skip:]
    if lanes <= 1 or not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _, inner = sch.split(fused, [None, lanes])
    sch.vectorize(inner)


def schedule_lookup(sch: Schedule, spec: LookupSpec, target: Target, knobs: Knobs) -> None:
    """``c_block = 0``: y tile in registers for the whole sum (table column slice in L2).
    ``c_block > 0``: sum ``c_block`` codebooks at a time into y, so the table slice being
    read (``c_block x K x cols``) stays in L1 when the whole table is too large."""
    lanes = _acc_lanes(spec, target)
    acc = sch.get_sblock("acc")
    n, m, c = sch.get_loops(acc)
    n_o, n_i = sch.split(n, [None, knobs.rows])
    m_o, m_i = sch.split(m, [None, knobs.cols])
    m_v, m_l = sch.split(m_i, [None, lanes])
    fp32 = spec.table_dtype == "float32"
    if knobs.c_block:
        c_o, c_i = sch.split(c, [None, knobs.c_block])
        sch.reorder(m_o, c_o, n_o, c_i, n_i, m_v, m_l)
        reduce_at, parallel = c_o, m_o
        if not fp32:
            sch.reverse_compute_at(sch.get_sblock("scale"), m_o)
    else:
        sch.reorder(m_o, n_o, c, n_i, m_v, m_l)
        reduce_at = c
        # "global" scope on purpose: small constant-size global buffers become stack
        # arrays (registers after LLVM's SROA); "local" ones become heap workspaces.
        epilogue = sch.cache_write(acc, 0, "global") if fp32 else sch.get_sblock("scale")
        sch.reverse_compute_at(epilogue, n_o)
        parallel = sch.fuse(m_o, n_o)
    sch.parallel(parallel)
    sch.unroll(n_i)
    sch.unroll(m_v)
    if lanes > 1:
        sch.vectorize(m_l)
    if not knobs.c_block:
        _vectorize_inner(sch, epilogue, lanes)
    elif not fp32:
        _vectorize_inner(sch, sch.get_sblock("scale"), lanes)
    init = sch.decompose_reduction(acc, reduce_at)
    _vectorize_inner(sch, init, lanes)


def schedule_encode(sch: Schedule, spec: EncodeSpec, target: Target, knobs: Knobs) -> None:
    if knobs.enc_rows:
        _encode_rows_in_lanes(sch, knobs.enc_rows)
    else:
        _encode_k_in_lanes(sch, spec, target, knobs)


def _encode_rows_in_lanes(sch: Schedule, rows: int) -> None:
    """``rows`` sub-vectors side by side in vector lanes: per prototype ``k`` one vector of
    distances, then a vector compare/select keeps the running argmin. The rows' sub-vectors
    are first copied transposed (``[V, rows]``) so each lane-vector load is contiguous."""
    am, dist = sch.get_sblock("argmin"), sch.get_sblock("dist")
    n, c, k = sch.get_loops(am)
    n_o, n_l = sch.split(n, [None, rows])
    sch.reorder(n_o, c, k, n_l)
    codes = sch.cache_write(am, 1, "global")  # write 1 = codes (0 is the running minimum)
    sch.reverse_compute_at(codes, c)
    sch.compute_at(dist, k)
    x_t = sch.cache_read(dist, 1, "global")
    sch.compute_at(x_t, c)
    sch.transform_layout(x_t, ("write", 0), lambda i, j: (j, i))
    *_, d_n, d_v = sch.get_loops(dist)
    sch.reorder(d_v, d_n)
    sch.vectorize(d_n)
    sch.unroll(d_v)
    sch.vectorize(sch.get_loops(am)[-1])
    sch.parallel(n_o)
    sch.decompose_reduction(dist, d_v)
    sch.decompose_reduction(am, sch.get_loops(am)[2])


def _encode_k_in_lanes(sch: Schedule, spec: EncodeSpec, target: Target, knobs: Knobs) -> None:
    """Distances of one sub-vector to the K prototypes as a vector over ``k``, then a scalar argmin
    (the fallback when N is not a multiple of the vector width)."""
    lanes = _lanes(spec.k, 4, target)
    am, dist = sch.get_sblock("argmin"), sch.get_sblock("dist")
    n, c, _ = sch.get_loops(am)
    c_o, c_i = sch.split(c, [None, knobs.c_tile])
    sch.compute_at(dist, c_i)
    *_, dk, dv = sch.get_loops(dist)
    sch.reorder(dv, dk)
    sch.parallel(sch.fuse(n, c_o))
    sch.unroll(dv)
    if lanes > 1:
        sch.vectorize(dk)
    sch.decompose_reduction(dist, dv)
    sch.decompose_reduction(am, sch.get_loops(am)[-1])


def scheduled(spec: KernelSpec, target: Target, knobs: Knobs | None = None) -> tirx.PrimFunc:
    """The kernel scheduled with ``knobs`` (default: the untuned hand choice)."""
    knobs = knobs or default_knobs(spec, target)
    family = FAMILIES.get(type(spec))
    if family:
        sch = Schedule(family.func(spec))
        family.schedule(sch, spec, target, knobs)
        return sch.mod["main"]
    if knobs.kernel == ENCODE_ROWS_KERNEL and isinstance(spec, EncodeSpec):
        return encode_rows_func(spec, knobs.enc_rows)
    if knobs.kernel != "gather":
        if not isinstance(spec, LookupSpec) or knobs.kernel not in shuffle_kernels(spec, target):
            raise ValueError(f"{spec.name}: kernel {knobs.kernel!r} needs int8 tables, K=16 and a CPU with "
                             f"its SIMD features; target {target} does not qualify")
        return shuffle_func(spec, knobs.kernel, knobs.cols)
    sch = Schedule(kernel_func(spec))
    if isinstance(spec, LookupSpec):
        schedule_lookup(sch, spec, target, knobs)
    else:
        schedule_encode(sch, spec, target, knobs)
    return sch.mod["main"]


# -- generic fallback for the non-LUT parts of a model ----------------------------------
def schedule_generic(func: tirx.PrimFunc, target: Target) -> tirx.PrimFunc:
    """Parallel + vectorised schedule for any CPU PrimFunc (dlight has no CPU matmul rule).

    First every elementwise block with one consumer is inlined into it (the legalised ops
    chain slices, transposes, casts and selects through full-size buffers, one pass each).
    A function whose last block is elementwise over rows (softmax, layernorm: reductions
    then a normalise) is then computed one row at a time, rows across threads, so the
    row stays in L1 between its passes. Otherwise each block gets the first rule that
    applies: matmul-like reductions (spatial ``..., i, j``, one reduction, two inputs) a
    register tile with the reduction between the tile loops, like the lookup kernel;
    other blocks are split across threads and vectorised. A block that refuses a rule
    tries the next one and keeps the default lowering if none applies.
    """
    sch = Schedule(func)
    try:
        root = sch.get_sblock("root")
    except (ScheduleError, ValueError):
        return func
    _inline_elementwise(sch, root)
    trial = sch.copy()
    if _rows_at_once(trial, trial.get_sblock("root"), target):
        return trial.mod["main"]
    done: set[str] = set()
    while True:  # a rule may add blocks (padding copies): schedule those too
        todo = [n for n in (sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))) if n not in done]
        if not todo:
            return sch.mod["main"]
        done.add(todo[0])
        for rule in (_tile_matmul, _parallel_vectorize):
            trial = sch.copy()
            try:
                if rule(trial, trial.get_sblock(todo[0]), target):
                    sch = trial
                    break
            except (ScheduleError, ValueError):
                continue


def _inline_elementwise(sch: Schedule, root) -> None:
    """Inline spatial-only blocks that feed exactly one block (never an output block; a block
    read by two consumers, e.g. softmax's ``exp``, stays so it is computed once)."""
    changed = True
    while changed:
        changed = False
        blocks = sch.get_child_blocks(root)
        for block in blocks[:-1]:
            if any(t != 0 for t in _iter_types(sch, block)) or len(sch.get_consumers(block)) != 1 or _pads(sch, block):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except (ScheduleError, ValueError):
                continue


def _size(region) -> int:
    """Elements of the buffer a block read/write region belongs to."""
    n = 1
    for s in region.source.shape:
        n *= int(s)
    return n


def _pads(sch: Schedule, block) -> bool:
    """Whether ``block`` writes more elements than its input has (zero padding of a conv):
    inlined, it would put a bounds check on every input load of the consumer's inner loop."""
    b = sch.get(block)
    return bool(b.reads) and _size(b.writes[0]) > max(_size(r) for r in b.reads)


def _rows_at_once(sch: Schedule, root, target: Target) -> bool:
    """Reductions over the last axis followed by an elementwise block over the same rows:
    every block computed under the last block's row loops, rows split across threads, the
    row vectorised (sums and maxima as ``lanes`` partial results, then one horizontal step)."""
    blocks = sch.get_child_blocks(root)
    last = blocks[-1]
    if len(blocks) < 2 or any(t != 0 for t in _iter_types(sch, last)):
        return False
    n_rows = len(sch.get_loops(last)) - 1  # row loops: all but the last
    reductions = [_iter_types(sch, b) for b in blocks[:-1] if 2 in _iter_types(sch, b)]
    if n_rows < 1 or not reductions or any(t.count(0) != n_rows for t in reductions):
        return False  # e.g. a conv + bias: its reduction keeps more spatial axes than the rows
    width = _extent(sch, sch.get_loops(last)[-1])
    # rows of whole vectors only: an odd row (197 tokens) is left to LLVM (predicated vector tails
    # measured 1.6x slower for softmax, and a predicated rfactor summed the tail lanes: wrong results)
    lanes = red_lanes = _lanes(width, 4, target)
    try:
        partials = []
        for block in blocks[:-1] if red_lanes > 1 else []:
            types, loops = _iter_types(sch, block), sch.get_loops(block)
            if types.count(2) == 1 and types[-1] == 2 and _extent(sch, loops[-1]) == width:
                _, lane = sch.split(loops[-1], [None, red_lanes])
                partials.append(sch.get(sch.rfactor(lane, factor_axis=len(types) - 1)).name_hint)
        loops = sch.get_loops(last)
        for block in reversed(sch.get_child_blocks(root)[:-1]):
            sch.compute_at(block, loops[-2], preserve_unit_loops=True)
        row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(row)
        for block in sch.get_child_blocks(row) if lanes > 1 else []:
            inner = sch.get_loops(block)[-1]
            if sch.get(block).name_hint in partials:  # loops: row, lane, unit loops, reduction
                lane = sch.get_loops(block)[1]
                sch.reorder(inner, lane)
                sch.vectorize(lane)
            elif _extent(sch, inner) == width and all(t == 0 for t in _iter_types(sch, block)):
                sch.vectorize(sch.split(inner, [None, lanes])[1])
    except (ScheduleError, ValueError):
        return False
    return True


def _iter_types(sch: Schedule, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]  # 0 spatial, 2 reduction


def _extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _largest_divisor(n: int, choices) -> int:
    return max(c for c in choices if n % c == 0)


def _tile_matmul(sch: Schedule, block, target: Target) -> bool:
    types, loops = _iter_types(sch, block), sch.get_loops(block)
    n_spatial = types.count(0)
    if len(types) != len(loops) or n_spatial < 2 or n_spatial == len(types) or len(sch.get(block).reads) < 2:
        return False
    if any(t != 2 for t in types[n_spatial:]):  # spatial loops first, then only reductions
        return False
    # odd extents (197 tokens) are padded to whole register tiles (4 rows x whole vectors): an
    # unpadded 197-wide tile had 1 row and no vectors (1.6x slower attention matmuls)
    full = simd_bytes(target) // 4
    i_extent = _extent(sch, loops[n_spatial - 2])
    pad = [1] * (n_spatial - 2) + [4 if i_extent % 2 and i_extent > 4 else 1,
                                   full if _extent(sch, loops[n_spatial - 1]) % full else 1] + [1] * (len(types) - n_spatial)
    macs = 1
    for loop in loops:
        macs *= _extent(sch, loop)
    # padding copies the operands each call: only where each element is reused enough (not a GEMV)
    reads = sch.get(block).reads
    # only true matmuls (each operand indexed by plain loop variables): a conv's window indexing made
    # pad_einsum's copies cost 10x the 7x7 conv itself
    padded = (any(p > 1 for p in pad) and macs >= 16 * sum(_size(r) for r in reads)
              and all(isinstance(rng.min, (tirx.Var, tirx.IntImm)) for r in reads for rng in r.region))
    if padded:
        sch.pad_einsum(block, pad)
        loops = sch.get_loops(block)
    *batch, i, j = loops[:n_spatial]
    reds = loops[n_spatial:]
    lanes = _lanes(_extent(sch, j), 4, target)
    rows = _largest_divisor(_extent(sch, i), (1, 2, 4))
    cols = lanes * _largest_divisor(_extent(sch, j) // lanes, (1, 2, 4)) if lanes > 1 else _extent(sch, j)
    if rows == 1 and _extent(sch, i) in (3, 5, 7) and cols >= 2 * lanes > 2:
        rows, cols = _extent(sch, i), 2 * lanes  # a 7-pixel conv row: 7 x 2 vectors of accumulators
    i_o, i_i = sch.split(i, [None, rows])
    j_o, j_i = sch.split(j, [None, cols])
    j_v, j_l = sch.split(j_i, [None, lanes])
    sch.reorder(*batch, i_o, j_o, *reds, i_i, j_v, j_l)
    wb = sch.cache_write(block, 0, "global")
    sch.reverse_compute_at(wb, j_o)
    if padded and pad[-1 - len(reds)] == 1:
        # only rows padded: the tile writes straight into the unpadded output (a row check, whole
        # vector stores) instead of a full-size copy after (1.3x faster at DeiT b8; with padded
        # columns the stores would be masked lane by lane: slower)
        try:
            sch.reverse_compute_inline(sch.get_consumers(wb)[0])
        except (ScheduleError, ValueError):
            pass
    sch.parallel(sch.fuse(*batch, i_o, j_o))
    sch.unroll(i_i)
    if lanes > 1:
        sch.unroll(j_v)
        sch.vectorize(j_l)
    _vectorize_inner(sch, wb, lanes)
    init = sch.decompose_reduction(block, reds[0])
    _vectorize_inner(sch, init, lanes)
    return True


def _parallel_vectorize(sch: Schedule, block, target: Target) -> bool:
    types, loops = _iter_types(sch, block), sch.get_loops(block)
    if len(types) != len(loops) or not loops:
        return False
    n_spatial = next((i for i, t in enumerate(types) if t != 0), len(types))
    if n_spatial == 0:
        return False
    if n_spatial == len(loops) and len(loops) > 1:
        # threads over rows; a row of whole vectors is vectorised, an odd one (197 tokens) left to
        # LLVM: fusing it with the rows would cost an index division per lane
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
        if _extent(sch, loops[-1]) % (simd_bytes(target) // 4) == 0:
            sch.vectorize(sch.split(loops[-1], [None, simd_bytes(target) // 4])[1])
        return True
    if n_spatial == len(loops):  # purely elementwise: vectorise the fused tail
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        lanes = _lanes(_extent(sch, fused), 4, target)
        outer, inner = sch.split(fused, [None, lanes])
        sch.parallel(outer)
        if lanes > 1:
            sch.vectorize(inner)
        return True
    full = simd_bytes(target) // 4
    if n_spatial > 1 and _extent(sch, loops[n_spatial - 1]) % full == 0 and all(t == 2 for t in types[n_spatial:]):
        # a reduction per element of a channels-last row (pooling): the reduction loops outside
        # one vector of the last spatial axis
        *rows, last = loops[:n_spatial]
        vec_o, vec = sch.split(last, [None, full])
        sch.reorder(*rows, vec_o, *loops[n_spatial:], vec)
        sch.parallel(sch.fuse(*rows))
        sch.vectorize(vec)
        init = sch.decompose_reduction(block, loops[n_spatial])
        sch.vectorize(sch.get_loops(init)[-1])
        return True
    outer = sch.fuse(*loops[:n_spatial]) if n_spatial > 1 else loops[0]
    sch.parallel(outer)
    return True
