/* split_compute: the CPU worker of split compute. While the accelerator computes the experts its
 * slots hold, this worker computes the missed ones from the host copy of the weights, with ggml's
 * own CPU kernels (MUL_MAT_ID, SWIGLU), so each output is the one llama.cpp's CPU path gives.
 *
 * One job at a time: split_worker_start() hands it the FFN input of the tokens and the expert of
 * each column (one column per missed selection) and returns at once; split_worker_wait() blocks
 * until the outputs [n_embd, n_cols] are ready. The expert cache (expert_cache.c) starts a job at a
 * block's `ffn_moe_topk` node and waits for it at the block's `ffn_moe_weighted` node.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>

#include "ggml-cpu.h"
#include "split_compute.h"

struct split_worker {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake, done_cond;
    bool has_job, done, quit, ok;
    ggml_backend_t cpu;
    /* the job */
    const struct split_layer *layer;
    int32_t n_cols;
    float *x;        /* [n_embd, n_cols] */
    int32_t *ids;    /* [n_cols] */
    float *out;      /* [n_embd, n_cols] */
    int32_t max_cols, n_embd;
    void *arena;
    size_t arena_size;
    int64_t compute_ns; /* total time spent computing jobs */
};

/* A weight of the layer as a ggml tensor over its host bytes, [ne0, ne1, n_expert]. */
static struct ggml_tensor *host_weight(struct ggml_context *ctx, const struct split_weight *w) {
    struct ggml_tensor *t = ggml_new_tensor_3d(ctx, w->type, w->ne0, w->ne1, w->n_expert);
    t->data = (void *)w->host;
    return t;
}

static bool compute(struct split_worker *s) {
    const struct split_layer *l = s->layer;
    int32_t n = s->n_cols, n_embd = s->n_embd;
    /* weights: headers only, their data is the host copy */
    struct ggml_init_params wp = {ggml_tensor_overhead() * 8, NULL, true};
    struct ggml_context *wctx = ggml_init(wp);
    struct ggml_init_params cp = {s->arena_size, s->arena, false};
    struct ggml_context *ctx = wctx ? ggml_init(cp) : NULL;
    if (!ctx) {
        if (wctx) {
            ggml_free(wctx);
        }
        return false;
    }
    struct ggml_tensor *x = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_embd, 1, n);
    memcpy(x->data, s->x, sizeof(float) * n_embd * n);
    struct ggml_tensor *ids = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 1, n);
    memcpy(ids->data, s->ids, sizeof(int32_t) * n);
    struct ggml_tensor *gate, *up;
    if (l->gate_up.host) {
        struct ggml_tensor *gu = ggml_mul_mat_id(ctx, host_weight(wctx, &l->gate_up), x, ids); /* [2 n_ff, 1, n] */
        int64_t n_ff = gu->ne[0] / 2;
        gate = ggml_view_3d(ctx, gu, n_ff, gu->ne[1], gu->ne[2], gu->nb[1], gu->nb[2], 0);
        up = ggml_view_3d(ctx, gu, n_ff, gu->ne[1], gu->ne[2], gu->nb[1], gu->nb[2], n_ff * gu->nb[0]);
    } else {
        up = ggml_mul_mat_id(ctx, host_weight(wctx, &l->up), x, ids);
        gate = ggml_mul_mat_id(ctx, host_weight(wctx, &l->gate), x, ids);
    }
    struct ggml_tensor *h = ggml_swiglu_split(ctx, gate, up);
    struct ggml_tensor *y = ggml_mul_mat_id(ctx, host_weight(wctx, &l->down), h, ids); /* [n_embd, 1, n] */
    struct ggml_cgraph *gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, y);
    bool ok = ggml_backend_graph_compute(s->cpu, gf) == GGML_STATUS_SUCCESS;
    if (ok) {
        memcpy(s->out, y->data, sizeof(float) * n_embd * n);
    }
    ggml_free(ctx);
    ggml_free(wctx);
    return ok;
}

