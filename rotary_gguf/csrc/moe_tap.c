/* moe_tap: a llama.cpp eval callback that records which experts each token's router selects.
 *
 * The graph scheduler asks the callback about every node it computes (thousands per token), so the
 * question must cost nanoseconds: only `ffn_moe_topk-<layer>` nodes are wanted. Such a node holds
 * the selected expert ids, I32 [n_used, n_tokens], a view whose token rows are nb[1] bytes apart.
 *
 * Counts are kept per layer in file positions (the expert ids llama.cpp sees); mapping them to a
 * model's original ids is the caller's job. The caller reads the arrays in place while decoding
 * goes on: figures may be one token apart, never torn (aligned 64-bit stores).
 *
 * The expert cache (expert_cache.c) records into a tap from its own callback when both run: one
 * eval callback per context.
 *
 * Built and loaded by rotary_gguf/native/callbacks.py, against the ggml headers llama-cpp-python installs.
 */
#include "topk.h"

struct moe_tap {
    int32_t n_layer, n_expert, n_used, window;
    bool enabled;
    int64_t *tokens;    /* [n_layer]: tokens routed through each layer */
    int64_t *counts;    /* [n_layer][n_expert]: selections since the last reset */
    int64_t *recent;    /* [n_layer][n_expert]: selections of the layer's last `window` tokens */
    int64_t *pairs;     /* [n_layer][n_expert][n_expert] or NULL: tokens that selected both */
    int32_t *ring;      /* [n_layer][window][n_used]: the last `window` selections, -1 = none */
    int64_t *ring_next; /* [n_layer]: tokens written to the ring (next slot = ring_next % window) */
    uint8_t *scratch;   /* copy of a topk tensor that lives in device memory */
    size_t scratch_size;
};

static void clear(struct moe_tap *tap) {
    size_t layer_experts = (size_t)tap->n_layer * tap->n_expert;
    memset(tap->tokens, 0, sizeof(int64_t) * tap->n_layer);
    memset(tap->counts, 0, sizeof(int64_t) * layer_experts);
    memset(tap->recent, 0, sizeof(int64_t) * layer_experts);
    if (tap->pairs) {
        memset(tap->pairs, 0, sizeof(int64_t) * layer_experts * tap->n_expert);
    }
    memset(tap->ring, 0xff, sizeof(int32_t) * tap->n_layer * tap->window * tap->n_used);
    memset(tap->ring_next, 0, sizeof(int64_t) * tap->n_layer);
}

void moe_tap_free(struct moe_tap *tap) {
    if (!tap) {
        return;
    }
    free(tap->tokens);
    free(tap->counts);
    free(tap->recent);
    free(tap->pairs);
    free(tap->ring);
    free(tap->ring_next);
    free(tap->scratch);
    free(tap);
}

/* A tap for a model of n_layer blocks with n_expert experts, n_used per token; it keeps the last
 * `window` tokens per layer for the recent counts, and pair counts when `with_pairs`. NULL when
 * out of memory or given nonsense. Starts enabled. */
struct moe_tap *moe_tap_new(int32_t n_layer, int32_t n_expert, int32_t n_used, int32_t window, bool with_pairs) {
    if (n_layer < 1 || n_expert < 1 || n_used < 1 || n_used > n_expert || window < 1) {
        return NULL;
    }
    struct moe_tap *tap = calloc(1, sizeof *tap);
    if (!tap) {
        return NULL;
    }
    size_t layer_experts = (size_t)n_layer * n_expert;
    tap->n_layer = n_layer;
    tap->n_expert = n_expert;
    tap->n_used = n_used;
    tap->window = window;
    tap->enabled = true;
    tap->tokens = malloc(sizeof(int64_t) * n_layer);
    tap->counts = malloc(sizeof(int64_t) * layer_experts);
    tap->recent = malloc(sizeof(int64_t) * layer_experts);
    tap->pairs = with_pairs ? malloc(sizeof(int64_t) * layer_experts * n_expert) : NULL;
    tap->ring = malloc(sizeof(int32_t) * n_layer * window * n_used);
    tap->ring_next = malloc(sizeof(int64_t) * n_layer);
    if (!tap->tokens || !tap->counts || !tap->recent || (with_pairs && !tap->pairs) || !tap->ring || !tap->ring_next) {
        moe_tap_free(tap);
        return NULL;
    }
    clear(tap);
    return tap;
}

void moe_tap_reset(struct moe_tap *tap) { clear(tap); }

void moe_tap_set_enabled(struct moe_tap *tap, bool enabled) { tap->enabled = enabled; }

int64_t *moe_tap_tokens(struct moe_tap *tap) { return tap->tokens; }
int64_t *moe_tap_counts(struct moe_tap *tap) { return tap->counts; }
int64_t *moe_tap_recent(struct moe_tap *tap) { return tap->recent; }
int64_t *moe_tap_pairs(struct moe_tap *tap) { return tap->pairs; }

/* The selections of one token in `layer`: `ids` holds n (<= n_used) expert positions. */
static void record(struct moe_tap *tap, int32_t layer, const int32_t *ids, int32_t n) {
    int64_t *counts = tap->counts + (size_t)layer * tap->n_expert;
    int64_t *recent = tap->recent + (size_t)layer * tap->n_expert;
    int32_t *slot = tap->ring + ((size_t)layer * tap->window + tap->ring_next[layer] % tap->window) * tap->n_used;
    for (int32_t k = 0; k < tap->n_used; k++) { /* the token that falls out of the window */
        if (slot[k] >= 0) {
            recent[slot[k]]--;
        }
        slot[k] = -1;
    }
    for (int32_t k = 0; k < n; k++) {
        int32_t e = ids[k];
        if (e < 0 || e >= tap->n_expert) {
            continue;
        }
        counts[e]++;
        recent[e]++;
        slot[k] = e;
        if (tap->pairs) {
            int64_t *row = tap->pairs + ((size_t)layer * tap->n_expert + e) * tap->n_expert;
            for (int32_t j = 0; j < k; j++) {
                int32_t f = ids[j];
                if (f >= 0 && f < tap->n_expert && f != e) {
                    row[f]++;
                    tap->pairs[((size_t)layer * tap->n_expert + f) * tap->n_expert + e]++;
                }
            }
        }
    }
    tap->ring_next[layer]++;
    tap->tokens[layer]++;
}

bool moe_tap_wants(const struct moe_tap *tap) { return tap->enabled; }

/* Every token row of the topk node `t` of a block, its bytes at host address `data`. */
void moe_tap_record_rows(struct moe_tap *tap, const struct ggml_tensor *t, const uint8_t *data) {
    int32_t layer = topk_layer(t);
    if (layer < 0 || layer >= tap->n_layer) {
        return;
    }
    int32_t n = t->ne[0] < tap->n_used ? (int32_t)t->ne[0] : tap->n_used;
    for (int64_t i = 0; i < t->ne[1]; i++) {
        record(tap, layer, (const int32_t *)(data + i * t->nb[1]), n);
    }
}

/* ggml_backend_sched_eval_callback: `ask` says whether we want node `t`'s data; then we get it. */
bool moe_tap_eval(struct ggml_tensor *t, bool ask, void *user_data) {
    struct moe_tap *tap = user_data;
    if (ask) {
        return tap->enabled && topk_is(t);
    }
    if (!topk_readable(t)) {
        return true; /* not a selection we understand: let the computation go on */
    }
    const uint8_t *data = tensor_host_bytes(t, &tap->scratch, &tap->scratch_size);
    if (data) {
        moe_tap_record_rows(tap, t, data);
    }
    return true;
}
