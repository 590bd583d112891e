/* attention.c — causal softmax attention, multi-head and grouped-query.
 *
 * Shapes: q[B,S,H*hd], k,v[B,S,KV*hd], out/dout[B,S,H*hd]; query head h
 * reads key/value head g = h / (H/KV). Per (b, h), with c = 1/sqrt(hd):
 *   P  = softmax_rows(c Q K^T + causal mask)        [S,S]
 *   O  = P V
 * and backward (P recomputed, not stored):
 *   dV += P^T dO,   dP = dO V^T,
 *   dS = P * (dP - rowsum(P * dP)),
 *   dQ  = c dS K,   dK += c dS^T Q        (+= across the heads of a group)
 * Both passes walk blocks of BLOCK query rows [r0, r1); a block only meets
 * keys s < r1, and each product is one sgemm over those columns, so the
 * masked upper half is (almost) never multiplied. Inside the diagonal block
 * the masked entries are exact zeros; they are multiplied too, which is
 * exact unless a masked partner row (v[s] or k[s] for s > t, or q[t], dO[t]
 * in the dK/dV products) is inf/NaN — such a block takes a triangular loop
 * instead, so masked entries contribute exactly nothing.
 *
 * Segments (varlen): rows are token-major over a list of documents;
 * causal attention stays inside each document (see att_job). Full rows are
 * the case of B documents of S tokens, through the same tasks.
 *
 * Threads: the forward runs one task per (segment, head), the backward one
 * per (segment, kv head) (the heads of a group add into the same dK, dV in head
 * order). Each worker owns one slab of the workspace (P and dS of one row
 * block, 2 BLOCK S floats) and calls the (single-threaded) BLAS itself.
 * Results are the same for every thread count. */
#include "ab_internal.h"

#define TRY_RC(call) do { int rc_ = (call); if (rc_) return rc_; } while (0)
#define BLOCK 64
#define MAX_WORKERS 16   /* slabs in ab_attention_workspace_floats(S) */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* one worker's scratch: P and dS of one row block, [min(BLOCK, S), S] each */
static int64_t slab_floats(int64_t S) { return 2 * min64(BLOCK, S) * S; }

int64_t ab_attention_workspace_floats(int64_t S) {
    if (S < 0) return AB_FAIL(AB_EINVAL, NULL);
    if (S > AB_BLAS_INT_MAX) return AB_FAIL(AB_ETOOBIG, NULL);   /* bounded before multiplying */
    return slab_floats(S) * MAX_WORKERS;
}

/* A job is a list of segments (documents): segment i is rows
 * [start, start + len) of the token-major arrays, with start = cu[i] and
 * len = cu[i+1] - cu[i] (varlen), or start = i S and len = S (full rows,
 * cu NULL). Causal attention never crosses a segment. */
typedef struct {
    float *out, *dq, *dk, *dv;
    const float *q, *k, *v, *dout;
    float *work;
    const int64_t *cu;
    int64_t n_seq, S, H, KV, hd, slab;
} att_job;

static void segment(const att_job *j, int64_t i, int64_t *start, int64_t *len) {
    *start = j->cu ? j->cu[i] : i * j->S;
    *len = j->cu ? j->cu[i + 1] - j->cu[i] : j->S;
}

/* 1 if rows [0, n) of X (row stride ld, hd wide) are all finite */
AB_HOT
static int rows_finite(const float *X, int64_t ld, int64_t n, int64_t hd) {
    float acc = 0.0f;
    for (int64_t r = 0; r < n; r++) {
        const float *x = X + r * ld;
        AB_SIMD_REDUCE(+, acc)
        for (int64_t i = 0; i < hd; i++) acc += x[i] * 0.0f;   /* NaN iff some x is inf/NaN */
    }
    return acc == 0.0f;
}

/* rows t = r0 .. r0+m-1 of P[., 0:r1] (stride ldp): softmax over s <= t,
 * zeros for t < s < r1 */
AB_HOT
static void causal_softmax(float *P, int64_t ldp, int64_t r0, int64_t m, int64_t r1) {
    for (int64_t i = 0; i < m; i++) {
        const int64_t t = r0 + i;
        float *row = P + i * ldp;
        float mx = -INFINITY, sum = 0.0f;
        AB_SIMD_REDUCE(max, mx)
        for (int64_t s = 0; s <= t; s++) mx = row[s] > mx ? row[s] : mx;
        AB_SIMD_REDUCE(+, sum)
        for (int64_t s = 0; s <= t; s++) { float e = ab_expf(row[s] - mx); row[s] = e; sum += e; }
        const float inv = 1.0f / sum;
        AB_SIMD
        for (int64_t s = 0; s <= t; s++) row[s] *= inv;
        for (int64_t s = t + 1; s < r1; s++) row[s] = 0.0f;
    }
}

