/* anebackward.h — the package's whole C API.
 *
 * This one file is both the C prototypes (the C files include it) and the cffi
 * cdef (ffibuild.py feeds everything between the CDEF markers to ffi.cdef),
 * so the two cannot drift. Between the markers: plain declarations only, no
 * preprocessor lines, so cffi can parse them.
 *
 * Conventions (all kernels):
 *   - float32, C-contiguous, token-major rows: x[N, D] with N = B*S rows.
 *   - Weights are [out, in] like nn.Linear.weight.
 *   - Sizes are int64_t; indices never overflow int.
 *   - Every function returns AB_OK (0) or a negative AB_E* code; nothing
 *     aborts. ab_strerror() turns a code into a sentence; ab_last_error()
 *     says which function refused and why.
 *   - Outputs are written (overwritten) unless the argument is documented as
 *     accumulating ("+=").
 *   - No function keeps state between calls or owns hidden scratch memory;
 *     scratch comes from the caller (`work`, sized by *_workspace_floats).
 *   - Every fast kernel ab_X has a reference twin ab_ref_X with the same
 *     signature (csrc/reference/): the seed's scalar loops, math corrected.
 */
#ifndef ANEBACKWARD_H
#define ANEBACKWARD_H

#include <stdint.h>
#include <stddef.h>

/* AB_API marks the exported C API (default visibility; the rest of the
 * library is built hidden). ffibuild.py strips it from the cdef. */
#ifndef AB_API
#  if defined(_WIN32)
#    define AB_API
#  elif defined(__GNUC__)
#    define AB_API __attribute__((visibility("default")))
#  else
#    define AB_API
#  endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF BEGIN */

/* Error codes. */
enum {
    AB_OK = 0,
    AB_EINVAL = -1,      /* a size or argument is out of its domain          */
    AB_ENULL = -2,       /* a required pointer is NULL                       */
    AB_ERANGE = -3,      /* a token id / target is outside [0, vocab)        */
    AB_EWORKSPACE = -4,  /* the caller's workspace is too small              */
    AB_ETOOBIG = -5,     /* a dimension exceeds what the BLAS can index      */
    AB_ENOMEM = -6,      /* an allocation failed                             */
    AB_EUNAVAILABLE = -7 /* bf16 asked for, but oneDNN could not be loaded   */
};
AB_API const char *ab_strerror(int code);
/* Why this thread's last failing call refused: "function: reason" (e.g.
 * "ab_model_backward: one backward per forward: run ab_model_forward_backward
 * first"), or "" if nothing failed since ab_clear_error(). Per thread: each
 * thread reads its own calls' message (the ANE functions' messages, "ANE:
 * ...", too; an asynchronous ANE job's are its context's, ab_ane_last_error).
 * The pointer stays valid until this thread's next failing call. */
AB_API const char *ab_last_error(void);
AB_API void ab_clear_error(void);

/* The package version ("0.1.0"; the same string as anebackward.__version__). */
AB_API const char *ab_version(void);

/* Runtime facts: BLAS in use, its core, threads. ab_blas_get_num_threads is
 * OpenBLAS's own count, which the package keeps at 1 (ab_set_num_threads
 * is the one thread setting). */
AB_API const char *ab_blas_name(void);
AB_API const char *ab_blas_corename(void);
AB_API const char *ab_build_flags(void);
AB_API int ab_blas_get_num_threads(void);
/* The package's one thread setting: its worker pool (csrc/threads.c) and
 * the BLAS together use at most n threads (the BLAS gets n for the sgemms
 * and runs at 1 inside the package's own parallel regions). Default:
 * ANEBACKWARD_NUM_THREADS, else the BLAS's default, else the online cores.
 * Results of the package's kernels do not depend on n.
 * n outside [1, 256] is AB_EINVAL. */
AB_API int ab_set_num_threads(int n);
AB_API int ab_get_num_threads(void);

/* ---- linear (csrc/kernels/linear.c) ----
 * y[N,out] = x[N,in] · W[out,in]^T
 * dx[N,in]  (+)= dy[N,out] · W[out,in]
 * dW[out,in] (+)= dy[N,out]^T · x[N,in]       (accumulate != 0: beta = 1) */
AB_API int ab_linear_forward(float *y, const float *x, const float *W,
                      int64_t N, int64_t in, int64_t out);
AB_API int ab_linear_backward_dx(float *dx, const float *dy, const float *W,
                          int64_t N, int64_t in, int64_t out, int accumulate);
AB_API int ab_linear_backward_dW(float *dW, const float *dy, const float *x,
                          int64_t N, int64_t in, int64_t out, int accumulate);
AB_API int ab_ref_linear_forward(float *y, const float *x, const float *W,
                          int64_t N, int64_t in, int64_t out);
AB_API int ab_ref_linear_backward_dx(float *dx, const float *dy, const float *W,
                              int64_t N, int64_t in, int64_t out, int accumulate);
AB_API int ab_ref_linear_backward_dW(float *dW, const float *dy, const float *x,
                              int64_t N, int64_t in, int64_t out, int accumulate);

