/* KIVI decode attention on the CPU, fp32, batch 1: one query token over a KIVI cache.
 *
 * The torch reference is policies/kernels/kivi_attn.py (`reference`, `decode_torch`); this
 * file is its fast path, loaded by kivi_cpu.py. Layout (see kivi_attn.QuantView):
 *   keys 0..nq-1: codes [nq, D/PKk] int32 per head, per-channel scale/zero [nq/G, D],
 *     in the store frame (stored key t = R(-(t + shift)) post-RoPE key);
 *   keys nq..L-1: post-RoPE fp32 rows; values 0..nv-1: codes [nv, D/PKv], per-token
 *     scale/zero [nv, D/G]; values nv..L-1: fp32 rows.
 * Rotation: q . R(shift + g0 + i) k = (R(-(shift + g0)) q) . R(i) k for token g0 + i of the
 * key group starting at g0, so the queries turn once per group and each key turns by an
 * in-group angle read from a [G, HALF] table (L1-resident): no per-token sin/cos, and no
 * table that grows with the context.
 * Work splits by (KV head, token range) over OpenMP threads; each split keeps its own
 * softmax max and sum (flash-decoding) and the splits are merged at the end.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAXD 256
#define MAXGQ 16

typedef struct {
    int H, GQ, D, HALF, KB, VB, G, nq, nv, L;
    const float* q;                 /* [H*GQ, D] */
    const int32_t* kc; long kc_h;   /* [H, nq, D/PKk] */
    const float *ks, *kz; long ks_h; /* [H, nq/G, D] */
    const float* kr; long kr_h;     /* [H, L-nq, D] */
    const int32_t* vc; long vc_h;   /* [H, nv, D/PKv] */
    const float *vs, *vz; long vs_h; /* [H, nv, D/G] */
    const float* vr; long vr_h;     /* [H, L-nv, D] */
    const float *cin, *sin_;        /* [G, HALF]: cos/sin of i * freq, i < G */
    const float *cbase, *sbase;     /* [nq/G, HALF]: cos/sin of (g * G + shift) * freq */
    float scale;
} Args;

#define INLINE static inline __attribute__((always_inline))

/* x [D] turned by R(-angle) given cos/sin [HALF] of the angle (HF rotate_half pairs) */
INLINE void unturn(const float* x, const float* c, const float* s, int half, int d, float* out) {
    for (int i = 0; i < half; i++) {
        out[i] = x[i] * c[i] + x[i + half] * s[i];
        out[i + half] = x[i + half] * c[i] - x[i] * s[i];
    }
    for (int i = 2 * half; i < d; i++) out[i] = x[i];
}

INLINE float code_at(const int32_t* row, int c, int bits) {
    const int pk = 32 / bits;
    return (float)(((uint32_t)row[c / pk] >> ((c % pk) * bits)) & ((1u << bits) - 1u));
}

/* ---- portable path ------------------------------------------------------------------ */
static void keys_scalar(const Args* a, int h, int t0, int t1, const float* qs, float* lg, int n) {
    const int D = a->D, GQ = a->GQ, HALF = a->HALF, G = a->G, W = D / (32 / a->KB);
    float qg[MAXGQ * MAXD], k[MAXD], r[MAXD];
    for (int t = t0; t < t1; t++) {
        const float* qq = a->q + (long)h * GQ * D;
        const float* kk;
        if (t < a->nq) {
            const int g = t / G, i = t % G;
            if (i == 0 || t == t0)
                for (int j = 0; j < GQ; j++)
                    unturn(qs + j * D, a->cbase + (long)g * HALF, a->sbase + (long)g * HALF, HALF, D, qg + j * D);
            const int32_t* row = a->kc + h * a->kc_h + (long)t * W;
            const float* s = a->ks + h * a->ks_h + (long)g * D;
            const float* z = a->kz + h * a->ks_h + (long)g * D;
            for (int c = 0; c < D; c++) k[c] = code_at(row, c, a->KB) * s[c] + z[c];
            const float *ci = a->cin + (long)i * HALF, *si = a->sin_ + (long)i * HALF;
            for (int c = 0; c < HALF; c++) {
                r[c] = k[c] * ci[c] - k[c + HALF] * si[c];
                r[c + HALF] = k[c + HALF] * ci[c] + k[c] * si[c];
            }
            for (int c = 2 * HALF; c < D; c++) r[c] = k[c];
            qq = qg;
            kk = r;
        } else {
            kk = a->kr + h * a->kr_h + (long)(t - a->nq) * D;
        }
        for (int j = 0; j < GQ; j++) {
            float acc = 0.f;
            for (int c = 0; c < D; c++) acc += qq[j * D + c] * kk[c];
            lg[j * n + (t - t0)] = acc * a->scale;
        }
    }
}

