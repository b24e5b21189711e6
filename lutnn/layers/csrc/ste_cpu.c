/* CPU kernels of the fused straight-through estimator (lutnn/layers/fused.py).
 *
 * Eager PyTorch runs the STE backward as a dozen passes over [C, K, n] blocks (batched matmuls
 * with inner dimensions of 4-16, softmax, sums, scatter_add), each streaming the block through
 * memory, and its forward encoding as distances, then an argmin over rows of 16. Here one pass per codebook and
 * block of 16 rows keeps the K distances, the softmax and its gradient in registers. Vectors run
 * along rows (GCC vector extensions: one AVX-512 register, two AVX2 or four SSE ones), so any K
 * and V vectorise and no reduction over K is horizontal. No -ffast-math: the argmin must treat
 * NaN exactly as torch.min does.
 *
 * Layout: every row-indexed operand is a float pointer plus (row stride, feature stride) in
 * elements; a row stride of 1 (D-major [D, n] blocks, as im2col gives them) loads 16 rows at
 * once, other strides gather. Prototypes are [C, K, V] contiguous. Built and loaded by
 * lutnn/layers/native.py and checked against the eager path by tests/test_fused_ste.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
#define LANES 16

static inline v16 splat(float a) { return (v16){0} + a; }

static inline v16 vsel(v16i mask, v16 a, v16 b) { /* mask ? a : b, lane-wise */
    return (v16)((mask & (v16i)a) | (~mask & (v16i)b));
}

static inline v16 vmax(v16 a, v16 b) { return vsel(a > b, a, b); }

/* exp(x) for x <= 0 (softmax arguments after subtracting the maximum): Cody-Waite range reduction
 * and a degree-6 polynomial, ~2 ulp. */
static inline v16 vexp_nonpos(v16 x) {
    x = vmax(x, splat(-87.0f)); /* exp(-87) ~ 1.6e-38: below every other softmax term's rounding */
    const v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    v16 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
    return p * (v16)bits;
}

static inline float hsum(v16 a) {
    float total = 0.0f;
    for (int i = 0; i < LANES; ++i) total += a[i];
    return total;
}

/* 16 consecutive rows of one feature (fewer at the tail, zero-filled). */
static inline v16 load_rows(const float *p, int64_t stride, int64_t count) {
    v16 out = {0};
    if (stride == 1 && count == LANES) {
        memcpy(&out, p, sizeof out);
    } else {
        for (int64_t i = 0; i < count; ++i) out[i] = p[i * stride];
    }
    return out;
}

static inline void store_rows(float *p, int64_t stride, int64_t count, v16 value) {
    if (stride == 1 && count == LANES) {
        memcpy(p, &value, sizeof value);
    } else {
        for (int64_t i = 0; i < count; ++i) p[i * stride] = value[i];
    }
}

/* codes[n, c] = argmin_k |p_k|^2 - 2 x_n.p_k (the squared distance less |x|^2, which changes no
 * argmin) for n_rows rows of x at (row, feature) strides; prototypes [C, K, V]; codes [n_rows, C]
 * int64. First index on ties; a NaN score wins over numbers and the first NaN stays (torch.argmin's
 * rule), so a diverged row gets the code torch would give it. Returns -1 if out of memory. */
