/* ThreadSanitizer driver for the worker pool (.ci/threads-tsan): four threads
 * call threaded kernels at once while one of them changes the thread count;
 * any data race in csrc/threads.c, csrc/gemm.c or a kernel is a TSan report
 * (exit code 66). Results are checked by the Python tests, not here. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include "anebackward.h"
#define N 600
#define D 256
static float x[4][N * D], w[D], dy[4][N * D], dx[4][N * D], dwv[4][D], q[4][2 * 130 * 64], k[4][2 * 130 * 32], o[4][2 * 130 * 64];
static float W[4][500 * D], y[4][N * 500];
static void *run(void *arg) {
    int i = (int)(long)arg;
    int64_t wf = ab_attention_workspace_floats(130);
    float *ws = malloc(wf * 4);
    for (int rep = 0; rep < 20; rep++) {
        memset(dwv[i], 0, sizeof dwv[i]);
        if (ab_rmsnorm_backward(dx[i], dwv[i], dy[i], x[i], w, N, D, 1e-5f, 0)) abort();
        if (ab_attention_forward(o[i], q[i], k[i], k[i], 2, 130, 4, 2, 16, ws, wf)) abort();
        float *dq = malloc(sizeof q[i]), *dk = malloc(sizeof k[i]), *dv = malloc(sizeof k[i]);
        if (ab_attention_backward(dq, dk, dv, o[i], q[i], k[i], k[i], 2, 130, 4, 2, 16, ws, wf)) abort();
        free(dq); free(dk); free(dv);
        if (ab_linear_forward(y[i], x[i], W[i], N, D, 500)) abort();
        double ss = 0; if (ab_sumsq(&ss, x[i], N * D)) abort();
        if (i == 0 && rep % 5 == 0) ab_set_num_threads(1 + rep % 4);
    }
    free(ws);
    return NULL;
}
int main(void) {
    srand(1);
    for (int i = 0; i < 4; i++) {
        for (int j = 0; j < N * D; j++) { x[i][j] = rand() / (float)RAND_MAX; dy[i][j] = rand() / (float)RAND_MAX; }
        for (int j = 0; j < 2 * 130 * 64; j++) q[i][j] = rand() / (float)RAND_MAX;
        for (int j = 0; j < 2 * 130 * 32; j++) k[i][j] = rand() / (float)RAND_MAX;
        for (int j = 0; j < 500 * D; j++) W[i][j] = rand() / (float)RAND_MAX;
    }
    for (int j = 0; j < D; j++) w[j] = 1;
    ab_set_num_threads(3);
    pthread_t t[4];
    for (long i = 0; i < 4; i++) pthread_create(&t[i], NULL, run, (void *)i);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("ok\n");
    return 0;
}
