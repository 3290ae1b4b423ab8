// RoPE frequency tables against the published formulas, evaluated here in double precision:
// linear position interpolation, YaRN (Peng et al. 2023, as ggml applies it) and Llama 3.1's
// frequency factors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "engine/rope_table.h"

using namespace coinfer;

namespace {

ModelConfig config(int64_t n_rot, float base) {
    ModelConfig c;
    c.n_rot = n_rot;
    c.head_dim = n_rot;
    c.n_ctx_train = 131072;
    c.rope_freq_base = base;
    return c;
}

double rel(double got, double want) { return std::fabs(got - want) / std::fabs(want); }

// theta_i / pos without scaling.
double plain(int i, int n_rot, double base) { return std::pow(base, -2.0 * i / n_rot); }

}  // namespace

TEST_CASE("rope table: no scaling and linear") {
    for (int n_rot : {64, 128}) {
        ModelConfig c = config(n_rot, 10000.0f);
        RopeTable t = make_rope_table(c, {});
        REQUIRE(t.inv_freq.size() == size_t(n_rot / 2));
        CHECK(t.mscale == 1.0f);
        for (int i = 0; i < n_rot / 2; ++i) CHECK(rel(t.inv_freq[size_t(i)], plain(i, n_rot, 10000.0)) < 1e-5);
        c.rope_scaling = ROPE_SCALING_LINEAR;
        c.rope_scaling_factor = 4.0f;
        t = make_rope_table(c, {});
        CHECK(t.mscale == 1.0f);
        for (int i = 0; i < n_rot / 2; ++i) CHECK(rel(t.inv_freq[size_t(i)], plain(i, n_rot, 10000.0) / 4.0) < 1e-5);
    }
}

TEST_CASE("rope table: YaRN") {
    struct Case { int n_rot; double base, scale, orig, beta_fast, beta_slow, ext, attn; };
    const Case cases[] = {
        {128, 10000.0, 4.0, 32768.0, 32.0, 1.0, 1.0, 1.0},   // Qwen2.5-style 128k
        {128, 1000000.0, 4.0, 32768.0, 32.0, 1.0, 1.0, 1.0},
        {64, 10000.0, 16.0, 2048.0, 16.0, 2.0, 0.5, 0.8},    // other betas, a partial mix
    };
    for (const Case& k : cases) {
        CAPTURE(k.n_rot);
        CAPTURE(k.base);
        ModelConfig c = config(k.n_rot, float(k.base));
        c.rope_scaling = ROPE_SCALING_YARN;
        c.rope_scaling_factor = float(k.scale);
        c.rope_orig_ctx = int64_t(k.orig);
        c.rope_yarn_beta_fast = float(k.beta_fast);
        c.rope_yarn_beta_slow = float(k.beta_slow);
        c.rope_yarn_ext_factor = float(k.ext);
        c.rope_yarn_attn_factor = float(k.attn);
        const RopeTable t = make_rope_table(c, {});
        // The correction range: the dimensions that turn beta times over the original context.
        auto corr = [&](double beta) {
            return k.n_rot * std::log(k.orig / (beta * 2.0 * std::numbers::pi)) / (2.0 * std::log(k.base));
        };
        const double low = std::max(0.0, std::floor(corr(k.beta_fast)));
        const double high = std::min(k.n_rot - 1.0, std::ceil(corr(k.beta_slow)));
        int n_mixed = 0;
        for (int i = 0; i < k.n_rot / 2; ++i) {
            const double extrap = plain(i, k.n_rot, k.base), interp = extrap / k.scale;
            const double ramp = 1.0 - std::clamp((i - low) / std::max(0.001, high - low), 0.0, 1.0);
            const double mix = ramp * k.ext;
            n_mixed += mix > 0.0 && mix < 1.0;
            CHECK(rel(t.inv_freq[size_t(i)], interp * (1.0 - mix) + extrap * mix) < 1e-5);
        }
        CHECK(n_mixed > 0);  // the case reaches the ramp, not only its two ends
        CHECK(rel(t.mscale, k.attn * (1.0 + 0.1 * std::log(k.scale))) < 1e-6);
    }
}

TEST_CASE("rope table: Llama 3.1 frequency factors") {
    // Llama 3.1: factor 8, low / high frequency factors 1 / 4, original context 8192. The GGUF
    // carries the per-dimension factors (rope_freqs.weight); theta_i = base^(-2i/d) / factor_i.
    const int n_rot = 128;
    const double base = 500000.0, scale = 8.0, low_ff = 1.0, high_ff = 4.0, orig = 8192.0;
    std::vector<float> ff(n_rot / 2);
    int n_smooth = 0;
    for (int i = 0; i < n_rot / 2; ++i) {
        const double freq = plain(i, n_rot, base), wavelen = 2.0 * std::numbers::pi / freq;
        double f;
        if (wavelen < orig / high_ff) {
            f = 1.0;
        } else if (wavelen > orig / low_ff) {
            f = scale;
        } else {
            const double smooth = (orig / wavelen - low_ff) / (high_ff - low_ff);
            f = 1.0 / ((1.0 - smooth) / scale + smooth);
            ++n_smooth;
        }
        ff[size_t(i)] = float(f);
    }
    CHECK(n_smooth > 0);
    ModelConfig c = config(n_rot, float(base));
    const RopeTable t = make_rope_table(c, ff);
    CHECK(t.mscale == 1.0f);
    for (int i = 0; i < n_rot / 2; ++i) CHECK(rel(t.inv_freq[size_t(i)], plain(i, n_rot, base) / ff[size_t(i)]) < 1e-5);
}

TEST_CASE("rope table: rotation at positions up to 131,072") {
    // Both backends rotate by theta = pos * inv_freq (one F32 product) and cos / sin times mscale.
    // Against the exact rotation by that theta, the rotated pair stays within 1e-5.
    ModelConfig c = config(128, 1000000.0f);
    c.rope_scaling = ROPE_SCALING_YARN;
    c.rope_scaling_factor = 4.0f;
    c.rope_orig_ctx = 32768;
    c.rope_yarn_ext_factor = 1.0f;
    const RopeTable t = make_rope_table(c, {});
    for (int pos : {0, 1, 4095, 32767, 65536, 131071}) {
        for (int i = 0; i < 64; ++i) {
            const float theta = float(pos) * t.inv_freq[size_t(i)];
            const float cs = std::cos(theta) * t.mscale, sn = std::sin(theta) * t.mscale;
            const float x0 = 0.6f, x1 = -0.8f;
            const float y0 = x0 * cs - x1 * sn, y1 = x0 * sn + x1 * cs;
            const double ct = std::cos(double(theta)) * t.mscale, st = std::sin(double(theta)) * t.mscale;
            CHECK(std::fabs(y0 - (x0 * ct - x1 * st)) < 1e-5);
            CHECK(std::fabs(y1 - (x0 * st + x1 * ct)) < 1e-5);
        }
    }
}