static void values_scalar(const Args* a, int h, int t0, int t1, const float* p, int n, float* acc) {
    const int D = a->D, GQ = a->GQ, G = a->G, W = D / (32 / a->VB);
    float v[MAXD];
    for (int t = t0; t < t1; t++) {
        const float* vv = v;
        if (t < a->nv) {
            const int32_t* row = a->vc + h * a->vc_h + (long)t * W;
            const float* s = a->vs + h * a->vs_h + (long)t * (D / G);
            const float* z = a->vz + h * a->vs_h + (long)t * (D / G);
            for (int c = 0; c < D; c++) v[c] = code_at(row, c, a->VB) * s[c / G] + z[c / G];
        } else {
            vv = a->vr + h * a->vr_h + (long)(t - a->nv) * D;
        }
        for (int j = 0; j < GQ; j++)
            for (int c = 0; c < D; c++) acc[j * D + c] += p[j * n + (t - t0)] * vv[c];
    }
}

/* ---- AVX2 path (HALF, D - 2 HALF and G multiples of 8) -------------------------------- */
#ifdef __AVX2__
/* codes of channels c0..c0+7 as floats; bits is a constant where this is inlined */
INLINE __m256 codes8(const int32_t* row, int c0, const int bits) {
    const int pk = 32 / bits;
    __m256i w, sh;
    if (pk >= 8) {
        const int b = (c0 % pk) * bits;
        w = _mm256_set1_epi32(row[c0 / pk]);
        sh = _mm256_setr_epi32(b, b + bits, b + 2 * bits, b + 3 * bits, b + 4 * bits, b + 5 * bits,
                               b + 6 * bits, b + 7 * bits);
    } else { /* 8 bits: two words */
        w = _mm256_setr_epi32(row[c0 / 4], row[c0 / 4], row[c0 / 4], row[c0 / 4], row[c0 / 4 + 1],
                              row[c0 / 4 + 1], row[c0 / 4 + 1], row[c0 / 4 + 1]);
        sh = _mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24);
    }
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, sh), _mm256_set1_epi32((1 << bits) - 1)));
}

/* the 8 sums of a[0..7] (each a vector of partial sums) as one vector */
INLINE __m256 sum8(const __m256* a) {
    __m256 t01 = _mm256_hadd_ps(a[0], a[1]), t23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t45 = _mm256_hadd_ps(a[4], a[5]), t67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t01, t23), u1 = _mm256_hadd_ps(t45, t67);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

INLINE float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}

/* logits of GQ queries qq [GQ, D] against 8 key rows r [8][MAXD] -> lg[j * n + 0..7] */
INLINE void dots8(const float* qq, const float (*r)[MAXD], int GQ, int D, float scale, float* lg, int n) {
    for (int j = 0; j < GQ; j++) {
        __m256 acc[8];
        for (int u = 0; u < 8; u++) acc[u] = _mm256_setzero_ps();
        for (int c = 0; c < D; c += 8) {
            const __m256 qv = _mm256_loadu_ps(qq + j * D + c);
            for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(qv, _mm256_load_ps(r[u] + c), acc[u]);
        }
        _mm256_storeu_ps(lg + j * n, _mm256_mul_ps(sum8(acc), _mm256_set1_ps(scale)));
    }
}

