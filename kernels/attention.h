#pragma once
// Paged attention over the KV cache, for decode and prefill alike: every query token attends to
// positions 0..pos of its own sequence through that sequence's block table.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kv_layout.h"

namespace coinfer::kernels {

struct AttentionParams {
    int32_t n_head, n_head_kv, head_dim;  // head_dim <= 256
    int32_t block_size;                   // tokens per KV block
    float scale;                          // 1/sqrt(head_dim)
    int32_t kv_type = KV_DEV_F16;         // KvDevType of the cache rows (kv_layout.h)
    int32_t q_stride = 0;                 // floats between q rows; 0: n_head * head_dim
    // Split counts that depend on nothing but a token's own context (16 splits at most), so a
    // token's result does not depend on its batch. Otherwise they are chosen per launch to fill
    // the GPU.
    bool batch_invariant = false;
};

// Whether the KV type and head geometry can run (q8_0: head_dim a multiple of 32, or 4, 8, 16;
// fp8: a multiple of 4).
// Returns nullptr or what is missing.
const char* attention_unsupported(const AttentionParams& p);

// Most tokens of one sequence an item may hold (items below): 64 / (n_head / n_head_kv) for the
// tensor-core kernel (F16, q8_0 and fp8 caches), 1 for F32 caches.
int32_t attention_item_tokens(const AttentionParams& p);

// Scratch floats any paged_attention call needs (split partials), whatever its batch: a fixed
// reservation. Launches whose partials would not fit run in parts.
size_t attention_scratch_floats(const AttentionParams& p);

//   q:   [n_tokens, q_stride], the first n_head * head_dim of each row (rotated)
//   out: [n_tokens, n_head * head_dim]
//   positions[t], seq[t]: token t sees positions 0..positions[t] of sequence seq[t]
//   block_tables: [n_seqs, table_stride] block ids
//   k_cache, v_cache: [n_slots] rows of p.kv_type
//   items: [n_items, 2] = (first token, count): count <= item_tokens tokens of one sequence at
//     consecutive positions, which share each K/V tile read (prompt runs); nullptr: item i is
//     token i alone. item_tokens <= attention_item_tokens(p).
//   max_ctx: the largest positions[t] + 1 of the items
void paged_attention(const AttentionParams& p, const float* q, const void* k_cache, const void* v_cache,
                     const int32_t* positions, const int32_t* seq, const int32_t* block_tables, int32_t table_stride,
                     const int32_t* items, int64_t n_items, int32_t item_tokens, int64_t max_ctx, float* scratch,
                     size_t scratch_floats, float* out, cudaStream_t stream);

}  // namespace coinfer::kernels
