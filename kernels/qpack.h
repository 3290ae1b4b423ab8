#pragma once
// The CUDA backend's layout of a quantized weight matrix ("packed"), made once at upload from
// the GGUF blocks (engine/qpack.cpp) and read by the fused products (matmul_mma.cu).
//
// A matrix of n_out rows and n_in values is cut into tiles of 16 rows x 256 values (the last
// row tile and, for the 32-value block formats, the last K tile padded with zeros). Tiles are
// stored row tile by row tile, K tile by K tile, each in `qpack_tile_bytes(type)` bytes, so a
// warp walking K over one row tile reads consecutive memory.
//
// Within a tile every weight is a small unsigned code (format offset folded in: Q8_0 stores
// q + 128) with a scale s and an offset m per group of 32 (16 for Q2_K, Q3_K, Q6_K) values of a
// row: w = code * s + m. Lane l = 4g + c of a warp owns rows g and g + 8 and, in each 32-value
// chunk ch of the tile, values 8c..8c+7: exactly its A fragments of mma.m16n8k16 when the
// activations stay in natural order (B fragment = one 16-byte load of 8 activations).
// A lane's 8 codes of one (row, chunk) are two words of one-byte codes
//   W0 = [e0, e2, e1, e3], W1 = [e4, e6, e5, e7]
// so that (W & 0x00ff00ff) and (W >> 8 & 0x00ff00ff), ORed into 0x6400 (F16 1024), give the F16
// pairs (e0, e1), (e2, e3) directly. The codes are split into bit planes stored lane by lane:
//   P8  (Q8_0)             8 bits: per lane 8 units of 16 bytes; unit ch = [r0 W0, r0 W1, r1 W0, r1 W1]
//   P4  (4, 5, 6-bit)      low nibbles: 4 units; unit u = words U(r0, 2u), U(r1, 2u), U(r0, 2u+1),
//                          U(r1, 2u+1), where W0 = U & 0x0f0f0f0f and W1 = U >> 4 & 0x0f0f0f0f
//   P2  (Q2_K, Q3_K, Q6_K) two bits (Q6_K: bits 4-5, else 0-1): 2 units; word ch (unit ch / 4)
//                          holds, for byte b of W_h of row r, bits 8b + 2(2r + h) .. +1
//   P1  (5-bit, Q3_K)      one bit (bit 4; Q3_K: bit 2): 1 unit; word ch / 2 holds, for byte b
//                          of W_h of row r in chunk ch, bit 8b + 4r + 2(ch & 1) + h
// Unit i of lane l sits at plane offset (32 i + l) * 16, so each unit load of a warp is 512
// contiguous bytes. After the planes come the scales, `qpack_scale_bytes(type)` per g (the four
// lanes of a g read the same bytes), F16 pairs (row g, row g + 8):
//   Q4_0, Q5_0, Q8_0   per chunk: d pair                       s = d, m = -off * d
//   Q4_1, Q5_1         per chunk: d pair, m pair               s = d, m = m
//   Q4_K, Q5_K         d pair, dmin pair; per chunk a word [sc_g, mn_g, sc_g8, mn_g8]
//                                                              s = d * sc, m = -(dmin * mn)
//   Q6_K, Q3_K         d pair, 0; per chunk a word of int8 scales [g: 2ch, 2ch+1; g8: 2ch, 2ch+1]
//                      (Q3_K: the 6-bit scale less 32)         s = d * sc, m = -off * s
//   Q2_K               d pair, dmin pair; per chunk [g: 2ch, 2ch+1; g8: 2ch, 2ch+1] bytes of
//                      (sc | mn << 4)                          s = d * sc, m = -(dmin * mn)
// off: Q4_0 8, Q5_0 16, Q8_0 128, Q3_K 4, Q6_K 32. Products of F16 by small integers are
// rounded once to F16 (exactly what `__hmul2` gives), as are code * s + m (`__hfma2`).
#include <cstddef>
#include <cstdint>

