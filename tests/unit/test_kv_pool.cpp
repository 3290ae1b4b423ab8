// The KV block pool's bookkeeping: allocation, refcounts, the free list order, prefix hashes.
#include <doctest/doctest.h>

#include <algorithm>
#include <random>

#include "engine/kv_pool.h"

using coinfer::KvBlockPool;

TEST_CASE("alloc until empty returns nullopt, free returns blocks") {
    KvBlockPool pool(4, 16);
    CHECK(pool.n_free() == 4);
    std::vector<int32_t> got;
    for (int i = 0; i < 4; ++i) got.push_back(pool.kv_block_alloc().value());
    CHECK(!pool.kv_block_alloc().has_value());
    CHECK(pool.n_used() == 4);
    std::sort(got.begin(), got.end());
    CHECK(got == std::vector<int32_t>{0, 1, 2, 3});
    CHECK(!pool.kv_block_alloc_n(1).has_value());
    pool.kv_block_free(2);
    CHECK(pool.kv_block_alloc().value() == 2);
}

TEST_CASE("alloc_n is all or nothing") {
    KvBlockPool pool(5);
    auto a = pool.kv_block_alloc_n(3).value();
    CHECK(!pool.kv_block_alloc_n(3).has_value());
    CHECK(pool.n_free() == 2);
    CHECK(pool.kv_block_alloc_n(2).has_value());
}

TEST_CASE("refcounts: a block returns to the free list only at zero") {
    KvBlockPool pool(2);
    int32_t id = pool.kv_block_alloc().value();
    pool.kv_block_ref(id);
    CHECK(pool.ref_count(id) == 2);
    pool.kv_block_free(id);
    CHECK(pool.n_free() == 1);
    pool.kv_block_free(id);
    CHECK(pool.n_free() == 2);
}

TEST_CASE("a sequence is freed tail first, so its prefix is evicted last") {
    KvBlockPool pool(3);
    auto seq = pool.kv_block_alloc_n(3).value();  // 0, 1, 2
    for (size_t i = 0; i < seq.size(); ++i) pool.kv_block_set_hash(seq[i], 100 + i);
    pool.kv_block_free_seq(seq);
    CHECK(pool.n_cached() == 3);
    // The first allocation evicts the tail block (hash 102); the prefix stays findable.
    CHECK(pool.kv_block_alloc().value() == seq[2]);
    CHECK(!pool.kv_block_lookup(102).has_value());
    CHECK(pool.kv_block_lookup(100).value() == seq[0]);
    CHECK(pool.n_cached() == 2);
}

TEST_CASE("a cached free block can be revived by a prefix hit in O(1)") {
    KvBlockPool pool(4);
    auto seq = pool.kv_block_alloc_n(2).value();
    pool.kv_block_set_hash(seq[0], 7);
    pool.kv_block_free_seq(seq);
    auto hit = pool.kv_block_lookup(7).value();
    pool.kv_block_ref(hit);
    CHECK(pool.ref_count(hit) == 1);
    CHECK(pool.n_free() == 3);
    CHECK(pool.n_cached() == 0);
    // Allocating everything else never hands out the revived block.
    auto rest = pool.kv_block_alloc_n(3).value();
    CHECK(std::find(rest.begin(), rest.end(), hit) == rest.end());
}

TEST_CASE("dropping a hash: the block is no longer found, no longer cached, and reused first") {
    KvBlockPool pool(4, 16);
    auto a = *pool.kv_block_alloc(), b = *pool.kv_block_alloc();
    pool.kv_block_set_hash(a, 111);
    pool.kv_block_set_hash(b, 222);
    pool.kv_block_free(a);
    pool.kv_block_free(b);
    CHECK(pool.n_cached() == 2);
    pool.kv_block_drop_hash(b);
    CHECK_FALSE(pool.kv_block_lookup(222).has_value());
    CHECK(pool.kv_block_lookup(111) == a);
    CHECK(pool.n_cached() == 1);
    CHECK(pool.n_free() == 4);
    CHECK(*pool.kv_block_alloc() == b);  // the invalid block goes first, before any cached one
    // A held block loses its hash the same way, and frees as plain free.
    pool.kv_block_set_hash(b, 333);
    pool.kv_block_drop_hash(b);
    CHECK_FALSE(pool.kv_block_lookup(333).has_value());
    pool.kv_block_free(b);
    CHECK(pool.n_cached() == 1);
    pool.kv_block_drop_hash(b);  // no hash: nothing happens
    CHECK(pool.n_free() == 4);
}

TEST_CASE("random alloc/ref/free keeps the counts consistent") {
    KvBlockPool pool(64);
    std::mt19937 rng(7);
    std::vector<int32_t> held;
    for (int step = 0; step < 20000; ++step) {
        int op = std::uniform_int_distribution<int>(0, 2)(rng);
        if (op == 0) {
            if (auto id = pool.kv_block_alloc()) held.push_back(*id);
            else CHECK(pool.n_free() == 0);
        } else if (op == 1 && !held.empty()) {
            int32_t id = held[std::uniform_int_distribution<size_t>(0, held.size() - 1)(rng)];
            pool.kv_block_ref(id);
            held.push_back(id);
        } else if (!held.empty()) {
            size_t k = std::uniform_int_distribution<size_t>(0, held.size() - 1)(rng);
            pool.kv_block_free(held[k]);
            held.erase(held.begin() + static_cast<long>(k));
        }
        std::vector<int32_t> distinct = held;
        std::sort(distinct.begin(), distinct.end());
        distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
        REQUIRE(pool.n_used() == static_cast<int32_t>(distinct.size()));
    }
}

TEST_CASE("a cached block matches only its own tokens under its own parent, as the parent is now") {
    KvBlockPool pool(8, 4);
    const std::vector<int32_t> ta = {1, 2, 3, 4}, tb = {5, 6, 7, 8}, other = {1, 2, 3, 5};
    const int32_t a = *pool.kv_block_alloc(), b = *pool.kv_block_alloc();
    pool.kv_block_set_hash(a, 100, -1, ta);
    pool.kv_block_set_hash(b, 200, a, tb);
    CHECK(pool.kv_block_match(100, -1, ta) == a);
    CHECK(pool.kv_block_match(200, a, tb) == b);
    // The same hash with other tokens (a collision) or another parent is a miss.
    CHECK_FALSE(pool.kv_block_match(100, -1, other).has_value());
    CHECK_FALSE(pool.kv_block_match(200, -1, tb).has_value());
    CHECK_FALSE(pool.kv_block_match(200, b, tb).has_value());
    CHECK_FALSE(pool.kv_block_match(300, -1, ta).has_value());
    // A colliding block registered later does not replace (or poison) the cached one.
    const int32_t c = *pool.kv_block_alloc();
    pool.kv_block_set_hash(c, 100, -1, other);
    CHECK(pool.kv_block_match(100, -1, ta) == a);
    CHECK_FALSE(pool.kv_block_match(100, -1, other).has_value());
    // The parent evicted and reused: its child no longer matches, even under the same hash and
    // tokens again (the K/V it was computed from is gone).
    pool.kv_block_free(a);
    pool.kv_block_drop_hash(a);
    const int32_t a2 = *pool.kv_block_alloc();
    REQUIRE(a2 == a);
    pool.kv_block_set_hash(a2, 100, -1, ta);
    CHECK(pool.kv_block_match(100, -1, ta) == a2);
    CHECK_FALSE(pool.kv_block_match(200, a2, tb).has_value());
}
