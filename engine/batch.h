#pragma once
// One forward pass's input: a ragged batch of tokens from many sequences.
//
//   tokens     t0 t1 t2 t3 t4        (flat, any mix of prompt chunks and decode steps)
//   positions   5  6  7  0 12
//   seq         0  0  0  1  2   ---> block_tables[seq] maps position p to KV slot
//                                    block_tables[seq][p / block_size] * block_size + p % block_size
//   logit_rows {2, 3, 4}             rows whose logits come back, in this order
//
// Every token attends to positions 0..pos of its own sequence: earlier positions must already
// be in the cache or be in this batch.
#include <cstdint>
#include <vector>

#include "../io/tokenizer.h"

namespace coinfer {

struct Batch {
    std::vector<TokenId> tokens;                    // [n_tokens]
    std::vector<int32_t> positions;                 // [n_tokens]
    std::vector<int32_t> seq;                       // [n_tokens] index into block_tables
    std::vector<std::vector<int32_t>> block_tables; // [n_seqs][blocks]
    std::vector<int32_t> logit_rows;                // token indices that need logits

    int32_t n_tokens() const { return static_cast<int32_t>(tokens.size()); }
    int32_t n_seqs() const { return static_cast<int32_t>(block_tables.size()); }

    int32_t add_seq(std::vector<int32_t> block_table) {
        block_tables.push_back(std::move(block_table));
        return n_seqs() - 1;
    }
    void add(TokenId token, int32_t pos, int32_t seq_index, bool want_logits) {
        if (want_logits) logit_rows.push_back(n_tokens());
        tokens.push_back(token);
        positions.push_back(pos);
        seq.push_back(seq_index);
    }
    void clear() {
        tokens.clear();
        positions.clear();
        seq.clear();
        block_tables.clear();
        logit_rows.clear();
    }
};

}  // namespace coinfer
