/* test_seed_compat.c — the seed's helper functions (anebackward/seed_compat.h)
 * against float64 oracles written here, and the seed's own RMSNorm formula
 * (copied from backward.h) shown to FAIL the same oracle.
 *
 * Built by tests/test_c_library.py and .ci/c-lib with only
 * `anebackward config --cflags --libs` (+ -pthread). Exit 0: all passed.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <anebackward/seed_compat.h>
#include "check.h"

static float *randn(int n) {
    float *p = malloc((size_t)n * sizeof(float));
    for (int i = 0; i < n; i++) p[i] = frand();
    return p;
}

/* ---- the seed's RMSNorm backward, verbatim math (backward.h) ---- */
static void seed_rmsnorm_backward(float *dx, const float *dy, const float *x, const float *w,
                                  int S, int D) {
    for (int t = 0; t < S; t++) {
        float ss = 0;
        for (int i = 0; i < D; i++) ss += x[t*D+i] * x[t*D+i];
        float rms = sqrtf(ss / D + 1e-5f);
        float inv_rms = 1.0f / rms;
        float dot = 0;
        for (int i = 0; i < D; i++) dot += dy[t*D+i] * w[i] * x[t*D+i];
        dot /= (D * rms * rms);
        for (int i = 0; i < D; i++) dx[t*D+i] = dy[t*D+i] * w[i] * inv_rms - x[t*D+i] * dot;
    }
}

static void test_rmsnorm(void) {
    const int S = 7, D = 37;
    float *x = randn(S * D), *dy = randn(S * D), *w = randn(D);
    for (int i = 0; i < S * D; i++) x[i] *= 3.0f;   /* rms far from 1: the rms^2 error shows */
    double *rdx = calloc(S * D, sizeof(double)), *rdw = calloc(D, sizeof(double));
    rmsnorm_backward_oracle(rdx, rdw, dy, x, w, S, D, 1e-5);
    float *dx = malloc(S * D * sizeof(float)), *dw = calloc(D, sizeof(float));
    cpu_rmsnorm_backward(dx, dy, x, w, S, D);
    expect("cpu_rmsnorm_backward dx == float64 oracle (rms^3)", worst(dx, rdx, S * D, 1e-5, 1e-4) <= 1);
    memset(dx, 0, S * D * sizeof(float));
    cpu_rmsnorm_backward_dw(dx, dw, dy, x, w, S, D);
    expect("cpu_rmsnorm_backward_dw dx == oracle", worst(dx, rdx, S * D, 1e-5, 1e-4) <= 1);
    expect("cpu_rmsnorm_backward_dw dw == oracle (seed: never computed)",
           worst(dw, rdw, D, 1e-5, 1e-4) <= 1);
    seed_rmsnorm_backward(dx, dy, x, w, S, D);
    expect("the seed's formula (rms^2) FAILS the same oracle", worst(dx, rdx, S * D, 1e-5, 1e-4) > 1);
    free(x); free(dy); free(w); free(rdx); free(rdw); free(dx); free(dw);
}

static void test_linear(void) {
    const int S = 5, in = 19, out = 11;
    float *dy = randn(S * out), *x = randn(S * in), *W = randn(out * in);
    float *dW = randn(out * in), *dx = malloc(S * in * sizeof(float));
    double *rdW = malloc(out * in * sizeof(double)), *rdx = calloc(S * in, sizeof(double));
    for (int i = 0; i < out * in; i++) rdW[i] = dW[i];   /* accumulates onto what is there */
    for (int t = 0; t < S; t++)
        for (int i = 0; i < out; i++)
            for (int j = 0; j < in; j++) {
                rdW[i*in+j] += (double)dy[t*out+i] * x[t*in+j];
                rdx[t*in+j] += (double)W[i*in+j] * dy[t*out+i];
            }
    cpu_accum_dW(dW, dy, x, S, out, in);
    expect("cpu_accum_dW (+=) == oracle", worst(dW, rdW, out * in, 1e-5, 1e-5) <= 1);
    cpu_matmul_backward_dx(W, dy, dx, S, out, in);
    expect("cpu_matmul_backward_dx == oracle", worst(dx, rdx, S * in, 1e-5, 1e-5) <= 1);
    free(dy); free(x); free(W); free(dW); free(dx); free(rdW); free(rdx);
}

