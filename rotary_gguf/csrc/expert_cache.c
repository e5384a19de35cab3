/* expert_cache: the hot path of the rotary expert cache, as a llama.cpp eval callback.
 *
 * The graph scheduler asks the callback about every node (thousands per token); only the
 * `ffn_moe_topk-<layer>` nodes are wanted while the cache is bound. At such a node (I32
 * [n_used, n_tokens], a view whose token rows are nb[1] bytes apart) the callback admits the
 * selected experts with the decayed-LFU policy (the same arithmetic and tie-breaks as
 * rotary_gguf/expert_cache.py's DecayedLFU, so a Python replay gives the same counts), uploads the
 * missing experts into their slots, rewrites the ids to slot numbers, and moves each selected
 * probability to its slot's position in the probability row the routing weights are gathered
 * from (src[0] of the topk view's argsort).
 *
 * The control plane (finding the expert tensors, binding them to the slots, the startup check)
 * is Python: in "look" mode every question is passed on to a Python callback.
 *
 * With a routing tap attached (expert_cache_set_tap), the callback also records every selection
 * into it, in file positions, before remapping: telemetry and cache share one eval callback.
 *
 * Split mode (split compute): a miss is not uploaded before the block runs. Hits go to their
 * slots, misses to one extra all-zero slot (its output is exactly 0), and the CPU worker
 * (split_compute.c) computes the missed experts from the host copy at the same time. Two more
 * nodes of the block are then asked for: at `ffn_moe_weights` (the probabilities gathered with the
 * remapped ids) the true probabilities are written back, so the normalized weights are the
 * uncached ones; at `ffn_moe_weighted` (each expert's output times its weight, before the sum) the
 * worker's outputs times their weights are written into the missed positions. The adds that follow
 * sum the same values in the same order as the uncached graph. Missed experts are admitted into
 * slots between decode calls (expert_cache_admit_pending), under a budget of bytes.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>

#include "split_compute.h"
#include "topk.h"

#define MAX_WEIGHTS 4
#define RESCALE_STEPS 512

enum { MODE_HOST = 0, MODE_CACHED = 1, MODE_LOOK = 2, MODE_SPLIT = 3 };

#define WEIGHTS_PREFIX "ffn_moe_weights-"
#define WEIGHTED_PREFIX "ffn_moe_weighted-"

typedef bool (*eval_fn)(struct ggml_tensor *t, bool ask, void *user_data);

struct layer {
    int32_t n_weights;
    struct ggml_tensor *weights[MAX_WEIGHTS];
    const uint8_t *host[MAX_WEIGHTS]; /* the host copy of each weight: where uploads come from */
    size_t expert_bytes[MAX_WEIGHTS];
    int32_t *slot_of;   /* [n_expert]: slot of a resident expert, -1 */
    int32_t *expert_in; /* [slots]: expert in a slot, -1 */
    double *scaled;     /* [n_expert]: decayed use counts, scaled by decay**-(step - base) */
    int64_t *last_use;  /* [n_expert] */
    int64_t step, base;
    struct split_layer split; /* the host weights by role, for the CPU worker */
    uint8_t *pending;         /* [n_expert]: missed in split mode, waiting to be admitted */
};

/* The split-compute job of the block being computed (one at a time: blocks run in order). */
struct split_job {
    int32_t layer; /* -1: none */
    int32_t n_used, n_tokens, n_miss;
    int32_t *miss_pos; /* [n_used * max_tokens]: token * n_used + k of each worker column */
    float *p_true;     /* [n_used * max_tokens]: the selected probabilities, in selection order */
    float *row;        /* [n_embd]: one weighted output row */
};

struct expert_cache {
    int32_t n_layer, n_expert, n_used, slots, mode;
    double decay;
    eval_fn look;
    struct moe_tap *tap; /* or NULL */
    struct layer *layers;
    int64_t *hits, *misses; /* [n_layer]: distinct selections served from a slot / uploaded */
    int64_t uploaded_bytes, failures;
    int32_t *needed, *missing, *free_slots;
    uint8_t *mark;
    float *values;
    uint8_t *topk, *probs;
    size_t topk_size, probs_size;
    /* split mode */
    struct split_worker *worker;
    struct split_job job;
    int32_t max_tokens, n_embd, admit_cursor;
    uint8_t *x, *scratch;
    size_t x_size, scratch_size;
    int64_t wait_ns; /* time the graph waited for the worker at `ffn_moe_weighted` */
    int64_t hot_ns;  /* time in split mode's own reads, remaps and writes (waiting excluded) */
};