int lutnn_encode(const float *x, int64_t xr, int64_t xf, int64_t n_rows, const float *prototypes,
                 int64_t C, int64_t K, int64_t V, int64_t *codes) {
    v16 *xv = (v16 *)aligned_alloc(64, sizeof(v16) * V);
    float *pm2 = (float *)malloc(sizeof(float) * (V * K + K));
    if (!xv || !pm2) {
        free(xv);
        free(pm2);
        return -1;
    }
    float *psq = pm2 + V * K;
    for (int64_t c = 0; c < C; ++c) {
        const float *pc = prototypes + c * K * V;
        for (int64_t k = 0; k < K; ++k) {
            float sq = 0.0f;
            for (int64_t v = 0; v < V; ++v) {
                pm2[v * K + k] = -2.0f * pc[k * V + v];
                sq += pc[k * V + v] * pc[k * V + v];
            }
            psq[k] = sq;
        }
        for (int64_t n0 = 0; n0 < n_rows; n0 += LANES) {
            const int64_t count = n_rows - n0 < LANES ? n_rows - n0 : LANES;
            for (int64_t v = 0; v < V; ++v) {
                xv[v] = load_rows(x + n0 * xr + (c * V + v) * xf, xr, count);
                if (xr == 1) __builtin_prefetch(x + (n0 + 4 * LANES) + (c * V + v) * xf); /* V streams */
            }
            v16 best = splat(INFINITY);
            v16i arg = {0}, seen_nan = {0};
            v16 score[4];
            for (int64_t k0 = 0; k0 < K; k0 += 4) {
                const int64_t width = K - k0 < 4 ? K - k0 : 4; /* four independent FMA chains */
                for (int64_t j = 0; j < width; ++j) score[j] = splat(psq[k0 + j]);
                for (int64_t v = 0; v < V; ++v) {
                    const float *r = pm2 + v * K + k0;
                    for (int64_t j = 0; j < width; ++j) score[j] += xv[v] * r[j];
                }
                for (int64_t j = 0; j < width; ++j) { /* in k order: first index wins ties */
                    const v16i is_nan = score[j] != score[j];
                    const v16i take = ((score[j] < best) | is_nan) & ~seen_nan;
                    best = vsel(take, score[j], best);
                    arg = (take & (int32_t)(k0 + j)) | (~take & arg);
                    seen_nan |= is_nan;
                }
            }
            for (int64_t i = 0; i < count; ++i) codes[(n0 + i) * C + c] = arg[i];
        }
    }
    free(xv);
    free(pm2);
    return 0;
}

/* The soft-argmin part of the fused STE backward for n_rows rows (see fused.py's docstring):
 * x, g = dL/dx_hat and dx (may be NULL) are [n_rows, D] at (row, feature) strides; codes [n_rows, C]
 * contiguous, 1 or 8 bytes each; prototypes [C, K, V]. With z = (2 x.p - |p|^2)/tau,
 * s = softmax(z), G = P g and dz = s (G - sum_k s G): writes dx = (2/tau) dz P, adds dz^T x to
 * dzx [C, K, V], sum_n dz to dzsum [C, K], sum_n onehot(code)^T g to hard [C, K, V] and
 * sum dz*z to *dzz_out. Returns -1 if its scratch memory cannot be allocated, else 0. */
