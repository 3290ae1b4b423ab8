// Tensor-core products over quantized weights, dequantized in registers (up to 192 activation rows).
//
//   y[r][o] = sum_k W[o][k] x[r][k],  W: n_out rows in their ggml block format (never written out
//   as F16), x: F16 activations [n_rows, n_in], F32 accumulation (mma.sync m16n8k16).
//
// A block owns 64 weight rows (4 warps x 16) and BN = 8 * NT activation rows, and walks K in
// tiles of 256 elements (one K-quant super-block, or 8 blocks of the 32-element formats). Each
// tile's raw weight bytes and F16 activations come in through a cp.async ring in shared memory.
//
// The mma's K order inside a 32-element chunk is ours to choose, as long as A and B agree. Lane
// (g = lane / 4, c = lane % 4) holds 8 of the chunk's elements, for weight rows g and g+8 (A)
// and activation row g of each n8 tile (B), as four F16 pairs in fragment order (k16 tile 0
// columns 2c|2c+1, then 2c+8|2c+9, then the same of k16 tile 1). The pairs are chosen so that
// a 32-bit word of 4 one-byte values v0..v3 gives two of them with one AND-OR each:
// (v0, v2) and (v1, v3), as F16 of 1024 + v (v OR 0x6400).
//   contiguous formats (Q8_0, K-quants: element e in byte e): lane c takes elements 8c..8c+7,
//     pairs (0,2) (1,3) (4,6) (5,7);
//   nibble formats (Q4_0, Q4_1, Q5_0, Q5_1: byte j holds elements j and j+16): lane c takes
//     bytes 4c..4c+3, pairs (4c,4c+2) (4c+1,4c+3) (16+4c,16+4c+2) (16+4c+1,16+4c+3).
// The activations are converted to F16 in that order (x_to_f16_perm_kernel), so a lane's B
// fragments for one chunk are one 16-byte load. Then one or two half2 ops apply the scale.
//
// Rows > 64 tile the grid's y; where the (n_out, n_rows) tiles leave SMs idle, K is split and
// the partial sums are added in a fixed order by a second kernel (same bits on every run).
#include <algorithm>

#include <cuda_fp16.h>

#include "cuda_check.h"
#include "matmul_mma.h"
#include "mma.cuh"
#include "quant_dev.cuh"

namespace coinfer::kernels {

namespace {

constexpr int k_bk = 256;     // K elements per tile
constexpr int k_warps = 8;                // warps per block, 16 weight rows each
constexpr int k_threads = 32 * k_warps;
constexpr int k_bm = 16 * k_warps;        // weight rows per block
constexpr int k_x_pitch = 288;  // halves per staged activation row: 256 + 32, so the 8 rows a
                                // quarter-warp reads sit in different banks

// Bytes of one K tile of a row (8 chunks of 32 elements).
template <int T>
constexpr int tile_bytes() { return bytes_per_256<T>(); }
// Shared bytes per row and stage: the tile rounded out to 16-byte copies (a tile may start
// mid-vector when tile_bytes is not a multiple of 16).
template <int T>
constexpr int row_slot_bytes() { return (tile_bytes<T>() + 15) / 16 * 16 + 16; }

__device__ __forceinline__ uint32_t lds16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }
__device__ __forceinline__ uint32_t lds32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
// 4 bytes at a 2-byte aligned address.
__device__ __forceinline__ uint32_t lds32_a2(const uint8_t* p) { return lds16(p) | (lds16(p + 2) << 16); }
__device__ __forceinline__ __half2 h2_bits(uint32_t u) { return *reinterpret_cast<const __half2*>(&u); }
__device__ __forceinline__ uint32_t bits_h2(__half2 h) { return *reinterpret_cast<const uint32_t*>(&h); }
__device__ __forceinline__ __half2 h2_dup(uint32_t h16) { return h2_bits(h16 | (h16 << 16)); }
__device__ __forceinline__ __half2 h2_f(float f) { return __float2half2_rn(f); }

// v: 4 one-byte values. lo = F16 pair (1024 + v0, 1024 + v2), hi = (1024 + v1, 1024 + v3).
__device__ __forceinline__ void bytes_1024(uint32_t v, uint32_t& lo, uint32_t& hi) {
    lo = (v & 0x00ff00ffu) | 0x64006400u;
    hi = ((v >> 8) & 0x00ff00ffu) | 0x64006400u;
}

// out[0..3]: this lane's four F16 pairs (see the top of the file) of chunk ch (0..7) of the K
// tile at tr. v[0], v[1]: its 8 quant values as bytes (offset to be non-negative), then per
// format (v - off) * d (+ m), with v - off exact in F16.
__device__ __forceinline__ void finish_mul(const uint32_t v[2], __half2 off, __half2 d, uint32_t* out) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        uint32_t lo, hi;
        bytes_1024(v[i], lo, hi);
        out[2 * i] = bits_h2(__hmul2(__hsub2(h2_bits(lo), off), d));
        out[2 * i + 1] = bits_h2(__hmul2(__hsub2(h2_bits(hi), off), d));
    }
}
__device__ __forceinline__ void finish_fma(const uint32_t v[2], __half2 off, __half2 d, __half2 m, uint32_t* out) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        uint32_t lo, hi;
        bytes_1024(v[i], lo, hi);
        out[2 * i] = bits_h2(__hfma2(__hsub2(h2_bits(lo), off), d, m));
        out[2 * i + 1] = bits_h2(__hfma2(__hsub2(h2_bits(hi), off), d, m));
    }
}