static void *run(void *arg) {
    struct split_worker *s = arg;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->has_job && !s->quit) {
            pthread_cond_wait(&s->wake, &s->lock);
        }
        if (s->quit) {
            break;
        }
        pthread_mutex_unlock(&s->lock);
        int64_t t0 = monotonic_ns();
        bool ok = compute(s);
        int64_t spent = monotonic_ns() - t0;
        pthread_mutex_lock(&s->lock);
        s->compute_ns += spent;
        s->ok = ok;
        s->has_job = false;
        s->done = true;
        pthread_cond_signal(&s->done_cond);
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* Arena bytes for a job of `cols` columns: inputs, gate+up, swiglu, outputs, graph, tensors. */
static size_t arena_bytes(int32_t cols, int32_t n_embd, int64_t n_ff) {
    size_t floats = (size_t)cols * (size_t)(2 * n_embd + 4 * n_ff + 1);
    return floats * sizeof(float) + ggml_graph_overhead() + ggml_tensor_overhead() * 16 + 1024 * 64;
}

/* Everything a worker holds; `sync` also its lock and conditions (once they exist). */
static void release(struct split_worker *s, bool sync) {
    if (sync) {
        pthread_mutex_destroy(&s->lock);
        pthread_cond_destroy(&s->wake);
        pthread_cond_destroy(&s->done_cond);
    }
    if (s->cpu) {
        ggml_backend_free(s->cpu);
    }
    free(s->arena);
    free(s->x);
    free(s->out);
    free(s->ids);
    free(s);
}

struct split_worker *split_worker_new(int32_t n_embd, int64_t n_ff, int32_t max_cols, int32_t n_threads) {
    struct split_worker *s = calloc(1, sizeof *s);
    if (!s) {
        return NULL;
    }
    s->n_embd = n_embd;
    s->max_cols = max_cols;
    s->arena_size = arena_bytes(max_cols, n_embd, n_ff);
    s->arena = malloc(s->arena_size);
    s->x = malloc(sizeof(float) * n_embd * max_cols);
    s->out = malloc(sizeof(float) * n_embd * max_cols);
    s->ids = malloc(sizeof(int32_t) * max_cols);
    s->cpu = ggml_backend_cpu_init();
    if (!s->arena || !s->x || !s->out || !s->ids || !s->cpu) {
        release(s, false);
        return NULL;
    }
    ggml_backend_cpu_set_n_threads(s->cpu, n_threads > 0 ? n_threads : 1);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->wake, NULL);
    pthread_cond_init(&s->done_cond, NULL);
    if (pthread_create(&s->thread, NULL, run, s) != 0) {
        release(s, true);
        return NULL;
    }
    return s;
}

void split_worker_free(struct split_worker *s) {
    if (!s) {
        return;
    }
    pthread_mutex_lock(&s->lock);
    s->quit = true;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
    release(s, true);
}

float *split_worker_input(struct split_worker *s) { return s->x; }
int32_t *split_worker_experts(struct split_worker *s) { return s->ids; }
int64_t *split_worker_compute_ns(struct split_worker *s) { return &s->compute_ns; }

bool split_worker_start(struct split_worker *s, const struct split_layer *layer, int32_t n_cols) {
    if (n_cols < 1 || n_cols > s->max_cols) {
        return false;
    }
    pthread_mutex_lock(&s->lock);
    s->layer = layer;
    s->n_cols = n_cols;
    s->done = false;
    s->has_job = true;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    return true;
}

const float *split_worker_wait(struct split_worker *s) {
    pthread_mutex_lock(&s->lock);
    while (!s->done) {
        pthread_cond_wait(&s->done_cond, &s->lock);
    }
    bool ok = s->ok;
    pthread_mutex_unlock(&s->lock);
    return ok ? s->out : NULL;
}
