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
 * Every product is an sgemm over row/column blocks of the lower triangle,
 * so the masked upper half is never multiplied. Scratch (P and dP, 2 S^2
 * floats) comes from the caller and is reused for every head. */
#include "ab_internal.h"

#define BLOCK 64

int64_t ab_attention_workspace_floats(int64_t S) {
    return S > 0 ? 2 * S * S : 0;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
/* end of the row block containing row t: the last computed column + 1 */
static inline int64_t block_end(int64_t t, int64_t S) { return min64((t / BLOCK + 1) * BLOCK, S); }

/* P[t, 0:block_end(t)] = c * Q[t] . K[s]  for the lower block triangle */
static void causal_scores(float *P, const float *Q, int64_t ldq, const float *K,
                          int64_t ldk, int64_t S, int64_t hd, float c) {
    for (int64_t r0 = 0; r0 < S; r0 += BLOCK) {
        int64_t r1 = min64(r0 + BLOCK, S);
        ab_sgemm(0, 1, r1 - r0, r1, hd, c, Q + r0 * ldq, ldq, K, ldk, 0.0f, P + r0 * S, S);
    }
}

/* row-wise softmax over s <= t; entries t < s < block_end are zeroed */
AB_HOT
static void causal_softmax(float *P, int64_t S) {
    for (int64_t t = 0; t < S; t++) {
        float *row = P + t * S;
        float m = -INFINITY, sum = 0.0f;
        AB_SIMD_REDUCE(max, m)
        for (int64_t s = 0; s <= t; s++) m = row[s] > m ? row[s] : m;
        AB_SIMD_REDUCE(+, sum)
        for (int64_t s = 0; s <= t; s++) { float e = ab_expf(row[s] - m); row[s] = e; sum += e; }
        const float inv = 1.0f / sum;
        AB_SIMD
        for (int64_t s = 0; s <= t; s++) row[s] *= inv;
        for (int64_t s = t + 1, e = block_end(t, S); s < e; s++) row[s] = 0.0f;
    }
}

/* dS = c * P * (dP - rowsum(P * dP)) in place over dP; zero above the diagonal */
AB_HOT
static void causal_softmax_backward(float *dS, const float *P, int64_t S, float c) {
    for (int64_t t = 0; t < S; t++) {
        const float *pr = P + t * S;
        float *dr = dS + t * S;
        float dot = 0.0f;
        AB_SIMD_REDUCE(+, dot)
        for (int64_t s = 0; s <= t; s++) dot += pr[s] * dr[s];
        AB_SIMD
        for (int64_t s = 0; s <= t; s++) dr[s] = c * pr[s] * (dr[s] - dot);
        for (int64_t s = t + 1, e = block_end(t, S); s < e; s++) dr[s] = 0.0f;
    }
}

static int check_args(int64_t B, int64_t S, int64_t H, int64_t KV, int64_t hd,
                      int64_t work_floats) {
    AB_NONNEG(B); AB_NONNEG(S);
    AB_REQUIRE(H > 0 && KV > 0 && hd > 0 && H % KV == 0, AB_EINVAL);
    AB_BLAS_FITS(H * hd); AB_BLAS_FITS(S);
    AB_REQUIRE(work_floats >= ab_attention_workspace_floats(S), AB_EWORKSPACE);
    return AB_OK;
}

int ab_attention_forward(float *out, const float *q, const float *k, const float *v,
                         int64_t B, int64_t S, int64_t H, int64_t KV,
                         int64_t hd, float *work, int64_t work_floats) {
    int rc = check_args(B, S, H, KV, hd, work_floats);
    if (rc) return rc;
    AB_NONNULL(out); AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    if (B == 0 || S == 0) return AB_OK;
    AB_NONNULL(work);
    const int64_t ldq = H * hd, ldk = KV * hd, group = H / KV;
    const float c = 1.0f / sqrtf((float)hd);
    float *P = work;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / group;
            const float *Q = q + b * S * ldq + h * hd;
            const float *K = k + b * S * ldk + g * hd, *V = v + b * S * ldk + g * hd;
            float *O = out + b * S * ldq + h * hd;
            causal_scores(P, Q, ldq, K, ldk, S, hd, c);
            causal_softmax(P, S);
            for (int64_t r0 = 0; r0 < S; r0 += BLOCK) {
                int64_t r1 = min64(r0 + BLOCK, S);
                ab_sgemm(0, 0, r1 - r0, hd, r1, 1.0f, P + r0 * S, S, V, ldk, 0.0f, O + r0 * ldq, ldq);
            }
        }
    }
    return AB_OK;
}

int ab_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                          const float *q, const float *k, const float *v,
                          int64_t B, int64_t S, int64_t H, int64_t KV,
                          int64_t hd, float *work, int64_t work_floats) {
    int rc = check_args(B, S, H, KV, hd, work_floats);
    if (rc) return rc;
    AB_NONNULL(dq); AB_NONNULL(dk); AB_NONNULL(dv); AB_NONNULL(dout);
    AB_NONNULL(q); AB_NONNULL(k); AB_NONNULL(v);
    if (B == 0 || S == 0) return AB_OK;
    AB_NONNULL(work);
    const int64_t ldq = H * hd, ldk = KV * hd, group = H / KV;
    const float c = 1.0f / sqrtf((float)hd);
    float *P = work, *dS = work + S * S;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t g = h / group;
            const float beta = (h % group == 0) ? 0.0f : 1.0f;  /* first head of a group writes */
            const float *Q = q + b * S * ldq + h * hd, *dO = dout + b * S * ldq + h * hd;
            const float *K = k + b * S * ldk + g * hd, *V = v + b * S * ldk + g * hd;
            float *dQ = dq + b * S * ldq + h * hd;
            float *dK = dk + b * S * ldk + g * hd, *dV = dv + b * S * ldk + g * hd;
            causal_scores(P, Q, ldq, K, ldk, S, hd, c);
            causal_softmax(P, S);
            /* dP = dO V^T on the lower block triangle */
            for (int64_t r0 = 0; r0 < S; r0 += BLOCK) {
                int64_t r1 = min64(r0 + BLOCK, S);
                ab_sgemm(0, 1, r1 - r0, r1, hd, 1.0f, dO + r0 * ldq, ldq, V, ldk, 0.0f, dS + r0 * S, S);
            }
            causal_softmax_backward(dS, P, S, c);
            for (int64_t r0 = 0; r0 < S; r0 += BLOCK) {
                int64_t r1 = min64(r0 + BLOCK, S);
                /* dQ[r0:r1] = dS[r0:r1, 0:r1] K[0:r1] */
                ab_sgemm(0, 0, r1 - r0, hd, r1, 1.0f, dS + r0 * S, S, K, ldk, 0.0f, dQ + r0 * ldq, ldq);
                /* column block [r0,r1): only rows t >= r0 are nonzero there
                 * dV[r0:r1] (+)= P[r0:S, r0:r1]^T dO[r0:S]
                 * dK[r0:r1] (+)= dS[r0:S, r0:r1]^T Q[r0:S] */
                ab_sgemm(1, 0, r1 - r0, hd, S - r0, 1.0f, P + r0 * S + r0, S, dO + r0 * ldq, ldq,
                         beta, dV + r0 * ldk, ldk);
                ab_sgemm(1, 0, r1 - r0, hd, S - r0, 1.0f, dS + r0 * S + r0, S, Q + r0 * ldq, ldq,
                         beta, dK + r0 * ldk, ldk);
            }
        }
    }
    return AB_OK;
}