// Spread the low 4 bits of x to bit 0 of each byte.
__device__ __forceinline__ uint32_t bits_to_bytes(uint32_t x) { return ((x & 0xf) * 0x00204081u) & 0x01010101u; }

template <int T>
__device__ __forceinline__ void dq8h(const uint8_t* tr, int ch, int c, uint32_t* out) {
    const __half2 k1024 = h2_f(1024.0f);
    if constexpr (T == WT_Q4_0 || T == WT_Q4_1 || T == WT_Q5_0 || T == WT_Q5_1) {
        // Byte j of qs: element j (low nibble) and j + 16 (high). Q5: bit e of qh is element e's 5th bit.
        constexpr int bytes = T == WT_Q4_0 ? 18 : T == WT_Q4_1 ? 20 : T == WT_Q5_0 ? 22 : 24;
        constexpr int qs_off = T == WT_Q4_0 ? 2 : T == WT_Q4_1 ? 4 : T == WT_Q5_0 ? 6 : 8;
        const uint8_t* b = tr + bytes * ch;
        const uint32_t u = (T == WT_Q4_1 || T == WT_Q5_1) ? lds32(b + qs_off + 4 * c) : lds32_a2(b + qs_off + 4 * c);
        uint32_t v[2] = {u & 0x0f0f0f0fu, (u >> 4) & 0x0f0f0f0fu};
        if constexpr (T == WT_Q5_0 || T == WT_Q5_1) {
            const uint32_t qh = T == WT_Q5_1 ? lds32(b + 4) : lds32_a2(b + 2);
            v[0] |= bits_to_bytes(qh >> (4 * c)) << 4;
            v[1] |= bits_to_bytes(qh >> (16 + 4 * c)) << 4;
        }
        const __half2 d = h2_dup(lds16(b));
        if constexpr (T == WT_Q4_0) finish_mul(v, h2_f(1032.0f), d, out);
        else if constexpr (T == WT_Q5_0) finish_mul(v, h2_f(1040.0f), d, out);
        else finish_fma(v, k1024, d, h2_dup(lds16(b + 2)), out);
    } else if constexpr (T == WT_Q8_0) {
        const uint8_t* b = tr + 34 * ch;
        const uint8_t* q = b + 2 + 8 * c;
        const uint32_t v[2] = {lds32_a2(q) ^ 0x80808080u, lds32_a2(q + 4) ^ 0x80808080u};  // q + 128
        finish_mul(v, h2_f(1152.0f), h2_dup(lds16(b)), out);
    } else if constexpr (T == WT_Q4_K || T == WT_Q5_K) {
        const uint8_t* b = tr;  // one super-block per tile; chunk ch = sub-block
        int sc, mn;
        k4_scale_min(ch, b + 4, sc, mn);
        const float d = __half2float(__ushort_as_half(uint16_t(lds16(b))));
        const float dmin = __half2float(__ushort_as_half(uint16_t(lds16(b + 2))));
        const __half2 d1 = h2_f(d * float(sc)), m1 = h2_f(-(dmin * float(mn)));
        constexpr int qs_off = T == WT_Q4_K ? 16 : 48;
        const uint2 u = *reinterpret_cast<const uint2*>(b + qs_off + 32 * (ch >> 1) + 8 * c);
        const int sh = 4 * (ch & 1);
        uint32_t v[2] = {(u.x >> sh) & 0x0f0f0f0fu, (u.y >> sh) & 0x0f0f0f0fu};
        if constexpr (T == WT_Q5_K) {
            const uint2 h = *reinterpret_cast<const uint2*>(b + 16 + 8 * c);
            v[0] |= ((h.x >> ch) & 0x01010101u) << 4;
            v[1] |= ((h.y >> ch) & 0x01010101u) << 4;
        }
        finish_fma(v, k1024, d1, m1, out);
    } else if constexpr (T == WT_Q6_K) {
        const uint8_t* b = tr;
        const int half = ch >> 2, r = ch & 3;
        const uint8_t* ql = b + 64 * half + 32 * (r & 1) + 8 * c;
        const uint8_t* qh = b + 128 + 32 * half + 8 * c;
        const int lsh = (r & 2) ? 4 : 0;
        uint32_t v[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
            v[i] = ((lds32_a2(ql + 4 * i) >> lsh) & 0x0f0f0f0fu) | (((lds32_a2(qh + 4 * i) >> (2 * r)) & 0x03030303u) << 4);
        const int s = int(int8_t(b[192 + 8 * half + (c >> 1) + 2 * r]));
        const float d = __half2float(__ushort_as_half(uint16_t(lds16(b + 208))));
        finish_mul(v, h2_f(1056.0f), h2_f(d * float(s)), out);
    } else if constexpr (T == WT_Q2_K) {
        const uint8_t* b = tr;
        const int half = ch >> 2, s4 = ch & 3;
        const uint8_t* q = b + 16 + 32 * half + 8 * c;
        const int sc = b[half * 8 + s4 * 2 + (c >> 1)];
        const float d = __half2float(__ushort_as_half(uint16_t(lds16(b + 80))));
        const float dmin = __half2float(__ushort_as_half(uint16_t(lds16(b + 82))));
        const uint32_t v[2] = {(lds32(q) >> (2 * s4)) & 0x03030303u, (lds32(q + 4) >> (2 * s4)) & 0x03030303u};
        finish_fma(v, k1024, h2_f(d * float(sc & 0xf)), h2_f(-(dmin * float(sc >> 4))), out);
    } else if constexpr (T == WT_Q3_K) {
        const uint8_t* b = tr;
        const int half = ch >> 2, s4 = ch & 3;
        const uint8_t* q = b + 32 + 32 * half + 8 * c;
        const int mbit = half * 4 + s4;
        uint32_t v[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
            v[i] = ((lds32_a2(q + 4 * i) >> (2 * s4)) & 0x03030303u) |
                   (((lds32_a2(b + 8 * c + 4 * i) >> mbit) & 0x01010101u) << 2);
        const float d = __half2float(__ushort_as_half(uint16_t(lds16(b + 108))));
        // value = (q | hmask << 2) - 4: hmask set means no offset of -4.
        finish_mul(v, h2_f(1028.0f), h2_f(d * float(q3k_scale(b + 96, half * 8 + s4 * 2 + (c >> 1)))), out);
    }
}

// Grid: (n_out / k_bm, n_rows / BN, splits). Block: k_threads. Dynamic shared memory:
// [stages][k_bm rows][row_slot_bytes] weight tiles, then [stages][BN][k_x_pitch] F16 activations.
// y: [n_rows, n_out], or with splits > 1 the partials [splits][n_rows][n_out].
template <int T, int NT>
__global__ void __launch_bounds__(k_threads)
qmma_kernel(const uint8_t* __restrict__ w, size_t stride, int64_t row_data, int n_in, int n_out,
            const __half* __restrict__ xh, int n_rows, float* __restrict__ y, int tiles_per_split, int n_stages) {
    constexpr int BN = 8 * NT, TB = tile_bytes<T>(), WS = row_slot_bytes<T>();
    constexpr int w_stage = k_bm * WS, x_stage = BN * k_x_pitch * 2;
    extern __shared__ __align__(16) uint8_t smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int o_blk = blockIdx.x * k_bm, r_blk = blockIdx.y * BN;
    const int n_chunks = n_in / 32;
    const int n_tiles = (n_chunks + 7) / 8;
    const int t0 = blockIdx.z * tiles_per_split, t1 = min(t0 + tiles_per_split, n_tiles);

    auto issue = [&](int t, int slot) {
        if (t < t1) {
            // Weights: bytes [t*TB, min((t+1)*TB, row_data)) of each row, rounded out to 16.
            const int64_t a0 = (int64_t(t) * TB) & ~int64_t(15);
            const int n16 = int((min(int64_t(t + 1) * TB, row_data) - a0 + 15) / 16);
            uint8_t* ws = smem + slot * w_stage;
            for (int i = tid; i < k_bm * n16; i += k_threads) {
                const int r = i / n16, v = i - r * n16;
                const int o = min(o_blk + r, n_out - 1);  // rows past n_out: read a valid row, never stored
                cp_async16(ws + r * WS + 16 * v, w + int64_t(o) * stride + a0 + 16 * v, 16);
            }
            // Activations: BN rows x 32 vectors of 8 halves; past n_rows or n_in: zeros.
            uint8_t* xs = smem + n_stages * w_stage + slot * x_stage;
            for (int i = tid; i < BN * 32; i += k_threads) {
                const int r = i >> 5, v = i & 31;
                const int k = t * k_bk + 8 * v;
                const bool live = r_blk + r < n_rows && k < n_in;
                const __half* src = live ? xh + int64_t(r_blk + r) * n_in + k : xh;
                cp_async16(xs + (r * k_x_pitch + 8 * v) * 2, src, live ? 16 : 0);
            }
        }
        cp_async_commit();  // every thread commits one group per tile, live or not
    };

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;

    for (int s = 0; s < n_stages - 1; ++s) issue(t0 + s, s);
    const int g = lane >> 2, c = lane & 3;
    const int row_a = warp * 16 + g;  // this lane's weight rows in the block: row_a, row_a + 8
    for (int t = t0; t < t1; ++t) {
        const int slot = (t - t0) % n_stages;
        cp_async_wait(n_stages - 2);  // tile t has landed (this thread's copies) ...
        __syncthreads();              // ... everyone's, and tile t - 1's slot is free
        issue(t + n_stages - 1, (t - t0 + n_stages - 1) % n_stages);
        const int shift = int((int64_t(t) * TB) & 15);
        const uint8_t* wr0 = smem + slot * w_stage + row_a * WS + shift;
        const uint8_t* wr1 = wr0 + 8 * WS;
        const __half* xs = reinterpret_cast<const __half*>(smem + n_stages * w_stage + slot * x_stage);
        auto chunk = [&](int ch) {
            uint32_t p[4], q[4];
            dq8h<T>(wr0, ch, c, p);
            dq8h<T>(wr1, ch, c, q);
            const uint32_t a0[4] = {p[0], q[0], p[1], q[1]};
            const uint32_t a1[4] = {p[2], q[2], p[3], q[3]};
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const uint4 b = *reinterpret_cast<const uint4*>(xs + (8 * j + g) * k_x_pitch + 32 * ch + 8 * c);
                mma16816(acc[j], a0, b.x, b.y);
                mma16816(acc[j], a1, b.z, b.w);
            }
        };
        const int n_ch = min(8, n_chunks - t * 8);
        if (n_ch == 8) {
            // Unrolled, so that the decode of one chunk overlaps the products of the last.
#pragma unroll
            for (int ch = 0; ch < 8; ++ch) chunk(ch);
        } else {
            for (int ch = 0; ch < n_ch; ++ch) chunk(ch);
        }
    }
    cp_async_wait(0);

    // C fragment: acc[j][0..1] = (weight row row_a, activation rows 8j + 2c, +1), [2..3] row_a + 8.
    float* out = gridDim.z > 1 ? y + int64_t(blockIdx.z) * n_rows * n_out : y;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int o = o_blk + row_a + (i >= 2 ? 8 : 0);
            const int r = r_blk + 8 * j + 2 * c + (i & 1);
            if (o < n_out && r < n_rows) out[int64_t(r) * n_out + o] = acc[j][i];
        }
}