/* ---- bf16 matmuls (csrc/bf16, csrc/kernels/linear.c) ----
 * Mixed precision: matmul operands rounded to bfloat16 (round to nearest
 * even), products accumulated and returned in fp32. The path is picked at
 * run time (ab_bf16_path):
 *   AB_BF16_ONEDNN: oneDNN's matmul primitive; libdnnl (oneDNN 3.x, GNU
 *     OpenMP build) is loaded at run time, used where it reports bf16
 *     instructions (avx512_core_bf16, AMX);
 *   AB_BF16_PORTABLE: the bf16 operands widened to fp32 and one sgemm: the
 *     same rounded operands, any CPU (oneDNN without bf16 instructions, or
 *     asked for with ab_bf16_set_mode);
 *   AB_BF16_UNAVAILABLE: oneDNN could not be loaded (and the portable path
 *     was not asked for): bf16 calls return AB_EUNAVAILABLE.
 * ab_bf16_init: load libdnnl from `path` (NULL: the soname libdnnl.so.3 on
 *   the loader's search path); only the first call loads, later calls
 *   report its result; the first bf16 call does ab_bf16_init(NULL) if no
 *   call came before. err (may be NULL): what was loaded, or why not.
 * ab_bf16_set_mode(path, threads), each negative = keep:
 *   path AB_BF16_AUTO (oneDNN where it has bf16 instructions, else
 *     portable) or AB_BF16_PORTABLE (always portable, needs no oneDNN);
 *   threads AB_BF16_POOL (default: fixed tiles of C on the package's pool,
 *     one oneDNN thread each: results independent of the thread count) or
 *     AB_BF16_ONEDNN_THREADS (one oneDNN call on ab_get_num_threads()
 *     OpenMP threads of its own: results may depend on the thread count).
 * ab_bf16_describe: one line naming the path, oneDNN's version, ISA and
 *   kernel, or why bf16 is unavailable.
 * ab_gemm_bf16: C[M,N] (+)= op(A)[M,K] · op(B)[K,N]; A, B row-major bf16
 *   (uint16 bit patterns) with leading dimensions lda, ldb, op = transpose
 *   if transA/transB; C fp32 with ldc; accumulate != 0 adds.
 * ab_f32_to_bf16 / ab_bf16_to_f32: n values (round to nearest even; NaN
 *   stays NaN, inf stays inf).
 * ab_linear_*_bf16: ab_linear_*'s products (same arguments) with bf16
 *   operands: the fp32 inputs are rounded to bf16 inside the call. */
enum { AB_BF16_UNAVAILABLE = 0, AB_BF16_ONEDNN = 1, AB_BF16_PORTABLE = 2 };
enum { AB_BF16_AUTO = 0, AB_BF16_POOL = 0, AB_BF16_ONEDNN_THREADS = 1 };
AB_API int ab_bf16_init(const char *path, char *err, size_t errcap);
AB_API int ab_bf16_set_mode(int path, int threads);
AB_API int ab_bf16_get_mode(int *path, int *threads);
AB_API int ab_bf16_path(void);
AB_API const char *ab_bf16_describe(void);
AB_API int ab_gemm_bf16(int transA, int transB, int64_t M, int64_t N, int64_t K,
                        const uint16_t *A, int64_t lda, const uint16_t *B, int64_t ldb,
                        int accumulate, float *C, int64_t ldc);
AB_API int ab_f32_to_bf16(uint16_t *dst, const float *src, int64_t n);
AB_API int ab_bf16_to_f32(float *dst, const uint16_t *src, int64_t n);
AB_API int ab_linear_forward_bf16(float *y, const float *x, const float *W,
                                  int64_t N, int64_t in, int64_t out);
AB_API int ab_linear_backward_dx_bf16(float *dx, const float *dy, const float *W,
                                      int64_t N, int64_t in, int64_t out, int accumulate);
AB_API int ab_linear_backward_dW_bf16(float *dW, const float *dy, const float *x,
                                      int64_t N, int64_t in, int64_t out, int accumulate);

/* ---- RMSNorm (csrc/kernels/rmsnorm.c) ----
 * r_t = 1/sqrt(mean_i x_ti^2 + eps);  y_ti = x_ti * r_t * w_i
 * dx_ti (+)= w_i dy_ti r_t - x_ti r_t^3 / D * sum_j w_j dy_tj x_tj
 * dw_i   += sum_t dy_ti x_ti r_t            (always accumulates; may be NULL) */
AB_API int ab_rmsnorm_forward(float *y, const float *x, const float *w,
                       int64_t N, int64_t D, float eps);
AB_API int ab_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                        const float *w, int64_t N, int64_t D, float eps,
                        int accumulate_dx);
AB_API int ab_ref_rmsnorm_forward(float *y, const float *x, const float *w,
                           int64_t N, int64_t D, float eps);
AB_API int ab_ref_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                            const float *w, int64_t N, int64_t D, float eps,
                            int accumulate_dx);

/* ---- rotary embedding (csrc/kernels/rope.c) ----
 * x[B, S, n_heads*head_dim]; pairs (2i, 2i+1) of each head rotate by
 * angle (pos_offset + s) * 10000^(-2i/head_dim). Backward rotates by the
 * negative angle. y may equal x (in place).
 * The *_ex variants take ab_rope_params (NULL = llama2.c's defaults, which
 * are also what an all-zero struct means):
 *   layout AB_ROPE_INTERLEAVED: pairs (2i, 2i+1) (llama2.c);
 *          AB_ROPE_HALF: pairs (i, i + head_dim/2) (HF's rotate_half);
 *   theta: frequency base, f_i = theta^(-2i/head_dim) (0 means 10000);
 *   factor > 0: Llama-3 scaling of f_i (HF rope_type "llama3"): with
 *     wavelength w = 2 pi / f_i, L = original_max_position_embeddings,
 *     w > L/low_freq_factor: f_i / factor; w < L/high_freq_factor: f_i;
 *     between: (1 - s) f_i / factor + s f_i, s = (L/w - low) / (high - low).
 *     factor 0 = no scaling; otherwise factor >= 1 (Llama-3's is 8),
 *     0 < low_freq_factor < high_freq_factor, L >= 1, else AB_EINVAL.
 * ab_rope_inv_freq writes the head_dim/2 frequencies f_i the kernels use. */
enum { AB_ROPE_INTERLEAVED = 0, AB_ROPE_HALF = 1 };
typedef struct {
    int layout;
    float theta;
    float factor, low_freq_factor, high_freq_factor;
    int64_t original_max_position_embeddings;
} ab_rope_params;
AB_API int ab_rope_params_check(const ab_rope_params *p);
AB_API int ab_rope_inv_freq(float *inv_freq, int64_t head_dim, const ab_rope_params *p);
AB_API int ab_rope_forward_ex(float *y, const float *x, int64_t B, int64_t S,
                       int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                       const ab_rope_params *p);
AB_API int ab_rope_backward_ex(float *dx, const float *dy, int64_t B, int64_t S,
                        int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                        const ab_rope_params *p);
AB_API int ab_ref_rope_forward_ex(float *y, const float *x, int64_t B, int64_t S,
                           int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                           const ab_rope_params *p);