INLINE void keys_avx(const Args* a, int h, int t0, int t1, const float* qs, float* lg, int n, const int KB) {
    const int D = a->D, GQ = a->GQ, HALF = a->HALF, G = a->G, W = D / (32 / KB);
    float qg[MAXGQ * MAXD] __attribute__((aligned(32)));
    float r[8][MAXD] __attribute__((aligned(32)));
    const int tq = t1 < a->nq ? t1 : a->nq;
    for (int g0 = t0; g0 < tq; g0 += G) {  /* t0 and nq are multiples of G */
        const int g = g0 / G;
        for (int j = 0; j < GQ; j++)
            unturn(qs + j * D, a->cbase + (long)g * HALF, a->sbase + (long)g * HALF, HALF, D, qg + j * D);
        const float* s = a->ks + h * a->ks_h + (long)g * D;
        const float* z = a->kz + h * a->ks_h + (long)g * D;
        for (int i0 = 0; i0 < G; i0 += 8) {
            for (int u = 0; u < 8; u++) {
                const int i = i0 + u;
                const int32_t* row = a->kc + h * a->kc_h + (long)(g0 + i) * W;
                const float *ci = a->cin + (long)i * HALF, *si = a->sin_ + (long)i * HALF;
                for (int c = 0; c < HALF; c += 8) {
                    __m256 k1 = _mm256_fmadd_ps(codes8(row, c, KB), _mm256_loadu_ps(s + c), _mm256_loadu_ps(z + c));
                    __m256 k2 = _mm256_fmadd_ps(codes8(row, c + HALF, KB), _mm256_loadu_ps(s + c + HALF),
                                                _mm256_loadu_ps(z + c + HALF));
                    __m256 co = _mm256_loadu_ps(ci + c), sn = _mm256_loadu_ps(si + c);
                    _mm256_store_ps(r[u] + c, _mm256_fnmadd_ps(k2, sn, _mm256_mul_ps(k1, co)));
                    _mm256_store_ps(r[u] + c + HALF, _mm256_fmadd_ps(k1, sn, _mm256_mul_ps(k2, co)));
                }
                for (int c = 2 * HALF; c < D; c += 8)
                    _mm256_store_ps(r[u] + c, _mm256_fmadd_ps(codes8(row, c, KB), _mm256_loadu_ps(s + c),
                                                              _mm256_loadu_ps(z + c)));
            }
            dots8(qg, (const float(*)[MAXD])r, GQ, D, a->scale, lg + (g0 + i0 - t0), n);
        }
    }
    const float* q = a->q + (long)h * GQ * D;
    int t = tq > t0 ? tq : t0;
    for (; t + 8 <= t1; t += 8) {  /* full-precision residual keys, 8 at a time */
        for (int u = 0; u < 8; u++)
            memcpy(r[u], a->kr + h * a->kr_h + (long)(t + u - a->nq) * D, sizeof(float) * D);
        dots8(q, (const float(*)[MAXD])r, GQ, D, a->scale, lg + (t - t0), n);
    }
    for (; t < t1; t++) {
        const float* kk = a->kr + h * a->kr_h + (long)(t - a->nq) * D;
        for (int j = 0; j < GQ; j++) {
            __m256 acc = _mm256_setzero_ps();
            for (int c = 0; c < D; c += 8)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * D + c), _mm256_loadu_ps(kk + c), acc);
            lg[j * n + (t - t0)] = hsum(acc) * a->scale;
        }
    }
}

/* acc[j0 + j][c..c+8 NV) for j < NJ over tokens [t0, t1): the accumulators stay in registers
 * (NJ x NV <= 8 vectors) while the tokens stream past; NJ, NV and VB are constants here */