void expert_cache_free(struct expert_cache *c) {
    if (!c) {
        return;
    }
    for (int32_t i = 0; c->layers && i < c->n_layer; i++) {
        free(c->layers[i].slot_of);
        free(c->layers[i].expert_in);
        free(c->layers[i].scaled);
        free(c->layers[i].last_use);
    }
    free(c->layers);
    free(c->hits);
    free(c->misses);
    free(c->needed);
    free(c->missing);
    free(c->free_slots);
    free(c->mark);
    free(c->values);
    free(c->topk);
    free(c->probs);
    for (int32_t i = 0; c->layers && i < c->n_layer; i++) {
        free(c->layers[i].pending);
    }
    split_worker_free(c->worker);
    free(c->job.miss_pos);
    free(c->job.p_true);
    free(c->job.row);
    free(c->x);
    free(c->scratch);
    free(c);
}

/* Forget every resident expert, use count and statistic (the slots' bytes stay). */
void expert_cache_reset(struct expert_cache *c) {
    for (int32_t i = 0; i < c->n_layer; i++) {
        struct layer *l = &c->layers[i];
        memset(l->slot_of, 0xff, sizeof(int32_t) * c->n_expert);
        memset(l->expert_in, 0xff, sizeof(int32_t) * c->slots);
        memset(l->scaled, 0, sizeof(double) * c->n_expert);
        memset(l->last_use, 0, sizeof(int64_t) * c->n_expert);
        if (l->pending) {
            memset(l->pending, 0, c->n_expert);
        }
        l->step = l->base = 0;
    }
    c->job.layer = -1;
    c->wait_ns = c->hot_ns = 0;
    if (c->worker) {
        *split_worker_compute_ns(c->worker) = 0;
    }
    memset(c->hits, 0, sizeof(int64_t) * c->n_layer);
    memset(c->misses, 0, sizeof(int64_t) * c->n_layer);
    c->uploaded_bytes = c->failures = 0;
}

struct expert_cache *expert_cache_new(int32_t n_layer, int32_t n_expert, int32_t n_used, int32_t slots, double decay,
                                      eval_fn look) {
    if (n_layer < 1 || n_used < 1 || slots < 0 || slots > n_expert || !(decay > 0 && decay < 1) || !look) {
        return NULL;
    }
    struct expert_cache *c = calloc(1, sizeof *c);
    if (!c) {
        return NULL;
    }
    c->n_layer = n_layer;
    c->n_expert = n_expert;
    c->n_used = n_used;
    c->slots = slots;
    c->decay = decay;
    c->look = look;
    c->mode = MODE_LOOK;
    c->layers = calloc(n_layer, sizeof *c->layers);
    c->hits = malloc(sizeof(int64_t) * n_layer);
    c->misses = malloc(sizeof(int64_t) * n_layer);
    c->needed = malloc(sizeof(int32_t) * n_expert);
    c->missing = malloc(sizeof(int32_t) * n_expert);
    c->free_slots = malloc(sizeof(int32_t) * (slots + 1));
    c->mark = malloc(n_expert);
    c->values = malloc(sizeof(float) * n_used);
    bool ok = c->layers && c->hits && c->misses && c->needed && c->missing && c->free_slots && c->mark && c->values;
    for (int32_t i = 0; ok && i < n_layer; i++) {
        struct layer *l = &c->layers[i];
        l->slot_of = malloc(sizeof(int32_t) * n_expert);
        l->expert_in = malloc(sizeof(int32_t) * (slots + 1));
        l->scaled = malloc(sizeof(double) * n_expert);
        l->last_use = malloc(sizeof(int64_t) * n_expert);
        ok = l->slot_of && l->expert_in && l->scaled && l->last_use;
    }
    if (!ok) {
        expert_cache_free(c);
        return NULL;
    }
    expert_cache_reset(c);
    return c;
}

void expert_cache_set_mode(struct expert_cache *c, int32_t mode) { c->mode = mode; }

void expert_cache_set_tap(struct expert_cache *c, struct moe_tap *tap) { c->tap = tap; }