/* dS = c * P * (dP - rowsum(P * dP)) in place over dP, same rows as above */
AB_HOT
static void causal_softmax_backward(float *dS, const float *P, int64_t ldp, int64_t r0,
                                    int64_t m, int64_t r1, float c) {
    for (int64_t i = 0; i < m; i++) {
        const int64_t t = r0 + i;
        const float *pr = P + i * ldp;
        float *dr = dS + i * ldp;
        float dot = 0.0f;
        AB_SIMD_REDUCE(+, dot)
        for (int64_t s = 0; s <= t; s++) dot += pr[s] * dr[s];
        AB_SIMD
        for (int64_t s = 0; s <= t; s++) dr[s] = c * pr[s] * (dr[s] - dot);
        for (int64_t s = t + 1; s < r1; s++) dr[s] = 0.0f;
    }
}

/* y[hd] += a * x[hd] */
AB_HOT
static void axpy(float *y, float a, const float *x, int64_t hd) {
    AB_SIMD
    for (int64_t i = 0; i < hd; i++) y[i] += a * x[i];
}

/* Y[r0:r1] = A[., 0:r1] X[0:r1]  (A: block rows, stride lda; Y, X stride ld*)
 * exact: the diagonal block by a triangular loop, s <= t only */
static void rows_times(float *Y, int64_t ldy, const float *A, int64_t lda, const float *X,
                       int64_t ldx, int64_t r0, int64_t r1, int64_t hd, int exact) {
    const int64_t m = r1 - r0;
    if (!exact) {
        ab_sgemm_1(0, 0, m, hd, r1, 1.0f, A, lda, X, ldx, 0.0f, Y + r0 * ldy, ldy);
        return;
    }
    if (r0 > 0)
        ab_sgemm_1(0, 0, m, hd, r0, 1.0f, A, lda, X, ldx, 0.0f, Y + r0 * ldy, ldy);
    else
        for (int64_t i = 0; i < m; i++) memset(Y + i * ldy, 0, (size_t)hd * sizeof(float));
    for (int64_t i = 0; i < m; i++)
        for (int64_t s = r0; s <= r0 + i; s++)
            axpy(Y + (r0 + i) * ldy, A[i * lda + s], X + s * ldx, hd);
}

/* Y[0:r1] += A[., 0:r1]^T X[r0:r1]  (A: block rows t = r0.., stride lda)
 * exact: the diagonal block by a triangular loop, t >= s only */
static void cols_times(float *Y, int64_t ldy, const float *A, int64_t lda, const float *X,
                       int64_t ldx, int64_t r0, int64_t r1, int64_t hd, int exact) {
    const int64_t m = r1 - r0;
    const float *Xb = X + r0 * ldx;
    if (!exact) {
        ab_sgemm_1(1, 0, r1, hd, m, 1.0f, A, lda, Xb, ldx, 1.0f, Y, ldy);
        return;
    }
    if (r0 > 0) ab_sgemm_1(1, 0, r0, hd, m, 1.0f, A, lda, Xb, ldx, 1.0f, Y, ldy);
    for (int64_t s = r0; s < r1; s++)
        for (int64_t i = s - r0; i < m; i++)
            axpy(Y + s * ldy, A[i * lda + s], Xb + i * ldx, hd);
}

static void forward_task(void *ctx, int64_t task, int worker) {
    const att_job *j = ctx;
    const int64_t hd = j->hd, ldq = j->H * hd, ldk = j->KV * hd;
    const int64_t b = task / j->H, h = task % j->H, g = h / (j->H / j->KV);
    int64_t t0, S;
    segment(j, b, &t0, &S);
    const float c = 1.0f / sqrtf((float)hd);
    const float *Q = j->q + t0 * ldq + h * hd;
    const float *K = j->k + t0 * ldk + g * hd, *V = j->v + t0 * ldk + g * hd;
    float *O = j->out + t0 * ldq + h * hd;
    float *P = j->work + worker * j->slab;
    for (int64_t r0 = 0; r0 < S; r0 += BLOCK) {
        const int64_t r1 = min64(r0 + BLOCK, S), m = r1 - r0;
        ab_sgemm_1(0, 1, m, r1, hd, c, Q + r0 * ldq, ldq, K, ldk, 0.0f, P, S);
        causal_softmax(P, S, r0, m, r1);
        int exact = !rows_finite(V + r0 * ldk, ldk, m, hd);
        rows_times(O, ldq, P, S, V, ldk, r0, r1, hd, exact);
    }
}

