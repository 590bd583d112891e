/* test_capi.c — libanebackward from a C program, built with nothing but
 * `anebackward config --cflags --libs`: kernels against float64 loops, the
 * model (forward, backward against central differences of its own loss,
 * the KV-cache decoder against the full forward), the backward's state
 * checks, the backward's gradient-ready callback, version and threads. Exit 0: all passed.
 *
 *   test_capi [EXPECTED_VERSION]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <anebackward.h>
#include "check.h"

static void test_kernels(void) {
    enum { N = 6, IN = 13, OUT = 9 };
    float x[N * IN], W[OUT * IN], dy[N * OUT], y[N * OUT], dx[N * IN], dW[OUT * IN];
    double ry[N * OUT] = {0}, rdx[N * IN] = {0}, rdW[OUT * IN] = {0};
    for (int i = 0; i < N * IN; i++) x[i] = frand();
    for (int i = 0; i < OUT * IN; i++) W[i] = frand();
    for (int i = 0; i < N * OUT; i++) dy[i] = frand();
    for (int t = 0; t < N; t++)
        for (int o = 0; o < OUT; o++)
            for (int i = 0; i < IN; i++) {
                ry[t * OUT + o] += (double)x[t * IN + i] * W[o * IN + i];
                rdx[t * IN + i] += (double)dy[t * OUT + o] * W[o * IN + i];
                rdW[o * IN + i] += (double)dy[t * OUT + o] * x[t * IN + i];
            }
    expect("ab_linear_forward == float64",
           ab_linear_forward(y, x, W, N, IN, OUT) == AB_OK
           && worst(y, ry, N * OUT, 1e-5, 1e-4) <= 1);
    expect("ab_linear_backward_dx == float64",
           ab_linear_backward_dx(dx, dy, W, N, IN, OUT, 0) == AB_OK
           && worst(dx, rdx, N * IN, 1e-5, 1e-4) <= 1);
    expect("ab_linear_backward_dW == float64",
           ab_linear_backward_dW(dW, dy, x, N, IN, OUT, 0) == AB_OK
           && worst(dW, rdW, OUT * IN, 1e-5, 1e-4) <= 1);

    float w[IN], rx[N * IN], rw[IN];
    double rrx[N * IN], rrw[IN] = {0};
    for (int i = 0; i < IN; i++) w[i] = frand();
    rmsnorm_backward_oracle(rrx, rrw, dx, x, w, N, IN, 1e-5);
    memset(rw, 0, sizeof rw);
    expect("ab_rmsnorm_backward dx, dw == float64",
           ab_rmsnorm_backward(rx, rw, dx, x, w, N, IN, 1e-5f, 0) == AB_OK
           && worst(rx, rrx, N * IN, 1e-5, 1e-4) <= 1 && worst(rw, rrw, IN, 1e-5, 1e-4) <= 1);
    expect("a kernel refuses NULL with AB_ENULL",
           ab_linear_forward(NULL, x, W, N, IN, OUT) == AB_ENULL);
    expect("ab_strerror names the code", strstr(ab_strerror(AB_ENULL), "NULL") != NULL);
}

/* ab_model_backward_notify's callback: the groups in order, none twice */
typedef struct { int64_t seen[16]; int n; } ready_log;
static void on_ready(void *user, int64_t group) {
    ready_log *r = user;
    if (r->n < 16) r->seen[r->n] = group;
    r->n++;
}