AB_API int ab_ref_rope_backward_ex(float *dx, const float *dy, int64_t B, int64_t S,
                            int64_t n_heads, int64_t head_dim, int64_t pos_offset,
                            const ab_rope_params *p);
/* Per-row positions: x[N, n_heads*head_dim], row t rotates by the angle
 * positions[t] * f_k (every positions[t] >= 0, else AB_EINVAL). For
 * varlen batches (below): left padding, packed documents, any position. */
AB_API int ab_rope_forward_pos(float *y, const float *x, int64_t N, int64_t n_heads,
                        int64_t head_dim, const int32_t *positions, const ab_rope_params *p);
AB_API int ab_rope_backward_pos(float *dx, const float *dy, int64_t N, int64_t n_heads,
                         int64_t head_dim, const int32_t *positions, const ab_rope_params *p);
AB_API int ab_ref_rope_forward_pos(float *y, const float *x, int64_t N, int64_t n_heads,
                            int64_t head_dim, const int32_t *positions,
                            const ab_rope_params *p);
AB_API int ab_ref_rope_backward_pos(float *dx, const float *dy, int64_t N, int64_t n_heads,
                             int64_t head_dim, const int32_t *positions,
                             const ab_rope_params *p);
AB_API int ab_rope_forward(float *y, const float *x, int64_t B, int64_t S,
                    int64_t n_heads, int64_t head_dim, int64_t pos_offset);
AB_API int ab_rope_backward(float *dx, const float *dy, int64_t B, int64_t S,
                     int64_t n_heads, int64_t head_dim, int64_t pos_offset);
AB_API int ab_ref_rope_forward(float *y, const float *x, int64_t B, int64_t S,
                        int64_t n_heads, int64_t head_dim, int64_t pos_offset);
AB_API int ab_ref_rope_backward(float *dx, const float *dy, int64_t B, int64_t S,
                         int64_t n_heads, int64_t head_dim, int64_t pos_offset);

/* ---- causal attention, MHA and GQA (csrc/kernels/attention.c) ----
 * q[B,S,H*hd], k,v[B,S,KV*hd], out[B,S,H*hd]; head h reads kv head
 * h / (H/KV). P = softmax_causal(q_h k_g^T / sqrt(hd)); out_h = P v_g.
 * Backward recomputes P; dq, dk, dv are written (not accumulated).
 * work: ab_attention_workspace_floats(S) floats owned by the caller (one
 * slab of 2*min(64,S)*S floats per worker thread, for up to 16; any
 * work_floats of at least one slab is correct, fewer slabs use fewer
 * threads). ab_attention_workspace_floats returns AB_EINVAL for S < 0 and
 * AB_ETOOBIG for S > 2^31 - 1. */
AB_API int64_t ab_attention_workspace_floats(int64_t S);
AB_API int ab_attention_forward(float *out, const float *q, const float *k, const float *v,
                         int64_t B, int64_t S, int64_t n_heads, int64_t n_kv_heads,
                         int64_t head_dim, float *work, int64_t work_floats);
AB_API int ab_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                          const float *q, const float *k, const float *v,
                          int64_t B, int64_t S, int64_t n_heads, int64_t n_kv_heads,
                          int64_t head_dim, float *work, int64_t work_floats);
AB_API int ab_ref_attention_forward(float *out, const float *q, const float *k, const float *v,
                             int64_t B, int64_t S, int64_t n_heads, int64_t n_kv_heads,
                             int64_t head_dim, float *work, int64_t work_floats);
AB_API int ab_ref_attention_backward(float *dq, float *dk, float *dv, const float *dout,
                              const float *q, const float *k, const float *v,
                              int64_t B, int64_t S, int64_t n_heads, int64_t n_kv_heads,
                              int64_t head_dim, float *work, int64_t work_floats);

/* Varlen (FlashAttention's convention): a batch of documents of any
 * lengths as ONE token-major list of its real tokens, q[N, H*hd], k,v[N,
 * KV*hd], no padding rows at all; cu_seqlens[n_seq+1] holds the segment
 * starts (cu_seqlens[0] = 0, non-decreasing, cu_seqlens[n_seq] = N; else
 * AB_EINVAL), and causal attention stays inside each segment [cu_seqlens[i],
 * cu_seqlens[i+1]). Segment starts rather than a segment id per token: the
 * segments are contiguous, so each query's key range is two loads (O(1)),
 * the work splits into (segment, head) tasks with no scan, and it is what
 * FlashAttention's varlen kernels and HF's flattening collator produce.
 * work: ab_attention_workspace_floats(longest segment). Full rows are the
 * case cu_seqlens = {0, S, 2S, ..., BS}: ab_attention_forward runs the same
 * code. Bit-identical results for every thread count. */
AB_API int ab_attention_forward_varlen(float *out, const float *q, const float *k,
                                const float *v, const int64_t *cu_seqlens, int64_t n_seq,
                                int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                                float *work, int64_t work_floats);
AB_API int ab_attention_backward_varlen(float *dq, float *dk, float *dv, const float *dout,
                                 const float *q, const float *k, const float *v,
                                 const int64_t *cu_seqlens, int64_t n_seq, int64_t n_heads,
                                 int64_t n_kv_heads, int64_t head_dim, float *work,
                                 int64_t work_floats);
AB_API int ab_ref_attention_forward_varlen(float *out, const float *q, const float *k,
                                    const float *v, const int64_t *cu_seqlens, int64_t n_seq,
                                    int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                                    float *work, int64_t work_floats);
AB_API int ab_ref_attention_backward_varlen(float *dq, float *dk, float *dv, const float *dout,
                                     const float *q, const float *k, const float *v,
                                     const int64_t *cu_seqlens, int64_t n_seq,
                                     int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                                     float *work, int64_t work_floats);

/* ---- SwiGLU (csrc/kernels/swiglu.c) ----
 * y = silu(h1) * h3, silu(a) = a * sigmoid(a)
 * dh1 = dy * h3 * sigmoid(h1) * (1 + h1 * (1 - sigmoid(h1))),  dh3 = dy * silu(h1)
 * dh1 or dh3 may equal dy (in place). */
