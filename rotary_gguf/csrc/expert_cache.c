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
 */
#include <math.h>

#include "topk.h"

#define MAX_WEIGHTS 4
#define RESCALE_STEPS 512

enum { MODE_HOST = 0, MODE_CACHED = 1, MODE_LOOK = 2 };

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
        l->step = l->base = 0;
    }
    memset(c->hits, 0, sizeof(int64_t) * c->n_layer);
    memset(c->misses, 0, sizeof(int64_t) * c->n_layer);
    c->uploaded_bytes = c->failures = 0;
}

struct expert_cache *expert_cache_new(int32_t n_layer, int32_t n_expert, int32_t n_used, int32_t slots, double decay,
                                      eval_fn look) {
    if (n_layer < 1 || n_used < 1 || slots < n_used || slots > n_expert || !(decay > 0 && decay < 1) || !look) {
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
    c->free_slots = malloc(sizeof(int32_t) * slots);
    c->mark = malloc(n_expert);
    c->values = malloc(sizeof(float) * n_used);
    bool ok = c->layers && c->hits && c->misses && c->needed && c->missing && c->free_slots && c->mark && c->values;
    for (int32_t i = 0; ok && i < n_layer; i++) {
        struct layer *l = &c->layers[i];
        l->slot_of = malloc(sizeof(int32_t) * n_expert);
        l->expert_in = malloc(sizeof(int32_t) * slots);
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

/* Serve the selections of topk node `t` (its bytes at `ids`) from the slots of `layer`. */
static void remap(struct expert_cache *c, struct ggml_tensor *t, uint8_t *ids, struct layer *l, int32_t layer) {
    struct ggml_tensor *probs = t->view_src ? t->view_src->src[0] : NULL;
    int32_t n_used = (int32_t)t->ne[0];
    if (n_used > c->n_used || !probs || probs->type != GGML_TYPE_F32 || probs->ne[0] != c->n_expert) {
        c->failures++;
        return;
    }
    uint8_t *p = tensor_host_bytes(probs, &c->probs, &c->probs_size);
    if (!p) {
        c->failures++;
        return;
    }
    memset(c->mark, 0, c->n_expert);
    for (int64_t i = 0; i < t->ne[1]; i++) {
        const int32_t *row = (const int32_t *)(ids + i * t->nb[1]);
        for (int32_t k = 0; k < n_used; k++) {
            if (row[k] < 0 || row[k] >= c->n_expert) {
                c->failures++;
                return;
            }
            c->mark[row[k]] = 1;
        }
    }
    int32_t uploads = admit(c, l);
    if (uploads < 0) {
        c->failures++;
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

/* ggml_backend_sched_eval_callback */
bool expert_cache_eval(struct ggml_tensor *t, bool ask, void *user_data) {
    struct expert_cache *c = user_data;
    if (c->mode == MODE_LOOK) {
        return c->look(t, ask, NULL);
    }
    bool counting = c->tap && moe_tap_wants(c->tap);
    if (ask) {
        return (c->mode == MODE_CACHED || counting) && topk_is(t);
    }
    int32_t layer = topk_layer(t);
    bool serving = c->mode == MODE_CACHED && layer >= 0 && layer < c->n_layer && c->layers[layer].n_weights > 0;
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
    if (serving) {
        remap(c, t, ids, &c->layers[layer], layer);
    }
    return true;
}
