/* topk.h: reading a block's `ffn_moe_topk-<layer>` node, shared by the routing tap and the expert cache.
 *
 * Such a node holds the selected expert ids, I32 [n_used, n_tokens], a view whose token rows are
 * nb[1] bytes apart; it may live in host or device memory.
 */
#ifndef ROTARY_TOPK_H
#define ROTARY_TOPK_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml.h"

#define TOPK_PREFIX "ffn_moe_topk-"

static inline bool topk_is(const struct ggml_tensor *t) {
    return strncmp(t->name, TOPK_PREFIX, sizeof TOPK_PREFIX - 1) == 0;
}

/* The block index in a topk node's name. */
static inline int32_t topk_layer(const struct ggml_tensor *t) {
    return (int32_t)strtol(t->name + sizeof TOPK_PREFIX - 1, NULL, 10);
}

/* Whether `t` is a selection we understand: I32 ids, rows of packed ids. */
static inline bool topk_readable(const struct ggml_tensor *t) {
    return t->type == GGML_TYPE_I32 && t->buffer && t->nb[0] == sizeof(int32_t);
}

/* A host address holding all bytes `t` spans: its own data in host memory, else a copy in
 * *scratch (grown as needed). NULL when out of memory. */
static inline uint8_t *tensor_host_bytes(struct ggml_tensor *t, uint8_t **scratch, size_t *scratch_size) {
    if (ggml_backend_buffer_is_host(t->buffer)) {
        return t->data;
    }
    size_t size = ggml_nbytes(t);
    if (size > *scratch_size) {
        uint8_t *grown = realloc(*scratch, size);
        if (!grown) {
            return NULL;
        }
        *scratch = grown;
        *scratch_size = size;
    }
    ggml_backend_tensor_get(t, *scratch, 0, size);
    return *scratch;
}

/* What the routing tap offers the expert cache (moe_tap.c): one eval callback serves both. */
struct moe_tap;
bool moe_tap_wants(const struct moe_tap *tap);
void moe_tap_record_rows(struct moe_tap *tap, const struct ggml_tensor *t, const uint8_t *data);

#endif