/* Weight `index` of `layer`: a host expert tensor (already bound to its slots or not), with the
 * address of its host copy and the bytes of one expert. */
bool expert_cache_set_weight(struct expert_cache *c, int32_t layer, int32_t index, struct ggml_tensor *weight,
                             const uint8_t *host, size_t expert_bytes) {
    if (layer < 0 || layer >= c->n_layer || index < 0 || index >= MAX_WEIGHTS) {
        return false;
    }
    struct layer *l = &c->layers[layer];
    l->weights[index] = weight;
    l->host[index] = host;
    l->expert_bytes[index] = expert_bytes;
    if (index >= l->n_weights) {
        l->n_weights = index + 1;
    }
    return true;
}

int64_t *expert_cache_hits(struct expert_cache *c) { return c->hits; }
int64_t *expert_cache_misses(struct expert_cache *c) { return c->misses; }
int64_t *expert_cache_uploaded_bytes(struct expert_cache *c) { return &c->uploaded_bytes; }
int64_t *expert_cache_failures(struct expert_cache *c) { return &c->failures; }
int32_t *expert_cache_slot_of(struct expert_cache *c, int32_t layer) { return c->layers[layer].slot_of; }

static void touch(struct expert_cache *c, struct layer *l, int32_t e) {
    if (l->step - l->base >= RESCALE_STEPS) {
        double factor = pow(c->decay, (double)(l->step - l->base));
        for (int32_t i = 0; i < c->n_expert; i++) {
            l->scaled[i] *= factor;
        }
        l->base = l->step;
    }
    l->scaled[e] += pow(c->decay, -(double)(l->step - l->base));
    l->last_use[e] = l->step;
}

static bool ranks_lower(const struct layer *l, int32_t a, int32_t b) {
    if (l->scaled[a] != l->scaled[b]) {
        return l->scaled[a] < l->scaled[b];
    }
    if (l->last_use[a] != l->last_use[b]) {
        return l->last_use[a] < l->last_use[b];
    }
    return a < b;
}

static int cmp_i32(const void *a, const void *b) { return *(const int32_t *)a - *(const int32_t *)b; }

/* Admit the marked experts (c->mark); the uploads are missing[i] -> free_slots[i]. Returns how
 * many, or -1 when they do not all fit. */
static int32_t admit(struct expert_cache *c, struct layer *l) {
    int32_t n_needed = 0, n_missing = 0, n_free = 0;
    for (int32_t e = 0; e < c->n_expert; e++) {
        if (c->mark[e]) {
            c->needed[n_needed++] = e;
        }
    }
    l->step++;
    if (n_needed > c->slots) {
        return -1;
    }
    for (int32_t i = 0; i < n_needed; i++) {
        if (l->slot_of[c->needed[i]] < 0) {
            c->missing[n_missing++] = c->needed[i];
        }
    }
    for (int32_t s = 0; s < c->slots; s++) {
        if (l->expert_in[s] < 0) {
            c->free_slots[n_free++] = s;
        }
    }
    while (n_free < n_missing) { /* evict the lowest-ranked resident expert not needed now */
        int32_t victim = -1;
        for (int32_t s = 0; s < c->slots; s++) {
            int32_t e = l->expert_in[s];
            if (e >= 0 && !c->mark[e] && (victim < 0 || ranks_lower(l, e, victim))) {
                victim = e;
            }
        }
        int32_t slot = l->slot_of[victim];
        l->slot_of[victim] = -1;
        l->expert_in[slot] = -1;
        c->free_slots[n_free++] = slot;
    }
    qsort(c->free_slots, n_free, sizeof(int32_t), cmp_i32);
    for (int32_t i = 0; i < n_missing; i++) {
        l->slot_of[c->missing[i]] = c->free_slots[i];
        l->expert_in[c->free_slots[i]] = c->missing[i];
    }
    for (int32_t i = 0; i < n_needed; i++) {
        touch(c, l, c->needed[i]);
    }
    return n_missing;
}

/* After a failure, point every selection at slot 0 (it exists in every binding): the output of
 * this call is wrong, but no kernel reads past the slots. The control plane sees `failures` and
 * turns the cache off before the next call. */