AB_API int ab_swiglu_forward(float *y, const float *h1, const float *h3, int64_t n);
AB_API int ab_swiglu_backward(float *dh1, float *dh3, const float *dy,
                       const float *h1, const float *h3, int64_t n);
AB_API int ab_ref_swiglu_forward(float *y, const float *h1, const float *h3, int64_t n);
AB_API int ab_ref_swiglu_backward(float *dh1, float *dh3, const float *dy,
                           const float *h1, const float *h3, int64_t n);

/* ---- cross-entropy (csrc/kernels/cross_entropy.c) ----
 * logits[N,V], targets[N] in [0,V) or -1 (row ignored).
 * loss = mean over counted rows of (logsumexp(row) - row[target]);
 * dlogits = (softmax(row) - onehot(target)) * grad_scale / n_counted,
 * ignored rows get zeros. dlogits may equal logits (in place) or be NULL
 * (loss only). *n_counted_out may be NULL. */
AB_API int ab_cross_entropy(double *loss_out, int64_t *n_counted_out, float *dlogits,
                     const float *logits, const int32_t *targets,
                     int64_t N, int64_t V, float grad_scale);
AB_API int ab_ref_cross_entropy(double *loss_out, int64_t *n_counted_out, float *dlogits,
                         const float *logits, const int32_t *targets,
                         int64_t N, int64_t V, float grad_scale);
/* The same with a caller's denominator: loss = sum over counted rows /
 * denominator and dlogits scaled by grad_scale / denominator (HF Trainer's
 * num_items_in_batch: the counted targets of all micro-batches of a step).
 * denominator 0: the counted rows (ab_cross_entropy); else it must be
 * finite and > 0 (AB_EINVAL). */
AB_API int ab_cross_entropy_ex(double *loss_out, int64_t *n_counted_out, float *dlogits,
                        const float *logits, const int32_t *targets,
                        int64_t N, int64_t V, float grad_scale, double denominator);
AB_API int ab_ref_cross_entropy_ex(double *loss_out, int64_t *n_counted_out, float *dlogits,
                            const float *logits, const int32_t *targets,
                            int64_t N, int64_t V, float grad_scale, double denominator);

/* ---- embedding (csrc/kernels/embedding.c) ----
 * x[N,D] = E[tokens[N], :];   dE[tokens[t], :] += dx[t, :]  (accumulates) */
AB_API int ab_embedding_forward(float *x, const float *E, const int32_t *tokens,
                         int64_t N, int64_t V, int64_t D);
AB_API int ab_embedding_backward(float *dE, const float *dx, const int32_t *tokens,
                          int64_t N, int64_t V, int64_t D);
AB_API int ab_ref_embedding_forward(float *x, const float *E, const int32_t *tokens,
                             int64_t N, int64_t V, int64_t D);
AB_API int ab_ref_embedding_backward(float *dE, const float *dx, const int32_t *tokens,
                              int64_t N, int64_t V, int64_t D);

/* ---- optimiser (csrc/kernels/optim.c) ----
 * ab_sumsq:   *out += sum x_i^2, accumulated in double.
 * ab_scale:   x_i *= s.
 * ab_adamw:   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
 *             p -= lr * wd * p   (decoupled weight decay, before the step);
 *             p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).  */
AB_API int ab_sumsq(double *out, const float *x, int64_t n);
AB_API int ab_scale(float *x, int64_t n, float s);
AB_API int ab_adamw(float *p, const float *g, float *m, float *v, int64_t n,
             int64_t step, float lr, float beta1, float beta2, float eps,
             float weight_decay);
AB_API int ab_ref_sumsq(double *out, const float *x, int64_t n);
AB_API int ab_ref_scale(float *x, int64_t n, float s);
AB_API int ab_ref_adamw(float *p, const float *g, float *m, float *v, int64_t n,
                 int64_t step, float lr, float beta1, float beta2, float eps,
                 float weight_decay);

/* ---- whole model (csrc/model/model.c) ----
 * A Llama-2 model over the kernels above: one call per step. Parameters and
 * gradients are flat float buffers laid out by ab_model_param_layout
 * (offsets in floats; 2-D weights first, so weight decay covers the prefix
 * [0, n_decay); a tied classifier has output == tok_embeddings). Activations
 * live in a caller-owned workspace of ab_model_workspace_floats floats,
 * reused across steps of the same (B, S). Zero it once (calloc) before its
 * first use, so that no stale "dlogits ready" tag can be found in it.
 * ab_model_forward: tokens/targets [B*S] int32, targets -1 = ignored, may be
 *   NULL (logits only, at *logits_offset of the workspace). want_grad != 0
 *   overwrites the logits with dlogits (mean over counted targets) and keeps
 *   in the workspace what the backward needs (B, S and a copy of the tokens,
 *   so the caller may reuse its token buffer).
 *   With recompute the classifier runs in row chunks and the workspace
 *   holds one chunk of logits (the backward computes them again): targets
 *   NULL is then AB_EINVAL (ab_model_forward_logits writes the logits into
 *   the caller's buffer), and no dlogits are left in the workspace.
 * ab_model_backward: takes no tokens: it uses the forward's. AB_EINVAL unless
 *   the last forward on this workspace had want_grad and the same B and S,
 *   and no backward has used it yet (one backward per forward); fills every
 *   gradient, scaled by grad_scale; accumulate != 0 adds (+=) to grads.
 * options->reference != 0 runs the seed-loop kernels (ab_ref_*) instead. */
/* The Hugging Face architectures (Llama 3, Qwen3) are the same model with
 * the fields after `norm_eps`, whose zero values are llama2.c's:
 *   head_dim: 0 = dim / n_heads; else q is n_heads*head_dim wide (wq
 *     [H*hd, dim], wo [dim, H*hd]) and k, v n_kv_heads*head_dim;
 *   qk_norm != 0: Qwen3's per-head RMSNorm of q and k (over head_dim, eps
 *     norm_eps, weights q_norm[L, hd], k_norm[L, hd]) before RoPE;
 *   rope: see ab_rope_params (all zero: llama2.c's interleaved, theta 1e4);
 *   options->recompute != 0: activation recomputation. The workspace keeps each
 *     layer's input and one layer's other activations; the backward
 *     recomputes them layer by layer (one more layer forward per layer, far
 *     less memory). The classifier runs in row chunks, its logits computed
 *     again in the backward (see ab_model_forward): the loss and gradients
 *     equal the run without recompute to float32 rounding. */
