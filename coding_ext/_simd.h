/* Inner loops of the coding kernels, in C.
 *
 * Vector width: every loop below is plain C that GCC auto-vectorises, and on
 * x86-64 with GCC it is compiled three times (function multi-versioning:
 * x86-64-v4 = AVX-512, x86-64-v3 = AVX2, and the baseline); the dynamic
 * loader picks the widest clone the CPU supports (an ifunc), so a build made
 * here runs anywhere and still uses AVX-512 where present. Two things are
 * written with intrinsics instead and dispatched once at import
 * (__builtin_cpu_supports): the float16 loads (F16C, which the
 * auto-vectoriser does not use) and the streaming-store loop for large
 * outputs. Elsewhere (other compilers or architectures, or with
 * -DPARM_NO_DISPATCH) there is one plain version of everything.
 *
 * Arithmetic: float32, in exactly the order of the definitions in
 * coding_ext/reference.py; setup.py passes -ffp-contract=off so that no
 * multiply-add is fused, which makes the kernels bit-identical to the
 * reference.
 *
 * Aliasing: no pointer here is restrict-qualified; `out` may be exactly one of
 * the inputs (element i of the output depends only on element i, or on a
 * disjoint input window for the concatenation, of each input; the Python
 * layer rejects partial overlaps). `#pragma GCC ivdep` tells the vectoriser
 * that there is no loop-carried dependence, which is true in both cases.
 *
 * Nothing here allocates or fails: the only scratch memory is a fixed array
 * on the stack (PARM_CHUNK floats).
 */
#ifndef PARM_SIMD_H
#define PARM_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__) \
    && !defined(PARM_NO_DISPATCH)
#define PARM_X86_DISPATCH 1
#define PARM_MV __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#include <immintrin.h>
#else
#define PARM_X86_DISPATCH 0
#define PARM_MV
#endif

#if defined(__GNUC__)
#define PARM_IVDEP _Pragma("GCC ivdep")
#define PARM_UNROLL _Pragma("GCC unroll 4")
#else
#define PARM_UNROLL
#define PARM_IVDEP
#endif

/* dtype codes shared with the Cython layer */
#define PARM_F32 0
#define PARM_F16 1
#define PARM_U8 2

/* Elements per stack scratch chunk (16 KiB, L1-resident). Even, so that a
 * chunk of a concatenation row holds whole 2-element pooling windows. */
#define PARM_CHUNK 4096

typedef ptrdiff_t parm_idx;

/* ---------------------------------------------------------------- float16 */

/* IEEE binary16 -> binary32, exact (NaN payloads are kept, quietened). */
static inline float parm_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x00400000u : 0u);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {
        f = (float)mant * 5.9604644775390625e-8f; /* mant * 2^-24, exact */
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void parm_f16_to_f32_plain(const uint16_t *x, float *out, parm_idx n)
{
    for (parm_idx i = 0; i < n; i++) out[i] = parm_half_to_float(x[i]);
}

#if PARM_X86_DISPATCH
__attribute__((target("avx512f")))
static void parm_f16_to_f32_avx512(const uint16_t *x, float *out, parm_idx n)
{
    parm_idx i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + i))));
    for (; i < n; i++) out[i] = parm_half_to_float(x[i]);
}

__attribute__((target("avx,f16c")))
static void parm_f16_to_f32_f16c(const uint16_t *x, float *out, parm_idx n)
{
    parm_idx i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) out[i] = parm_half_to_float(x[i]);
}

typedef void (*parm_f16_fn)(const uint16_t *, float *, parm_idx);
/* Set once by parm_simd_init (at import, GIL held), read-only after. */
static parm_f16_fn parm_f16_impl = parm_f16_to_f32_plain;

static inline void parm_f16_to_f32(const uint16_t *x, float *out, parm_idx n)
{
    parm_f16_impl(x, out, n);
}