static void test_model(void) {
    /* the architecture only; options NULL: the defaults (fp32, no recomputation) */
    ab_model_config c = {.struct_size = sizeof c, .dim = 16, .hidden_dim = 40, .n_layers = 2,
                         .n_heads = 4, .n_kv_heads = 2, .vocab_size = 23, .max_seq_len = 12,
                         .shared_classifier = 0, .norm_eps = 1e-5f};
    ab_model_layout P;
    expect("ab_model_param_layout", ab_model_param_layout(&c, &P) == AB_OK && P.n_params > 0);
    /* the tensor table: 1 + 7 L + 1 + 2 L + 1 tensors, packed, ending at n_params */
    ab_model_tensor T[32];
    int64_t nt = 0, end = 0;
    expect("ab_model_tensors (count)", ab_model_tensors(&c, NULL, 0, &nt) == AB_OK && nt == 21);
    expect("ab_model_tensors", ab_model_tensors(&c, T, 32, &nt) == AB_OK && nt == 21);
    for (int64_t i = 0; i < nt; i++) {
        expect("ab_model_tensors: packed in order", T[i].offset == end);
        end += T[i].shape[0] * (T[i].ndim == 2 ? T[i].shape[1] : 1);
    }
    expect("ab_model_tensors: covers params", end == P.n_params);
    expect("ab_model_tensors: names", strcmp(T[1].name, "layers.0.attention.wq.weight") == 0
           && strcmp(T[20].name, "norm.weight") == 0 && T[20].group == 2 && T[0].group == -1);
    expect("ab_model_tensors: wk is [kv_dim, dim]", T[3].shape[0] == 8 && T[3].shape[1] == 16);
    expect("ab_model_tensors: capacity too small",
           ab_model_tensors(&c, T, 20, &nt) == AB_EINVAL);
    const int64_t B = 2, S = 7, N = B * S;
    int64_t nw;
    expect("ab_model_workspace_floats", ab_model_workspace_floats(&c, B, S, &nw, NULL) == AB_OK);
    float *params = malloc(P.n_params * sizeof(float)), *grads = malloc(P.n_params * sizeof(float));
    float *work = calloc(nw, sizeof(float));
    for (int64_t i = 0; i < P.n_params; i++) params[i] = 0.3f * frand();
    for (int64_t i = P.n_decay; i < P.n_params; i++) params[i] = 1.0f + 0.1f * frand();
    int32_t tok[14], tgt[14];
    for (int i = 0; i < N; i++) tok[i] = (i * 5 + 3) % 23;
    for (int i = 0; i < N; i++) tgt[i] = (i % S == S - 1) ? -1 : tok[i + 1];

    expect("backward before any forward: AB_EINVAL",
           ab_model_backward(&c, params, grads, B, S, 1.0f, 0, work, nw) == AB_EINVAL);
    double loss;
    expect("ab_model_forward (want_grad)",
           ab_model_forward(&loss, &c, params, tok, tgt, B, S, 1, work, nw) == AB_OK && isfinite(loss));
    expect("backward with another (B, S): AB_EINVAL",
           ab_model_backward(&c, params, grads, 1, N, 1.0f, 0, work, nw) == AB_EINVAL);
    tok[0] = 999;   /* the backward uses the forward's copy, not this buffer */
    expect("ab_model_backward", ab_model_backward(&c, params, grads, B, S, 1.0f, 0, work, nw) == AB_OK);
    tok[0] = 3;
    expect("a second backward of the same forward: AB_EINVAL",
           ab_model_backward(&c, params, grads, B, S, 1.0f, 0, work, nw) == AB_EINVAL);
    expect("... and ab_last_error() says one backward per forward",
           strstr(ab_last_error(), "one backward per forward") != NULL);
    /* the same backward announcing its gradient groups: head, layers 1 and 0, embedding */
    float *grads2 = malloc(P.n_params * sizeof(float));
    ready_log log = {{0}, 0};
    ab_model_forward(&loss, &c, params, tok, tgt, B, S, 1, work, nw);
    expect("ab_model_backward_notify",
           ab_model_backward_notify(&c, params, grads2, B, S, 1.0f, 0, work, nw, on_ready, &log)
           == AB_OK);
    expect("  groups announced in order: 2 (head), 1, 0, -1 (embedding)",
           log.n == 4 && log.seen[0] == 2 && log.seen[1] == 1 && log.seen[2] == 0
           && log.seen[3] == -1);
    expect("  gradients bit-identical to ab_model_backward",
           memcmp(grads, grads2, P.n_params * sizeof(float)) == 0);

    /* the same rows as a varlen batch (one segment each, positions from the
     * segment): the full-row path is that case, so bit-identical */
    const int64_t cu[3] = {0, S, 2 * S};
    ab_batch_layout lay = {.n_tokens = N, .n_seq = 2, .cu_seqlens = cu, .positions = NULL,
                           .loss_denominator = 0.0};
    double loss_v;
    expect("ab_model_forward_batch",
           ab_model_forward_batch(&loss_v, &c, params, tok, tgt, B, S, &lay, 1, work, nw) == AB_OK
           && loss_v == loss);
    expect("  its backward: gradients bit-identical to the full rows'",
           ab_model_backward(&c, params, grads2, B, S, 1.0f, 0, work, nw) == AB_OK
           && memcmp(grads, grads2, P.n_params * sizeof(float)) == 0);
    /* padding removed: 7 + 3 real tokens in the (B, S) workspace, loss over 10 - 2 targets
     * divided by a caller's denominator */
    const int64_t cu2[3] = {0, S, S + 3};
    int32_t tgt2[10];
    for (int i = 0; i < 10; i++) tgt2[i] = (i == S - 1 || i == 9) ? -1 : tok[i + 1];
    ab_batch_layout lay2 = {.n_tokens = 10, .n_seq = 2, .cu_seqlens = cu2, .positions = NULL,
                            .loss_denominator = 16.0};
    double l_mean, l_sum;
    lay2.loss_denominator = 0.0;
    ab_model_forward_batch(&l_mean, &c, params, tok, tgt2, B, S, &lay2, 0, work, nw);
    lay2.loss_denominator = 16.0;
    expect("a padded batch: loss = sum / loss_denominator",
           ab_model_forward_batch(&l_sum, &c, params, tok, tgt2, B, S, &lay2, 1, work, nw) == AB_OK
           && fabs(l_sum - l_mean * 8.0 / 16.0) <= 1e-12 * fabs(l_mean)
           && ab_model_backward(&c, params, grads2, B, S, 1.0f, 0, work, nw) == AB_OK);
    free(grads2);

    /* central differences of the loss (double) at the largest gradient of each tensor */
    const int64_t starts[] = {P.tok_embeddings, P.wq, P.wk, P.w2, P.output, P.ffn_norm, P.norm};
    const int64_t ends[] = {P.wq, P.wk, P.wv, P.w3, P.attention_norm, P.norm, P.n_params};
    int ok = 1;
    for (int r = 0; r < 7; r++) {
        int64_t best = starts[r];
        for (int64_t i = starts[r]; i < ends[r]; i++)
            if (fabsf(grads[i]) > fabsf(grads[best])) best = i;
        const float h = 1e-2f, p0 = params[best];
        double lp, lm;
        params[best] = p0 + h;
        ab_model_forward(&lp, &c, params, tok, tgt, B, S, 0, work, nw);
        params[best] = p0 - h;
        ab_model_forward(&lm, &c, params, tok, tgt, B, S, 0, work, nw);
        params[best] = p0;
        double fd = (lp - lm) / ((double)(p0 + h) - (double)(p0 - h));
        int this_ok = fabs(fd - grads[best]) <= 2e-4 + 0.03 * fabs(fd);
        if (!this_ok)
            printf("  param %lld: backward %.6g, central difference %.6g\n", (long long)best,
                   grads[best], fd);
        ok &= this_ok;
    }
    expect("model gradients == central differences of the loss", ok);

    /* KV-cache decoding == the full forward's logits, position by position */
    int64_t nkv, ndec;
    expect("decode sizes through out-parameters",
           ab_model_kv_cache_floats(&c, &nkv) == AB_OK && ab_model_decode_workspace_floats(&c, &ndec) == AB_OK);
    float *kv = calloc(nkv, sizeof(float)), *dw = calloc(ndec, sizeof(float));
    float *lg = malloc(c.vocab_size * sizeof(float));
    int64_t nw1, off1;   /* the workspace of (B, S) is big enough for (1, S) */
    ab_model_workspace_floats(&c, 1, S, &nw1, &off1);
    ab_model_forward(NULL, &c, params, tok, NULL, 1, S, 0, work, nw);
    double worst = 0;
    for (int64_t pos = 0; pos < S; pos++) {
        if (ab_model_decode(lg, &c, params, tok[pos], pos, kv, dw, ndec) != AB_OK) worst = INFINITY;
        for (int64_t v = 0; v < c.vocab_size; v++) {
            double d = fabs(lg[v] - work[off1 + pos * c.vocab_size + v]);
            if (!(d <= worst)) worst = d;
        }
    }
    expect("ab_model_decode == forward logits (KV cache)", worst < 1e-4);
    ab_model_config bad = c;
    bad.n_heads = 3;
    expect("a bad config: AB_EINVAL from the size functions",
           ab_model_kv_cache_floats(&bad, &nkv) == AB_EINVAL);
    /* struct_size: an unset (0) or unknown size is refused before any other
     * field is read, and ab_last_error() names the field and the fix */
    const uint32_t sizes[] = {0, (uint32_t)sizeof(ab_model_config) - 8,
                              (uint32_t)sizeof(ab_model_config) + 8};
    const uint32_t osizes[] = {0, (uint32_t)sizeof(ab_model_options) - 8,
                               (uint32_t)sizeof(ab_model_options) + 8};
    ab_model_options bad_o = {.struct_size = sizeof bad_o};
    for (int i = 0; i < 3; i++) {
        bad = c;
        bad.struct_size = sizes[i];
        ab_clear_error();
        expect("a wrong config struct_size: AB_EINVAL", ab_model_param_layout(&bad, &P) == AB_EINVAL
               && ab_model_forward(&loss, &bad, params, tok, tgt, B, S, 1, work, nw) == AB_EINVAL);
        expect("a wrong config struct_size: ab_last_error says struct_size and sizeof",
               strstr(ab_last_error(), "ab_model_config.struct_size") != NULL
               && strstr(ab_last_error(), "sizeof(ab_model_config)") != NULL);
        bad = c;
        bad_o.struct_size = osizes[i];
        bad.options = &bad_o;
        ab_clear_error();
        expect("a wrong options struct_size: AB_EINVAL",
               ab_model_workspace_floats(&bad, B, S, &nkv, NULL) == AB_EINVAL);
        expect("a wrong options struct_size: ab_last_error says so",
               strstr(ab_last_error(), "ab_model_options.struct_size") != NULL);
    }
    /* the same architecture under other options: recomputation gives the
     * default's gradients bit for bit (in a workspace of its own size) */
    ab_model_options rec = {.struct_size = sizeof rec, .recompute = 1};
    ab_model_config crec = c;
    crec.options = &rec;
    int64_t nwr = 0;
    expect("workspace with options", ab_model_workspace_floats(&crec, B, S, &nwr, NULL) == AB_OK
           && nwr > 0 && nwr < nw);
    float *workr = calloc(nwr, sizeof(float)), *gr = malloc(P.n_params * sizeof(float));
    float *g0 = malloc(P.n_params * sizeof(float));
    expect("default forward + backward",
           ab_model_forward(&loss, &c, params, tok, tgt, B, S, 1, work, nw) == AB_OK
           && ab_model_backward(&c, params, g0, B, S, 1.0f, 0, work, nw) == AB_OK);
    expect("recompute forward + backward",
           ab_model_forward(&loss, &crec, params, tok, tgt, B, S, 1, workr, nwr) == AB_OK
           && ab_model_backward(&crec, params, gr, B, S, 1.0f, 0, workr, nwr) == AB_OK);
    expect("options.recompute: the same gradients bit for bit",
           memcmp(g0, gr, P.n_params * sizeof(float)) == 0);
    free(workr); free(gr); free(g0);
    free(params); free(grads); free(work); free(kv); free(dw); free(lg);
}

int main(int argc, char **argv) {
    const char *v = ab_version();
    printf("libanebackward %s, %s, %d threads\n", v, ab_blas_name(), ab_get_num_threads());
    expect("ab_version", v && *v && (argc < 2 || !strcmp(v, argv[1])));
    expect("ab_set_num_threads(1)", ab_set_num_threads(1) == AB_OK && ab_get_num_threads() == 1);
    expect("ab_set_num_threads(0): AB_EINVAL", ab_set_num_threads(0) == AB_EINVAL);
    test_kernels();
    test_model();
    return finish();
}