INLINE void values_block(const Args* a, int h, int t0, int t1, const float* p, int n, float* acc, int j0, int c,
                         const int VB, const int NJ, const int NV) {
    const int D = a->D, G = a->G, W = D / (32 / VB);
    __m256 A[4][2];
    for (int j = 0; j < NJ; j++)
        for (int u = 0; u < NV; u++) A[j][u] = _mm256_setzero_ps();
    const int tq = t1 < a->nv ? t1 : a->nv;
    for (int t = t0; t < tq; t++) {
        const int32_t* row = a->vc + h * a->vc_h + (long)t * W;
        const float* s = a->vs + h * a->vs_h + (long)t * (D / G);
        const float* z = a->vz + h * a->vs_h + (long)t * (D / G);
        __m256 v[2];
        for (int u = 0; u < NV; u++) {
            const int cc = c + 8 * u;
            v[u] = _mm256_fmadd_ps(codes8(row, cc, VB), _mm256_set1_ps(s[cc / G]), _mm256_set1_ps(z[cc / G]));
        }
        for (int j = 0; j < NJ; j++) {
            const __m256 pj = _mm256_set1_ps(p[(j0 + j) * n + (t - t0)]);
            for (int u = 0; u < NV; u++) A[j][u] = _mm256_fmadd_ps(pj, v[u], A[j][u]);
        }
    }
    for (int t = tq > t0 ? tq : t0; t < t1; t++) {
        const float* vv = a->vr + h * a->vr_h + (long)(t - a->nv) * D + c;
        for (int j = 0; j < NJ; j++) {
            const __m256 pj = _mm256_set1_ps(p[(j0 + j) * n + (t - t0)]);
            for (int u = 0; u < NV; u++) A[j][u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vv + 8 * u), A[j][u]);
        }
    }
    for (int j = 0; j < NJ; j++)
        for (int u = 0; u < NV; u++) _mm256_storeu_ps(acc + (j0 + j) * D + c + 8 * u, A[j][u]);
}

INLINE void values_avx(const Args* a, int h, int t0, int t1, const float* p, int n, float* acc, const int VB) {
    const int D = a->D, GQ = a->GQ;
    for (int j0 = 0; j0 < GQ; j0 += 4) {
        const int nj = GQ - j0 < 4 ? GQ - j0 : 4;
        for (int c = 0; c < D; c += 16) {
            const int two = c + 16 <= D;
#define BLOCK(NJ_)                                                                              \
    if (nj == NJ_) {                                                                            \
        if (two) values_block(a, h, t0, t1, p, n, acc, j0, c, VB, NJ_, 2);                      \
        else values_block(a, h, t0, t1, p, n, acc, j0, c, VB, NJ_, 1);                          \
    }
            BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4)
#undef BLOCK
        }
    }
}

/* exp(x) for x <= 0 (softmax after the max is taken), 8 at a time: Cephes' expf polynomial,
 * within 2 ulp; below -87 it returns exp(-87) (~1e-38: nothing next to the max's 1) */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static void keys_vec(const Args* a, int h, int t0, int t1, const float* qs, float* lg, int n) {
    switch (a->KB) {
        case 2: keys_avx(a, h, t0, t1, qs, lg, n, 2); break;
        case 4: keys_avx(a, h, t0, t1, qs, lg, n, 4); break;
        default: keys_avx(a, h, t0, t1, qs, lg, n, 8);
    }
}

static void values_vec(const Args* a, int h, int t0, int t1, const float* p, int n, float* acc) {
    switch (a->VB) {
        case 2: values_avx(a, h, t0, t1, p, n, acc, 2); break;
        case 4: values_avx(a, h, t0, t1, p, n, acc, 4); break;
        default: values_avx(a, h, t0, t1, p, n, acc, 8);
    }
}
#endif