/* A model is two structs, each versioned by its first member:
 *   ab_model_config: what the model is (its architecture: the sizes, norm,
 *     RoPE, tied classifier, and the LoRA adapters' rank, scale and targets,
 *     which are tensors of the parameter layout). The parameter layout, the
 *     tensor table and a checkpoint depend on it and on nothing else.
 *   ab_model_options: how it runs (seed loops, recomputation, precision,
 *     adapters merged, frozen tensors). The same parameters run under any
 *     options; config.options points to them, NULL = all defaults (fp32,
 *     no recomputation, every tensor trainable).
 * struct_size: the caller's sizeof(ab_model_config) / sizeof(ab_model_options)
 * (C: `ab_model_config c = {.struct_size = sizeof c, .dim = ...}`; Python's
 * anebackward.layout.c_config sets both). Each struct may grow by appending
 * fields; the size tells the library which fields the caller's struct has,
 * so a program built against this header keeps working with a later
 * library. A size the library does not know (0, i.e. unset, or another
 * version's) is AB_EINVAL from every function that takes the config, with
 * ab_last_error() naming the struct; nothing past struct_size is read
 * before it is checked. */
typedef struct {
    uint32_t struct_size;
    int reference;      /* != 0: the seed-loop kernels (ab_ref_*) */
    int recompute;      /* != 0: keep each layer's input only, recompute the rest */
    int precision;      /* AB_PRECISION_FP32 (0) or AB_PRECISION_BF16, see below */
    int lora_merged;    /* != 0: the adapters are folded into W: forward skips them, no backward */
    /* Frozen tensors: NULL = every tensor trainable, grads laid out like params;
     * else AB_TENSOR_KINDS * n_layers offsets from ab_model_grad_layout. */
    const int64_t *grad_offsets;
} ab_model_options;
typedef struct {
    uint32_t struct_size;
    int64_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len;
    int shared_classifier;
    float norm_eps;
    int64_t head_dim;
    int qk_norm;
    ab_rope_params rope;
    /* LoRA adapters (lora_rank 0: none), see below */
    int64_t lora_rank;
    float lora_scale;   /* s in y = x W^T + s (x A^T) B^T: alpha/r (rsLoRA alpha/sqrt r) */
    int lora_targets;   /* AB_LORA_* bits: the projections that carry an adapter */
    const ab_model_options *options;   /* how to run it; NULL: the defaults */
} ab_model_config;
/* LoRA (lora_rank r > 0): every targeted projection y = x W^T becomes
 *   y = x W^T + s (x A^T) B^T,  A [r, in], B [out, r] per layer,
 * stored after the norms in params (ab_model_layout.lora_a/lora_b: per target
 * an [L, r, in] stack of A, then per target an [L, out, r] stack of B). The
 * forward keeps x A^T [N, r] in the workspace for the backward, which gives
 *   dB = s dy^T (x A^T),  d(x A^T) = s dy B,  dA = d(x A^T)^T x,
 *   dx += d(x A^T) A.
 * Every product goes through the same matmul route as the base weights
 * (fp32 or bf16). Not with the ANE route (AB_EINVAL). */
enum { AB_LORA_Q = 1, AB_LORA_K = 2, AB_LORA_V = 4, AB_LORA_O = 8,
       AB_LORA_GATE = 16, AB_LORA_DOWN = 32, AB_LORA_UP = 64 };   /* wq wk wv wo w1 w2 w3 */
/* Tensor kinds; tensor (kind, layer) is slot kind * n_layers + layer of the
 * gradient offset table (layer 0 for the kinds that are not per layer). */
enum { AB_TENSOR_TOK = 0, AB_TENSOR_WQ, AB_TENSOR_WK, AB_TENSOR_WV, AB_TENSOR_WO,
       AB_TENSOR_W1, AB_TENSOR_W2, AB_TENSOR_W3, AB_TENSOR_OUTPUT, AB_TENSOR_ATTENTION_NORM,
       AB_TENSOR_FFN_NORM, AB_TENSOR_NORM, AB_TENSOR_Q_NORM, AB_TENSOR_K_NORM,
       AB_TENSOR_LORA_A = 14,   /* + target index 0..6 (wq wk wv wo w1 w2 w3) */
       AB_TENSOR_LORA_B = 21,   /* + target index */
       AB_TENSOR_KINDS = 28 };
/* The gradient buffer of a model with frozen tensors: trainable[slot] != 0
 * for each trainable tensor (AB_TENSOR_KINDS * n_layers bytes; a tied
 * classifier follows tok_embeddings; slots of absent tensors are ignored).
 * Writes grad_offsets[slot] (floats into the gradient buffer; -1: frozen or
 * absent) packing the trainable tensors in parameter order, and the buffer's
 * size in *n_grads. Everything trainable gives the parameter layout itself.
 * A frozen tensor gets no weight-gradient product and no storage; the input
 * gradient still flows through it. */
AB_API int ab_model_grad_layout(const ab_model_config *c, const uint8_t *trainable,
                                int64_t *grad_offsets, int64_t *n_grads);
/* The model's tensors, one record each, in parameter order (the order of
 * the kinds above, then of the layers): what ab_model_param_layout,
 * ab_model_grad_layout and the backward use, as one table.
 *   name: the tensor's name, "tok_embeddings.weight", "output.weight"
 *     (untied only), "norm.weight", "layers.{l}.{attention.wq,
 *     attention.wk, attention.wv, attention.wo, feed_forward.w1,
 *     feed_forward.w2, feed_forward.w3, attention_norm, ffn_norm,
 *     attention.q_norm, attention.k_norm}.weight" and the adapters
 *     "layers.{l}.attention.wq.lora_A.weight", ... lora_B ...;
 *   kind: AB_TENSOR_*; layer: l, or -1 for a tensor not per layer;
 *   offset: floats into params; ndim 1 or 2, shape[ndim] (row-major);
 *   grad_offset: floats into grads (options->grad_offsets NULL: == offset; else
 *     that table's entry, -1 for a frozen tensor);
 *   group: the ab_model_backward_notify group that announces its gradient;
 *   decay: != 0 for the tensors AdamW decays (the 2-D ones).
 * Writes the number of tensors to *count; out NULL: only that. Otherwise
 * out has room for capacity records (AB_EINVAL if fewer than *count). */
