/* train.c — train a llama2.c checkpoint with libanebackward, from C.
 *
 * In llama2.c's spirit: one file, no dependencies beyond the library.
 * Loads a llama2.c "v0" checkpoint, runs N steps of forward + backward +
 * AdamW (weight decay on the 2-D weights only, as llama2.c's train.py), on a
 * pretokenized .bin shard (uint16 token ids, llama2.c's format) or on a
 * synthetic pattern, prints the loss and ms/step, and saves the checkpoint
 * atomically (a temporary file in the same directory, fsync, rename).
 *
 * Batches: step i reads B*S consecutive tokens of the stream starting at
 * i*B*S (wrapping around its end); in each row of S tokens, position t
 * predicts t+1 (the last position predicts nothing) — the same as
 * anebackward.Llama.forward(tokens) with its default targets, so the Python
 * API reproduces this run bit for bit.
 *
 * The checkpoint is any llama2.c "v0" file, e.g. the one the package's main
 * job writes (`anebackward train` -> runs/default/model.bin):
 *
 *   make && ./train ../../runs/default/model.bin -n 20 -o trained.bin
 *   ./train model.bin -d data00.bin -b 8 -s 256 --lr 5e-4
 *
 * The output is created with the usual permissions (0666 minus the umask).
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/stat.h>
#include <unistd.h>

#include <anebackward.h>

typedef struct {
    const char *checkpoint, *out, *data;
    long steps, batch, seq_len;
    double lr, beta1, beta2, eps, weight_decay, clip;
} options;

static void usage(FILE *f) {
    fprintf(f,
        "usage: train CHECKPOINT [options]\n"
        "  CHECKPOINT      a llama2.c v0 model.bin (e.g. runs/default/model.bin from `anebackward train`)\n"
        "  -n STEPS        training steps (default 20)\n"
        "  -b BATCH        sequences per step (default 4)\n"
        "  -s SEQ_LEN      tokens per sequence, 2..max_seq_len (default min(64, max_seq_len))\n"
        "  -d DATA.bin     pretokenized uint16 tokens (default: a synthetic pattern)\n"
        "  -o OUT.bin      write the trained checkpoint here (atomically)\n"
        "  --lr X          learning rate (default 5e-4)\n"
        "  --beta1 X --beta2 X --eps X --weight-decay X   AdamW (0.9, 0.95, 1e-8, 0.1)\n"
        "  --clip X        clip the global gradient norm to X (default 0: off)\n");
}

static int fail(const char *what, const char *detail) {
    fprintf(stderr, "train: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    return 1;
}

static int parse_long(const char *name, const char *s, long lo, long *out) {
    char *end;
    errno = 0;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || errno || *end || end == s || v < lo) {
        fprintf(stderr, "train: %s must be an integer >= %ld, got '%s'\n", name, lo, s ? s : "");
        return 1;
    }
    *out = v;
    return 0;
}

static int parse_double(const char *name, const char *s, double lo, double *out) {
    char *end;
    errno = 0;
    double v = s ? strtod(s, &end) : 0;
    if (!s || errno || *end || end == s || !isfinite(v) || v < lo) {
        fprintf(stderr, "train: %s must be a finite number >= %g, got '%s'\n", name, lo, s ? s : "");
        return 1;
    }
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, options *o) {
    *o = (options){NULL, NULL, NULL, 20, 4, 0, 5e-4, 0.9, 0.95, 1e-8, 0.1, 0.0};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0, takes = 1;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        else if (!strcmp(a, "-n")) bad = parse_long("-n", v, 1, &o->steps);
        else if (!strcmp(a, "-b")) bad = parse_long("-b", v, 1, &o->batch);
        else if (!strcmp(a, "-s")) bad = parse_long("-s", v, 2, &o->seq_len);
        else if (!strcmp(a, "-d")) { o->data = v; bad = !v; }
        else if (!strcmp(a, "-o")) { o->out = v; bad = !v; }
        else if (!strcmp(a, "--lr")) bad = parse_double("--lr", v, 0, &o->lr);
        else if (!strcmp(a, "--beta1")) bad = parse_double("--beta1", v, 0, &o->beta1);
        else if (!strcmp(a, "--beta2")) bad = parse_double("--beta2", v, 0, &o->beta2);
        else if (!strcmp(a, "--eps")) bad = parse_double("--eps", v, 0, &o->eps);
        else if (!strcmp(a, "--weight-decay")) bad = parse_double("--weight-decay", v, 0, &o->weight_decay);
        else if (!strcmp(a, "--clip")) bad = parse_double("--clip", v, 0, &o->clip);
        else if (a[0] != '-' && !o->checkpoint) { o->checkpoint = a; takes = 0; }
        else { fprintf(stderr, "train: unknown argument '%s'\n", a); usage(stderr); return 1; }
        if (bad) {
            if (!v) fprintf(stderr, "train: %s needs a value\n", a);
            return 1;
        }
        i += takes;
    }
    if (!o->checkpoint) { usage(stderr); return fail("no checkpoint given", NULL); }
    if (o->beta1 >= 1.0 || o->beta2 >= 1.0) return fail("--beta1 and --beta2 must be below 1", NULL);
    return 0;
}

/* ---- llama2.c v0 checkpoint: 7 int32, then the weights in file order ---- */