static void fail_safe(struct expert_cache *c, struct ggml_tensor *t, uint8_t *ids) {
    c->failures++;
    for (int64_t i = 0; i < t->ne[1]; i++) {
        memset(ids + i * t->nb[1], 0, sizeof(int32_t) * (size_t)t->ne[0]);
    }
    if ((void *)ids != t->data) {
        ggml_backend_tensor_set(t, ids, 0, ggml_nbytes(t));
    }
}

/* The routing probabilities a topk view was sorted from (src[0] of its argsort: F32 [n_expert,
 * n_tokens]) in *probs, and a host address holding them; NULL when they are not that. */
static uint8_t *routing_probs(struct expert_cache *c, struct ggml_tensor *t, struct ggml_tensor **probs) {
    *probs = t->view_src ? t->view_src->src[0] : NULL;
    if (!*probs || (*probs)->type != GGML_TYPE_F32 || (*probs)->ne[0] != c->n_expert) {
        return NULL;
    }
    return tensor_host_bytes(*probs, &c->probs, &c->probs_size);
}

/* Serve the selections of topk node `t` (its bytes at `ids`) from the slots of `layer`. */
static void remap(struct expert_cache *c, struct ggml_tensor *t, uint8_t *ids, struct layer *l, int32_t layer) {
    struct ggml_tensor *probs;
    int32_t n_used = (int32_t)t->ne[0];
    uint8_t *p = n_used <= c->n_used ? routing_probs(c, t, &probs) : NULL;
    if (!p) {
        fail_safe(c, t, ids);
        return;
    }
    memset(c->mark, 0, c->n_expert);
    for (int64_t i = 0; i < t->ne[1]; i++) {
        const int32_t *row = (const int32_t *)(ids + i * t->nb[1]);
        for (int32_t k = 0; k < n_used; k++) {
            if (row[k] < 0 || row[k] >= c->n_expert) {
                fail_safe(c, t, ids);
                return;
            }
            c->mark[row[k]] = 1;
        }
    }
    int32_t uploads = admit(c, l);
    if (uploads < 0) {
        fail_safe(c, t, ids);
        return;
    }
    int32_t n_needed = 0;
    for (int32_t e = 0; e < c->n_expert; e++) {
        n_needed += c->mark[e];
    }
    c->hits[layer] += n_needed - uploads;
    c->misses[layer] += uploads;
    for (int32_t i = 0; i < uploads; i++) {
        int32_t e = c->missing[i], slot = c->free_slots[i];
        for (int32_t w = 0; w < l->n_weights; w++) {
            size_t n = l->expert_bytes[w];
            ggml_backend_tensor_set(l->weights[w], l->host[w] + (size_t)e * n, (size_t)slot * n, n);
            c->uploaded_bytes += (int64_t)n;
        }
    }
    for (int64_t i = 0; i < t->ne[1]; i++) {
        int32_t *row = (int32_t *)(ids + i * t->nb[1]);
        float *prob_row = (float *)(p + i * probs->nb[1]);
        for (int32_t k = 0; k < n_used; k++) {
            c->values[k] = prob_row[row[k]];
        }
        for (int32_t k = 0; k < n_used; k++) {
            row[k] = l->slot_of[row[k]];
            prob_row[row[k]] = c->values[k];
        }
    }
    if (ids == c->topk) {
        ggml_backend_tensor_set(t, ids, 0, ggml_nbytes(t));
    }
    if (p == c->probs) {
        ggml_backend_tensor_set(probs, p, 0, ggml_nbytes(probs));
    }
}

/* --- split mode ---------------------------------------------------------------------------- */

/* Start the CPU worker: one thread pool of `n_threads` for batches of up to `max_tokens` tokens of
 * an FFN input of `n_embd`, experts of `n_ff`. */
bool expert_cache_enable_split(struct expert_cache *c, int32_t n_embd, int64_t n_ff, int32_t max_tokens,
                               int32_t n_threads) {
    if (c->worker || n_embd < 1 || n_ff < 1 || max_tokens < 1 || c->slots >= c->n_expert) {
        return false;
    }
    int32_t cols = c->n_used * max_tokens;
    c->worker = split_worker_new(n_embd, n_ff, cols, n_threads);
    c->job.miss_pos = malloc(sizeof(int32_t) * cols);
    c->job.p_true = malloc(sizeof(float) * cols);
    c->job.row = malloc(sizeof(float) * n_embd);
    bool ok = c->worker && c->job.miss_pos && c->job.p_true && c->job.row;
    for (int32_t i = 0; ok && i < c->n_layer; i++) {
        c->layers[i].pending = calloc(c->n_expert, 1);
        ok = c->layers[i].pending != NULL;
    }
    c->max_tokens = max_tokens;
    c->n_embd = n_embd;
    c->job.layer = -1;
    return ok;
}

