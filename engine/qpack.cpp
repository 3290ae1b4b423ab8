#include "qpack.h"

#include <cmath>
#include <cstring>

#include "io/error.h"
#include "kernels/qpack.h"
#include "quant.h"

namespace coinfer {

namespace kp = coinfer::kernels;

namespace {

uint16_t rd16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
void wr16(uint8_t* p, uint16_t v) {
    p[0] = uint8_t(v);
    p[1] = uint8_t(v >> 8);
}

// One row's 256 values of a K tile: codes and the scales of their groups.
struct Tile256 {
    uint8_t code[256] = {};
    uint16_t d[8] = {}, m[8] = {};      // 32-value formats: F16 scale (and min) per chunk
    uint16_t kd = 0, kdmin = 0;         // K-quants: F16 super-block scale and min scale
    int sc[16] = {}, mn[16] = {};       // K-quants: per group (8 or 16 groups)
};

// Values [256 kt, 256 kt + 256) of a row in the file format (past n_in: zeros).
void decode(int type, const uint8_t* row, int64_t n_in, int64_t kt, Tile256& t) {
    t = Tile256{};
    if (kp::qpack_kquant(type)) {
        if (type == kp::QP_Q2_K) {
            const uint8_t* b = row + 84 * kt;
            for (int i = 0; i < 16; ++i) {
                t.sc[i] = b[i] & 0xf;
                t.mn[i] = b[i] >> 4;
            }
            for (int half = 0; half < 2; ++half)
                for (int s4 = 0; s4 < 4; ++s4)
                    for (int l = 0; l < 32; ++l) t.code[128 * half + 32 * s4 + l] = (b[16 + 32 * half + l] >> (2 * s4)) & 3;
            t.kd = rd16(b + 80);
            t.kdmin = rd16(b + 82);
        } else if (type == kp::QP_Q3_K) {
            const uint8_t* b = row + 110 * kt;
            const uint8_t* s = b + 96;
            for (int i = 0; i < 16; ++i) {
                const int lo = i < 8 ? (s[i] & 0xf) : (s[i - 8] >> 4);
                const int hi = (s[8 + (i & 3)] >> (2 * (i / 4))) & 3;
                t.sc[i] = (lo | (hi << 4)) - 32;
            }
            for (int half = 0; half < 2; ++half)
                for (int s4 = 0; s4 < 4; ++s4)
                    for (int l = 0; l < 32; ++l) {
                        const int low = (b[32 + 32 * half + l] >> (2 * s4)) & 3;
                        const int h = (b[l] >> (4 * half + s4)) & 1;
                        t.code[128 * half + 32 * s4 + l] = uint8_t(low | (h << 2));
                    }
            t.kd = rd16(b + 108);
        } else if (type == kp::QP_Q4_K || type == kp::QP_Q5_K) {
            const bool five = type == kp::QP_Q5_K;
            const uint8_t* b = row + (five ? 176 : 144) * kt;
            const uint8_t* qs = b + (five ? 48 : 16);
            for (int j = 0; j < 8; ++j) {
                k4_scale_min(j, b + 4, t.sc[j], t.mn[j]);
                for (int l = 0; l < 32; ++l) {
                    int v = (qs[32 * (j >> 1) + l] >> (4 * (j & 1))) & 0xf;
                    if (five) v |= ((b[16 + l] >> j) & 1) << 4;
                    t.code[32 * j + l] = uint8_t(v);
                }
            }
            t.kd = rd16(b);
            t.kdmin = rd16(b + 2);
        } else {  // Q6_K
            const uint8_t* b = row + 210 * kt;
            for (int i = 0; i < 16; ++i) t.sc[i] = int8_t(b[192 + i]);
            for (int half = 0; half < 2; ++half)
                for (int r = 0; r < 4; ++r)
                    for (int l = 0; l < 32; ++l) {
                        const int lo = (b[64 * half + 32 * (r & 1) + l] >> ((r & 2) ? 4 : 0)) & 0xf;
                        const int hi = (b[128 + 32 * half + l] >> (2 * r)) & 3;
                        t.code[128 * half + 32 * r + l] = uint8_t(lo | (hi << 4));
                    }
            t.kd = rd16(b + 208);
        }
        return;
    }
    const int bytes = type == kp::QP_Q4_0 ? 18 : type == kp::QP_Q4_1 ? 20 : type == kp::QP_Q5_0 ? 22
                      : type == kp::QP_Q5_1 ? 24 : 34;
    for (int ch = 0; ch < 8; ++ch) {
        const int64_t blk = 8 * kt + ch;
        if (32 * blk >= n_in) break;
        const uint8_t* b = row + bytes * blk;
        uint8_t* c = t.code + 32 * ch;
        t.d[ch] = rd16(b);
        if (type == kp::QP_Q8_0) {
            for (int j = 0; j < 32; ++j) c[j] = uint8_t(int(int8_t(b[2 + j])) + 128);
            continue;
        }
        const bool has_m = type == kp::QP_Q4_1 || type == kp::QP_Q5_1;
        const bool five = type == kp::QP_Q5_0 || type == kp::QP_Q5_1;
        if (has_m) t.m[ch] = rd16(b + 2);
        uint32_t qh = 0;
        if (five) std::memcpy(&qh, b + (has_m ? 4 : 2), 4);
        const uint8_t* qs = b + (has_m ? 4 : 2) + (five ? 4 : 0);
        for (int j = 0; j < 16; ++j) {
            c[j] = uint8_t((qs[j] & 0xf) | (five ? ((qh >> j) & 1) << 4 : 0));
            c[j + 16] = uint8_t((qs[j] >> 4) | (five ? ((qh >> (j + 16)) & 1) << 4 : 0));
        }
    }
}

// Byte of W_h holding element j (0..7) of a lane's chunk: W0 = [e0, e2, e1, e3], W1 likewise.
int elem_byte(int j) {
    static constexpr int b[4] = {0, 2, 1, 3};
    return b[j & 3];
}

void check_f16_range(float v, const char* what) {
    if (!(std::fabs(v) <= 65504.0f))
        throw_error("weight {} beyond the F16 range of the GPU products ({}); this file cannot run on cuda", what, v);
}

// Byte offsets inside a tile.
struct Offsets {
    int p8, p4, p2, p1, sc, sb;
    explicit Offsets(int t)
        : p8(kp::qpack_p8_off(t)), p4(kp::qpack_p4_off(t)), p2(kp::qpack_p2_off(t)), p1(kp::qpack_p1_off(t)),
          sc(kp::qpack_scale_off(t)), sb(kp::qpack_scale_bytes(t)) {}
};

// Row i (0..15) of a tile from t, into the tile at dst (zeroed beforehand).
void put_row(int type, const Tile256& t, int i, uint8_t* dst) {
    const Offsets o(type);
    const int g = i & 7, r = i >> 3;
    const int off = kp::qpack_offset(type);
    for (int ch = 0; ch < 8; ++ch) {
        for (int c = 0; c < 4; ++c) {
            const int lane = 4 * g + c;
            for (int j = 0; j < 8; ++j) {
                const uint32_t code = t.code[32 * ch + 8 * c + j];
                const int h = j >> 2, b = elem_byte(j);
                if (kp::qpack_has_p8(type)) dst[o.p8 + (32 * ch + lane) * 16 + 4 * (2 * r + h) + b] = uint8_t(code);
                if (kp::qpack_has_p4(type)) {
                    uint8_t* p = dst + o.p4 + (32 * (ch >> 1) + lane) * 16 + 4 * (2 * (ch & 1) + r) + b;
                    *p = uint8_t(*p | ((code & 0xf) << (4 * h)));
                }
                if (kp::qpack_has_p2(type)) {
                    const uint32_t two = (code >> (type == kp::QP_Q6_K ? 4 : 0)) & 3;
                    const int bit = 8 * b + 2 * (2 * r + h);
                    uint8_t* p = dst + o.p2 + (32 * (ch >> 2) + lane) * 16 + 4 * (ch & 3) + bit / 8;
                    *p = uint8_t(*p | (two << (bit % 8)));
                }
                if (kp::qpack_has_p1(type)) {
                    const uint32_t one = (code >> (type == kp::QP_Q3_K ? 2 : 4)) & 1;
                    const int bit = 8 * b + 4 * r + 2 * (ch & 1) + h;
                    uint8_t* p = dst + o.p1 + lane * 16 + 4 * (ch >> 1) + bit / 8;
                    *p = uint8_t(*p | (one << (bit % 8)));
                }
            }
        }
        uint8_t* s = dst + o.sc + g * o.sb;
        if (!kp::qpack_kquant(type)) {
            const float d = fp16_to_fp32(t.d[ch]);
            check_f16_range(d * float(off), "scale x code offset");
            if (type == kp::QP_Q4_1 || type == kp::QP_Q5_1) {
                wr16(s + 8 * ch + 2 * r, t.d[ch]);
                wr16(s + 8 * ch + 4 + 2 * r, t.m[ch]);
            } else {
                wr16(s + 4 * ch + 2 * r, t.d[ch]);
            }
            continue;
        }
        uint8_t* w = s + 8 + 4 * ch;
        const float d = fp16_to_fp32(t.kd), dmin = fp16_to_fp32(t.kdmin);
        if (type == kp::QP_Q4_K || type == kp::QP_Q5_K) {
            w[2 * r] = uint8_t(t.sc[ch]);
            w[2 * r + 1] = uint8_t(t.mn[ch]);
            check_f16_range(d * float(t.sc[ch]), "scale");
            check_f16_range(dmin * float(t.mn[ch]), "min");
        } else {
            for (int gi = 0; gi < 2; ++gi) {
                const int grp = 2 * ch + gi;
                if (type == kp::QP_Q2_K) {
                    w[2 * r + gi] = uint8_t(t.sc[grp] | (t.mn[grp] << 4));
                    check_f16_range(d * float(t.sc[grp]), "scale");
                    check_f16_range(dmin * float(t.mn[grp]), "min");
                } else {
                    w[2 * r + gi] = uint8_t(int8_t(t.sc[grp]));
                    check_f16_range(d * float(t.sc[grp]) * float(off), "scale x code offset");
                }
            }
        }
    }
    if (kp::qpack_kquant(type)) {
        uint8_t* s = dst + o.sc + g * o.sb;
        wr16(s + 2 * r, t.kd);
        if (type != kp::QP_Q3_K && type != kp::QP_Q6_K) wr16(s + 4 + 2 * r, t.kdmin);
    }
}

}  // namespace

bool qpack_supported(GgmlType type) { return kp::qpack_type(int(type)); }

size_t qpack_size(GgmlType type, int64_t n_in, int64_t n_out) { return kp::qpack_bytes(int(type), n_in, n_out); }

void qpack_tiles(GgmlType type, int64_t n_in, int64_t n_out, const std::function<const uint8_t*(int64_t)>& row,
                 int64_t tile0, int64_t tile1, uint8_t* dst) {
    const int t = int(type);
    if (!kp::qpack_type(t)) throw_error("qpack: weight type {} has no packed layout", ggml_type_name(type));
    if (n_in % quant_block_size(type) != 0)
        throw_error("qpack: row of {} values is not a whole number of {} blocks", n_in, ggml_type_name(type));
    const int64_t n_kt = kp::qpack_k_tiles(n_in);
    const size_t tb = size_t(kp::qpack_tile_bytes(t));
    Tile256 tile;
    for (int64_t rt = tile0; rt < tile1; ++rt) {
        uint8_t* base = dst + size_t(rt) * size_t(n_kt) * tb;
        std::memset(base, 0, size_t(n_kt) * tb);
        for (int i = 0; i < kp::k_qpack_rows; ++i) {
            const int64_t r = rt * kp::k_qpack_rows + i;
            if (r >= n_out) break;
            const uint8_t* src = row(r);
            for (int64_t kt = 0; kt < n_kt; ++kt) {
                decode(t, src, n_in, kt, tile);
                put_row(t, tile, i, base + size_t(kt) * tb);
            }
        }
    }
}

void qpack_dequantize_row(GgmlType type, const uint8_t* packed, int64_t n_in, int64_t n_out, int64_t r, float* out) {
    const int t = int(type);
    if (!kp::qpack_type(t) || r < 0 || r >= n_out) throw_error("qpack_dequantize_row: bad type or row");
    const Offsets o(t);
    const int64_t n_kt = kp::qpack_k_tiles(n_in);
    const size_t tb = size_t(kp::qpack_tile_bytes(t));
    const int i = int(r % kp::k_qpack_rows), g = i & 7, rr = i >> 3;
    const int off = kp::qpack_offset(t);
    auto bit_at = [](const uint8_t* p, int bit) { return (p[bit / 8] >> (bit % 8)) & 1; };
    for (int64_t k = 0; k < n_in; ++k) {
        const int64_t kt = k / 256;
        const uint8_t* tile = packed + (size_t(r / kp::k_qpack_rows) * size_t(n_kt) + size_t(kt)) * tb;
        const int kk = int(k % 256), ch = kk / 32, c = (kk % 32) / 8, j = kk % 8;
        const int lane = 4 * g + c, h = j >> 2, b = elem_byte(j);
        uint32_t code = 0;
        if (kp::qpack_has_p8(t)) code = tile[o.p8 + (32 * ch + lane) * 16 + 4 * (2 * rr + h) + b];
        if (kp::qpack_has_p4(t))
            code = (tile[o.p4 + (32 * (ch >> 1) + lane) * 16 + 4 * (2 * (ch & 1) + rr) + b] >> (4 * h)) & 0xf;
        if (kp::qpack_has_p2(t)) {
            const uint8_t* w = tile + o.p2 + (32 * (ch >> 2) + lane) * 16 + 4 * (ch & 3);
            const int bit = 8 * b + 2 * (2 * rr + h);
            const uint32_t two = uint32_t(bit_at(w, bit) | (bit_at(w, bit + 1) << 1));
            code |= two << (t == kp::QP_Q6_K ? 4 : 0);
        }
        if (kp::qpack_has_p1(t)) {
            const uint8_t* w = tile + o.p1 + lane * 16 + 4 * (ch >> 1);
            code |= uint32_t(bit_at(w, 8 * b + 4 * rr + 2 * (ch & 1) + h)) << (t == kp::QP_Q3_K ? 2 : 4);
        }
        const uint8_t* s = tile + o.sc + g * o.sb;
        // The formats' own F32 arithmetic (engine/quant.cpp), term for term.
        if (!kp::qpack_kquant(t)) {
            const bool has_m = t == kp::QP_Q4_1 || t == kp::QP_Q5_1;
            const float d = fp16_to_fp32(rd16(s + (has_m ? 8 : 4) * ch + 2 * rr));
            if (has_m) out[k] = float(int(code)) * d + fp16_to_fp32(rd16(s + 8 * ch + 4 + 2 * rr));
            else out[k] = float(int(code) - off) * d;
            continue;
        }
        const float d = fp16_to_fp32(rd16(s + 2 * rr));
        const uint8_t* w = s + 8 + 4 * ch;
        if (t == kp::QP_Q4_K || t == kp::QP_Q5_K) {
            const float dmin = fp16_to_fp32(rd16(s + 4 + 2 * rr));
            out[k] = d * float(w[2 * rr]) * float(int(code)) - dmin * float(w[2 * rr + 1]);
        } else {
            const uint8_t sb = w[2 * rr + (c >> 1)];
            if (t == kp::QP_Q2_K) {
                const float dmin = fp16_to_fp32(rd16(s + 4 + 2 * rr));
                const float dl = d * float(sb & 0xf), ml = dmin * float(sb >> 4);
                out[k] = dl * float(int(code)) - ml;
            } else if (t == kp::QP_Q3_K) {
                out[k] = d * float(int8_t(sb)) * float(int(code) - off);
            } else {
                out[k] = d * float(int8_t(sb)) * float(int(code) - off);
            }
        }
    }
}

}  // namespace coinfer
