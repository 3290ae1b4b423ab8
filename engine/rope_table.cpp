#include "rope_table.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace coinfer {

RopeTable make_rope_table(const ModelConfig& c, std::span<const float> freq_factors) {
    RopeTable r;
    const int64_t half = c.n_rot / 2;
    r.inv_freq.resize(static_cast<size_t>(half));
    const bool yarn = c.rope_scaling == ROPE_SCALING_YARN;
    const float freq_scale =
        c.rope_scaling == ROPE_SCALING_LINEAR || yarn ? 1.0f / c.rope_scaling_factor : 1.0f;
    const float ext = yarn ? c.rope_yarn_ext_factor : 0.0f;
    float low = 0.0f, high = 0.0f;
    if (ext != 0.0f) {
        const float n_dims = static_cast<float>(c.n_rot);
        const float n_orig = static_cast<float>(c.rope_orig_ctx > 0 ? c.rope_orig_ctx : c.n_ctx_train);
        // The dimension whose wavelength turns `beta` times over the original context.
        auto corr_dim = [&](float beta) {
            return n_dims * std::log(n_orig / (beta * 2.0f * std::numbers::pi_v<float>)) /
                   (2.0f * std::log(c.rope_freq_base));
        };
        low = std::max(0.0f, std::floor(corr_dim(c.rope_yarn_beta_fast)));
        high = std::min(n_dims - 1.0f, std::ceil(corr_dim(c.rope_yarn_beta_slow)));
    }
    const float theta_scale = std::pow(c.rope_freq_base, -2.0f / static_cast<float>(c.n_rot));
    float t = 1.0f;
    for (int64_t i = 0; i < half; ++i) {
        const float extrap = freq_factors.empty() ? t : t / freq_factors[static_cast<size_t>(i)];
        float f = extrap * freq_scale;
        if (ext != 0.0f) {
            const float y = (static_cast<float>(i) - low) / std::max(0.001f, high - low);
            const float mix = (1.0f - std::min(1.0f, std::max(0.0f, y))) * ext;
            f = f * (1.0f - mix) + extrap * mix;
        }
        r.inv_freq[static_cast<size_t>(i)] = f;
        t *= theta_scale;
    }
    if (yarn) {
        r.mscale = c.rope_yarn_attn_factor;
        if (ext != 0.0f) r.mscale *= 1.0f + 0.1f * std::log(1.0f / freq_scale);
    }
    return r;
}

}  // namespace coinfer