static void backward_task(void *ctx, int64_t task, int worker) {
    const att_job *j = ctx;
    const int64_t hd = j->hd, ldq = j->H * hd, ldk = j->KV * hd;
    const int64_t group = j->H / j->KV, b = task / j->KV, g = task % j->KV;
    int64_t t0, S;
    segment(j, b, &t0, &S);
    const float c = 1.0f / sqrtf((float)hd);
    const float *K = j->k + t0 * ldk + g * hd, *V = j->v + t0 * ldk + g * hd;
    float *dK = j->dk + t0 * ldk + g * hd, *dV = j->dv + t0 * ldk + g * hd;
    float *P = j->work + worker * j->slab, *dS = P + min64(BLOCK, S) * S;
    for (int64_t s = 0; s < S; s++) {
        memset(dK + s * ldk, 0, (size_t)hd * sizeof(float));
        memset(dV + s * ldk, 0, (size_t)hd * sizeof(float));
    }
    for (int64_t h = g * group; h < (g + 1) * group; h++) {
        const float *Q = j->q + t0 * ldq + h * hd, *dO = j->dout + t0 * ldq + h * hd;
        float *dQ = j->dq + t0 * ldq + h * hd;
        for (int64_t r0 = 0; r0 < S; r0 += BLOCK) {
            const int64_t r1 = min64(r0 + BLOCK, S), m = r1 - r0;
            ab_sgemm_1(0, 1, m, r1, hd, c, Q + r0 * ldq, ldq, K, ldk, 0.0f, P, S);
            causal_softmax(P, S, r0, m, r1);
            ab_sgemm_1(0, 1, m, r1, hd, 1.0f, dO + r0 * ldq, ldq, V, ldk, 0.0f, dS, S);
            causal_softmax_backward(dS, P, S, r0, m, r1, c);
            int exact = !rows_finite(K + r0 * ldk, ldk, m, hd) ||
                        !rows_finite(Q + r0 * ldq, ldq, m, hd) ||
                        !rows_finite(dO + r0 * ldq, ldq, m, hd);
            rows_times(dQ, ldq, dS, S, K, ldk, r0, r1, hd, exact);   /* dQ = dS K */
            cols_times(dK, ldk, dS, S, Q, ldq, r0, r1, hd, exact);   /* dK += dS^T Q */
            cols_times(dV, ldk, P, S, dO, ldq, r0, r1, hd, exact);   /* dV += P^T dO */
        }
    }
}

static int check_heads(int64_t H, int64_t KV, int64_t hd) {
    AB_REQUIRE(H > 0 && KV > 0 && hd > 0 && H % KV == 0, AB_EINVAL);
    AB_MUL_FITS(H, hd);
    AB_BLAS_FITS(H * hd);
    return AB_OK;
}

static int check_args(int64_t B, int64_t S, int64_t H, int64_t KV, int64_t hd,
                      int64_t work_floats) {
    AB_NONNEG(B); AB_NONNEG(S);
    TRY_RC(check_heads(H, KV, hd));
    AB_BLAS_FITS(S);
    AB_MUL_FITS(B, S);
    AB_MUL_FITS(B * S, H * hd);
    AB_REQUIRE(work_floats >= slab_floats(S), AB_EWORKSPACE);   /* at least one worker's slab */
    return AB_OK;
}

/* cu_seqlens: cu[0] = 0, non-decreasing; *N = cu[n_seq], *max_len the longest */
int ab_varlen_check(const int64_t *cu, int64_t n_seq, int64_t *N, int64_t *max_len) {
    AB_NONNEG(n_seq);
    AB_NONNULL(cu);
    AB_REQUIRE(cu[0] == 0, AB_EINVAL);
    int64_t m = 0;
    for (int64_t i = 0; i < n_seq; i++) {
        AB_REQUIRE(cu[i + 1] >= cu[i], AB_EINVAL);
        const int64_t len = cu[i + 1] - cu[i];
        m = len > m ? len : m;
    }
    *N = cu[n_seq];
    *max_len = m;
    return AB_OK;
}