int lutnn_soft_backward(const float *x, int64_t xr, int64_t xf, const float *g, int64_t gr, int64_t gf,
                           float *dx, int64_t dr, int64_t df, const void *codes, int64_t code_bytes,
                           int64_t n_rows, const float *prototypes, float inv_tau,
                           int64_t C, int64_t K, int64_t V, float *dzx, float *dzsum, float *hard,
                           double *dzz_out) {
    /* per block: xv, gv [V]; z, s, gs [K]; accumulators dzx [K * V], dzsum [K], dzz */
    const int64_t vectors = 2 * V + 3 * K + K * V + K + 1;
    v16 *buf = (v16 *)aligned_alloc(64, sizeof(v16) * vectors);
    float *pt = (float *)malloc(sizeof(float) * (2 * K * V + K));
    if (!buf || !pt) {
        free(buf);
        free(pt);
        return -1;
    }
    v16 *xv = buf, *gv = xv + V, *z = gv + V, *s = z + K, *gs = s + K, *acc = gs + K, *acc_sum = acc + K * V,
        *acc_dzz = acc_sum + K;
    float *p2 = pt + K * V, *bias = p2 + K * V;
    const uint8_t *c8 = (const uint8_t *)codes;
    const int64_t *c64 = (const int64_t *)codes;
    double dzz = 0.0;
    for (int64_t c = 0; c < C; ++c) {
        const float *pc = prototypes + c * K * V;
        for (int64_t k = 0; k < K; ++k) {
            float sq = 0.0f;
            for (int64_t v = 0; v < V; ++v) {
                pt[v * K + k] = pc[k * V + v];
                p2[v * K + k] = 2.0f * inv_tau * pc[k * V + v];
                sq += pc[k * V + v] * pc[k * V + v];
            }
            bias[k] = -sq * inv_tau;
        }
        memset(acc, 0, sizeof(v16) * (K * V + K + 1));
        for (int64_t n0 = 0; n0 < n_rows; n0 += LANES) {
            const int64_t count = n_rows - n0 < LANES ? n_rows - n0 : LANES;
            for (int64_t v = 0; v < V; ++v) {
                xv[v] = load_rows(x + n0 * xr + (c * V + v) * xf, xr, count);
                gv[v] = load_rows(g + n0 * gr + (c * V + v) * gf, gr, count);
                if (xr == 1 && gr == 1) { /* 2 * V streams: more than the hardware prefetcher follows */
                    __builtin_prefetch(x + (n0 + 4 * LANES) + (c * V + v) * xf);
                    __builtin_prefetch(g + (n0 + 4 * LANES) + (c * V + v) * gf);
                }
            }
            /* z = bias + x P2 and G = g P, four prototypes at a time: eight independent FMA
             * chains hide the FMA latency that one chain per prototype would serialise on */
            v16 mx = splat(-INFINITY);
            int64_t k = 0;
            for (; k + 4 <= K; k += 4) {
                v16 z0 = splat(bias[k]), z1 = splat(bias[k + 1]), z2 = splat(bias[k + 2]), z3 = splat(bias[k + 3]);
                v16 g0 = {0}, g1 = {0}, g2 = {0}, g3 = {0};
                for (int64_t v = 0; v < V; ++v) {
                    const float *r2 = p2 + v * K + k, *r1 = pt + v * K + k;
                    const v16 a = xv[v], b = gv[v];
                    z0 += a * r2[0], z1 += a * r2[1], z2 += a * r2[2], z3 += a * r2[3];
                    g0 += b * r1[0], g1 += b * r1[1], g2 += b * r1[2], g3 += b * r1[3];
                }
                z[k] = z0, z[k + 1] = z1, z[k + 2] = z2, z[k + 3] = z3;
                gs[k] = g0, gs[k + 1] = g1, gs[k + 2] = g2, gs[k + 3] = g3;
                mx = vmax(mx, vmax(vmax(z0, z1), vmax(z2, z3)));
            }
            for (; k < K; ++k) {
                v16 zk = splat(bias[k]), gk = {0};
                for (int64_t v = 0; v < V; ++v) {
                    zk += xv[v] * p2[v * K + k];
                    gk += gv[v] * pt[v * K + k];
                }
                z[k] = zk;
                gs[k] = gk;
                mx = vmax(mx, zk);
            }
            v16 total = {0};
            for (int64_t k = 0; k < K; ++k) {
                s[k] = vexp_nonpos(z[k] - mx);
                total += s[k];
            }
            const v16 inv_total = 1.0f / total;
            v16 sg_sum = {0};
            for (int64_t k = 0; k < K; ++k) {
                s[k] *= inv_total;
                gs[k] *= s[k]; /* s G */
                sg_sum += gs[k];
            }
            for (int64_t k = 0; k < K; ++k) {
                const v16 dz = gs[k] - s[k] * sg_sum; /* padded rows: g = 0, so dz = 0 */
                gs[k] = dz;
                acc_sum[k] += dz;
                *acc_dzz += dz * z[k];
                for (int64_t v = 0; v < V; ++v) acc[k * V + v] += dz * xv[v];
            }
            if (dx) { /* dx = dz P2^T, four features at a time (independent chains, as above) */
                int64_t v = 0;
                for (; v + 4 <= V; v += 4) {
                    v16 d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0};
                    const float *r = p2 + v * K;
                    for (int64_t j = 0; j < K; ++j) {
                        const v16 e = gs[j];
                        d0 += e * r[j], d1 += e * r[K + j], d2 += e * r[2 * K + j], d3 += e * r[3 * K + j];
                    }
                    float *out = dx + n0 * dr + (c * V + v) * df;
                    store_rows(out, dr, count, d0);
                    store_rows(out + df, dr, count, d1);
                    store_rows(out + 2 * df, dr, count, d2);
                    store_rows(out + 3 * df, dr, count, d3);
                }
                for (; v < V; ++v) {
                    v16 d = {0};
                    for (int64_t j = 0; j < K; ++j) d += gs[j] * p2[v * K + j];
                    store_rows(dx + n0 * dr + (c * V + v) * df, dr, count, d);
                }
            }
            for (int64_t i = 0; i < count; ++i) { /* hard path: x_hat = P[code] */
                const int64_t at = (n0 + i) * C + c;
                float *h = hard + (c * K + (code_bytes == 1 ? (int64_t)c8[at] : c64[at])) * V;
                for (int64_t v = 0; v < V; ++v) h[v] += gv[v][i];
            }
        }
        for (int64_t k = 0; k < K; ++k) {
            for (int64_t v = 0; v < V; ++v) dzx[(c * K + k) * V + v] += hsum(acc[k * V + v]);
            dzsum[c * K + k] += hsum(acc_sum[k]);
        }
        dzz += hsum(*acc_dzz);
    }
    free(buf);
    free(pt);
    *dzz_out += dzz;
    return 0;
}