static const char *parm_simd_f16_name(void)
{
    return parm_f16_impl == parm_f16_to_f32_avx512 ? "avx512f"
         : parm_f16_impl == parm_f16_to_f32_f16c ? "f16c" : "plain";
}
#else
static inline void parm_f16_to_f32(const uint16_t *x, float *out, parm_idx n)
{
    parm_f16_to_f32_plain(x, out, n);
}
static const char *parm_simd_f16_name(void) { return "plain"; }
#endif

/* ------------------------------------------------- float32 sums, one pass */

/* Elements to handle one by one before `out` reaches a 64-byte boundary, so
 * that the vector stores never split a cache line (split stores cost more
 * than split loads; numpy's inputs are often 16 bytes off a line). */
static inline parm_idx parm_head(const float *out, parm_idx n)
{
    uintptr_t mis = (uintptr_t)out & 63u;
    parm_idx h = (mis & 3u) ? 0 : (parm_idx)(((64u - mis) & 63u) >> 2);
    return h < n ? h : n;
}

#define PARM_ALIGNED_LOOP(EXPR)                                  \
    do {                                                         \
        parm_idx i = 0, h_ = parm_head(out, n);                  \
        for (; i < h_; i++) out[i] = (EXPR);                     \
        PARM_IVDEP PARM_UNROLL                                   \
        for (i = h_; i < n; i++) out[i] = (EXPR);                \
    } while (0)

PARM_MV static void parm_sum2_f32(const float *x0, const float *x1, float *out, parm_idx n)
{
    PARM_ALIGNED_LOOP(x0[i] + x1[i]);
}

PARM_MV static void parm_sum3_f32(const float *x0, const float *x1, const float *x2,
                                  float *out, parm_idx n)
{
    PARM_ALIGNED_LOOP((x0[i] + x1[i]) + x2[i]);
}

PARM_MV static void parm_sum4_f32(const float *x0, const float *x1, const float *x2,
                                  const float *x3, float *out, parm_idx n)
{
    PARM_ALIGNED_LOOP(((x0[i] + x1[i]) + x2[i]) + x3[i]);
}

PARM_MV static void parm_sub1_f32(const float *p, const float *a0, float *out, parm_idx n)
{
    PARM_ALIGNED_LOOP(p[i] - a0[i]);
}

PARM_MV static void parm_sub2_f32(const float *p, const float *a0, const float *a1,
                                  float *out, parm_idx n)
{
    PARM_ALIGNED_LOOP(p[i] - (a0[i] + a1[i]));
}

PARM_MV static void parm_sub3_f32(const float *p, const float *a0, const float *a1,
                                  const float *a2, float *out, parm_idx n)
{
    PARM_ALIGNED_LOOP(p[i] - ((a0[i] + a1[i]) + a2[i]));
}

/* ------------------------------------- accumulator steps (chunked paths) */

PARM_MV static void parm_acc_add_f32(float *acc, const float *x, parm_idx n)
{
    PARM_IVDEP
    for (parm_idx i = 0; i < n; i++) acc[i] = acc[i] + x[i];
}

PARM_MV static void parm_acc_set_u8(float *acc, const uint8_t *x, parm_idx n)
{
    PARM_IVDEP
    for (parm_idx i = 0; i < n; i++) acc[i] = (float)x[i];
}

PARM_MV static void parm_acc_add_u8(float *acc, const uint8_t *x, parm_idx n)
{
    PARM_IVDEP
    for (parm_idx i = 0; i < n; i++) acc[i] = acc[i] + (float)x[i];
}

PARM_MV static void parm_store_affine(float *out, const float *acc, parm_idx n,
                                      float scale, float shift)
{
    PARM_IVDEP
    for (parm_idx i = 0; i < n; i++) out[i] = acc[i] * scale + shift;
}

PARM_MV static void parm_store_sub(float *out, const float *p, const float *acc, parm_idx n)
{
    PARM_IVDEP
    for (parm_idx i = 0; i < n; i++) out[i] = p[i] - acc[i];
}

/* acc[0:n] = ((x0 + x1) + ...)[off:off+n] for k inputs of type `dtype`;
 * tmp is a second PARM_CHUNK scratch for float16 conversion. n <= PARM_CHUNK. */
