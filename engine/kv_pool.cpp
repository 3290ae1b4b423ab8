#include "kv_pool.h"

#include <algorithm>
#include <cassert>

#include "io/error.h"

namespace coinfer {

KvBlockPool::KvBlockPool(int32_t n_blocks, int32_t block_size)
    : n_blocks_(n_blocks), block_size_(block_size) {
    if (n_blocks <= 0 || block_size <= 0)
        throw_error("KV pool needs at least one block of at least one token (got {} x {})", n_blocks, block_size);
    blocks_.resize(static_cast<size_t>(n_blocks) + 2);
    head_ = n_blocks;
    tail_ = n_blocks + 1;
    blocks_[head_].next = tail_;
    blocks_[tail_].prev = head_;
    for (int32_t i = 0; i < n_blocks; ++i) list_push_back(i);
    n_free_ = n_blocks;
}

void KvBlockPool::list_remove(int32_t id) {
    Block& b = blocks_[id];
    assert(b.prev >= 0 && b.next >= 0);
    blocks_[b.prev].next = b.next;
    blocks_[b.next].prev = b.prev;
    b.prev = b.next = -1;
}

void KvBlockPool::list_push_back(int32_t id) {
    Block& b = blocks_[id];
    b.prev = blocks_[tail_].prev;
    b.next = tail_;
    blocks_[b.prev].next = id;
    blocks_[tail_].prev = id;
}

void KvBlockPool::list_push_front(int32_t id) {
    Block& b = blocks_[id];
    b.prev = head_;
    b.next = blocks_[head_].next;
    blocks_[b.next].prev = id;
    blocks_[head_].next = id;
}

void KvBlockPool::drop_hash(int32_t id) {
    Block& b = blocks_[id];
    if (!b.has_hash) return;
    auto it = by_hash_.find(b.hash);
    if (it != by_hash_.end() && it->second == id) by_hash_.erase(it);
    b.has_hash = false;
    ++b.gen;  // blocks that named this one as their parent no longer match
}

std::optional<int32_t> KvBlockPool::kv_block_alloc() {
    int32_t id = blocks_[head_].next;
    if (id == tail_) return std::nullopt;
    list_remove(id);
    Block& b = blocks_[id];
    assert(b.ref_count == 0);
    if (b.has_hash) {
        --n_cached_free_;
        drop_hash(id);  // evicted: its old content is about to be overwritten
    }
    b.ref_count = 1;
    --n_free_;
    return id;
}

std::optional<std::vector<int32_t>> KvBlockPool::kv_block_alloc_n(int32_t n) {
    if (n < 0 || n > n_free_) return std::nullopt;
    std::vector<int32_t> ids;
    ids.reserve(n);
    for (int32_t i = 0; i < n; ++i) ids.push_back(*kv_block_alloc());
    return ids;
}

void KvBlockPool::kv_block_ref(int32_t id) {
    assert(id >= 0 && id < n_blocks_);
    Block& b = blocks_[id];
    if (b.ref_count == 0) {
        list_remove(id);
        --n_free_;
        if (b.has_hash) --n_cached_free_;
    }
    ++b.ref_count;
}

void KvBlockPool::kv_block_free(int32_t id) {
    assert(id >= 0 && id < n_blocks_);
    Block& b = blocks_[id];
    assert(b.ref_count > 0);
    if (--b.ref_count > 0) return;
    list_push_back(id);
    ++n_free_;
    if (b.has_hash) ++n_cached_free_;
}

void KvBlockPool::kv_block_free_seq(std::span<const int32_t> ids) {
    for (auto it = ids.rbegin(); it != ids.rend(); ++it) kv_block_free(*it);
}

void KvBlockPool::kv_block_set_hash(int32_t id, uint64_t hash, int32_t parent, std::span<const int32_t> tokens) {
    assert(id >= 0 && id < n_blocks_ && blocks_[id].ref_count > 0);
    assert(parent >= -1 && parent < n_blocks_);
    Block& b = blocks_[id];
    drop_hash(id);
    // A block already cached under this hash stays the findable one (the same content, or a
    // collision that kv_block_match tells apart).
    auto [it, inserted] = by_hash_.try_emplace(hash, id);
    if (!inserted) return;
    b.has_hash = true;
    b.hash = hash;
    b.parent = parent;
    b.parent_gen = parent >= 0 ? blocks_[parent].gen : 0;
    b.tokens.assign(tokens.begin(), tokens.end());
}

std::optional<int32_t> KvBlockPool::kv_block_match(uint64_t hash, int32_t parent, std::span<const int32_t> tokens) const {
    auto it = by_hash_.find(hash);
    if (it == by_hash_.end()) return std::nullopt;
    const Block& b = blocks_[it->second];
    if (b.parent != parent) return std::nullopt;
    if (parent >= 0 && (!blocks_[parent].has_hash || blocks_[parent].gen != b.parent_gen)) return std::nullopt;
    if (!std::equal(b.tokens.begin(), b.tokens.end(), tokens.begin(), tokens.end())) return std::nullopt;
    return it->second;
}

void KvBlockPool::kv_block_drop_hash(int32_t id) {
    assert(id >= 0 && id < n_blocks_);
    Block& b = blocks_[id];
    if (!b.has_hash) return;
    drop_hash(id);
    if (b.ref_count == 0) {
        --n_cached_free_;
        list_remove(id);
        list_push_front(id);
    }
}

std::optional<int32_t> KvBlockPool::kv_block_lookup(uint64_t hash) const {
    auto it = by_hash_.find(hash);
    if (it == by_hash_.end()) return std::nullopt;
    return it->second;
}

}  // namespace coinfer