// The element of a chunk (0..31) at position p of the lane-fragment order above. Within each
// group of four positions the values come in the order 0, 2, 1, 3.
__device__ __forceinline__ int perm_elem(bool nibble, int p) {
    const int o = (p & 1) * 2 + ((p >> 1) & 1);  // 0, 2, 1, 3
    const int c = p >> 3, hi = (p >> 2) & 1;
    return nibble ? 16 * hi + 4 * c + o : 8 * c + 4 * hi + o;
}

// xh = x in F16, each 32-element chunk of a row in fragment order. One thread per 8 outputs.
__global__ void x_to_f16_perm_kernel(const float* __restrict__ x, int64_t n, bool nibble, __half* __restrict__ xh) {
    const int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;  // first output position
    if (i >= n) return;
    const float* xc = x + (i & ~int64_t(31));
    const int p0 = int(i & 31);
    uint32_t u[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
        u[k] = bits_h2(__floats2half2_rn(xc[perm_elem(nibble, p0 + 2 * k)], xc[perm_elem(nibble, p0 + 2 * k + 1)]));
    *reinterpret_cast<uint4*>(xh + i) = make_uint4(u[0], u[1], u[2], u[3]);
}

// y[i] = sum over z of part[z][i], in order of z.
__global__ void split_sum_kernel(const float* __restrict__ part, int64_t n, int splits, float* __restrict__ y) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = part[i];
    for (int z = 1; z < splits; ++z) s += part[int64_t(z) * n + i];
    y[i] = s;
}

