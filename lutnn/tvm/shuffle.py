"""In-register int8 read-accumulate for K=16 (Bolt / MADDness / T-MAC style lookups).

The gather kernel (:func:`lutnn.tvm.kernels.lookup_func`) reads one table row per
``(row, codebook)`` from memory. Here the 16 int8 entries ``T[c, :, m]`` of a codebook
for one output column sit in a vector register and a byte shuffle looks up a whole
vector of rows at once, so the table is read from L1 once per row *block* instead of
once per row:

* ``pshufb256`` (AVX2) / ``pshufb512`` (AVX-512BW): ``vpshufb`` looks up 32 / 64 rows
  of one codebook per instruction. Codes are packed 4-bit (two codebooks per byte) into
  a row-block-major workspace by the kernel's first loop. Tables are stored offset to
  unsigned (``u = t + 128``), so a shuffle result viewed as 16-bit words is
  ``w = 256 * u_odd + u_even``; the kernel keeps ``A += w`` and ``H += w >> 8`` in
  uint16, which gives the exact even-row sums as ``A - 256 * H`` (mod 2**16) and the
  odd-row sums as ``H``. Both stay below 2**16 for up to ``PSHUFB_PAIRS_PER_PASS`` codebook
  pairs (``2 * 128 * 255 < 65536``); after each such pass they are widened into int32,
  so any ``C`` is exact. Cost: shuffle + shift + 2 adds per 32 / 64 lookups.
* ``vpermb512`` (AVX-512 VBMI + VNNI): ``vpermb`` looks up a 64-entry table, i.e. 4
  codebooks x 16 entries of one column. The index vector holds 16 rows x 4 codebooks
  (``code + 16 * (c % 4)``, prepared by the kernel's first loop), so the 4 bytes of each
  32-bit lane are one row's 4 looked-up entries and ``vpdpbusd(acc, 1, r)`` adds them
  straight into int32 (no overflow bound). Cost: 2 instructions per 64 lookups.

Both write ``y = scale[m] * acc + bias[m]`` with the same float operations as the
gather kernel, so the outputs are bit-identical. The vectors run over *rows*, so each
column tile is transposed through a small stack buffer before the row-major store.

The table layout differs from the gather kernel's ``[C, K, M]``:
:func:`prepare_table` converts a layer's int8 table once (like a dense library's weight
pre-packing); a :class:`lutnn.tvm.tuning.LookupKernel` applies the one it needs.
"""
from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T
from tvm.target import Target

from .kernels import KERNEL_ATTR, LookupSpec
from .target import cpu_has

# kernel name -> (CPU features it needs, rows per vector)
SHUFFLE_KERNELS: dict[str, tuple[tuple[str, ...], int]] = {
    "vpermb512": (("avx512vbmi", "avx512vnni", "avx512bw"), 16),
    "pshufb512": (("avx512bw",), 64),
    "pshufb256": (("avx2",), 32),
}
SHUFFLE_K = 16
PSHUFB_PAIRS_PER_PASS = 128  # codebook pairs summed in uint16 before widening: 2 * 128 * 255 < 2**16
COL_CHOICES = (4, 8)


def shuffle_kernels(spec: LookupSpec, target: Target) -> list[str]:
    """Shuffle kernels usable for ``spec`` on ``target`` (fastest first); empty = gather only."""
    if spec.table_dtype != "int8" or spec.k != SHUFFLE_K:
        return []
    return [name for name, (feats, _) in SHUFFLE_KERNELS.items() if cpu_has(target, *feats)]