/* (offset in the flat layout, floats) of each stored stack, in file order;
 * offset -1: the two RoPE tables, skipped on load, recomputed on save. */
typedef struct { int64_t offset, n; } region;

static int file_regions(const ab_model_config *c, const ab_model_layout *P, region r[13]) {
    const int64_t L = c->n_layers, D = c->dim, Hd = c->hidden_dim, V = c->vocab_size;
    const int64_t hd = D / c->n_heads, kv = hd * c->n_kv_heads;
    region all[13] = {
        {P->tok_embeddings, V * D}, {P->attention_norm, L * D}, {P->wq, L * D * D},
        {P->wk, L * kv * D}, {P->wv, L * kv * D}, {P->wo, L * D * D}, {P->ffn_norm, L * D},
        {P->w1, L * Hd * D}, {P->w2, L * D * Hd}, {P->w3, L * Hd * D}, {P->norm, D},
        {-1, c->max_seq_len * hd}, {P->output, V * D}};
    memcpy(r, all, sizeof all);
    return c->shared_classifier ? 12 : 13;
}

static int load_checkpoint(const char *path, ab_model_config *c, ab_model_layout *P,
                           float **params_out) {
    FILE *f = fopen(path, "rb");
    if (!f) return fail(path, strerror(errno));
    int32_t h[7];
    if (fread(h, sizeof h, 1, f) != 1) { fclose(f); return fail(path, "too short for a header"); }
    /* designated: the fields not named (head_dim, qk_norm, rope, ...) are
     * zero, which is llama2.c's model */
    *c = (ab_model_config){.struct_size = sizeof(ab_model_config),
                           .dim = h[0], .hidden_dim = h[1], .n_layers = h[2], .n_heads = h[3],
                           .n_kv_heads = h[4], .vocab_size = h[5] < 0 ? -(int64_t)h[5] : h[5],
                           .max_seq_len = h[6], .shared_classifier = h[5] > 0,
                           .norm_eps = 1e-5f};
    int rc = ab_model_param_layout(c, P);
    if (rc) {
        fclose(f);
        fprintf(stderr, "train: %s: not a valid llama2.c header (dim=%d hidden_dim=%d n_layers=%d "
                "n_heads=%d n_kv_heads=%d vocab_size=%d max_seq_len=%d): %s\n", path, h[0], h[1],
                h[2], h[3], h[4], h[5], h[6], ab_strerror(rc));
        return 1;
    }
    region r[13];
    int nr = file_regions(c, P, r);
    int64_t want = (int64_t)sizeof h;
    for (int i = 0; i < nr; i++) want += 4 * r[i].n;
    if (fseek(f, 0, SEEK_END) || ftell(f) != want) {
        fprintf(stderr, "train: %s: the file has %ld bytes, its header needs %lld "
                "(wrong file or truncated)\n", path, ftell(f), (long long)want);
        fclose(f);
        return 1;
    }
    fseek(f, (long)sizeof h, SEEK_SET);
    float *params = calloc((size_t)P->n_params, sizeof(float));
    if (!params) { fclose(f); return fail("out of memory for the parameters", NULL); }
    for (int i = 0; i < nr; i++) {
        if (r[i].offset < 0) { fseek(f, (long)(4 * r[i].n), SEEK_CUR); continue; }
        if (fread(params + r[i].offset, sizeof(float), (size_t)r[i].n, f) != (size_t)r[i].n) {
            free(params); fclose(f);
            return fail(path, "read error");
        }
    }
    fclose(f);
    for (int64_t i = 0; i < P->n_params; i++)
        if (!isfinite(params[i])) { free(params); return fail(path, "holds a NaN or infinite weight"); }
    *params_out = params;
    return 0;
}