template <int T>
int64_t row_data_bytes(int64_t n_in) {
    constexpr bool k_quant = T == WT_Q2_K || T == WT_Q3_K || T == WT_Q4_K || T == WT_Q5_K || T == WT_Q6_K;
    return k_quant ? n_in / 256 * tile_bytes<T>() : n_in / 32 * (tile_bytes<T>() / 8);
}

int sm_count() {
    static const int n = [] {
        int dev = 0, v = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
        return v;
    }();
    return n;
}

template <int T, int NT>
void launch_qmma(const uint8_t* w, size_t stride, int64_t n_in, int64_t n_out, const __half* xh, int64_t n_rows,
                 float* y, float* part, size_t part_floats, cudaStream_t stream) {
    constexpr int BN = 8 * NT;
    constexpr int stage_bytes = k_bm * row_slot_bytes<T>() + BN * k_x_pitch * 2;
    // As deep a ring as fits in ~110 KiB (two blocks per SM), at least 2 stages.
    const int n_stages = std::clamp((110 << 10) / stage_bytes, 2, 4);
    const int smem = n_stages * stage_bytes;
    static int per_sm = 0;  // resident blocks per SM, per instantiation (smem is fixed by T, NT)
    if (per_sm == 0) {
        CUDA_CHECK(cudaFuncSetAttribute(qmma_kernel<T, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, qmma_kernel<T, NT>, k_threads, smem));
        per_sm = std::max(per_sm, 1);
    }
    const int64_t gx = (n_out + k_bm - 1) / k_bm, gy = (n_rows + BN - 1) / BN;
    const int n_tiles = int((n_in / 32 + 7) / 8);
    // Split K so that the blocks fill whole waves of the resident slots as nearly as possible
    // (a last wave a third full costs as much as a full one), with at least 2 tiles a split.
    const int64_t slots = int64_t(per_sm) * sm_count(), base = gx * gy;
    int splits = 1;
    double best = 0.0;
    for (int s = 1; s <= std::min(8, std::max(1, n_tiles / 2)); ++s) {
        if (size_t(s) * size_t(n_rows * n_out) > part_floats && s > 1) break;
        const int64_t waves = (base * s + slots - 1) / slots;
        const double fill = double(base * s) / double(waves * slots);
        if (fill > best + 0.05) {
            best = fill;
            splits = s;
        }
    }
    const int per = (n_tiles + splits - 1) / splits;
    splits = (n_tiles + per - 1) / per;
    const dim3 grid{unsigned(gx), unsigned(gy), unsigned(splits)};
    qmma_kernel<T, NT><<<grid, k_threads, smem, stream>>>(w, stride, row_data_bytes<T>(n_in), int(n_in), int(n_out), xh,
                                                    int(n_rows), splits > 1 ? part : y, per, n_stages);
    CUDA_CHECK_LAUNCH();
    if (splits > 1) {
        const int64_t n = n_rows * n_out;
        split_sum_kernel<<<unsigned((n + 255) / 256), 256, 0, stream>>>(part, n, splits, y);
        CUDA_CHECK_LAUNCH();
    }
}

}  // namespace