static void parm_sum_chunk(int dtype, const void *const *xs, int k, parm_idx off,
                           parm_idx n, float *acc, float *tmp)
{
    int j;
    if (dtype == PARM_F32) {
        const float *const *x = (const float *const *)xs;
        if (k >= 4) {
            parm_sum4_f32(x[0] + off, x[1] + off, x[2] + off, x[3] + off, acc, n);
            j = 4;
        } else if (k == 3) {
            parm_sum3_f32(x[0] + off, x[1] + off, x[2] + off, acc, n);
            j = 3;
        } else {
            parm_sum2_f32(x[0] + off, x[1] + off, acc, n);
            j = 2;
        }
        for (; j < k; j++) parm_acc_add_f32(acc, x[j] + off, n);
    } else if (dtype == PARM_U8) {
        const uint8_t *const *x = (const uint8_t *const *)xs;
        parm_acc_set_u8(acc, x[0] + off, n);
        for (j = 1; j < k; j++) parm_acc_add_u8(acc, x[j] + off, n);
    } else {
        const uint16_t *const *x = (const uint16_t *const *)xs;
        parm_f16_to_f32(x[0] + off, acc, n);
        for (j = 1; j < k; j++) {
            parm_f16_to_f32(x[j] + off, tmp, n);
            parm_acc_add_f32(acc, tmp, n);
        }
    }
}

/* ------------------------------------------- non-temporal stores (large) */

/* Outputs at least this large are written with streaming stores: they cannot
 * stay in L2 next to their inputs anyway, and skipping the read-for-ownership
 * of `out` saves one of k+2 memory streams. Measured on the development
 * machine (AVX-512, k = 2): 64 MiB arrays 29.5 -> 16.6 ms, 16 MiB 4.8 ->
 * 3.1 ms, 4 MiB 1.5 -> 0.5 ms. Smaller outputs keep ordinary stores so that
 * whoever reads the parity next (serialisation) finds it in cache. */
#define PARM_NT_MIN_BYTES ((parm_idx)4 << 20)

/* out = x0 + x1 + ... (k >= 2 float32 inputs), or with p != NULL
 * out = p - (x0 + x1 + ...) (k >= 1), left to right, streaming stores. */
typedef void (*parm_nt_fn)(const float *p, const float *const *x, int k, float *out,
                           parm_idx n);

static inline float parm_nt_scalar(const float *p, const float *const *x, int k, parm_idx i)
{
    float s = x[0][i];
    for (int j = 1; j < k; j++) s = s + x[j][i];
    return p ? p[i] - s : s;
}

#if PARM_X86_DISPATCH
#define PARM_NT_BODY(VEC, W, LOAD, ADD, SUB, STREAM)                           \
    parm_idx i = 0, h = parm_head(out, n);                                     \
    for (; i < h; i++) out[i] = parm_nt_scalar(p, x, k, i);                    \
    if (((uintptr_t)(out + i) & 63u) == 0) {                                   \
        for (; i + (W) <= n; i += (W)) {                                       \
            VEC s = LOAD(x[0] + i);                                            \
            for (int j = 1; j < k; j++) s = ADD(s, LOAD(x[j] + i));            \
            if (p) s = SUB(LOAD(p + i), s);                                    \
            STREAM(out + i, s);                                                \
        }                                                                      \
        _mm_sfence();                                                          \
    }                                                                          \
    for (; i < n; i++) out[i] = parm_nt_scalar(p, x, k, i);

__attribute__((target("avx512f")))
static void parm_nt_avx512(const float *p, const float *const *x, int k, float *out, parm_idx n)
{
    PARM_NT_BODY(__m512, 16, _mm512_loadu_ps, _mm512_add_ps, _mm512_sub_ps, _mm512_stream_ps)
}

__attribute__((target("avx")))
static void parm_nt_avx(const float *p, const float *const *x, int k, float *out, parm_idx n)
{
    PARM_NT_BODY(__m256, 8, _mm256_loadu_ps, _mm256_add_ps, _mm256_sub_ps, _mm256_stream_ps)
}

