#pragma once
// RoPE frequencies of a model, with its scaling (linear, YaRN, Llama 3 frequency factors), as
// both backends apply them: element pair i of a head at position pos is rotated by
// theta = pos * inv_freq[i], and cos / sin are multiplied by mscale.
#include <span>
#include <vector>

#include "io/model_config.h"

namespace coinfer {

struct RopeTable {
    std::vector<float> inv_freq;  // [n_rot / 2]
    float mscale = 1.0f;          // YaRN's magnitude correction; 1 otherwise
};

// freq_factors: rope_freqs.weight ([n_rot / 2], Llama 3.1), or empty. The arithmetic follows
// ggml's rope: theta_extrap_i = base^(-2i/n_rot) / factor_i (as a running product), and
//   linear:  theta_i = theta_extrap_i / scale
//   YaRN:    theta_i = theta_interp_i (1 - mix_i) + theta_extrap_i mix_i, theta_interp = theta_extrap
//            / scale, mix_i = ext_factor * (1 - clamp((i - low) / max(0.001, high - low), 0, 1)),
//            low / high = floor / ceil of n_rot ln(n_ctx_orig / (2 pi beta)) / (2 ln base) for
//            beta_fast / beta_slow (clamped to [0, n_rot - 1]);
//            mscale = attn_factor (1 + 0.1 ln scale) when ext_factor != 0.
RopeTable make_rope_table(const ModelConfig& c, std::span<const float> freq_factors);

}  // namespace coinfer