bool qmma_supported(int type, const void* w, size_t stride, int64_t n_in, int64_t n_rows) {
    const bool quant = type == WT_Q4_0 || type == WT_Q4_1 || type == WT_Q5_0 || type == WT_Q5_1 || type == WT_Q8_0 ||
                       type == WT_Q2_K || type == WT_Q3_K || type == WT_Q4_K || type == WT_Q5_K || type == WT_Q6_K;
    const bool k_quant = type == WT_Q2_K || type == WT_Q3_K || type == WT_Q4_K || type == WT_Q5_K || type == WT_Q6_K;
    return quant && n_rows <= k_qmma_max_rows && n_in % (k_quant ? 256 : 32) == 0 && stride % 16 == 0 &&
           reinterpret_cast<uintptr_t>(w) % 16 == 0 && n_in < (int64_t(1) << 30);
}

bool qmma(int type, const void* w, size_t stride, int64_t n_in, int64_t n_out, const float* x, int64_t n_rows,
          float* y, float* scratch, size_t scratch_floats, cudaStream_t stream) {
    // Scratch: the F16 activations (in fragment order), then split-K partials.
    const int64_t n_x = n_rows * n_in;
    const int64_t xh_floats = (n_x / 2 + 63) / 64 * 64;
    if (!qmma_supported(type, w, stride, n_in, n_rows) || scratch == nullptr || size_t(xh_floats) > scratch_floats)
        return false;
    auto* xh = reinterpret_cast<__half*>(scratch);
    const bool nibble = type == WT_Q4_0 || type == WT_Q4_1 || type == WT_Q5_0 || type == WT_Q5_1;
    const int threads = 256;
    x_to_f16_perm_kernel<<<unsigned((n_x / 8 + threads - 1) / threads), threads, 0, stream>>>(x, n_x, nibble, xh);
    CUDA_CHECK_LAUNCH();
    float* part = scratch + xh_floats;
    const size_t part_floats = scratch_floats - size_t(xh_floats);
    const auto* wb = static_cast<const uint8_t*>(w);
    dispatch_weight_type(type, [&](auto t) {
        constexpr int T = decltype(t)::value;
        if constexpr (tile_bytes<T>() > 0) {
            if (n_rows <= 16) launch_qmma<T, 2>(wb, stride, n_in, n_out, xh, n_rows, y, part, part_floats, stream);
            else if (n_rows <= 32) launch_qmma<T, 4>(wb, stride, n_in, n_out, xh, n_rows, y, part, part_floats, stream);
            else launch_qmma<T, 8>(wb, stride, n_in, n_out, xh, n_rows, y, part, part_floats, stream);
        }
    });
    return true;
}

}  // namespace coinfer::kernels
