/* Element-wise dropout kernels for cpu_kernels.py, built once per machine by the system's C
 * compiler and loaded with ctypes (cpu_kernels.py says when; without a compiler it does the same
 * work in numpy and torch, with the same results bit for bit).
 *
 * The random bits are int16 values of numpy's SFC64 stream (sfc64_fill below, or numpy itself),
 * 16 per element: an element is kept when its value is >= threshold. Every function handles
 * the elements (or matrices) [start, stop) of its arrays, so that cpu_kernels.py can split one
 * call over threads (ctypes lets go of the GIL).
 * bf16 values are handled as their uint16 bit patterns: widened to float by a shift, rounded
 * back to the nearest even as torch does (c10::BFloat16), so every result equals what torch's
 * ops compute from the same operands. */
#include <stdint.h>
#include <string.h>
#include <math.h>

/* cpu_kernels.py builds this file for the CPU in front of it: on x86-64 with the instruction
 * sets of torch's own kernels for that CPU (AVX512 or AVX2, as torch.backends.cpu reports), so
 * the cache holds one library per kind of CPU and a folder shared by different CPUs stays safe.
 * Elsewhere (arm) the compiler's default target is used. */

/* Built with OpenMP (-fopenmp, where the compiler has it: gcc), each function splits its range
 * over the threads itself. The library then asks for libgomp.so.1, which torch's own copy
 * already answers in the process, so these loops run on the very threads of torch's parallel
 * regions, which are still spinning for work when a kernel follows one of torch's ops. Without
 * OpenMP (Apple's clang) the pragmas are nothing and cpu_kernels.py splits a call over Python
 * threads. */
#ifdef _OPENMP
#define PRAGMA(text) _Pragma(#text)
#define PARALLEL_FOR(enough) PRAGMA(omp parallel for schedule(static) if (enough))
/* a short inner loop (a rotary half row: 24 values at head size 48) in vectors of 8 floats: the
 * AVX512 clone's 16 leave a third of such a row to scalar code, 3.5x slower in bf16 */
#define SIMD8 PRAGMA(omp simd simdlen(8))
#define SIMD_MAX(v) PRAGMA(omp simd reduction(max: v))
int kernels_openmp(void) { return 1; }
#else
#define PARALLEL_FOR(enough)
#define SIMD8
#define SIMD_MAX(v)
int kernels_openmp(void) { return 0; }
#endif
#define ELEMENTS (stop - start >= 65536)

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0; /* NaN, as c10::BFloat16 rounds it */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Vectors of 16 or 8 floats (GCC and clang's vector extensions: AVX512 or AVX2 registers on
 * x86, NEON on arm), for rows too short for the compiler's own loops to fill its vectors (a
 * rotary half row: 24 values at head size 48), loaded from and stored to float32 or bf16: the
 * bf16 load widens as bf16_to_float, its round and store round as float_to_bf16 (NaN to
 * 0x7FC0). Macros with statement expressions, not functions, so that they are always inlined
 * into the kernel that uses them. */
#define VECTOR_TYPES(N)                                                                            \
    typedef float f32x##N __attribute__((vector_size(4 * N)));                                     \
    typedef uint32_t u32x##N __attribute__((vector_size(4 * N)));                                  \
    typedef uint16_t u16x##N __attribute__((vector_size(2 * N)));
VECTOR_TYPES(16)
VECTOR_TYPES(8)
VECTOR_TYPES(4)
#define LOAD_F32(N, p) ({ f32x##N v_; memcpy(&v_, (p), sizeof v_); v_; })
#define KEEP_F32(N, v) (v)
#define STORE_F32(N, p, v) do { f32x##N v_ = (v); memcpy((p), &v_, sizeof v_); } while (0)
#define BF16_BITS(N, v) /* the bf16 bits of each float, in the low half of a u32 */              \
    ({ f32x##N f_ = (v); u32x##N u_, nan_ = (u32x##N)(f_ != f_); memcpy(&u_, &f_, sizeof u_);    \
       (((u_ + 0x7FFFu + ((u_ >> 16) & 1u)) >> 16) & ~nan_) | (0x7FC0u & nan_); })