def inner_loop_steps(spec: LookupSpec, kernel: str) -> int:
    """Shuffle groups the kernel's inner loop runs: (row vectors) x columns x codebook groups
    (4 codebooks for ``vpermb512``: vpermb + vpdpbusd; 2 for ``pshufb*``: per codebook
    vpshufb + shift + 2 adds, one packed code load)."""
    rows = SHUFFLE_KERNELS[kernel][1]
    group = 4 if kernel == "vpermb512" else 2
    return -(-spec.n // rows) * spec.m * -(-spec.c // group)


def col_choices(spec: LookupSpec) -> list[int]:
    return [c for c in COL_CHOICES if spec.m % c == 0] or [1]


def prepare_table(table: np.ndarray, kernel: str) -> np.ndarray:
    """int8 ``[C, K, M]`` -> the layout ``kernel`` reads (identity for ``"gather"``).

    ``vpermb512``: ``[M, ceil(C/4), 4 * K]`` int8 (4 codebooks per 64-byte row, zero padded);
    ``pshufb*``: ``[M, C rounded up to even, K]`` uint8 holding ``t + 128`` (pad 128 = zero).
    Per column the codebooks are contiguous, so a column tile's tables are a few linear
    streams (a ``[C, M, K]`` layout would put them 12 KiB apart: one L1 set, thrashing).
    """
    table = np.asarray(table)
    if kernel == "gather":
        return table
    if table.dtype != np.int8 or table.ndim != 3 or table.shape[1] != SHUFFLE_K:
        raise ValueError(f"{kernel} needs an int8 [C, {SHUFFLE_K}, M] table, got {table.dtype} {table.shape}")
    c, k, m = table.shape
    if kernel == "vpermb512":
        cq = -(-c // 4)
        out = np.zeros((cq * 4, k, m), np.int8)
        out[:c] = table
        return np.ascontiguousarray(out.transpose(2, 0, 1).reshape(m, cq, 4 * k))
    if kernel in SHUFFLE_KERNELS:
        out = np.full((c + c % 2, k, m), 128, np.uint8)
        out[:c] = (table.astype(np.int16) + 128).astype(np.uint8)
        return np.ascontiguousarray(out.transpose(2, 0, 1))
    raise ValueError(f"unknown lookup kernel {kernel!r}")


def shuffle_func(spec: LookupSpec, kernel: str, cols: int) -> tirx.PrimFunc:
    """The ``kernel`` read-accumulate for ``spec`` with ``cols`` output columns per tile;
    signature ``(codes [N, C] u8, prepared table, scale [M], bias [M], y [N, M])``."""
    if kernel == "vpermb512":
        return _vpermb(spec, cols)
    if kernel in ("pshufb256", "pshufb512"):
        return _pshufb(spec, SHUFFLE_KERNELS[kernel][1], cols)
    raise ValueError(f"unknown shuffle kernel {kernel!r}")


def _scaled(acc: tirx.PrimExpr, lanes: int, scale: tirx.Buffer, bias: tirx.Buffer, col) -> tirx.PrimExpr:
    """``scale[col] * acc + bias[col]`` for a vector of rows: the gather kernel's float ops."""
    return T.Cast(f"float32x{lanes}", acc) * T.broadcast(scale[col], lanes) + T.broadcast(bias[col], lanes)


def _rows_major(vectors: list[tirx.PrimExpr], lanes: int, interleave: int, cols: int) -> tirx.PrimExpr:
    """One row-major ``[rows, cols]`` tile from per-column vectors over rows, as a single shuffle
    (LLVM lowers it to in-register permutes). ``vectors[e * cols + j]`` holds column ``j`` of
    rows ``interleave * i + e`` (pshufb: even / odd rows in separate vectors)."""
    rows = lanes * interleave
    return tirx.Shuffle(vectors, [((r % interleave) * cols + j) * lanes + r // interleave
                                  for r in range(rows) for j in range(cols)])


def _pshufb(spec: LookupSpec, rows: int, cols: int) -> tirx.PrimFunc:
    n, c, m = spec.n, spec.c, spec.m
    cp = c + c % 2
    pairs = cp // 2
    npad = -(-n // rows) * rows
    half = rows // 2
    passes = -(-pairs // PSHUFB_PAIRS_PER_PASS)
    u8, u16, i32 = f"uint8x{rows}", f"uint16x{half}", f"int32x{half}"
    intrin = "llvm.x86.avx2.pshuf.b" if rows == 32 else "llvm.x86.avx512.pshuf.b.512"

    def lanes(base, count):
        return T.ramp(base, 1, count)

    def splat(value, count):
        return T.broadcast(value, count)

    def table_vec(t16):
        """16 table bytes repeated in every 128-bit lane (vbroadcasti128 / vbroadcasti32x4)."""
        v = T.vectorcombine("uint8x32", t16, t16)
        return v if rows == 32 else T.vectorcombine(u8, v, v)

    @T.prim_func(s_tir=False)
    def lut_lookup_pshufb(
        codes: T.Buffer((n, c), "uint8"),
        table: T.Buffer((m, cp, SHUFFLE_K), "uint8"),
        scale: T.Buffer((m,), "float32"),
        bias: T.Buffer((m,), "float32"),
        y: T.Buffer((n, m), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: "lookup"})
        # codes of codebooks (2q, 2q+1) for row block rb: low / high nibble of packed[rb, q, :]
        packed = T.alloc_buffer((npad // rows, pairs, rows), "uint8")
        for rb, q, i in T.grid(npad // rows, pairs, rows):
            if rb * rows + i < n:
                if 2 * q + 1 < c:
                    packed[rb, q, i] = codes[rb * rows + i, 2 * q] | (codes[rb * rows + i, 2 * q + 1] << T.uint8(4))
                else:
                    packed[rb, q, i] = codes[rb * rows + i, 2 * q]
            else:
                packed[rb, q, i] = T.uint8(0)
        for mo in T.parallel(m // cols):
            acc_all = T.alloc_buffer((cols, half), "uint16")
            acc_hi = T.alloc_buffer((cols, half), "uint16")
            acc = T.alloc_buffer((2, cols, half), "int32")  # even rows, odd rows
            tile = T.alloc_buffer((rows * cols,), "float32")
            for rb in range(npad // rows):
                for e, j in T.grid(2, cols):
                    acc[e, j, lanes(0, half)] = splat(T.int32(0), half)
                for p in range(passes):
                    for j in T.unroll(cols):
                        acc_all[j, lanes(0, half)] = splat(T.uint16(0), half)
                        acc_hi[j, lanes(0, half)] = splat(T.uint16(0), half)
                    for qi in range(T.min(PSHUFB_PAIRS_PER_PASS, pairs - p * PSHUFB_PAIRS_PER_PASS)):
                        pk = T.meta_var(packed[rb, p * PSHUFB_PAIRS_PER_PASS + qi, lanes(0, rows)])
                        for h in T.unroll(2):
                            idx = T.meta_var((pk >> splat(T.uint8(4 * h), rows)) & splat(T.uint8(15), rows))
                            for j in T.unroll(cols):
                                w = T.meta_var(T.reinterpret(u16, T.call_llvm_pure_intrin(
                                    u8, intrin,
                                    table_vec(table[mo * cols + j, 2 * (p * PSHUFB_PAIRS_PER_PASS + qi) + h,
                                                    lanes(0, SHUFFLE_K)]),
                                    idx)))
                                acc_all[j, lanes(0, half)] = acc_all[j, lanes(0, half)] + w
                                acc_hi[j, lanes(0, half)] = acc_hi[j, lanes(0, half)] + (w >> splat(T.uint16(8), half))
                    for j in T.unroll(cols):
                        acc[0, j, lanes(0, half)] = acc[0, j, lanes(0, half)] + T.Cast(
                            i32, acc_all[j, lanes(0, half)] - (acc_hi[j, lanes(0, half)] << splat(T.uint16(8), half)))
                        acc[1, j, lanes(0, half)] = acc[1, j, lanes(0, half)] + T.Cast(i32, acc_hi[j, lanes(0, half)])
                tile[lanes(0, rows * cols)] = _rows_major(
                    [_scaled(acc[e, j, lanes(0, half)] - splat(T.int32(128 * cp), half), half, scale, bias, mo * cols + j)
                     for e in range(2) for j in range(cols)], half, 2, cols)
                for r in range(rows):
                    if rb * rows + r < n:
                        y[rb * rows + r, lanes(mo * cols, cols)] = tile[lanes(r * cols, cols)]

    return lut_lookup_pshufb


def _vpermb(spec: LookupSpec, cols: int) -> tirx.PrimFunc:
    rows = SHUFFLE_KERNELS["vpermb512"][1]
    n, c, m = spec.n, spec.c, spec.m
    cq = -(-c // 4)
    npad = -(-n // rows) * rows

    def lanes(base, count):
        return T.ramp(base, 1, count)

    @T.prim_func(s_tir=False)
    def lut_lookup_vpermb(
        codes: T.Buffer((n, c), "uint8"),
        table: T.Buffer((m, cq, 4 * SHUFFLE_K), "int8"),
        scale: T.Buffer((m,), "float32"),
        bias: T.Buffer((m,), "float32"),
        y: T.Buffer((n, m), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: "lookup"})
        # index bytes: row i, codebook 4q+e at [rb, q, 4i+e] = code + 16e (padding reads entry 16e: 0)
        idx = T.alloc_buffer((npad // rows, cq, 4 * rows), "uint8")
        for rb, q, i, e in T.grid(npad // rows, cq, rows, 4):
            if rb * rows + i < n and q * 4 + e < c:
                idx[rb, q, i * 4 + e] = codes[rb * rows + i, q * 4 + e] + T.uint8(16 * e)
            else:
                idx[rb, q, i * 4 + e] = T.uint8(16 * e)
        for mo in T.parallel(m // cols):
            acc = T.alloc_buffer((cols, rows), "int32")
            tile = T.alloc_buffer((rows * cols,), "float32")
            for rb in range(npad // rows):
                for j in T.unroll(cols):
                    acc[j, lanes(0, rows)] = T.broadcast(T.int32(0), rows)
                for q in range(cq):
                    for j in T.unroll(cols):
                        acc[j, lanes(0, rows)] = T.call_llvm_pure_intrin(
                            "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[j, lanes(0, rows)],
                            T.broadcast(T.int8(1), 64),
                            T.call_llvm_pure_intrin(
                                "int8x64", "llvm.x86.avx512.permvar.qi.512",
                                table[mo * cols + j, q, lanes(0, 64)],
                                T.reinterpret("int8x64", idx[rb, q, lanes(0, 64)])))
                tile[lanes(0, rows * cols)] = _rows_major(
                    [_scaled(acc[j, lanes(0, rows)], rows, scale, bias, mo * cols + j) for j in range(cols)], rows, 1, cols)
                for r in range(rows):
                    if rb * rows + r < n:
                        y[rb * rows + r, lanes(mo * cols, cols)] = tile[lanes(r * cols, cols)]

    return lut_lookup_vpermb