static int check_varlen(const int64_t *cu, int64_t n_seq, int64_t H, int64_t KV, int64_t hd,
                        int64_t work_floats, int64_t *max_len) {
    int64_t N;
    TRY_RC(ab_varlen_check(cu, n_seq, &N, max_len));
    TRY_RC(check_heads(H, KV, hd));
    AB_BLAS_FITS(*max_len);
    AB_MUL_FITS(N, H * hd);
    AB_REQUIRE(work_floats >= slab_floats(*max_len), AB_EWORKSPACE);
    return AB_OK;
}

static int workers_for(int64_t S, int64_t work_floats) {
    const int64_t slab = slab_floats(S), n = slab > 0 ? work_floats / slab : 1;
    return n < AB_MAX_THREADS ? (int)n : AB_MAX_THREADS;
}

/* The full-row and the varlen entry points run the same tasks: full rows
 * are B segments of S tokens each. */
static int run_forward(att_job *j, int64_t max_len, int64_t work_floats) {
    if (j->n_seq == 0 || max_len == 0) return AB_OK;
    AB_NONNULL(j->work);
    j->slab = slab_floats(max_len);
    ab_parallel_for(j->n_seq * j->H, workers_for(max_len, work_floats), forward_task, j);
    return AB_OK;
}

static int run_backward(att_job *j, int64_t max_len, int64_t work_floats) {
    if (j->n_seq == 0 || max_len == 0) return AB_OK;   /* no rows */
    AB_NONNULL(j->work);
    j->slab = slab_floats(max_len);
    ab_parallel_for(j->n_seq * j->KV, workers_for(max_len, work_floats), backward_task, j);
    return AB_OK;
}

int ab_attention_forward(float *out, const float *q, const float *k, const float *v,
                         int64_t B, int64_t S, int64_t H, int64_t KV,
                         int64_t hd, float *work, int64_t work_floats) {
    TRY_RC(check_args(B, S, H, KV, hd, work_floats));
    AB_NONNULL(out); AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    att_job j = {.out = out, .q = q, .k = k, .v = v, .work = work,
                 .n_seq = B, .S = S, .H = H, .KV = KV, .hd = hd};
    return run_forward(&j, B > 0 ? S : 0, work_floats);
}

int ab_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                          const float *q, const float *k, const float *v,
                          int64_t B, int64_t S, int64_t H, int64_t KV,
                          int64_t hd, float *work, int64_t work_floats) {
    TRY_RC(check_args(B, S, H, KV, hd, work_floats));
    AB_NONNULL(dq); AB_NONNULL(dk); AB_NONNULL(dv); AB_NONNULL(dout);
    AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    att_job j = {.dq = dq, .dk = dk, .dv = dv, .dout = dout, .q = q, .k = k, .v = v,
                 .work = work, .n_seq = B, .S = S, .H = H, .KV = KV, .hd = hd};
    return run_backward(&j, B > 0 ? S : 0, work_floats);
}

int ab_attention_forward_varlen(float *out, const float *q, const float *k, const float *v,
                                const int64_t *cu_seqlens, int64_t n_seq, int64_t H,
                                int64_t KV, int64_t hd, float *work, int64_t work_floats) {
    int64_t max_len;
    TRY_RC(check_varlen(cu_seqlens, n_seq, H, KV, hd, work_floats, &max_len));
    AB_NONNULL(out); AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    att_job j = {.out = out, .q = q, .k = k, .v = v, .work = work, .cu = cu_seqlens,
                 .n_seq = n_seq, .H = H, .KV = KV, .hd = hd};
    return run_forward(&j, max_len, work_floats);
}

int ab_attention_backward_varlen(float *dq, float *dk, float *dv, const float *dout,
                                 const float *q, const float *k, const float *v,
                                 const int64_t *cu_seqlens, int64_t n_seq, int64_t H,
                                 int64_t KV, int64_t hd, float *work, int64_t work_floats) {
    int64_t max_len;
    TRY_RC(check_varlen(cu_seqlens, n_seq, H, KV, hd, work_floats, &max_len));
    AB_NONNULL(dq); AB_NONNULL(dk); AB_NONNULL(dv); AB_NONNULL(dout);
    AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    att_job j = {.dq = dq, .dk = dk, .dv = dv, .dout = dout, .q = q, .k = k, .v = v,
                 .work = work, .cu = cu_seqlens, .n_seq = n_seq, .H = H, .KV = KV, .hd = hd};
    return run_backward(&j, max_len, work_floats);
}
