#pragma once
// Bias, RoPE and the paged KV write, fused: what happens to Q/K/V between their projections and
// attention.
#include <cstdint>

#include <cuda_runtime_api.h>

namespace coinfer::kernels {

struct RopeParams {
    int32_t n_head, n_head_kv, head_dim, n_rot;
    bool neox;              // NEOX rotates (i, i + n_rot/2), NORM rotates (2i, 2i+1)
    const float* inv_freq;  // [n_rot / 2]: theta_i = pos * inv_freq[i]
    int32_t row_stride = 0;  // floats between token rows of q, k and v (one fused QKV output); 0: packed
    float mscale = 1.0f;     // cos and sin are multiplied by it (YaRN's magnitude correction)
};

// For each token t: q[t] += bq, k[t] += bk, v[t] += bv (when the biases are given); rotate q[t]
// and k[t] by positions[t]; write k[t], v[t] to cache slot slots[t] of k_cache / v_cache.
//   q: [n_tokens, n_head * head_dim]  k, v: [n_tokens, n_head_kv * head_dim] (rows row_stride apart when set)
//   k_cache, v_cache: [n_slots] rows of kv_type (kv_layout.h). For the quantized types k and v
//   are left rotated and biased (the rows that were quantized).
void rope_kv_write(const RopeParams& p, float* q, float* k, float* v, const float* bq, const float* bk, const float* bv,
                   const int32_t* positions, const int32_t* slots, int64_t n_tokens, void* k_cache, void* v_cache,
                   int32_t kv_type, cudaStream_t stream);

}  // namespace coinfer::kernels