/* llama2.c's precompute_freqs_cis tables (float): cos, then sin of t * f_i. */
static int write_freq_cis(FILE *f, const ab_model_config *c) {
    const int64_t hd = c->dim / c->n_heads;
    for (int table = 0; table < 2; table++)
        for (int64_t t = 0; t < c->max_seq_len; t++)
            for (int64_t i = 0; i < hd; i += 2) {
                float freq = 1.0f / powf(10000.0f, (float)i / (float)hd);
                float a = (float)t * freq, x = table ? sinf(a) : cosf(a);
                if (fwrite(&x, sizeof x, 1, f) != 1) return 1;
            }
    return 0;
}

static int save_checkpoint(const char *path, const ab_model_config *c, const ab_model_layout *P,
                           const float *params) {
    size_t n = strlen(path);
    char *tmp = malloc(n + 16);
    if (!tmp) return fail("out of memory", NULL);
    snprintf(tmp, n + 16, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) { fprintf(stderr, "train: cannot create %s: %s\n", tmp, strerror(errno)); free(tmp); return 1; }
    mode_t mask = umask(0);   /* mkstemp creates 0600: give the file the mode open() would */
    umask(mask);
    FILE *f = fchmod(fd, 0666 & ~mask) ? NULL : fdopen(fd, "wb");
    int32_t h[7] = {(int32_t)c->dim, (int32_t)c->hidden_dim, (int32_t)c->n_layers,
                    (int32_t)c->n_heads, (int32_t)c->n_kv_heads,
                    (int32_t)(c->shared_classifier ? c->vocab_size : -c->vocab_size),
                    (int32_t)c->max_seq_len};
    int bad = !f || fwrite(h, sizeof h, 1, f) != 1;
    region r[13];
    int nr = file_regions(c, P, r);
    for (int i = 0; i < nr && !bad; i++)
        bad = r[i].offset < 0 ? write_freq_cis(f, c)
                              : fwrite(params + r[i].offset, sizeof(float), (size_t)r[i].n, f)
                                    != (size_t)r[i].n;
    bad = bad || fflush(f) || fsync(fileno(f));
    if (f) bad = fclose(f) || bad; else close(fd);
    if (!bad && rename(tmp, path)) bad = 1;
    if (bad) {
        fprintf(stderr, "train: writing %s failed: %s (the old file, if any, is unchanged)\n",
                path, strerror(errno));
        unlink(tmp);
    }
    free(tmp);
    return bad;
}

/* ---- the token stream: a uint16 shard, or a synthetic pattern ---- */
typedef struct { uint16_t *tok; int64_t n; } stream;

