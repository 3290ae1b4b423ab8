#pragma once
// Paged attention over the KV cache, for decode and prefill alike: every query token attends to
// positions 0..pos of its own sequence through that sequence's block table.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace coinfer::kernels {

struct AttentionParams {
    int32_t n_head, n_head_kv, head_dim;  // head_dim <= 256
    int32_t block_size;                   // tokens per KV block
    float scale;                          // 1/sqrt(head_dim)
    bool kv_f16;
    int32_t q_stride = 0;                 // floats between q rows; 0: n_head * head_dim
    // Which kernel: ATTN_KERNEL_AUTO picks by GQA group size (grouped for n_head / n_head_kv >= 4).
    // The two sum in different orders: a caller that promises batch invariance must not choose
    // by batch size.
    int32_t kernel = 0;
};

enum AttnKernel : int32_t {
    ATTN_KERNEL_AUTO = 0,
    ATTN_KERNEL_GROUPED = 1,   // a block per (token, KV head, split): K/V staged once per group
    ATTN_KERNEL_PER_HEAD = 2,  // a block per (token, query head, split of 256)
};

// Scratch floats needed for n_tokens tokens whose largest context is max_ctx.
size_t attention_scratch_floats(const AttentionParams& p, int64_t n_tokens, int64_t max_ctx);

//   q:   [n_tokens, q_stride], the first n_head * head_dim of each row (rotated)
//   out: [n_tokens, n_head * head_dim]
//   positions[t], seq[t]: token t sees positions 0..positions[t] of sequence seq[t]
//   block_tables: [n_seqs, table_stride] block ids
//   k_cache, v_cache: [n_slots, n_head_kv * head_dim]
//   token_ids: when given, only tokens token_ids[0..n_tokens) (indices into the arrays above)
void paged_attention(const AttentionParams& p, const float* q, const void* k_cache, const void* v_cache,
                     const int32_t* positions, const int32_t* seq, const int32_t* block_tables, int32_t table_stride,
                     int64_t n_tokens, int64_t max_ctx, float* scratch, float* out, cudaStream_t stream,
                     const int32_t* token_ids = nullptr);

// Prompt runs (tokens of one sequence at consecutive positions) in tiles: the tiles' tokens
// share each K/V tile of the cache (decode-style kernels read it once per token).
//   tiles: [n_tiles, 2] = (first token, count), count <= prefill_tile_tokens(p)
// prefill_tile_tokens: 64 / (n_head / n_head_kv) for head_dim 64 or 128, else 0 (unsupported).
// The sums run in another order than paged_attention's: a batch-invariant caller uses one.
int32_t prefill_tile_tokens(const AttentionParams& p);
void paged_attention_prefill(const AttentionParams& p, const float* q, const void* k_cache, const void* v_cache,
                             const int32_t* positions, const int32_t* seq, const int32_t* block_tables,
                             int32_t table_stride, const int32_t* tiles, int64_t n_tiles, float* out,
                             cudaStream_t stream);

}  // namespace coinfer::kernels