static void test_silu(void) {
    double w = 0;
    for (float xv = -30.0f; xv <= 30.0f; xv += 0.37f) {
        double h = 1e-5, f1 = (xv + h) / (1 + exp(-(xv + h))), f0 = (xv - h) / (1 + exp(-(xv - h)));
        double e = fabs(silu_backward(xv) - (f1 - f0) / (2 * h)) / (1e-5 + 1e-4 * fabs((f1 - f0) / (2 * h)));
        if (!(e <= w)) w = e;
    }
    expect("silu_backward == float64 finite differences", w <= 1);
    expect("silu_backward(-200) finite (no exp overflow)", isfinite(silu_backward(-200.0f)));
}

/* float64 causal attention backward of one head layout [S, H*hd] */
static void attention_oracle(double *dq, double *dk, double *dv, const float *dout, const float *q,
                             const float *k, const float *v, int S, int H, int hd) {
    const int D = H * hd;
    double *p = malloc(S * sizeof(double)), *dp = malloc(S * sizeof(double));
    memset(dq, 0, S * D * sizeof(double)); memset(dk, 0, S * D * sizeof(double));
    memset(dv, 0, S * D * sizeof(double));
    for (int h = 0; h < H; h++)
        for (int t = 0; t < S; t++) {
            double mx = -INFINITY, sum = 0, dsum = 0;
            for (int s = 0; s <= t; s++) {
                double d = 0;
                for (int i = 0; i < hd; i++) d += (double)q[t*D+h*hd+i] * k[s*D+h*hd+i];
                p[s] = d / sqrt((double)hd);
                if (p[s] > mx) mx = p[s];
            }
            for (int s = 0; s <= t; s++) { p[s] = exp(p[s] - mx); sum += p[s]; }
            for (int s = 0; s <= t; s++) {
                p[s] /= sum;
                double d = 0;
                for (int i = 0; i < hd; i++) d += (double)dout[t*D+h*hd+i] * v[s*D+h*hd+i];
                dp[s] = d;
                dsum += p[s] * d;
            }
            for (int s = 0; s <= t; s++) {
                double ds = p[s] * (dp[s] - dsum) / sqrt((double)hd);
                for (int i = 0; i < hd; i++) {
                    dq[t*D+h*hd+i] += ds * k[s*D+h*hd+i];
                    dk[s*D+h*hd+i] += ds * q[t*D+h*hd+i];
                    dv[s*D+h*hd+i] += p[s] * dout[t*D+h*hd+i];
                }
            }
        }
    free(p); free(dp);
}

typedef struct { const float *dout, *q, *k, *v; float *dq, *dk, *dv; int S, H, hd, reps; } att_job;
static void *attention_worker(void *arg) {
    att_job *j = arg;
    for (int r = 0; r < j->reps; r++)
        cpu_attention_backward(j->dq, j->dk, j->dv, j->dout, j->q, j->k, j->v, j->S, j->H, j->hd);
    return NULL;
}

static void test_attention(void) {
    const int S = 23, H = 3, hd = 6, D = H * hd;
    float *q = randn(S * D), *k = randn(S * D), *v = randn(S * D), *dout = randn(S * D);
    float *dq = malloc(S * D * sizeof(float)), *dk = malloc(S * D * sizeof(float));
    float *dv = malloc(S * D * sizeof(float));
    double *rq = malloc(S * D * sizeof(double)), *rk = malloc(S * D * sizeof(double));
    double *rv = malloc(S * D * sizeof(double));
    attention_oracle(rq, rk, rv, dout, q, k, v, S, H, hd);
    cpu_attention_backward(dq, dk, dv, dout, q, k, v, S, H, hd);
    expect("cpu_attention_backward dq, dk, dv == float64 oracle",
           worst(dq, rq, S * D, 1e-5, 1e-4) <= 1 && worst(dk, rk, S * D, 1e-5, 1e-4) <= 1
           && worst(dv, rv, S * D, 1e-5, 1e-4) <= 1);
    /* thread safety: concurrent calls (scratch is per call) give the serial result */
    enum { T = 4 };
    pthread_t th[T];
    att_job jobs[T];
    float *outs = malloc((size_t)T * 3 * S * D * sizeof(float));
    for (int i = 0; i < T; i++) {
        float *o = outs + (size_t)i * 3 * S * D;
        jobs[i] = (att_job){dout, q, k, v, o, o + S * D, o + 2 * S * D, S, H, hd, 50};
        pthread_create(&th[i], NULL, attention_worker, &jobs[i]);
    }
    int same = 1;
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        const float *o = outs + (size_t)i * 3 * S * D;
        same &= !memcmp(o, dq, S * D * sizeof(float)) && !memcmp(o + S * D, dk, S * D * sizeof(float))
                && !memcmp(o + 2 * S * D, dv, S * D * sizeof(float));
    }
    expect("cpu_attention_backward from 4 threads == serial, bit for bit", same);
    free(q); free(k); free(v); free(dout); free(dq); free(dk); free(dv); free(rq); free(rk);
    free(rv); free(outs);
}