#define LOAD_BF16(N, p)                                                                            \
    ({ u16x##N h_; memcpy(&h_, (p), sizeof h_); u32x##N w_ = __builtin_convertvector(h_, u32x##N) << 16; \
       f32x##N g_; memcpy(&g_, &w_, sizeof g_); g_; })
#define ROUND_BF16_V(N, v) ({ u32x##N w_ = BF16_BITS(N, v) << 16; f32x##N g_; memcpy(&g_, &w_, sizeof g_); g_; })
#define STORE_BF16(N, p, v) do { u16x##N h_ = __builtin_convertvector(BF16_BITS(N, v), u16x##N); memcpy((p), &h_, sizeof h_); } while (0)

/* numpy's SFC64 generator (numpy/random/src/sfc64/sfc64.h): n outputs from the state s (a, b,
 * c, counter), which is advanced in place, so this gives the words numpy's random_raw(n) gives
 * from the same state, several times faster (numpy calls its generator once per word). */
void sfc64_fill(uint64_t *s, uint64_t *out, int64_t n) {
    uint64_t a = s[0], b = s[1], c = s[2], counter = s[3];
    for (int64_t i = 0; i < n; i++) {
        uint64_t tmp = a + b + counter++;
        a = b ^ (b >> 11);
        b = c + (c << 3);
        c = ((c << 24) | (c >> 40)) + tmp;
        out[i] = tmp;
    }
    s[0] = a, s[1] = b, s[2] = c, s[3] = counter;
}

/* out[i] = x[i] * (bits[i] >= threshold ? scale : 0): dropout and its backward pass */
void mask_mul_bf16(const uint16_t *x, const int16_t *bits, uint16_t *out, int64_t start, int64_t stop,
                   int32_t threshold, float scale) {
    PARALLEL_FOR(ELEMENTS)
    for (int64_t i = start; i < stop; i++)
        out[i] = float_to_bf16(bf16_to_float(x[i]) * (bits[i] >= threshold ? scale : 0.0f));
}

void mask_mul_f32(const float *x, const int16_t *bits, float *out, int64_t start, int64_t stop,
                  int32_t threshold, float scale) {
    PARALLEL_FOR(ELEMENTS)
    for (int64_t i = start; i < stop; i++)
        out[i] = x[i] * (bits[i] >= threshold ? scale : 0.0f);
}

/* The attention probabilities p of matrices [start, stop), each (T, T), times their causal
 * dropout mask (cpu_kernels._CausalDropStream): with T even, matrix m's bits are (T/2, T+1)
 * values from bits + m * (T/2) * (T+1); query row i < T/2 reads its bit row i forwards, row
 * T-1-i reads the same bit row backwards from its end. With T odd the bits are (T, T). */
#define CAUSAL_MASK(NAME, TYPE, LOAD, STORE)                                                         \
    void NAME(const TYPE *p, const int16_t *bits, TYPE *out, int64_t start, int64_t stop, int64_t T, \
              int32_t threshold) {                                                                \
        int64_t half = T / 2;                                                                     \
        PARALLEL_FOR(stop - start >= 2)                                                           \
        for (int64_t m = start; m < stop; m++) {                                                  \
            const TYPE *pm = p + m * T * T;                                                       \
            TYPE *om = out + m * T * T;                                                           \
            if (T % 2) {                                                                          \
                const int16_t *b = bits + m * T * T;                                              \
                for (int64_t e = 0; e < T * T; e++)                                               \
                    om[e] = STORE(LOAD(pm[e]) * (b[e] >= threshold ? 1.0f : 0.0f));               \
                continue;                                                                         \
            }                                                                                     \
            const int16_t *bm = bits + m * half * (T + 1);                                        \
            for (int64_t i = 0; i < half; i++) {                                                  \
                const int16_t *b = bm + i * (T + 1);                                              \
                const TYPE *pr = pm + i * T;                                                      \
                TYPE *orow = om + i * T;                                                          \
                for (int64_t j = 0; j < T; j++)                                                   \
                    orow[j] = STORE(LOAD(pr[j]) * (b[j] >= threshold ? 1.0f : 0.0f));             \
                pr = pm + (T - 1 - i) * T;                                                        \
                orow = om + (T - 1 - i) * T;                                                      \
                const int16_t *back = b + T; /* column j reads b[T - j] */                        \
                for (int64_t j = 0; j < T; j++)                                                   \
                    orow[j] = STORE(LOAD(pr[j]) * (back[-j] >= threshold ? 1.0f : 0.0f));         \
            }                                                                                     \
        }                                                                                         \
    }

#define IDENTITY(v) (v)
CAUSAL_MASK(causal_mask_bf16, uint16_t, bf16_to_float, float_to_bf16)
CAUSAL_MASK(causal_mask_f32, float, IDENTITY, IDENTITY)

/* The residual add with dropout, x + dropout(y), for x in float32 and y in bf16 (autocast) or
 * float32: out[i] = x[i] + (y[i] * (kept ? scale : 0), rounded to y's dtype), as torch's add
 * of the two computes it. Built with -ffp-contract=off, so no multiply and add fuse into one
 * rounding where torch rounds twice. */
void add_mask_mul_bf16(const float *x, const uint16_t *y, const int16_t *bits, float *out, int64_t start,
                           int64_t stop, int32_t threshold, float scale) {
    PARALLEL_FOR(ELEMENTS)
    for (int64_t i = start; i < stop; i++)
        out[i] = x[i] + bf16_to_float(float_to_bf16(bf16_to_float(y[i]) * (bits[i] >= threshold ? scale : 0.0f)));
}

void add_mask_mul_f32(const float *x, const float *y, const int16_t *bits, float *out, int64_t start,
                          int64_t stop, int32_t threshold, float scale) {
    PARALLEL_FOR(ELEMENTS)
    for (int64_t i = start; i < stop; i++)
        out[i] = x[i] + y[i] * (bits[i] >= threshold ? scale : 0.0f);
}

/* Its backward pass for a bf16 y: the float32 gradient rounded to bf16 (the add's backward
 * casts it to y's dtype), times the mask, rounded again. */
void mask_mul_f32_to_bf16(const float *g, const int16_t *bits, uint16_t *out, int64_t start, int64_t stop,
                              int32_t threshold, float scale) {
    PARALLEL_FOR(ELEMENTS)
    for (int64_t i = start; i < stop; i++)
        out[i] = float_to_bf16(bf16_to_float(float_to_bf16(g[i])) * (bits[i] >= threshold ? scale : 0.0f));
}

/* The attention backward's ds for matrices [start, stop), each (T, T), in place over gv (the
 * product g v^T): ds = gv * pm + p * minus_d, minus_d one value per query row, all bf16.
 * Rounded as torch's gv.mul_(pm).addcmul_(p, minus_d) rounds: the product to bf16, then the
 * sum (p * minus_d, two bf16 values, is exact in float, so whether torch fuses that multiply
 * into its add makes no difference; in float32 it would, so float32 keeps torch's ops). */
#define ATTENTION_DS(NAME, TYPE, LOAD, STORE)                                                      \
    void NAME(TYPE *gv, const TYPE *pm, const TYPE *p, const TYPE *minus_d, int64_t start,     \
                  int64_t stop, int64_t T) {                                                       \
        PARALLEL_FOR((stop - start) * T * T >= 65536)                                              \
        for (int64_t r = start * T; r < stop * T; r++) { /* one query row of one matrix */         \
            float d = LOAD(minus_d[r]);                                                            \
            TYPE *row = gv + r * T;                                                                \
            const TYPE *pmr = pm + r * T, *pr = p + r * T;                                         \
            for (int64_t j = 0; j < T; j++)                                                        \
                row[j] = STORE(LOAD(STORE(LOAD(row[j]) * LOAD(pmr[j]))) + LOAD(pr[j]) * d);        \
        }                                                                                          \
    }

ATTENTION_DS(attention_ds_bf16, uint16_t, bf16_to_float, float_to_bf16)

/* torch's exp of a float on x86 (ATen's Vectorized<float>::exp, which calls Sleef's expf_u10):
 * Sleef's steps, its constants, its fused multiply-adds, for d <= 0 or NaN only (a softmax's
 * x - max): the same value for every such float (checked against Sleef_expf16_u10 for all
 * 1.1e9 floats from -0 to -112, docs/speed.md). exp_f32 is it over an array, for the tests. */
static inline float pow2i(int32_t q) {
    uint32_t u = (uint32_t)(q + 0x7f) << 23;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float torch_expf(float d) {
    float dd = d < -104.0f ? -104.0f : d; /* below -104 the answer is 0 (NaN stays NaN) */
    float q = __builtin_rintf(dd * 1.442695040888963407359924681001892137426645954152985934135449406931f);
    int32_t qi = (int32_t)q;
    float s = __builtin_fmaf(q, -0.693145751953125f, dd);
    s = __builtin_fmaf(q, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = __builtin_fmaf(u, s, 0.00139304355252534151077271f);
    u = __builtin_fmaf(u, s, 0.00833336077630519866943359f);
    u = __builtin_fmaf(u, s, 0.0416664853692054748535156f);
    u = __builtin_fmaf(u, s, 0.166666671633720397949219f);
    u = __builtin_fmaf(u, s, 0.5f);
    u = 1.0f + __builtin_fmaf(s * s, u, s);
    u = u * pow2i(qi >> 1) * pow2i(qi - (qi >> 1));
    return d < -104.0f ? 0.0f : u;
}

void exp_f32(const float *x, float *out, int64_t start, int64_t stop) {
    for (int64_t i = start; i < stop; i++) out[i] = torch_expf(x[i]);
}

/* One query row i of causal attention probabilities, as torch.softmax(s + causal, -1) computes
 * them in bf16 (ATen's _vec_softmax_lastdim<BFloat16>) with vectors of L floats: the max, then
 * exp(x - max) summed lane by lane over the T - T % L values of whole vectors, the lanes added
 * in halves (ATen's vec_reduce_all), the rest one by one (std::exp), then each value times
 * 1 / sum, rounded to bf16. Only keys j <= i are read: the masked ones are exp(-inf) = 0 in
 * torch, and adding zeros changes no sum, so the vectors past the diagonal are skipped. A NaN
 * is left out of the max, but it makes the sum NaN, so its row comes out NaN as in torch (its
 * masked entries 0 here, NaN there). pm (unless NULL) = p times the row's dropout bits, read at
 * b[j * step] (step 1 or -1, as causal_mask reads them); p and pm are 0 past the diagonal. */
#define CAUSAL_SOFTMAX_ROW(NAME, L)                                                                \
    static inline __attribute__((always_inline)) void NAME(                                        \
        const uint16_t *restrict x, uint16_t *restrict p, uint16_t *restrict pm,                   \
        const int16_t *restrict b, int64_t step, int64_t i, int64_t T, int32_t threshold) {        \
        float buf[T + L];                                                                          \
        int64_t n = i + 1, vec_end = T - T % L;                                                    \
        int64_t chunks_end = (n < vec_end ? n + L - 1 : vec_end) / L * L; /* the vectors with keys <= i */ \
        float mx = -INFINITY, acc[L];                                                              \
        for (int l = 0; l < L; l++) acc[l] = 0.0f;                                                 \
        for (int64_t j = 0; j < n; j++) buf[j] = bf16_to_float(x[j]);                              \
        for (int64_t j = n; j < chunks_end; j++) buf[j] = -INFINITY; /* exp gives 0 */             \
        /* a NaN may be left out of the max: it makes the sum NaN, so its row comes out NaN */    \
        SIMD_MAX(mx)                                                                               \
        for (int64_t j = 0; j < n; j++) mx = buf[j] > mx ? buf[j] : mx;                            \
        for (int64_t c = 0; c < chunks_end; c += L)                                                \
            for (int l = 0; l < L; l++) {                                                          \
                float e = torch_expf(buf[c + l] - mx);                                             \
                buf[c + l] = e;                                                                    \
                acc[l] += e;                                                                       \
            }                                                                                      \
        for (int h = L / 2; h >= 1; h /= 2)                                                        \
            for (int l = 0; l < h; l++) acc[l] = acc[l] + acc[l + h];                              \
        float sum = acc[0];                                                                        \
        for (int64_t j = vec_end; j < n; j++) { /* torch's scalar tail: std::exp */               \
            buf[j] = expf(buf[j] - mx);                                                            \
            sum += buf[j];                                                                         \
        }                                                                                          \
        float inv = 1.0f / sum;                                                                    \
        if (!pm) {                                                                                 \
            for (int64_t j = 0; j < n; j++) p[j] = float_to_bf16(buf[j] * inv);                   \
        } else if (step == 1) { /* pm: p where kept, else p * 0: 0, or p's NaN */                 \
            for (int64_t j = 0; j < n; j++) {                                                      \
                uint16_t v = float_to_bf16(buf[j] * inv);                                          \
                p[j] = v;                                                                          \
                pm[j] = b[j] >= threshold || v == 0x7FC0 ? v : 0;                                  \
            }                                                                                      \
        } else {                                                                                   \
            for (int64_t j = 0; j < n; j++) {                                                      \
                uint16_t v = float_to_bf16(buf[j] * inv);                                          \
                p[j] = v;                                                                          \
                pm[j] = b[-j] >= threshold || v == 0x7FC0 ? v : 0;                                 \
            }                                                                                      \
        }                                                                                          \
        for (int64_t j = n; j < T; j++) p[j] = 0;                                                  \
        if (pm)                                                                                    \
            for (int64_t j = n; j < T; j++) pm[j] = 0;                                             \
    }

CAUSAL_SOFTMAX_ROW(causal_softmax_row16, 16)
CAUSAL_SOFTMAX_ROW(causal_softmax_row8, 8)

/* The causal softmax of matrices [start, stop) of bf16 scores s, each (T, T) (only the causal
 * part read: no mask added first), into p, and p times its dropout mask into pm, the bits laid
 * out as causal_mask's; bits and pm NULL for no dropout. lanes: 16 or 8, the float vector of
 * torch's build on this CPU (cpu_kernels.py checks which one gives torch's values). */
void causal_softmax_bf16(const uint16_t *s, const int16_t *bits, uint16_t *p, uint16_t *pm, int64_t start,
                             int64_t stop, int64_t T, int32_t threshold, int64_t lanes) {
    int64_t half = T / 2;
    PARALLEL_FOR((stop - start) * T * T >= 65536)
    for (int64_t r = start * T; r < stop * T; r++) { /* query row i of matrix m */
        int64_t m = r / T, i = r % T, step = 1;
        const int16_t *b = bits;
        if (bits) {
            if (T % 2)
                b = bits + m * T * T + i * T;
            else if (i < half)
                b = bits + m * half * (T + 1) + i * (T + 1);
            else {
                b = bits + m * half * (T + 1) + (T - 1 - i) * (T + 1) + T;
                step = -1;
            }
        }
        uint16_t *pmr = pm ? pm + r * T : 0;
        if (lanes == 16)
            causal_softmax_row16(s + r * T, p + r * T, pmr, b, step, i, T, threshold);
        else
            causal_softmax_row8(s + r * T, p + r * T, pmr, b, step, i, T, threshold);
    }
}

/* The attention's q, k and v out of c_attn's output x, rows (b, t) of [q | k | v], each C = nh * hs
 * values, row_stride apart: each into its own contiguous (B, nh, T, hs) tensor, q times q_scale
 * and v times v_scale (k as it is), rounded to the dtype as torch's copy and in-place multiply
 * round: one pass instead of three copies and two multiplies. Output rows [start, stop) of
 * B * nh * T, written in order. */
#define SPLIT_HEADS(SUFFIX, TYPE, LOAD, STORE)                                                     \
    void split_heads_##SUFFIX(const TYPE *x, TYPE *q, TYPE *k, TYPE *v, int64_t start, int64_t stop, \
                                  int64_t nh, int64_t T, int64_t hs, int64_t row_stride, float q_scale, \
                                  float v_scale) {                                                \
        int64_t C = nh * hs;                                                                       \
        PARALLEL_FOR((stop - start) * 3 * hs >= 65536)                                             \
        for (int64_t r = start; r < stop; r++) { /* output row r = (b * nh + h) * T + t */       \
            int64_t t = r % T, h = (r / T) % nh, b = r / (T * nh);                                 \
            const TYPE *restrict xq = x + (b * T + t) * row_stride + h * hs;                       \
            const TYPE *restrict xk = xq + C, *restrict xv = xq + 2 * C;                           \
            TYPE *restrict oq = q + r * hs, *restrict ok = k + r * hs, *restrict ov = v + r * hs;  \
            if (q_scale == 1.0f)                                                                   \
                memcpy(oq, xq, hs * sizeof(TYPE));                                                 \
            else                                                                                   \
                for (int64_t j = 0; j < hs; j++) oq[j] = STORE(LOAD(xq[j]) * q_scale);             \
            memcpy(ok, xk, hs * sizeof(TYPE));                                                     \
            if (v_scale == 1.0f)                                                                   \
                memcpy(ov, xv, hs * sizeof(TYPE));                                                 \
            else                                                                                   \
                for (int64_t j = 0; j < hs; j++) ov[j] = STORE(LOAD(xv[j]) * v_scale);             \
        }                                                                                          \
    }

SPLIT_HEADS(bf16, uint16_t, bf16_to_float, float_to_bf16)
SPLIT_HEADS(f32, float, IDENTITY, IDENTITY)

/* relu(x)^2, the relu2 MLP activation (model.ReLUSquared), forward and backward, each one pass
 * over elements [start, stop). Rounded as torch's relu, square (pow 2) and their backward
 * (grad * (2 * r), zero where r <= 0) round: 2 * r is exact, so each result is one rounding of
 * a product. NaN stays NaN, as in torch's relu (`v <= 0` is false for NaN). Each loop computes
 * its product for every element and then selects 0 where v <= 0, in vectors (a compare and a
 * blend; gcc needs -fno-trapping-math for it): a scalar loop's branch on the sign missed half
 * the time, 2.7x torch's relu and square on an AVX2 CPU. */
#define RELU_SQUARED(SUFFIX, TYPE, LOAD, STORE)                                                      \
    void relu_squared_forward_##SUFFIX(const TYPE *x, TYPE *out, int64_t start, int64_t stop) {  \
        PARALLEL_FOR(ELEMENTS)                                                                     \
        for (int64_t i = start; i < stop; i++) {                                                   \
            float v = LOAD(x[i]);                                                                  \
            float square = v * v;                                                                  \
            out[i] = STORE(v <= 0.0f ? 0.0f : square);                                            \
        }                                                                                          \
    }                                                                                              \
    void relu_squared_backward_##SUFFIX(const TYPE *x, const TYPE *g, TYPE *out, int64_t start, int64_t stop) { \
        PARALLEL_FOR(ELEMENTS)                                                                     \
        for (int64_t i = start; i < stop; i++) {                                                   \
            float v = LOAD(x[i]);                                                                  \
            float grad = LOAD(g[i]) * LOAD(STORE(2.0f * v));                                       \
            out[i] = STORE(v <= 0.0f ? 0.0f : grad);                                               \
        }                                                                                          \
    }

RELU_SQUARED(bf16, uint16_t, bf16_to_float, float_to_bf16)
RELU_SQUARED(f32, float, IDENTITY, IDENTITY)

/* The gradient of an element-wise function of one bf16 value (GELU): x has only 65536 values,
 * so cpu_kernels.py asks torch once for its float32 factor f(x) at each (gelu_backward of a
 * gradient of 1 in float32), and out = bf16(float(g) * f(x)), the one product and rounding
 * torch's bf16 kernel ends with: torch's values, at the speed of memory. */
void lookup_grad_bf16(const uint16_t *x, const uint16_t *g, const float *table, uint16_t *out,
                          int64_t start, int64_t stop) {
    PARALLEL_FOR(ELEMENTS)
    for (int64_t i = start; i < stop; i++) out[i] = float_to_bf16(bf16_to_float(g[i]) * table[x[i]]);
}

/* Rotary position embeddings (model.apply_rotary) on rows [start, stop) of x, a (B, nh, T, hs)
 * tensor with unit stride in hs and strides sb, sh, st for B, nh and T; cos and sin are (T, h)
 * per batch row, cb apart (0: shared), h = hs / 2, all of x's dtype. Each row of out
 * (contiguous, as torch.cat makes it) is, with x1, x2 the two halves:
 *   forward:  [x1 cos + x2 sin, x2 cos - x1 sin]
 *   backward: [x1 cos - x2 sin, x2 cos + x1 sin] (x is then the gradient; autograd's sum of the
 *             two products that reach each half, in either order: the sum is the same)
 * every product rounded to the dtype, then the sum, as torch's separate multiplies and adds do
 * (in bf16 each op widens its operands to float32 and rounds its result back). */
#define ROUND_F32(v) (v)
#define ROUND_BF16(v) bf16_to_float(float_to_bf16(v))
/* a row's first values in vectors of N floats, as many as fit (the loop of one does the rest) */
#define ROTATE_VECTORS(N, LOADV, ROUNDV, STOREV)                                                   \
    for (; j + N <= h; j += N) {                                                                   \
        f32x##N a = LOADV(N, x1 + j), z = LOADV(N, x2 + j), cj = LOADV(N, c + j), sj = LOADV(N, s + j); \
        f32x##N ac = ROUNDV(N, a * cj), as = ROUNDV(N, a * sj);                                   \
        f32x##N zc = ROUNDV(N, z * cj), zs = ROUNDV(N, z * sj);                                   \
        STOREV(N, o + j, ac + sign * zs);                                                          \
        STOREV(N, o + h + j, zc - sign * as);                                                      \
    }
#define VECTORS_F32 ROTATE_VECTORS(16, LOAD_F32, KEEP_F32, STORE_F32) ROTATE_VECTORS(8, LOAD_F32, KEEP_F32, STORE_F32)
#define VECTORS_BF16 ROTATE_VECTORS(16, LOAD_BF16, ROUND_BF16_V, STORE_BF16) ROTATE_VECTORS(8, LOAD_BF16, ROUND_BF16_V, STORE_BF16)
#define ROTARY(SUFFIX, TYPE, LOAD, STORE, ROUND, VECTORS)                                          \
    void rotary_##SUFFIX(const TYPE *x, const TYPE *cos, const TYPE *sin, TYPE *out, int64_t start, \
                             int64_t stop, int64_t nh, int64_t T, int64_t h, int64_t sb, int64_t sh,   \
                             int64_t st, int64_t cb, int32_t backward) {                          \
        float sign = backward ? -1.0f : 1.0f; /* exact: it only flips signs */                   \
        if (stop <= start) return;                                                                 \
        /* row r = bh * T + t with bh = b * nh + head: each bh's rows in a loop over t, so that  \
         * no row pays for divisions (three 64-bit ones weigh as much as a short row's work) */    \
        int64_t first = start / T, last = (stop - 1) / T;                                         \
        PARALLEL_FOR((stop - start) * h >= 32768)                                                  \
        for (int64_t bh = first; bh <= last; bh++) {                                               \
            int64_t b = bh / nh, head = bh % nh;                                                   \
            int64_t t0 = start > bh * T ? start - bh * T : 0, t1 = stop < (bh + 1) * T ? stop - bh * T : T; \
            for (int64_t t = t0; t < t1; t++) {                                                    \
                const TYPE *restrict x1 = x + b * sb + head * sh + t * st, *restrict x2 = x1 + h; \
                const TYPE *restrict c = cos + b * cb + t * h, *restrict s = sin + b * cb + t * h; \
                TYPE *restrict o = out + (bh * T + t) * 2 * h;                                     \
                int64_t j = 0;                                                                     \
                VECTORS                                                                            \
                SIMD8                                                                              \
                for (int64_t k = j; k < h; k++) {                                                  \
                    float a = LOAD(x1[k]), z = LOAD(x2[k]), ck = LOAD(c[k]), sk = LOAD(s[k]);      \
                    float ac = ROUND(a * ck), as = ROUND(a * sk), zc = ROUND(z * ck), zs = ROUND(z * sk); \
                    o[k] = STORE(ac + sign * zs);     /* forward: ac + zs; backward: ac - zs */   \
                    o[h + k] = STORE(zc - sign * as); /* forward: zc - as; backward: zc + as */   \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

ROTARY(f32, float, IDENTITY, IDENTITY, ROUND_F32, VECTORS_F32)
ROTARY(bf16, uint16_t, bf16_to_float, float_to_bf16, ROUND_BF16, VECTORS_BF16)

/* The float32 sum of v[0..n) in the order of torch's own CPU sum over a contiguous last
 * dimension (ATen's vectorized_inner_sum, SumKernel.cpp) with vectors of `lanes` floats: lane-wise
 * sums of the n / lanes whole vectors (four interleaved accumulators, cascaded in chunks of 16),
 * then the leftover values one by one, then the lanes one by one. lanes is what torch's build
 * uses on this CPU (16 with AVX512, 8 with AVX2): cpu_kernels.py finds it by comparing this
 * with torch.sum, and does not use it where none matches. n >= lanes, lanes <= 16. */
#define TORCH_SUM(NAME, L)                                                                         \
    static inline float NAME(const float *v, int64_t n) {                                         \
        enum { LEVELS = 4, ILP = 4 };                                                              \
        int64_t vecs = n / L, size = vecs / ILP;                                                   \
        int64_t ceil_log2 = 1;                                                                     \
        if (size > 2) {                                                                            \
            ceil_log2 = 0;                                                                         \
            while (((int64_t)1 << ceil_log2) < size) ceil_log2++;                                  \
        }                                                                                          \
        int64_t power = ceil_log2 / LEVELS > 4 ? ceil_log2 / LEVELS : 4;                           \
        int64_t step = (int64_t)1 << power, mask = step - 1;                                       \
        float acc[LEVELS][ILP][L]; /* the levels above 0 only serve rows of whole chunks */       \
        memset(acc, 0, size >= step ? sizeof acc : sizeof acc[0]);                                 \
        int64_t i = 0;                                                                             \
        while (i + step <= size) { /* ATen's cascade: chunks of `step` groups, then up a level */ \
            for (int64_t j = 0; j < step; j++, i++)                                                \
                for (int k = 0; k < ILP; k++)                                                      \
                    for (int l = 0; l < L; l++) acc[0][k][l] += v[(i * ILP + k) * L + l];          \
            for (int j = 1; j < LEVELS; j++) {                                                     \
                for (int k = 0; k < ILP; k++)                                                      \
                    for (int l = 0; l < L; l++) {                                                  \
                        acc[j][k][l] += acc[j - 1][k][l];                                          \
                        acc[j - 1][k][l] = 0.0f;                                                   \
                    }                                                                              \
                if ((i & (mask << (j * power))) != 0) break;                                       \
            }                                                                                      \
        }                                                                                          \
        for (; i < size; i++)                                                                      \
            for (int k = 0; k < ILP; k++)                                                          \
                for (int l = 0; l < L; l++) acc[0][k][l] += v[(i * ILP + k) * L + l];              \
        if (size >= step) /* levels above 0 hold something only after a whole chunk */            \
            for (int j = 1; j < LEVELS; j++)                                                       \
                for (int k = 0; k < ILP; k++)                                                      \
                    for (int l = 0; l < L; l++) acc[0][k][l] += acc[j][k][l];                      \
        for (int64_t r = size * ILP; r < vecs; r++) /* whole vectors after the groups of ILP */   \
            for (int l = 0; l < L; l++) acc[0][0][l] += v[r * L + l];                              \
        for (int k = 1; k < ILP; k++)                                                              \
            for (int l = 0; l < L; l++) acc[0][0][l] += acc[0][k][l];                              \
        float total = 0.0f;                                                                        \
        for (int64_t r = vecs * L; r < n; r++) total += v[r];                                      \
        for (int l = 0; l < L; l++) total += acc[0][0][l];                                         \
        return total;                                                                              \
    }

TORCH_SUM(torch_sum16, 16)
TORCH_SUM(torch_sum8, 8)
TORCH_SUM(torch_sum4, 4)

static inline float torch_sum(const float *v, int64_t n, int64_t lanes) {
    return lanes == 16 ? torch_sum16(v, n) : lanes == 8 ? torch_sum8(v, n) : torch_sum4(v, n);
}

/* out[row] = torch_sum of row `row` of v (rows of n, contiguous): the check against torch.sum */
void row_sums_f32(const float *v, float *out, int64_t start, int64_t stop, int64_t n, int64_t lanes) {
    for (int64_t row = start; row < stop; row++) out[row] = torch_sum(v + row * n, n, lanes);
}

/* Parameter-free RMSNorm over the last dimension (n values a row), as torch's rms_norm computes
 * it in float32 (bf16 rows widened first): r = rsqrt(mean(x^2) + eps) per row, y = x * r.
 * torch's own reductions (the mean of the squares, the backward's row sums) decide their rounding
 * by the order of their additions: rms_sums below adds in torch's order where cpu_kernels.py has
 * checked that it matches; elsewhere torch reduces, and these kernels do the element-wise passes
 * around its reductions, one pass each where torch makes two to four:
 *   rms_square: x^2 in float32 (what the mean reads)   rms_scale: y = x * r, in x's dtype
 *   rms_product: g * x in float32 (what the row sums read)
 *   rms_grad: dx = g * r + (gv / n) * (2 x), gv = -0.5 * sum(g x) * r^3 per row (autograd's
 *             terms of the mul, and of the mean and the square, rounded as it rounds them)
 * Row `row` of x (and of sq, out for the forward ones) starts at the offset of its index
 * (i0, i1, i2) over sizes (., d1, d2) and strides (s0, s1, s2); g, prod and the backward's out
 * are contiguous. */
#define ROW_OFFSET(row, s0, s1, s2) (((row) / (d1 * d2)) * (s0) + (((row) / d2) % d1) * (s1) + ((row) % d2) * (s2))
#define RMS_NORM(SUFFIX, TYPE, LOAD, STORE)                                                        \
    void rms_square_##SUFFIX(const TYPE *x, float *sq, int64_t start, int64_t stop, int64_t n, \
                                 int64_t d1, int64_t d2, int64_t s0, int64_t s1, int64_t s2,      \
                                 int64_t q0, int64_t q1, int64_t q2) {                            \
        PARALLEL_FOR((stop - start) * n >= 32768)                                                  \
        for (int64_t row = start; row < stop; row++) {                                             \
            const TYPE *restrict xr = x + ROW_OFFSET(row, s0, s1, s2);                            \
            float *restrict o = sq + ROW_OFFSET(row, q0, q1, q2);                                  \
            for (int64_t j = 0; j < n; j++) {                                                      \
                float v = LOAD(xr[j]);                                                             \
                o[j] = v * v;                                                                      \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    void rms_scale_##SUFFIX(const TYPE *x, const float *r, TYPE *out, int64_t start, int64_t stop, \
                                int64_t n, int64_t d1, int64_t d2, int64_t s0, int64_t s1, int64_t s2, \
                                int64_t o0, int64_t o1, int64_t o2) {                             \
        PARALLEL_FOR((stop - start) * n >= 32768)                                                  \
        for (int64_t row = start; row < stop; row++) {                                             \
            const TYPE *restrict xr = x + ROW_OFFSET(row, s0, s1, s2);                            \
            TYPE *restrict o = out + ROW_OFFSET(row, o0, o1, o2);                                  \
            float rr = r[row];                                                                     \
            for (int64_t j = 0; j < n; j++)                                                        \
                o[j] = STORE(LOAD(xr[j]) * rr);                                                    \
        }                                                                                          \
    }                                                                                              \
    void rms_product_##SUFFIX(const TYPE *g, const TYPE *x, float *prod, int64_t start, int64_t stop, \
                                  int64_t n, int64_t d1, int64_t d2, int64_t s0, int64_t s1, int64_t s2) { \
        PARALLEL_FOR((stop - start) * n >= 32768)                                                  \
        for (int64_t row = start; row < stop; row++) {                                             \
            const TYPE *restrict xr = x + ROW_OFFSET(row, s0, s1, s2), *restrict gr = g + row * n; \
            float *restrict o = prod + row * n;                                                    \
            for (int64_t j = 0; j < n; j++)                                                        \
                o[j] = LOAD(gr[j]) * LOAD(xr[j]);                                                  \
        }                                                                                          \
    }

RMS_NORM(bf16, uint16_t, bf16_to_float, float_to_bf16)
RMS_NORM(f32, float, IDENTITY, IDENTITY)

/* Where torch_sum matches torch's sum (cpu_kernels.py checks), the reductions too, in the
 * passes that make their values: out[row] = the sum of x^2 (product = 0: the forward's mean,
 * before its division) or of g * x (product = 1: the backward's row sums) over row `row`, the
 * values made in a buffer of the row (n <= 8192) and summed in torch's order. x's rows as
 * above, g contiguous. No sq or prod tensor is written, nor read again by torch. */
#define RMS_SUMS(SUFFIX, TYPE, LOAD)                                                               \
    void rms_sums_##SUFFIX(const TYPE *x, const TYPE *g, float *out, int64_t start, int64_t stop, \
                               int64_t n, int64_t d1, int64_t d2, int64_t s0, int64_t s1, int64_t s2, \
                               int64_t lanes, int32_t product) {                                  \
        PARALLEL_FOR((stop - start) * n >= 32768)                                                  \
        for (int64_t row = start; row < stop; row++) {                                             \
            float buf[8192];                                                                       \
            const TYPE *restrict xr = x + ROW_OFFSET(row, s0, s1, s2), *restrict gr = g + row * n; \
            if (product)                                                                           \
                for (int64_t j = 0; j < n; j++) buf[j] = LOAD(gr[j]) * LOAD(xr[j]);               \
            else                                                                                   \
                for (int64_t j = 0; j < n; j++) buf[j] = LOAD(xr[j]) * LOAD(xr[j]);               \
            out[row] = torch_sum(buf, n, lanes);                                                   \
        }                                                                                          \
    }

RMS_SUMS(bf16, uint16_t, bf16_to_float)
RMS_SUMS(f32, float, IDENTITY)

/* The backward's gradient for a bf16 x: torch's composite widens x to float32 first, so both of
 * its terms meet in float32 and the sum is rounded to bf16 once. */
void rms_grad_bf16(const uint16_t *g, const uint16_t *x, const float *r, const float *gv, uint16_t *out,
                       int64_t start, int64_t stop, int64_t n, int64_t d1, int64_t d2, int64_t s0, int64_t s1,
                       int64_t s2) {
    PARALLEL_FOR((stop - start) * n >= 32768)
    for (int64_t row = start; row < stop; row++) {
        const uint16_t *restrict xr = x + ROW_OFFSET(row, s0, s1, s2), *restrict gr = g + row * n;
        uint16_t *restrict o = out + row * n;
        float rr = r[row], d = gv[row] / (float)n;
        for (int64_t j = 0; j < n; j++)
            o[j] = float_to_bf16(bf16_to_float(gr[j]) * rr + d * (2.0f * bf16_to_float(xr[j])));
    }
}

/* For a float32 x the two terms are x's gradient from two of autograd's nodes (the mul and the
 * square): it adds each to whatever else x's gradient holds in turn, so they are written apart
 * and cpu_kernels.py hands them back as two gradients, to be added in the same order. */
void rms_grad_terms_f32(const float *g, const float *x, const float *r, const float *gv, float *direct,
                            float *squared, int64_t start, int64_t stop, int64_t n, int64_t d1, int64_t d2,
                            int64_t s0, int64_t s1, int64_t s2) {
    PARALLEL_FOR((stop - start) * n >= 32768)
    for (int64_t row = start; row < stop; row++) {
        const float *restrict xr = x + ROW_OFFSET(row, s0, s1, s2), *restrict gr = g + row * n;
        float *restrict o = direct + row * n, *restrict q = squared + row * n;
        float rr = r[row], d = gv[row] / (float)n;
        for (int64_t j = 0; j < n; j++) {
            o[j] = gr[j] * rr;
            q[j] = d * (2.0f * xr[j]);
        }
    }
}

/* torch_sum of each of `count` rows (count <= 16) of n values, `stride` apart, into out: the
 * order of torch_sum for rows too short for its cascade (n < 64 * lanes), with the last additions
 * (each row's lanes, one by one) made for all the rows at once, a vector across rows. */
#define TORCH_SUMS_SHORT(NAME, L)                                                                  \
    static inline __attribute__((always_inline)) void NAME(const float *v, int64_t n, int64_t stride, int64_t count, \
                                                           float *out) {                           \
        int64_t vecs = n / L, size = vecs / 4;                                                     \
        f32x##L across[16]; /* each row's lanes */                                                 \
        for (int64_t r = 0; r < count; r++) {                                                      \
            const float *x = v + r * stride;                                                       \
            f32x##L acc[4] = {0};                                                                  \
            for (int64_t i = 0; i < size; i++)                                                     \
                for (int k = 0; k < 4; k++) acc[k] += LOAD_F32(L, x + (i * 4 + k) * L);           \
            for (int64_t i = size * 4; i < vecs; i++) acc[0] += LOAD_F32(L, x + i * L);            \
            for (int k = 1; k < 4; k++) acc[0] += acc[k];                                          \
            float total = 0.0f;                                                                    \
            for (int64_t i = vecs * L; i < n; i++) total += x[i];                                  \
            out[r] = total;                                                                        \
            across[r] = acc[0];                                                                    \
        }                                                                                          \
        for (int l = 0; l < L; l++) /* the rows' chains of additions are independent: they overlap */ \
            for (int64_t r = 0; r < count; r++) out[r] += across[r][l];                            \
    }
TORCH_SUMS_SHORT(torch_sums_short16, 16)
TORCH_SUMS_SHORT(torch_sums_short8, 8)
TORCH_SUMS_SHORT(torch_sums_short4, 4)

static inline __attribute__((always_inline)) void torch_sums_short(const float *v, int64_t n, int64_t stride, int64_t count, int64_t lanes,
                                    float *out) {
    for (int64_t r = 0; r < count; r += 16) {
        int64_t m = count - r < 16 ? count - r : 16;
        if (lanes == 16) torch_sums_short16(v + r * stride, n, stride, m, out + r);
        else if (lanes == 8) torch_sums_short8(v + r * stride, n, stride, m, out + r);
        else torch_sums_short4(v + r * stride, n, stride, m, out + r);
    }
}

/* The attention's heads for the qk_norm and rotary options (cpu_kernels._CPUQKHeads): q, k and v
 * out of c_attn's output qkv, rows (b, t) of [q | k | v] (C = nh * hs values each, contiguous),
 * each head's q and k RMS-normed and rotated, into contiguous (B, nh, T, hs) tensors, in one pass
 * each way where the split, views, rms_norm and rotary kernels above and torch's ops between them
 * take eleven forward and twelve backward. Every value is computed and rounded as those compute
 * and round it, so the results are theirs bit for bit (cpu_kernels.py checks it once, on this
 * machine, before using these):
 *   forward:  r = rsqrt(mean(x^2) + eps) per head row of q and k (the mean's sum in torch's order:
 *             torch_sums_short), y = rotary(x * r) (rms_scale's result rounded to the dtype, then
 *             each rotary product and sum), v copied; r is kept (B, T, 2, nh) for the backward
 *   backward: g' = the rotary's backward of q's or k's gradient, gv = -0.5 * sum(g' x) * r^3
 *             (the sum in torch's order; r^3 as torch's pow(r, 3): r * r * r), qkv's gradient
 *             g' * r + (gv / hs) * (2 x) (rms_grad: rounded once in bf16; the sum of
 *             rms_grad_terms_f32's two terms in float32, as autograd adds them), v's copied
 * Rows [start, stop) of B * T, 2 * nh * hs <= QK_MAX. cos and sin: (T, hs/2), or (B, T, hs/2)
 * with cb = T * hs/2 between sequences. */
#define QK_MAX 8192
/* rotate half rows x1, x2 (h values each), each value times `scale` and rounded first (the
 * forward's rms_scale; 1 and no rounding in the backward), into o and o + h; sign +1 forward,
 * -1 backward */
#define QK_ROTATE_VECTORS(N, LOADV, ROUNDV, STOREV, SCALED)                                        \
    for (; j + N <= h; j += N) {                                                                   \
        f32x##N a = LOADV(N, x1 + j), z = LOADV(N, x2 + j), cj = LOADV(N, c + j), sj = LOADV(N, s + j); \
        if (SCALED) a = ROUNDV(N, a * scale), z = ROUNDV(N, z * scale);                            \
        f32x##N ac = ROUNDV(N, a * cj), as = ROUNDV(N, a * sj);                                   \
        f32x##N zc = ROUNDV(N, z * cj), zs = ROUNDV(N, z * sj);                                   \
        STOREV(N, o + j, ac + sign * zs);                                                          \
        STOREV(N, o + h + j, zc - sign * as);                                                      \
    }
#define QK_VECTORS_bf16(SCALED) QK_ROTATE_VECTORS(16, LOAD_BF16, ROUND_BF16_V, STORE_BF16, SCALED)      \
                                QK_ROTATE_VECTORS(8, LOAD_BF16, ROUND_BF16_V, STORE_BF16, SCALED)
#define QK_VECTORS_f32(SCALED) QK_ROTATE_VECTORS(16, LOAD_F32, KEEP_F32, STORE_F32, SCALED)             \
                               QK_ROTATE_VECTORS(8, LOAD_F32, KEEP_F32, STORE_F32, SCALED)
#define QK_ROTATE(SUFFIX, LOAD, STORE, ROUND, SCALED)                                              \
    {                                                                                              \
        int64_t j = 0;                                                                             \
        QK_VECTORS_##SUFFIX(SCALED)                                                                \
        for (int64_t k = j; k < h; k++) {                                                          \
            float a = LOAD(x1[k]), z = LOAD(x2[k]), ck = LOAD(c[k]), sk = LOAD(s[k]);              \
            if (SCALED) a = ROUND(a * scale), z = ROUND(z * scale);                                \
            float ac = ROUND(a * ck), as = ROUND(a * sk), zc = ROUND(z * ck), zs = ROUND(z * sk);  \
            o[k] = STORE(ac + sign * zs);                                                          \
            o[h + k] = STORE(zc - sign * as);                                                      \
        }                                                                                          \
    }
#define QK_HEADS(SUFFIX, TYPE, LOAD, STORE, ROUND)                                                 \
    void qk_forward_##SUFFIX(const TYPE *qkv, const TYPE *cos, const TYPE *sin, TYPE *out, float *r, \
                                 int64_t start, int64_t stop, int64_t rows, int64_t T, int64_t nh, \
                                 int64_t hs, int64_t cb, int64_t lanes, float eps) {               \
        const float sign = 1.0f;                                                                   \
        int64_t C = nh * hs, h = hs / 2, between = rows * C; /* between the q, k, v outputs */   \
        PARALLEL_FOR((stop - start) * 3 * C >= 32768)                                              \
        for (int64_t row = start; row < stop; row++) {                                             \
            int64_t b = row / T, t = row % T;                                                      \
            const TYPE *restrict c = cos + b * cb + t * h, *restrict s = sin + b * cb + t * h;     \
            const TYPE *restrict x = qkv + row * 3 * C; /* q's heads, then k's: 2 nh rows of hs */ \
            float sq[QK_MAX], *restrict rr = r + row * 2 * nh;                                     \
            for (int64_t j = 0; j < 2 * C; j++) sq[j] = LOAD(x[j]) * LOAD(x[j]);                   \
            torch_sums_short(sq, hs, hs, 2 * nh, lanes, rr);                                       \
            for (int64_t i = 0; i < 2 * nh; i++) rr[i] = 1.0f / sqrtf(rr[i] / (float)hs + eps);    \
            for (int64_t i = 0; i < 2 * nh; i++) { /* head row i: part i / nh, head i % nh */     \
                const TYPE *restrict x1 = x + i * hs, *restrict x2 = x1 + h;                       \
                TYPE *restrict o = out + (i / nh) * between + ((b * nh + i % nh) * T + t) * hs;    \
                float scale = rr[i];                                                               \
                QK_ROTATE(SUFFIX, LOAD, STORE, ROUND, 1)                                           \
            }                                                                                      \
            for (int64_t head = 0; head < nh; head++)                                              \
                memcpy(out + 2 * between + ((b * nh + head) * T + t) * hs, x + 2 * C + head * hs,  \
                       hs * sizeof(TYPE));                                                         \
        }                                                                                          \
    }                                                                                              \
    void qk_backward_##SUFFIX(const TYPE *qkv, const TYPE *gq, const TYPE *gk, const TYPE *gv, \
                                  const float *r, const TYPE *cos, const TYPE *sin, TYPE *out,     \
                                  int64_t start, int64_t stop, int64_t rows, int64_t T, int64_t nh, \
                                  int64_t hs, int64_t cb, int64_t lanes) {                         \
        const float sign = -1.0f;                                                                  \
        int64_t C = nh * hs, h = hs / 2;                                                           \
        (void)rows;                                                                                \
        PARALLEL_FOR((stop - start) * 3 * C >= 32768)                                              \
        for (int64_t row = start; row < stop; row++) {                                             \
            int64_t b = row / T, t = row % T;                                                      \
            const TYPE *restrict c = cos + b * cb + t * h, *restrict s = sin + b * cb + t * h;     \
            const TYPE *restrict x = qkv + row * 3 * C;                                            \
            const float *restrict rr = r + row * 2 * nh;                                           \
            TYPE *restrict dx = out + row * 3 * C;                                                 \
            TYPE gr[QK_MAX];  /* g': the rotary's backward of each head row's gradient */         \
            float prod[QK_MAX], sums[2 * QK_MAX / 8];                                              \
            for (int64_t i = 0; i < 2 * nh; i++) {                                                 \
                const TYPE *restrict x1 = (i < nh ? gq : gk) + ((b * nh + i % nh) * T + t) * hs, *restrict x2 = x1 + h; \
                TYPE *restrict o = gr + i * hs;                                                    \
                const float scale = 1.0f;                                                          \
                QK_ROTATE(SUFFIX, LOAD, STORE, ROUND, 0)                                           \
            }                                                                                      \
            for (int64_t j = 0; j < 2 * C; j++) prod[j] = LOAD(gr[j]) * LOAD(x[j]);                \
            torch_sums_short(prod, hs, hs, 2 * nh, lanes, sums);                                   \
            for (int64_t i = 0; i < 2 * nh; i++) {                                                 \
                float d = (-0.5f * sums[i]) * (rr[i] * rr[i] * rr[i]) / (float)hs, ri = rr[i];    \
                const TYPE *restrict xi = x + i * hs, *restrict gi = gr + i * hs;                  \
                TYPE *restrict di = dx + i * hs;                                                   \
                for (int64_t j = 0; j < hs; j++) di[j] = STORE(LOAD(gi[j]) * ri + d * (2.0f * LOAD(xi[j]))); \
            }                                                                                      \
            for (int64_t head = 0; head < nh; head++)                                              \
                memcpy(dx + 2 * C + head * hs, gv + ((b * nh + head) * T + t) * hs, hs * sizeof(TYPE)); \
        }                                                                                          \
    }

QK_HEADS(bf16, uint16_t, bf16_to_float, float_to_bf16, ROUND_BF16)
QK_HEADS(f32, float, IDENTITY, IDENTITY, ROUND_F32)