static void parm_nt_sse2(const float *p, const float *const *x, int k, float *out, parm_idx n)
{
    PARM_NT_BODY(__m128, 4, _mm_loadu_ps, _mm_add_ps, _mm_sub_ps, _mm_stream_ps)
}

static parm_nt_fn parm_nt_impl = parm_nt_sse2;
#define PARM_HAVE_NT 1
#else
#define PARM_HAVE_NT 0
#endif

/* Called once when the module is imported (with the GIL held). The
 * environment variable PARM_SIMD_MAX=avx|sse2 caps the intrinsic paths below
 * what the CPU offers, so that tests can run them on a newer machine (it does
 * not affect the target_clones loops, which the loader picks). */
static void parm_simd_init(void)
{
#if PARM_X86_DISPATCH
    const char *cap = getenv("PARM_SIMD_MAX");
    int allow_avx512 = cap == NULL || strcmp(cap, "avx512f") == 0;
    int allow_avx = allow_avx512 || strcmp(cap, "avx") == 0;
    __builtin_cpu_init();
    if (allow_avx512 && __builtin_cpu_supports("avx512f")) {
        parm_f16_impl = parm_f16_to_f32_avx512;
        parm_nt_impl = parm_nt_avx512;
    } else if (allow_avx && __builtin_cpu_supports("avx")) {
        parm_nt_impl = parm_nt_avx;
        if (__builtin_cpu_supports("f16c")) parm_f16_impl = parm_f16_to_f32_f16c;
    }
#endif
}

static const char *parm_simd_nt_name(void)
{
#if PARM_HAVE_NT
    return parm_nt_impl == parm_nt_avx512 ? "avx512f"
         : parm_nt_impl == parm_nt_avx ? "avx" : "sse2";
#else
    return "none";
#endif
}

/* ------------------------------------------------------------- drivers */

/* Summation encode. Inputs: k arrays of nblocks * inner elements of `dtype`,
 * block b belonging to channel b % channels. out (float32) gets
 *   sum                                    if scale == shift == NULL,
 *   sum * scale[c] + ((float)k * shift[c])  otherwise (missing = 1 / 0). */
static void parm_sum_encode(int dtype, const void *const *xs, int k, float *out,
                            parm_idx nblocks, parm_idx inner, parm_idx channels,
                            const float *scale, const float *shift)
{
    float acc[PARM_CHUNK];
    float tmp[PARM_CHUNK];
    parm_idx total = nblocks * inner;
#if PARM_HAVE_NT
    if (scale == NULL && shift == NULL && dtype == PARM_F32
        && total * (parm_idx)sizeof(float) >= PARM_NT_MIN_BYTES) {
        parm_nt_impl(NULL, (const float *const *)xs, k, out, total);
        return;
    }
#endif
    if (scale == NULL && shift == NULL && dtype == PARM_F32 && k <= 4) {
        const float *const *x = (const float *const *)xs;
        if (k == 2) parm_sum2_f32(x[0], x[1], out, total);
        else if (k == 3) parm_sum3_f32(x[0], x[1], x[2], out, total);
        else parm_sum4_f32(x[0], x[1], x[2], x[3], out, total);
        return;
    }
    if (scale == NULL && shift == NULL) {
        for (parm_idx off = 0; off < total; off += PARM_CHUNK) {
            parm_idx n = total - off < PARM_CHUNK ? total - off : PARM_CHUNK;
            parm_sum_chunk(dtype, xs, k, off, n, acc, tmp);
            memcpy(out + off, acc, (size_t)n * sizeof(float));
        }
        return;
    }
    for (parm_idx b = 0; b < nblocks; b++) {
        parm_idx c = b % channels;
        float a = scale ? scale[c] : 1.0f;
        float s = shift ? (float)k * shift[c] : 0.0f;
        for (parm_idx i = 0; i < inner; i += PARM_CHUNK) {
            parm_idx n = inner - i < PARM_CHUNK ? inner - i : PARM_CHUNK;
            parm_idx off = b * inner + i;
            parm_sum_chunk(dtype, xs, k, off, n, acc, tmp);
            parm_store_affine(out + off, acc, n, a, s);
        }
    }
}