typedef struct {
    char name[64];
    int kind;
    int ndim;
    int64_t layer;
    int64_t offset;
    int64_t shape[2];
    int64_t grad_offset;
    int64_t group;
    int decay;
} ab_model_tensor;
AB_API int ab_model_tensors(const ab_model_config *c, ab_model_tensor *out, int64_t capacity,
                            int64_t *count);
/* options->precision AB_PRECISION_BF16: every matmul of the forward and backward
 * (layer projections and classifier) takes bf16 operands (ab_gemm_bf16),
 * accumulates and returns fp32; weights, weight gradients, the optimiser,
 * RMSNorm statistics, softmax, cross-entropy and the residual stream stay
 * fp32. The workspace (larger: ab_model_workspace_floats) then also holds
 * a bf16 copy of the 2-D weights, made by ab_model_bf16_refresh from params:
 * call it before the first forward on a workspace and after every change of
 * params (each optimiser step); a bf16 forward without it is AB_EINVAL.
 * Activations are rounded to bf16 into the workspace where a matmul first
 * reads them. Not with `reference` nor the ANE backward (AB_EINVAL);
 * ab_model_decode always runs fp32. */
enum { AB_PRECISION_FP32 = 0, AB_PRECISION_BF16 = 1 };
/* q_norm, k_norm follow norm in the no-decay tail ([L, head_dim] each; both
 * equal n_params, i.e. empty, without qk_norm). */
typedef struct {
    int64_t tok_embeddings, wq, wk, wv, wo, w1, w2, w3, output;
    int64_t attention_norm, ffn_norm, norm;
    int64_t n_decay, n_params;
    int64_t q_norm, k_norm;
    int64_t lora_a[7], lora_b[7];   /* per target (wq wk wv wo w1 w2 w3); n_params if none */
} ab_model_layout;
AB_API int ab_model_config_check(const ab_model_config *c);
AB_API int ab_model_param_layout(const ab_model_config *c, ab_model_layout *out);
AB_API int ab_model_workspace_floats(const ab_model_config *c, int64_t B, int64_t S,
                              int64_t *total, int64_t *logits_offset);
/* One-token inference with a KV cache, as llama2.c's run.c forward():
 * logits[vocab] for `token` at position `pos` (< max_seq_len), keys/values
 * of positions < pos read from kv_cache (ab_model_kv_cache_floats floats),
 * this position's written to it. work: ab_model_decode_workspace_floats.
 * The two size functions return AB_OK and the size in *out, or an error. */
AB_API int ab_model_kv_cache_floats(const ab_model_config *c, int64_t *out);
AB_API int ab_model_decode_workspace_floats(const ab_model_config *c, int64_t *out);
AB_API int ab_model_decode(float *logits, const ab_model_config *c, const float *params,
                    int32_t token, int64_t pos, float *kv_cache, float *work,
                    int64_t work_floats);

AB_API int ab_model_bf16_refresh(const ab_model_config *c, const float *params, float *work,
                                 int64_t work_floats);
/* The same for the LoRA adapters only (params[first adapter, n_params)),
 * when nothing else changed since the last full refresh (AB_EINVAL if that
 * refresh was not made): a LoRA step's frozen base keeps its copy. */
AB_API int ab_model_bf16_refresh_adapters(const ab_model_config *c, const float *params,
                                          float *work, int64_t work_floats);

AB_API int ab_model_forward(double *loss_out, const ab_model_config *c, const float *params,
                     const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                     int want_grad, float *work, int64_t work_floats);
/* ab_model_forward_logits: ab_model_forward that also copies the logits
 * [B*S, vocab] into logits_out (before want_grad overwrites them with
 * dlogits); loss, dlogits and what the backward needs are the same. */
AB_API int ab_model_forward_logits(double *loss_out, float *logits_out, const ab_model_config *c,
                            const float *params, const int32_t *tokens, const int32_t *targets,
                            int64_t B, int64_t S, int want_grad, float *work,
                            int64_t work_floats);
AB_API int ab_model_backward(const ab_model_config *c, const float *params, float *grads,
                      int64_t B, int64_t S, float grad_scale, int accumulate,
                      float *work, int64_t work_floats);
/* Real batch layouts: ab_model_forward over a varlen batch (see the
 * attention kernels): tokens[n_tokens] and targets[n_tokens] are the real
 * tokens only (padding removed by the caller), in segment order; every
 * matmul, the attention and the loss run over these rows and nothing else.
 *   cu_seqlens[n_seq+1]: segment starts (one document each; attention stays
 *     inside it), cu_seqlens[n_seq] = n_tokens;
 *   positions[n_tokens]: RoPE position of each token (>= 0), NULL = its
 *     index inside its segment;
 *   loss_denominator: 0 = mean over counted targets; > 0: sum / it (HF
 *     Trainer's num_items_in_batch).
 * (B, S) is only the workspace's geometry (ab_model_workspace_floats):
 * n_tokens <= B*S and every segment <= S <= max_seq_len. The forward copies
 * the layout into the workspace, so ab_model_backward* with the same (B, S)
 * needs nothing more. layout NULL: ab_model_forward (B full rows of S).
 * With a layout, work must be 8-byte aligned (as malloc gives), else
 * AB_EINVAL. */
typedef struct {
    int64_t n_tokens;
    int64_t n_seq;
    const int64_t *cu_seqlens;
    const int32_t *positions;
    double loss_denominator;
} ab_batch_layout;
AB_API int ab_model_forward_batch(double *loss_out, const ab_model_config *c,
                           const float *params, const int32_t *tokens,
                           const int32_t *targets, int64_t B, int64_t S,
                           const ab_batch_layout *layout, int want_grad, float *work,
                           int64_t work_floats);