/* The host weight of `layer` with role 0 gate_up, 1 gate, 2 up, 3 down: [ne0, ne1, n_expert]. */
bool expert_cache_set_split_weight(struct expert_cache *c, int32_t layer, int32_t role, int32_t type, int64_t ne0,
                                   int64_t ne1, const uint8_t *host) {
    if (layer < 0 || layer >= c->n_layer || role < 0 || role > 3) {
        return false;
    }
    struct split_layer *sl = &c->layers[layer].split;
    struct split_weight *w = role == 0 ? &sl->gate_up : role == 1 ? &sl->gate : role == 2 ? &sl->up : &sl->down;
    w->type = type;
    w->ne0 = ne0;
    w->ne1 = ne1;
    w->n_expert = c->n_expert;
    w->host = host;
    return true;
}

int64_t *expert_cache_wait_ns(struct expert_cache *c) { return &c->wait_ns; }
int64_t *expert_cache_hot_ns(struct expert_cache *c) { return &c->hot_ns; }
int64_t *expert_cache_cpu_ns(struct expert_cache *c) { return c->worker ? split_worker_compute_ns(c->worker) : NULL; }

static bool split_ready(const struct split_layer *sl) {
    return sl->down.host && (sl->gate_up.host || (sl->gate.host && sl->up.host));
}

/* Write `size` bytes at `offset` of tensor `t`, in host or device memory. */
static void write_bytes(struct ggml_tensor *t, const void *src, size_t offset, size_t size) {
    if (ggml_backend_buffer_is_host(t->buffer)) {
        memcpy((uint8_t *)t->data + offset, src, size);
    } else {
        ggml_backend_tensor_set(t, src, offset, size);
    }
}

/* Split mode at a topk node: hits to their slots, misses to the zero slot and to the CPU worker. */
static void remap_split(struct expert_cache *c, struct ggml_tensor *t, uint8_t *ids, struct layer *l, int32_t layer) {
    struct ggml_tensor *probs;
    int32_t n_used = (int32_t)t->ne[0], n_tokens = (int32_t)t->ne[1];
    uint8_t *p = n_used <= c->n_used && n_tokens <= c->max_tokens ? routing_probs(c, t, &probs) : NULL;
    struct ggml_tensor *logits = p ? probs->src[0] : NULL;
    struct ggml_tensor *x = logits && logits->op == GGML_OP_MUL_MAT ? logits->src[1] : NULL; /* the FFN input */
    if (!x || x->type != GGML_TYPE_F32 || x->ne[0] != c->n_embd || x->nb[0] != sizeof(float) || x->ne[1] != n_tokens ||
        !split_ready(&l->split) || c->job.layer >= 0) {
        fail_safe(c, t, ids);
        return;
    }
    struct split_job *job = &c->job;
    float *x_cols = split_worker_input(c->worker);
    int32_t *experts = split_worker_experts(c->worker);
    int32_t zero = c->slots, n_miss = 0;
    l->step++;
    for (int32_t i = 0; i < n_tokens; i++) {
        int32_t *row = (int32_t *)(ids + (size_t)i * t->nb[1]);
        float *prob_row = (float *)(p + (size_t)i * probs->nb[1]);
        for (int32_t k = 0; k < n_used; k++) {
            int32_t e = row[k];
            if (e < 0 || e >= c->n_expert) {
                fail_safe(c, t, ids);
                return;
            }
            job->p_true[i * n_used + k] = prob_row[e];
            touch(c, l, e);
            if (l->slot_of[e] >= 0) {
                row[k] = l->slot_of[e];
                c->hits[layer]++;
                continue;
            }
            row[k] = zero;
            c->misses[layer]++;
            l->pending[e] = 1;
            job->miss_pos[n_miss] = i * n_used + k;
            experts[n_miss] = e;
            n_miss++;
        }
    }
    if (n_miss > 0) { /* the FFN input of the tokens with a miss, one column per missed expert */
        uint8_t *xs = tensor_host_bytes(x, &c->x, &c->x_size);
        if (!xs) {
            fail_safe(c, t, ids);
            return;
        }
        for (int32_t j = 0; j < n_miss; j++) {
            size_t token = (size_t)(job->miss_pos[j] / n_used);
            memcpy(x_cols + (size_t)j * c->n_embd, xs + token * x->nb[1], sizeof(float) * c->n_embd);
        }
    }
    if (ids == c->topk) {
        ggml_backend_tensor_set(t, ids, 0, ggml_nbytes(t));
    }
    if (n_miss == 0) { /* all hits: as in cached mode, each probability moves to its slot's place */
        for (int32_t i = 0; i < n_tokens; i++) {
            const int32_t *row = (const int32_t *)(ids + (size_t)i * t->nb[1]);
            float *prob_row = (float *)(p + (size_t)i * probs->nb[1]);
            for (int32_t k = 0; k < n_used; k++) {
                prob_row[row[k]] = job->p_true[i * n_used + k];
            }
        }
        if (p == c->probs) {
            ggml_backend_tensor_set(probs, p, 0, ggml_nbytes(probs));
        }
        return;
    }
    job->layer = layer;
    job->n_used = n_used;
    job->n_tokens = n_tokens;
    job->n_miss = n_miss;
    if (!split_worker_start(c->worker, &l->split, n_miss)) {
        c->failures++;
        job->layer = -1;
    }
}