static void test_rope(void) {
    const int S = 9, H = 2, hd = 8, D = H * hd;
    float *dq = randn(S * D), *dk = randn(S * D);
    double *rq = malloc(S * D * sizeof(double)), *rk = malloc(S * D * sizeof(double));
    for (int t = 0; t < S; t++)   /* rotate back by -t * 10000^(-i/hd): the transpose */
        for (int h = 0; h < H; h++)
            for (int i = 0; i < hd; i += 2) {
                double a = t * (double)(1.0f / powf(10000.0f, (float)i / hd));
                int o = t * D + h * hd + i;
                rq[o] = dq[o] * cos(a) + dq[o+1] * sin(a); rq[o+1] = -dq[o] * sin(a) + dq[o+1] * cos(a);
                rk[o] = dk[o] * cos(a) + dk[o+1] * sin(a); rk[o+1] = -dk[o] * sin(a) + dk[o+1] * cos(a);
            }
    cpu_rope_backward(dq, dk, S, H, hd);
    expect("cpu_rope_backward (in place) == float64 oracle",
           worst(dq, rq, S * D, 1e-5, 1e-4) <= 1 && worst(dk, rk, S * D, 1e-5, 1e-4) <= 1);
    free(dq); free(dk); free(rq); free(rk);
}

static void test_clip_adam(void) {
    const int n = 1001;
    float *g = randn(n);
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)g[i] * g[i];
    double *rg = malloc(n * sizeof(double));
    for (int i = 0; i < n; i++) rg[i] = g[i] * (0.5 / sqrt(ss));
    float norm = cpu_clip_gradients(g, n, 0.5f);
    expect("cpu_clip_gradients: norm before, grads scaled to 0.5",
           fabs(norm - sqrt(ss)) <= 1e-5 * sqrt(ss) && worst(g, rg, n, 1e-7, 1e-5) <= 1);
    float *p = randn(n), *m = calloc(n, sizeof(float)), *v = calloc(n, sizeof(float));
    double *rp = malloc(n * sizeof(double)), *rm = calloc(n, sizeof(double)), *rv = calloc(n, sizeof(double));
    for (int i = 0; i < n; i++) rp[i] = p[i];
    int step = 0;
    for (int it = 1; it <= 3; it++) {
        cpu_adam_step(p, g, m, v, n, &step, 1e-2f, 0.9f, 0.999f, 1e-8f);
        for (int i = 0; i < n; i++) {
            rm[i] = 0.9 * rm[i] + 0.1 * g[i];
            rv[i] = 0.999 * rv[i] + 0.001 * (double)g[i] * g[i];
            rp[i] -= 1e-2 * (rm[i] / (1 - pow(0.9, it))) / (sqrt(rv[i] / (1 - pow(0.999, it))) + 1e-8);
        }
    }
    expect("cpu_adam_step x3 == float64 Adam, step counter 3", step == 3 && worst(p, rp, n, 1e-6, 1e-5) <= 1);
    free(g); free(rg); free(p); free(m); free(v); free(rp); free(rm); free(rv);
}

static void test_errors(void) {
    seed_compat_last_error();
    float x[4] = {0};
    cpu_rmsnorm_backward(x, x, x, NULL, 1, 4);
    expect("a NULL weight is reported (AB_ENULL), not a crash", seed_compat_last_error() == AB_ENULL);
    expect("the error is cleared once read", seed_compat_last_error() == AB_OK);
    cpu_attention_backward(x, x, x, x, x, x, x, 0, 1, 2);
    expect("S = 0 is reported (AB_EINVAL)", seed_compat_last_error() == AB_EINVAL);
}

int main(void) {
    rng_state = 88172645463325252ULL;   /* this program's own inputs: its own seed */
    test_rmsnorm();
    test_linear();
    test_silu();
    test_attention();
    test_rope();
    test_clip_adam();
    test_errors();
    return finish();
}