/* ab_model_backward_notify: ab_model_backward that calls ready(user, group)
 * on the calling thread, between kernels, as each group of gradients becomes
 * final for this backward, so a data-parallel trainer can start reducing
 * them while the rest is computed (the backward only ever writes groups not
 * yet announced). Groups, in the order they come:
 *   group == n_layers: the final norm, and the untied classifier (output);
 *   group == l, for l = n_layers-1 down to 0: every tensor of layer l (wq wk
 *     wv wo w1 w2 w3, attention_norm, ffn_norm, q_norm and k_norm if any);
 *   group == -1: tok_embeddings (with a tied classifier: output too).
 * After an error no further call is made. ready NULL: ab_model_backward.
 * The gradients are bit-identical to ab_model_backward's. */
typedef void (*ab_grads_ready_fn)(void *user, int64_t group);
AB_API int ab_model_backward_notify(const ab_model_config *c, const float *params, float *grads,
                             int64_t B, int64_t S, float grad_scale, int accumulate,
                             float *work, int64_t work_floats,
                             ab_grads_ready_fn ready, void *user);

/* ---- Apple Neural Engine dispatch (csrc/ane) ----
 * A context owns one platform ("darwin": the private AppleNeuralEngine
 * framework, Apple Silicon only; "emulated": a software interpreter of the
 * generated MIL, fp16 storage rounding, any OS), a cache of compiled programs
 * keyed by shape, staged fp16 weights, an asynchronous worker, and counters.
 * Unlike the kernels above it is stateful; its calls are serialised by the
 * context's own mutex. Every function returns AB_OK or an error code.
 * Errors: AB_* codes above or AB_ANE_E* below; every function that can meet a
 * platform failure takes (err, errcap) and writes the platform's whole
 * message (AB_ANE_ERRCAP bytes always suffice for the core's own text). */
enum {
    AB_ANE_EUNAVAILABLE = -20,  /* the platform cannot run here                 */
    AB_ANE_EPLATFORM = -21,     /* unknown platform name                        */
    AB_ANE_EMIL = -22,          /* malformed or unsupported MIL text            */
    AB_ANE_ECOMPILE = -23,      /* the platform rejected the program            */
    AB_ANE_ELOAD = -24,         /* loading the compiled program failed          */
    AB_ANE_EEVAL = -25,         /* evaluating the program failed                */
    AB_ANE_ESURFACE = -26,      /* creating or locking a tensor surface failed  */
    AB_ANE_EBUDGET = -27        /* the process's compile budget is spent        */
};
enum { AB_ANE_ERRCAP = 8192 };
/* Why a tile of rows ran on the CPU instead (ab_ane_call_info.fallback). */
enum {
    AB_ANE_FB_NONE = 0,
    AB_ANE_FB_OVERFLOW = 1,     /* fp16 result inf/NaN or saturated (|x| >= 65504),
                                   also after a re-run at a lower scale         */
    AB_ANE_FB_RANGE = 2,        /* dy not finite, or W beyond fp16 range        */
    AB_ANE_FB_BUDGET = 3,       /* the process's compile budget is spent        */
    AB_ANE_FB_ERROR = 4         /* platform error, call was not strict          */
};
/* ab_ane_linear_backward_dx flags */
enum {
    AB_ANE_STRICT = 1,          /* platform errors are returned, not hidden     */
    AB_ANE_NO_LOSS_SCALE = 2    /* skip the power-of-two scaling of dy          */
};
typedef struct ab_ane_ctx ab_ane_ctx;
typedef struct ab_ane_job ab_ane_job;
typedef struct {
    int64_t compiles;           /* programs compiled by this context (incl. failed) */
    int64_t process_compiles;   /* by every context of this process: the ANE's
                                   limit (~119 compiles) is per process         */
    int64_t programs;           /* shapes in the cache (loaded or failed)       */
    int64_t max_programs;       /* process compile budget; at it, new shapes
                                   run on the CPU                               */
    int64_t tile_rows;          /* rows per program (spatial size S)            */
    int64_t calls, tiles_ane, tiles_cpu;
    int64_t fallback_overflow, fallback_range, fallback_budget, fallback_error;
    int64_t overflow_reruns;    /* tiles re-run at a lower scale                */
    int64_t load_retries;       /* loads retried after a failure                */
    int64_t weight_stagings;    /* fp32 -> fp16 conversions of a whole W        */
    int64_t weight_reuses;      /* calls that found W staged at their version   */
    int64_t requests;           /* requests (program + surface pair) created:
                                   one per program and per staged weight, made
                                   when its surface is, never per call         */
    int loss_scaling;
    int self_test_code;         /* 1: not run; AB_OK: passed; else its error    */
    double self_test_rel_err;   /* relative error of the last self-test, or -1  */
} ab_ane_stats;
typedef struct {
    int64_t tiles;              /* row tiles of this call                       */
    int64_t tiles_cpu;          /* of which ran on the CPU                      */
    int fallback;               /* first AB_ANE_FB_* reason met, 0 if none      */
    int scale_log2;             /* dy scale 2^k of the first ANE tile           */
    int w_staged;               /* 1: W converted to fp16 by this call; 0: reused
                                   (or the call never reached the ANE)          */
    int64_t t_start_ns, t_end_ns;   /* when the call ran (ab_ane_clock_ns)     */
    int64_t eval_ns;            /* of which in the platform's evaluations; the
                                   rest is the CPU's staging work (packing,
                                   fp16 conversion, layout, unpacking)         */
} ab_ane_call_info;

AB_API const char *ab_ane_strerror(int code);
/* platform: "darwin", "emulated", or NULL for the native one of this OS. */
AB_API int ab_ane_open(ab_ane_ctx **ctx, const char *platform, char *err, size_t errcap);
/* Waits for the context's queued jobs, then frees it (NULL: nothing to do). */
AB_API int ab_ane_close(ab_ane_ctx *ctx);
AB_API const char *ab_ane_platform_name(const ab_ane_ctx *ctx);
/* Negative arguments keep the current value. tile_rows: a multiple of 64.
 * max_programs: the compile budget counted over the whole process. */