/* At `ffn_moe_weights`: the selected probabilities in selection order, as the uncached graph has them. */
static void fill_weights(struct expert_cache *c, struct ggml_tensor *t) {
    struct split_job *job = &c->job;
    size_t n = (size_t)job->n_used * job->n_tokens;
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) || (size_t)ggml_nelements(t) != n) {
        c->failures++;
        return;
    }
    write_bytes(t, job->p_true, 0, n * sizeof(float));
}

/* At `ffn_moe_weighted`: the worker's outputs times their weights into the missed positions. */
static void fill_weighted(struct expert_cache *c, struct ggml_tensor *t) {
    struct split_job *job = &c->job;
    job->layer = -1;
    if (job->n_miss == 0) {
        return;
    }
    int64_t t0 = monotonic_ns();
    const float *y = split_worker_wait(c->worker);
    c->wait_ns += monotonic_ns() - t0;
    struct ggml_tensor *w = t->src[1];
    if (!y || !w || w->type != GGML_TYPE_F32 || t->type != GGML_TYPE_F32 || t->ne[0] != c->n_embd ||
        t->nb[0] != sizeof(float) || t->ne[1] != job->n_used || t->ne[2] != job->n_tokens ||
        (size_t)ggml_nelements(w) != (size_t)job->n_used * job->n_tokens || !ggml_is_contiguous(w)) {
        c->failures++;
        return;
    }
    const float *weights = (const float *)tensor_host_bytes(w, &c->scratch, &c->scratch_size);
    if (!weights) {
        c->failures++;
        return;
    }
    for (int32_t j = 0; j < job->n_miss; j++) {
        int32_t pos = job->miss_pos[j], i = pos / job->n_used, k = pos % job->n_used;
        float weight = weights[pos];
        const float *out = y + (size_t)j * c->n_embd;
        for (int32_t d = 0; d < c->n_embd; d++) {
            job->row[d] = out[d] * weight;
        }
        write_bytes(t, job->row, (size_t)i * t->nb[2] + (size_t)k * t->nb[1], sizeof(float) * c->n_embd);
    }
}

/* Admit experts missed in split mode into slots, best-ranked first, while they outrank the
 * residents they would replace, uploading at most `budget` bytes (< 0: no limit). Blocks take
 * turns at the front of the queue. Returns the bytes uploaded. */