/* Subtraction decode: out = p - ((a0 + a1) + ...), m >= 1 float32 arrays. */
static void parm_subtract_decode(const float *p, const float *const *as, int m,
                                 float *out, parm_idx total)
{
    float acc[PARM_CHUNK];
#if PARM_HAVE_NT
    if (total * (parm_idx)sizeof(float) >= PARM_NT_MIN_BYTES) {
        parm_nt_impl(p, as, m, out, total);
        return;
    }
#endif
    if (m == 1) { parm_sub1_f32(p, as[0], out, total); return; }
    if (m == 2) { parm_sub2_f32(p, as[0], as[1], out, total); return; }
    if (m == 3) { parm_sub3_f32(p, as[0], as[1], as[2], out, total); return; }
    for (parm_idx off = 0; off < total; off += PARM_CHUNK) {
        parm_idx n = total - off < PARM_CHUNK ? total - off : PARM_CHUNK;
        parm_sum_chunk(PARM_F32, (const void *const *)as, m, off, n, acc, NULL);
        parm_store_sub(out + off, p + off, acc, n);
    }
}

/* ------------------------------------------------------ concatenation */

/* rows x (2*half) -> rows x half, 1x2 mean: out[j] = (x[2j] + x[2j+1]) * 0.5 */
PARM_MV static void parm_pool2_rows_f32(const float *x, parm_idx x_stride, float *out,
                                        parm_idx out_stride, parm_idx rows, parm_idx half)
{
    for (parm_idx r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        PARM_IVDEP
        for (parm_idx j = 0; j < half; j++) o[j] = (xr[2 * j] + xr[2 * j + 1]) * 0.5f;
    }
}

PARM_MV static void parm_pool2_rows_u8(const uint8_t *x, parm_idx x_stride, float *out,
                                       parm_idx out_stride, parm_idx rows, parm_idx half)
{
    for (parm_idx r = 0; r < rows; r++) {
        const uint8_t *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        PARM_IVDEP
        for (parm_idx j = 0; j < half; j++)
            o[j] = ((float)xr[2 * j] + (float)xr[2 * j + 1]) * 0.5f;
    }
}

/* 2x2 mean of row pairs: out[j] = ((t[2j] + t[2j+1]) + (b[2j] + b[2j+1])) * 0.25
 * with t = x + r*x_stride and b = t + below. */
PARM_MV static void parm_pool4_rows_f32(const float *x, parm_idx x_stride, parm_idx below,
                                        float *out, parm_idx out_stride, parm_idx rows,
                                        parm_idx half)
{
    for (parm_idx r = 0; r < rows; r++) {
        const float *t = x + r * x_stride;
        const float *b = t + below;
        float *o = out + r * out_stride;
        PARM_IVDEP
        for (parm_idx j = 0; j < half; j++)
            o[j] = ((t[2 * j] + t[2 * j + 1]) + (b[2 * j] + b[2 * j + 1])) * 0.25f;
    }
}

PARM_MV static void parm_pool4_rows_u8(const uint8_t *x, parm_idx x_stride, parm_idx below,
                                       float *out, parm_idx out_stride, parm_idx rows,
                                       parm_idx half)
{
    for (parm_idx r = 0; r < rows; r++) {
        const uint8_t *t = x + r * x_stride;
        const uint8_t *b = t + below;
        float *o = out + r * out_stride;
        PARM_IVDEP
        for (parm_idx j = 0; j < half; j++)
            o[j] = (((float)t[2 * j] + (float)t[2 * j + 1])
                    + ((float)b[2 * j] + (float)b[2 * j + 1])) * 0.25f;
    }
}

