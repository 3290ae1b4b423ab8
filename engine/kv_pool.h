#pragma once
// The KV block pool: plain bookkeeping over block ids, no memory of its own. Each backend keeps
// K/V storage shaped [n_blocks * block_size, ...] and indexes it with these ids.
//
// Free blocks sit on one intrusive doubly-linked list with dummy ends (O(1) removal from the
// middle, for prefix-cache hits). A freed block keeps its hash, so it stays findable until it is
// handed out again: allocation takes from the head, so the least recently freed block is evicted
// first (LRU), and only when space is needed.
#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace coinfer {

class KvBlockPool {
public:
    explicit KvBlockPool(int32_t n_blocks, int32_t block_size = 16);

    int32_t n_blocks() const { return n_blocks_; }
    int32_t block_size() const { return block_size_; }
    int32_t n_free() const { return n_free_; }          // refcount 0 (cached ones included)
    int32_t n_used() const { return n_blocks_ - n_free_; }
    int32_t n_cached() const { return n_cached_free_; }  // free but still holding a hashed prefix

    // One block with refcount 1, or nullopt when none is free ("out of blocks" is not an error).
    std::optional<int32_t> kv_block_alloc();
    // n blocks or none at all.
    std::optional<std::vector<int32_t>> kv_block_alloc_n(int32_t n);
    // Another reference to a block; a free (cached) block is taken off the free list.
    void kv_block_ref(int32_t id);
    // Drops one reference; at zero the block joins the free list's tail.
    void kv_block_free(int32_t id);
    // Frees a sequence's blocks in reverse order, so its tail is evicted before its prefix.
    void kv_block_free_seq(std::span<const int32_t> ids);

    // Prefix cache: a full block's content hash, and what it must match besides the hash: the
    // block before it in its sequence (-1: the first) and its tokens. A hash alone is not
    // trusted (64 bits, not collision-resistant against a chosen prompt).
    void kv_block_set_hash(int32_t id, uint64_t hash, int32_t parent = -1, std::span<const int32_t> tokens = {});
    std::optional<int32_t> kv_block_lookup(uint64_t hash) const;
    // The cached block of that hash whose parent is `parent` (as it is now: not reused since)
    // and whose tokens are `tokens`; nullopt otherwise.
    std::optional<int32_t> kv_block_match(uint64_t hash, int32_t parent, std::span<const int32_t> tokens) const;
    // Forgets a block's hash (its K/V turned out not to be valid). A free block then counts as
    // plain free and moves to the head of the free list, to be handed out first.
    void kv_block_drop_hash(int32_t id);
    int32_t ref_count(int32_t id) const { return blocks_[id].ref_count; }

private:
    struct Block {
        int32_t ref_count = 0;
        bool has_hash = false;
        uint64_t hash = 0;
        uint32_t gen = 0;             // bumped whenever the block's content identity ends
        int32_t parent = -1;          // identity: the block before it, at generation parent_gen
        uint32_t parent_gen = 0;
        std::vector<int32_t> tokens;  // and its tokens
        int32_t prev = -1, next = -1;  // free-list links (indices into blocks_, dummies included)
    };
    void list_remove(int32_t id);
    void list_push_back(int32_t id);
    void list_push_front(int32_t id);
    void drop_hash(int32_t id);

    int32_t n_blocks_;
    int32_t block_size_;
    int32_t n_free_ = 0;
    int32_t n_cached_free_ = 0;
    std::vector<Block> blocks_;  // [n_blocks + 2]: the last two are the list's head and tail
    int32_t head_, tail_;
    std::unordered_map<uint64_t, int32_t> by_hash_;
};

}  // namespace coinfer
