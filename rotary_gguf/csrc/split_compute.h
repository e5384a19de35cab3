/* split_compute.h: the CPU worker of split compute (split_compute.c), as the expert cache uses it. */
#ifndef ROTARY_SPLIT_COMPUTE_H
#define ROTARY_SPLIT_COMPUTE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-backend.h"
#include "ggml.h"

/* One expert weight of a block in host memory: [ne0, ne1, n_expert] of `type`, contiguous. */
struct split_weight {
    int32_t type; /* enum ggml_type */
    int64_t ne0, ne1, n_expert;
    const uint8_t *host; /* NULL: the block has no such weight */
};

/* A block's expert FFN: fused gate_up, or separate gate and up; then down. */
struct split_layer {
    struct split_weight gate_up, gate, up, down;
};

/* Nanoseconds of the monotonic clock: the worker's and the hot path's timings. */
static inline int64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct split_worker;
struct split_worker *split_worker_new(int32_t n_embd, int64_t n_ff, int32_t max_cols, int32_t n_threads);
void split_worker_free(struct split_worker *s);
/* Where the caller writes a job's inputs before starting it: x [n_embd, cols] and the expert of
 * each column. */
float *split_worker_input(struct split_worker *s);
int32_t *split_worker_experts(struct split_worker *s);
int64_t *split_worker_compute_ns(struct split_worker *s);
bool split_worker_start(struct split_worker *s, const struct split_layer *layer, int32_t n_cols);
/* The outputs [n_embd, cols] of the started job, or NULL when it failed. */
const float *split_worker_wait(struct split_worker *s);

#endif