/* one split: tokens [t0, t1) of head h -> per query max m, sum l, unnormalized acc [GQ, D] */
static void split(const Args* a, int vec, int h, int t0, int t1, const float* qs, float* lg, float* m, float* l,
                  float* acc) {
    const int GQ = a->GQ, n = t1 - t0;
#ifdef __AVX2__
    if (vec) keys_vec(a, h, t0, t1, qs, lg, n);
    else
#endif
        keys_scalar(a, h, t0, t1, qs, lg, n);
    for (int j = 0; j < GQ; j++) {
        float* row = lg + j * n;
        float mx = -INFINITY, sum = 0.f;
        for (int i = 0; i < n; i++) mx = row[i] > mx ? row[i] : mx;
        int i = 0;
#ifdef __AVX2__
        if (vec) {
            __m256 acc8 = _mm256_setzero_ps();
            for (; i + 8 <= n; i += 8) {
                const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(mx)));
                _mm256_storeu_ps(row + i, e);
                acc8 = _mm256_add_ps(acc8, e);
            }
            sum = hsum(acc8);
        }
#endif
        for (; i < n; i++) {
            row[i] = expf(row[i] - mx);
            sum += row[i];
        }
        m[j] = mx;
        l[j] = sum;
    }
    memset(acc, 0, sizeof(float) * GQ * a->D);
#ifdef __AVX2__
    if (vec) values_vec(a, h, t0, t1, lg, n, acc);
    else
#endif
        values_scalar(a, h, t0, t1, lg, n, acc);
}

/* out [H*GQ, D] = softmax(scale q k^T) v over the whole cache, splits of `per` tokens (a
 * multiple of G). Returns 0, or 1 for a shape this kernel does not take, 2 out of memory. */
int kivi_decode(int H, int GQ, int D, int HALF, int KB, int VB, int G, int nq, int nv, int L,
                const float* q, const int32_t* kc, long kc_h, const float* ks, const float* kz, long ks_h,
                const float* kr, long kr_h, const int32_t* vc, long vc_h, const float* vs, const float* vz,
                long vs_h, const float* vr, long vr_h, const float* cin, const float* sin_, const float* cbase,
                const float* sbase, float scale, int per, int threads, float* out) {
    if (D > MAXD || GQ > MAXGQ || per % G || nq % G || L < 1) return 1;
    Args a = {H, GQ, D, HALF, KB, VB, G, nq, nv, L, q, kc, kc_h, ks, kz, ks_h, kr, kr_h, vc, vc_h, vs, vz, vs_h,
              vr, vr_h, cin, sin_, cbase, sbase, scale};
    int vec = 0;
#ifdef __AVX2__
    vec = HALF % 8 == 0 && D % 8 == 0 && G % 8 == 0;
#endif
    const int ns = (L + per - 1) / per;
    const long stride = (long)GQ * (D + 2);
    float* work = malloc(sizeof(float) * ((long)H * ns * stride + (long)H * ns * GQ * per));
    if (!work) return 2;
    float* lgall = work + (long)H * ns * stride;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < H * ns; i++) {
        const int h = i / ns, s = i % ns;
        const int t0 = s * per, t1 = t0 + per < L ? t0 + per : L;
        float* w = work + i * stride;
        split(&a, vec, h, t0, t1, q + (long)h * GQ * D, lgall + (long)i * GQ * per, w, w + GQ, w + 2 * GQ);
    }
    for (int h = 0; h < H; h++) {
        for (int j = 0; j < GQ; j++) {
            float M = -INFINITY, den = 0.f;
            for (int s = 0; s < ns; s++) {
                const float m = work[(h * ns + s) * stride + j];
                M = m > M ? m : M;
            }
            float* o = out + ((long)h * GQ + j) * D;
            memset(o, 0, sizeof(float) * D);
            for (int s = 0; s < ns; s++) {
                const float* w = work + (h * ns + s) * stride;
                const float f = expf(w[j] - M);
                den += f * w[GQ + j];
                for (int c = 0; c < D; c++) o[c] += f * w[2 * GQ + j * D + c];
            }
            for (int c = 0; c < D; c++) o[c] /= den;
        }
    }
    free(work);
    return 0;
}