int64_t expert_cache_admit_pending(struct expert_cache *c, int64_t budget) {
    int64_t spent = 0;
    for (int32_t n = 0; n < c->n_layer; n++) {
        int32_t layer = (c->admit_cursor + n) % c->n_layer;
        struct layer *l = &c->layers[layer];
        if (!l->pending || l->n_weights == 0) {
            continue;
        }
        size_t bytes = 0;
        for (int32_t w = 0; w < l->n_weights; w++) {
            bytes += l->expert_bytes[w];
        }
        for (;;) {
            int32_t best = -1;
            for (int32_t e = 0; e < c->n_expert; e++) {
                if (l->pending[e] && l->slot_of[e] < 0 && (best < 0 || ranks_lower(l, best, e))) {
                    best = e;
                }
            }
            if (best < 0) {
                break;
            }
            int32_t slot = -1, victim = -1;
            for (int32_t s = 0; s < c->slots && slot < 0; s++) {
                if (l->expert_in[s] < 0) {
                    slot = s;
                }
            }
            if (slot < 0) {
                for (int32_t s = 0; s < c->slots; s++) {
                    int32_t e = l->expert_in[s];
                    if (victim < 0 || ranks_lower(l, e, victim)) {
                        victim = e;
                    }
                }
                if (victim < 0 || !ranks_lower(l, victim, best)) {
                    break; /* nothing resident ranks below the best candidate */
                }
            }
            if (budget >= 0 && spent + (int64_t)bytes > budget) {
                c->admit_cursor = layer; /* this block goes first next time */
                return spent;
            }
            if (victim >= 0) {
                slot = l->slot_of[victim];
                l->slot_of[victim] = -1;
            }
            l->slot_of[best] = slot;
            l->expert_in[slot] = best;
            l->pending[best] = 0;
            for (int32_t w = 0; w < l->n_weights; w++) {
                size_t nb = l->expert_bytes[w];
                ggml_backend_tensor_set(l->weights[w], l->host[w] + (size_t)best * nb, (size_t)slot * nb, nb);
            }
            c->uploaded_bytes += (int64_t)bytes;
            spent += (int64_t)bytes;
        }
        memset(l->pending, 0, c->n_expert);
    }
    c->admit_cursor = 0;
    return spent;
}

/* The block of a `<prefix><layer>` node name, or -1 (also for "... (view)" names). */
static int32_t node_layer(const struct ggml_tensor *t, const char *prefix, size_t len) {
    if (strncmp(t->name, prefix, len) != 0) {
        return -1;
    }
    char *end;
    long layer = strtol(t->name + len, &end, 10);
    return end != t->name + len && *end == '\0' ? (int32_t)layer : -1;
}

/* ggml_backend_sched_eval_callback */
bool expert_cache_eval(struct ggml_tensor *t, bool ask, void *user_data) {
    struct expert_cache *c = user_data;
    if (c->mode == MODE_LOOK) {
        return c->look(t, ask, NULL);
    }
    bool counting = c->tap && moe_tap_wants(c->tap);
    bool splitting = c->mode == MODE_SPLIT;
    if (splitting && c->job.layer >= 0 && c->job.n_miss > 0) {
        int32_t layer = node_layer(t, WEIGHTS_PREFIX, sizeof WEIGHTS_PREFIX - 1);
        if (layer == c->job.layer) {
            if (!ask) {
                int64_t t0 = monotonic_ns();
                fill_weights(c, t);
                c->hot_ns += monotonic_ns() - t0;
            }
            return true;
        }
        layer = node_layer(t, WEIGHTED_PREFIX, sizeof WEIGHTED_PREFIX - 1);
        if (layer == c->job.layer) {
            if (!ask) {
                int64_t t0 = monotonic_ns(), waited = c->wait_ns;
                fill_weighted(c, t);
                c->hot_ns += monotonic_ns() - t0 - (c->wait_ns - waited);
            }
            return true;
        }
    }
    if (ask) {
        return (c->mode == MODE_CACHED || splitting || counting) && topk_is(t);
    }
    int32_t layer = topk_layer(t);
    bool serving = (c->mode == MODE_CACHED || splitting) && layer >= 0 && layer < c->n_layer &&
                   c->layers[layer].n_weights > 0;
    if (!serving && !counting) {
        return true;
    }
    uint8_t *ids = topk_readable(t) ? tensor_host_bytes(t, &c->topk, &c->topk_size) : NULL;
    if (!ids) {
        c->failures += serving;
        return true;
    }
    if (counting) {
        moe_tap_record_rows(c->tap, t, ids);
    }
    if (serving && splitting) {
        int64_t t0 = monotonic_ns();
        remap_split(c, t, ids, &c->layers[layer], layer);
        c->hot_ns += monotonic_ns() - t0;
    } else if (serving) {
        remap(c, t, ids, &c->layers[layer], layer);
    }
    return true;
}