/* float16 rows go through float32 scratch, PARM_CHUNK elements at a time. */
static void parm_pool2_rows_f16(const uint16_t *x, parm_idx x_stride, float *out,
                                parm_idx out_stride, parm_idx rows, parm_idx half)
{
    float t[PARM_CHUNK];
    for (parm_idx r = 0; r < rows; r++) {
        for (parm_idx j = 0; j < 2 * half; j += PARM_CHUNK) {
            parm_idx n = 2 * half - j < PARM_CHUNK ? 2 * half - j : PARM_CHUNK;
            parm_f16_to_f32(x + r * x_stride + j, t, n);
            parm_pool2_rows_f32(t, 0, out + r * out_stride + j / 2, 0, 1, n / 2);
        }
    }
}

static void parm_pool4_rows_f16(const uint16_t *x, parm_idx x_stride, parm_idx below,
                                float *out, parm_idx out_stride, parm_idx rows,
                                parm_idx half)
{
    float t[2 * PARM_CHUNK];
    for (parm_idx r = 0; r < rows; r++) {
        for (parm_idx j = 0; j < 2 * half; j += PARM_CHUNK) {
            parm_idx n = 2 * half - j < PARM_CHUNK ? 2 * half - j : PARM_CHUNK;
            parm_f16_to_f32(x + r * x_stride + j, t, n);
            parm_f16_to_f32(x + r * x_stride + below + j, t + PARM_CHUNK, n);
            parm_pool4_rows_f32(t, 0, PARM_CHUNK, out + r * out_stride + j / 2, 0, 1, n / 2);
        }
    }
}

static void parm_pool2_rows(int dtype, const void *x, parm_idx x_stride, float *out,
                            parm_idx out_stride, parm_idx rows, parm_idx half)
{
    if (dtype == PARM_F32)
        parm_pool2_rows_f32((const float *)x, x_stride, out, out_stride, rows, half);
    else if (dtype == PARM_U8)
        parm_pool2_rows_u8((const uint8_t *)x, x_stride, out, out_stride, rows, half);
    else
        parm_pool2_rows_f16((const uint16_t *)x, x_stride, out, out_stride, rows, half);
}

static void parm_pool4_rows(int dtype, const void *x, parm_idx x_stride, parm_idx below,
                            float *out, parm_idx out_stride, parm_idx rows, parm_idx half)
{
    if (dtype == PARM_F32)
        parm_pool4_rows_f32((const float *)x, x_stride, below, out, out_stride, rows, half);
    else if (dtype == PARM_U8)
        parm_pool4_rows_u8((const uint8_t *)x, x_stride, below, out, out_stride, rows, half);
    else
        parm_pool4_rows_f16((const uint16_t *)x, x_stride, below, out, out_stride, rows, half);
}

/* Concatenation encode of k = 2 or 4 arrays (planes, H, W) -> out (planes, H, W).
 * k = 2: out[p, h, i*W/2 + j] = mean of x_i[p, h, 2j : 2j+2].
 * k = 4: out[p, (i/2)*H/2 + h, (i%2)*W/2 + j] = mean of x_i[p, 2h : 2h+2, 2j : 2j+2]. */
static void parm_concat_encode(int dtype, const void *const *xs, int k, float *out,
                               parm_idx planes, parm_idx H, parm_idx W)
{
    size_t isz = dtype == PARM_F32 ? 4 : dtype == PARM_F16 ? 2 : 1;
    if (k == 2) {
        for (int i = 0; i < 2; i++)
            parm_pool2_rows(dtype, xs[i], W, out + i * (W / 2), W, planes * H, W / 2);
        return;
    }
    for (parm_idx p = 0; p < planes; p++) {
        for (int i = 0; i < 4; i++) {
            const char *src = (const char *)xs[i] + (size_t)(p * H * W) * isz;
            float *dst = out + p * H * W + (i / 2) * (H / 2) * W + (i % 2) * (W / 2);
            parm_pool4_rows(dtype, src, 2 * W, W, dst, W, H / 2, W / 2);
        }
    }
}

#endif /* PARM_SIMD_H */
