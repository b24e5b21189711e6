"""Encode with rows in vector lanes and an in-register transpose of the input.

The scheduled rows-in-lanes encode (:func:`lutnn.tvm.schedules._encode_rows_in_lanes`)
copies each ``rows x V`` block of ``x`` transposed with strided loads, which LLVM emits
as ``vgatherdps``: about half of the encode's time on a Zen 4. Here the block is read
as ``rows`` contiguous ``V``-float loads and transposed by one shuffle (LLVM lowers it
to in-register permutes); the distance and argmin arithmetic is the scheduled kernel's
(``pnorm - 2 x.p`` summed over ``v`` in order, strict ``<`` keeps the first minimum),
so the codes are identical.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .kernels import KERNEL_ATTR, EncodeSpec

KERNEL = "rows_xpose"


def encode_rows_func(spec: EncodeSpec, rows: int) -> tirx.PrimFunc:
    """``(x [N, C*V], protos_t [C, V, K], pnorm [C, K]) -> codes [N, C]``, ``rows`` rows per vector."""
    n, c, k, v = spec.n, spec.c, spec.k, spec.v
    d = c * v
    blocks = -(-n // rows)

    def transposed(x, nb, cb):
        """``x[nb*rows + i, cb*v + j]`` at lane ``j * rows + i`` (rows past N repeat row N-1)."""
        vecs = [x[T.min(nb * rows + i, n - 1), T.ramp(cb * v, 1, v)] for i in range(rows)]
        return tirx.Shuffle(vecs, [i * v + j for j in range(v) for i in range(rows)])

    @T.prim_func(s_tir=False)
    def lut_encode_rows(
        x: T.Buffer((n, d), "float32"),
        protos_t: T.Buffer((c, v, k), "float32"),
        pnorm: T.Buffer((c, k), "float32"),
        codes: T.Buffer((n, c), "uint8"),
    ):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: "encode"})
        for nb in T.parallel(blocks):
            xt = T.alloc_buffer((v * rows,), "float32")
            best = T.alloc_buffer((rows,), "float32")
            code = T.alloc_buffer((rows,), "uint8")
            dist = T.alloc_buffer((rows,), "float32")
            for cb in range(c):
                xt[T.ramp(0, 1, v * rows)] = transposed(x, nb, cb)
                best[T.ramp(0, 1, rows)] = T.broadcast(T.float32("inf"), rows)
                code[T.ramp(0, 1, rows)] = T.broadcast(T.uint8(0), rows)
                for kk in range(k):
                    dist[T.ramp(0, 1, rows)] = T.broadcast(pnorm[cb, kk], rows)
                    for j in T.unroll(v):
                        dist[T.ramp(0, 1, rows)] = dist[T.ramp(0, 1, rows)] - T.broadcast(T.float32(2), rows) * xt[
                            T.ramp(j * rows, 1, rows)] * T.broadcast(protos_t[cb, j, kk], rows)
                    code[T.ramp(0, 1, rows)] = T.Select(
                        dist[T.ramp(0, 1, rows)] < best[T.ramp(0, 1, rows)],
                        T.broadcast(T.Cast("uint8", kk), rows), code[T.ramp(0, 1, rows)])
                    best[T.ramp(0, 1, rows)] = T.min(dist[T.ramp(0, 1, rows)], best[T.ramp(0, 1, rows)])
                for i in range(rows):
                    if nb * rows + i < n:
                        codes[nb * rows + i, cb] = code[i]

    return lut_encode_rows
