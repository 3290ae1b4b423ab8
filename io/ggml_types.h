#pragma once
// Tensor element types as GGUF files number them (ggml's type ids), with their block geometry.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace coinfer {

enum GgmlType : uint32_t {
    GGML_TYPE_F32 = 0,
    GGML_TYPE_F16 = 1,
    GGML_TYPE_Q4_0 = 2,
    GGML_TYPE_Q4_1 = 3,
    GGML_TYPE_Q5_0 = 6,
    GGML_TYPE_Q5_1 = 7,
    GGML_TYPE_Q8_0 = 8,
    GGML_TYPE_Q8_1 = 9,
    GGML_TYPE_Q2_K = 10,
    GGML_TYPE_Q3_K = 11,
    GGML_TYPE_Q4_K = 12,
    GGML_TYPE_Q5_K = 13,
    GGML_TYPE_Q6_K = 14,
    GGML_TYPE_Q8_K = 15,
    GGML_TYPE_IQ2_XXS = 16,
    GGML_TYPE_IQ2_XS = 17,
    GGML_TYPE_IQ3_XXS = 18,
    GGML_TYPE_IQ1_S = 19,
    GGML_TYPE_IQ4_NL = 20,
    GGML_TYPE_IQ3_S = 21,
    GGML_TYPE_IQ2_S = 22,
    GGML_TYPE_IQ4_XS = 23,
    GGML_TYPE_I8 = 24,
    GGML_TYPE_I16 = 25,
    GGML_TYPE_I32 = 26,
    GGML_TYPE_I64 = 27,
    GGML_TYPE_F64 = 28,
    GGML_TYPE_IQ1_M = 29,
    GGML_TYPE_BF16 = 30,
    GGML_TYPE_TQ1_0 = 34,
    GGML_TYPE_TQ2_0 = 35,
    GGML_TYPE_MXFP4 = 39,
};

struct GgmlTypeInfo {
    std::string_view name;
    uint32_t block_size;  // elements per block
    uint32_t type_size;   // bytes per block
};

// Geometry of a known type id; nullopt for ids that are unknown or retired.
std::optional<GgmlTypeInfo> ggml_type_info(uint32_t type);

// Name for printing; "type(N)" style names are not returned, unknown ids give "unknown".
std::string_view ggml_type_name(uint32_t type);

// Parses a type name such as "q4_k" or "Q4_K" (case-insensitive).
std::optional<GgmlType> ggml_type_from_name(std::string_view name);

// Bytes of one row of n elements; nullopt when n is not a multiple of the block size.
std::optional<size_t> ggml_row_bytes(GgmlType type, int64_t n);

}  // namespace coinfer