namespace coinfer::kernels {

// ggml type ids of the packed formats (quant_dev.cuh's WeightType, kept free of CUDA here).
constexpr int QP_Q4_0 = 2, QP_Q4_1 = 3, QP_Q5_0 = 6, QP_Q5_1 = 7, QP_Q8_0 = 8, QP_Q2_K = 10, QP_Q3_K = 11,
              QP_Q4_K = 12, QP_Q5_K = 13, QP_Q6_K = 14;

constexpr int k_qpack_rows = 16;   // rows per tile
constexpr int k_qpack_k = 256;     // values per tile and row

constexpr bool qpack_type(int t) {
    return t == QP_Q4_0 || t == QP_Q4_1 || t == QP_Q5_0 || t == QP_Q5_1 || t == QP_Q8_0 || t == QP_Q2_K ||
           t == QP_Q3_K || t == QP_Q4_K || t == QP_Q5_K || t == QP_Q6_K;
}
constexpr bool qpack_has_p8(int t) { return t == QP_Q8_0; }
constexpr bool qpack_has_p4(int t) {
    return t == QP_Q4_0 || t == QP_Q4_1 || t == QP_Q5_0 || t == QP_Q5_1 || t == QP_Q4_K || t == QP_Q5_K || t == QP_Q6_K;
}
constexpr bool qpack_has_p2(int t) { return t == QP_Q2_K || t == QP_Q3_K || t == QP_Q6_K; }
constexpr bool qpack_has_p1(int t) { return t == QP_Q5_0 || t == QP_Q5_1 || t == QP_Q5_K || t == QP_Q3_K; }
// Groups of 16 values (two per chunk) rather than 32.
constexpr bool qpack_group16(int t) { return t == QP_Q2_K || t == QP_Q3_K || t == QP_Q6_K; }
constexpr bool qpack_kquant(int t) {
    return t == QP_Q2_K || t == QP_Q3_K || t == QP_Q4_K || t == QP_Q5_K || t == QP_Q6_K;
}
// Values the code is offset by (w = (code - off) * s); 0 for the formats with a stored min.
constexpr int qpack_offset(int t) {
    return t == QP_Q4_0 ? 8 : t == QP_Q5_0 ? 16 : t == QP_Q8_0 ? 128 : t == QP_Q3_K ? 4 : t == QP_Q6_K ? 32 : 0;
}

constexpr int k_qp_p8_bytes = 32 * 128, k_qp_p4_bytes = 32 * 64, k_qp_p2_bytes = 32 * 32, k_qp_p1_bytes = 32 * 16;

constexpr int qpack_p8_off(int) { return 0; }
constexpr int qpack_p4_off(int t) { return qpack_has_p8(t) ? k_qp_p8_bytes : 0; }
constexpr int qpack_p2_off(int t) { return qpack_p4_off(t) + (qpack_has_p4(t) ? k_qp_p4_bytes : 0); }
constexpr int qpack_p1_off(int t) { return qpack_p2_off(t) + (qpack_has_p2(t) ? k_qp_p2_bytes : 0); }
constexpr int qpack_scale_off(int t) { return qpack_p1_off(t) + (qpack_has_p1(t) ? k_qp_p1_bytes : 0); }
// Scale bytes per g (a multiple of 8: each g's scales are read as 8-byte words).
constexpr int qpack_scale_bytes(int t) {
    if (t == QP_Q4_1 || t == QP_Q5_1) return 64;  // 8 chunks x (d pair, m pair)
    if (qpack_kquant(t)) return 40;                // 8 (d, dmin pairs) + 32 (a word per chunk)
    return 32;                                     // 8 chunks x d pair
}
constexpr int qpack_tile_bytes(int t) { return qpack_scale_off(t) + 8 * qpack_scale_bytes(t); }

constexpr int64_t qpack_row_tiles(int64_t n_out) { return (n_out + k_qpack_rows - 1) / k_qpack_rows; }
constexpr int64_t qpack_k_tiles(int64_t n_in) { return (n_in + k_qpack_k - 1) / k_qpack_k; }
constexpr size_t qpack_bytes(int t, int64_t n_in, int64_t n_out) {
    return size_t(qpack_row_tiles(n_out)) * size_t(qpack_k_tiles(n_in)) * size_t(qpack_tile_bytes(t));
}

}  // namespace coinfer::kernels