static int load_stream(const char *path, int64_t vocab, stream *s) {
    FILE *f = fopen(path, "rb");
    if (!f) return fail(path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (bytes < 4 || bytes % 2) {
        fclose(f);
        return fail(path, "not a uint16 token file (odd size, or fewer than 2 tokens)");
    }
    s->n = bytes / 2;
    s->tok = malloc((size_t)bytes);
    if (!s->tok || fread(s->tok, 2, (size_t)s->n, f) != (size_t)s->n) {
        fclose(f);
        return fail(path, "read error or out of memory");
    }
    fclose(f);
    for (int64_t i = 0; i < s->n; i++)
        if (s->tok[i] >= vocab) {
            fprintf(stderr, "train: %s: token %lld is %u, outside the model's vocabulary [0, %lld)\n",
                    path, (long long)i, s->tok[i], (long long)vocab);
            return 1;
        }
    return 0;
}

static int32_t stream_token(const stream *s, int64_t i, int64_t vocab) {
    if (s->tok) return s->tok[i % s->n];
    return (int32_t)((3 * i + i / 5) % vocab);   /* synthetic: learnable, not constant */
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

#define CHECK(call, what) do { int rc_ = (call); \
    if (rc_) { fprintf(stderr, "train: %s: %s\n", what, ab_last_error()); return 1; } } while (0)

int main(int argc, char **argv) {
    options o;
    if (parse_args(argc, argv, &o)) return 2;
    ab_model_config c;
    ab_model_layout P;
    float *params;
    if (load_checkpoint(o.checkpoint, &c, &P, &params)) return 1;
    const int64_t B = o.batch, S = o.seq_len ? o.seq_len : (c.max_seq_len < 64 ? c.max_seq_len : 64);
    if (S < 2 || S > c.max_seq_len) {
        fprintf(stderr, "train: -s must be in [2, max_seq_len = %lld], got %lld\n",
                (long long)c.max_seq_len, (long long)S);
        return 2;
    }
    stream data = {NULL, 0};
    if (o.data && load_stream(o.data, c.vocab_size, &data)) return 1;

    int64_t work_floats;
    CHECK(ab_model_workspace_floats(&c, B, S, &work_floats, NULL), "workspace size");
    float *grads = calloc((size_t)P.n_params, sizeof(float));
    float *m = calloc((size_t)P.n_params, sizeof(float));
    float *v = calloc((size_t)P.n_params, sizeof(float));
    float *work = calloc((size_t)work_floats, sizeof(float));   /* zeroed: see ab_model_backward */
    int32_t *tokens = malloc((size_t)(B * S) * sizeof(int32_t));
    int32_t *targets = malloc((size_t)(B * S) * sizeof(int32_t));
    if (!grads || !m || !v || !work || !tokens || !targets)
        return fail("out of memory for the gradients, optimizer state and activations", NULL);

    printf("model: dim %lld, layers %lld, heads %lld/%lld, vocab %lld, %lld parameters; "
           "batch %lld x %lld, %s, %s, %d threads\n", (long long)c.dim, (long long)c.n_layers,
           (long long)c.n_heads, (long long)c.n_kv_heads, (long long)c.vocab_size,
           (long long)P.n_params, (long long)B, (long long)S, o.data ? o.data : "synthetic tokens",
           ab_blas_name(), ab_get_num_threads());
    for (long step = 0; step < o.steps; step++) {
        const int64_t start = (int64_t)step * B * S;
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = 0; t < S; t++) {
                tokens[b * S + t] = stream_token(&data, start + b * S + t, c.vocab_size);
                targets[b * S + t] = t + 1 < S ? stream_token(&data, start + b * S + t + 1,
                                                              c.vocab_size) : -1;
            }
        double t0 = now_ms(), loss;
        CHECK(ab_model_forward(&loss, &c, params, tokens, targets, B, S, 1, work, work_floats),
              "forward");
        CHECK(ab_model_backward(&c, params, grads, B, S, 1.0f, 0, work, work_floats), "backward");
        double norm = -1.0;
        if (o.clip > 0) {   /* as anebackward.clip_grad_norm: double norm, float scale */
            double ss = 0.0;
            CHECK(ab_sumsq(&ss, grads, P.n_params), "gradient norm");
            norm = sqrt(ss);
            if (isfinite(norm) && norm > o.clip)
                CHECK(ab_scale(grads, P.n_params, (float)(o.clip / norm)), "clip");
        }
        /* AdamW: decay on the 2-D weights (the prefix [0, n_decay)), not on the norms */
        CHECK(ab_adamw(params, grads, m, v, P.n_decay, step + 1, (float)o.lr, (float)o.beta1,
                       (float)o.beta2, (float)o.eps, (float)o.weight_decay), "adamw");
        CHECK(ab_adamw(params + P.n_decay, grads + P.n_decay, m + P.n_decay, v + P.n_decay,
                       P.n_params - P.n_decay, step + 1, (float)o.lr, (float)o.beta1,
                       (float)o.beta2, (float)o.eps, 0.0f), "adamw");
        double ms = now_ms() - t0;
        printf("step %ld loss %.17g ms %.2f", step, loss, ms);
        if (norm >= 0) printf(" norm %.6g", norm);
        printf("\n");
        fflush(stdout);
    }
    int rc = o.out ? save_checkpoint(o.out, &c, &P, params) : 0;
    if (!rc && o.out) printf("saved %s\n", o.out);
    free(params); free(grads); free(m); free(v); free(work); free(tokens); free(targets);
    free(data.tok);
    return rc;
}