AB_API int ab_ane_configure(ab_ane_ctx *ctx, int loss_scaling, int64_t max_programs,
                     int64_t tile_rows);
AB_API int ab_ane_get_stats(ab_ane_ctx *ctx, ab_ane_stats *out);
/* The latest platform failure met by this context ("" if none), and the
 * self-test's report; *needed (may be NULL) = its length + 1. */
AB_API int ab_ane_last_error(ab_ane_ctx *ctx, char *buf, size_t cap, size_t *needed);
AB_API int ab_ane_self_test_report(ab_ane_ctx *ctx, char *buf, size_t cap, size_t *needed);
/* Drop every cached program (a failed shape is tried again afterwards) and
 * staged weight; compiles already spent stay spent. */
AB_API int ab_ane_clear_cache(ab_ane_ctx *ctx);
/* dx[N,in] (+)= dy[N,out] · W[out,in] on the ANE, tile by tile; a tile whose
 * fp16 result overflows or saturates is re-run at a lower scale, then on the
 * CPU (as are budget/range problems).
 * w_version: 0 = convert W to fp16 on this call; else the version of the
 * buffer holding W (bump it whenever W changes, e.g. at each optimiser step):
 * W is converted once per (W, shape, version) and the fp16 copy reused.
 * Platform errors: without AB_ANE_STRICT the CPU takes over silently; with
 * it the error is returned, and dx is either untouched (the program could not
 * be built) or complete (evaluation failed midway: the rest ran on the CPU). */
AB_API int ab_ane_linear_backward_dx(ab_ane_ctx *ctx, float *dx, const float *dy,
                              const float *W, uint64_t w_version, int64_t N, int64_t in,
                              int64_t out, int accumulate, int flags,
                              ab_ane_call_info *info, char *err, size_t errcap);
/* y[N,out] = x[N,in] · W[out,in]^T on the ANE: the same dynamic-weight
 * program as dx (x^T packed with W^T, the contracted dimension in), W^T
 * staged once per (W, shape, version); tiles, loss scaling (of x),
 * fallbacks, flags and errors as above. */
AB_API int ab_ane_linear_forward(ab_ane_ctx *ctx, float *y, const float *x, const float *W,
                                 uint64_t w_version, int64_t N, int64_t in, int64_t out, int flags,
                                 ab_ane_call_info *info, char *err, size_t errcap);
/* The same call queued to the context's worker thread: returns at once, so
 * the caller can do CPU work (the weight gradients) meanwhile. dx, dy and W
 * must stay valid and untouched until ab_ane_job_wait, which every job needs
 * (it reports like the synchronous call and frees the job). */
AB_API int ab_ane_linear_backward_dx_submit(ab_ane_ctx *ctx, ab_ane_job **job, float *dx,
                                     const float *dy, const float *W, uint64_t w_version,
                                     int64_t N, int64_t in, int64_t out, int accumulate,
                                     int flags);
AB_API int ab_ane_job_wait(ab_ane_job *job, ab_ane_call_info *info, char *err, size_t errcap);
/* Monotonic clock in ns, the one ab_ane_call_info's timestamps use. */
AB_API int ab_ane_clock_ns(int64_t *out);
/* Compile, load, evaluate once and unload arbitrary MIL with one input and
 * one output surface (raw bytes); counts as a compile. For tests/diagnosis. */
AB_API int ab_ane_run_mil(ab_ane_ctx *ctx, const char *mil, const void *in, size_t in_bytes,
                   void *out, size_t out_bytes, char *err, size_t errcap);
/* dx of a 256 x 768 x 768 problem (S x in x out: a shape the origin project
 * ran on the hardware) through the platform, compared with the CPU within
 * fp16 tolerance; the result is kept for ab_ane_self_test_report and the
 * stats. The darwin platform runs it whenever a context opens: a failure
 * makes ab_ane_open fail with AB_ANE_EUNAVAILABLE and the reason. */
AB_API int ab_ane_self_test(ab_ane_ctx *ctx, char *err, size_t errcap);
/* ab_model_forward with the layer projections (wq wk wv wo w1 w2 w3; not
 * the classifier) run on the ANE context (ab_ane_linear_forward: fp16
 * operands, results within fp16 rounding of the CPU's), the rest on the
 * CPU; params_version and ane_flags as for ab_model_backward_ane below; ane
 * NULL: exactly ab_model_forward. A recompute backward (c->recompute) given
 * the same context rebuilds the activations the same way. */
AB_API int ab_model_forward_ane(double *loss_out, const ab_model_config *c, const float *params,
                                const int32_t *tokens, const int32_t *targets, int64_t B, int64_t S,
                                int want_grad, float *work, int64_t work_floats, ab_ane_ctx *ane,
                                uint64_t params_version, int ane_flags);
/* ab_model_backward with the layer projections' dx (wq wk wv wo w1 w2 w3;
 * not the classifier) run on the ANE from the calling thread (fused for
 * projections sharing an input: w1+w3, wq+wk+wv, one evaluation each), and every
 * weight gradient queued to the context's worker thread as its inputs are
 * ready (a serial CPU queue; its scratch inputs copied), waited for once at
 * the end (with recompute: also before each layer's recompute). params_version: the staging key of
 * the weights (w_version above): bump it whenever params change, e.g. at
 * each optimiser step. ane_flags: 0 (platform errors: the CPU takes over) or
 * AB_ANE_STRICT (they are returned). ane NULL: exactly ab_model_backward.
 * The reference kernels (c->reference) take no ANE: AB_EINVAL. */
AB_API int ab_model_backward_ane(const ab_model_config *c, const float *params, float *grads,
                                 int64_t B, int64_t S, float grad_scale, int accumulate,
                                 float *work, int64_t work_floats, ab_ane_ctx *ane,
                                 uint64_t params_version, int ane_flags);

/* CDEF END */

#ifdef __cplusplus
}
#endif
#endif /* ANEBACKWARD_H */
