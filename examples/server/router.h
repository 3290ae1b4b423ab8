#pragma once
// Data parallel serving: engine replicas (one per GPU, or several CPU engines) behind one API.
// Each request goes to the replica with the least work in hand, counted in tokens, less the
// prompt tokens it probably still holds in its prefix cache: the router remembers which prompt
// prefixes (chained hashes of whole 16-token blocks) it sent where, so a conversation's next
// turn returns to the replica that has its history cached unless that replica is busier by
// more than the tokens the hit would save. A replica whose device is lost gets nothing more.
// Everything here runs on the server's io thread: nothing locks.
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "scheduler/engine.h"

namespace coinfer::server {

class Router {
public:
    // Tokens a request is expected to generate at most, for the load count: a request asking for
    // thousands usually stops far earlier, and counting them all would starve its replica.
    static constexpr int64_t k_gen_horizon = 256;
    static constexpr int32_t k_block_tokens = 16;
    static constexpr size_t k_max_prefixes = size_t(1) << 16;  // remembered per replica

    explicit Router(std::vector<Engine*> replicas);

    size_t size() const { return replicas_.size(); }
    Engine& replica(size_t i) { return *replicas_[i]; }
    const Model& model() const { return replicas_.front()->model(); }

    // Tokens a routed request still counts for on its replica; it stops counting when destroyed
    // (which may come after the Router's end, from a coroutine frame the io_context destroys).
    class Lease {
    public:
        Lease() = default;
        Lease(Lease&& o) noexcept { *this = std::move(o); }
        Lease& operator=(Lease&& o) noexcept;
        ~Lease() { release(); }
        size_t replica() const { return replica_; }
        // A token came out: the prompt is done, and one fewer is left to generate.
        void on_token();

    private:
        friend class Router;
        void release();
        std::weak_ptr<std::vector<int64_t>> load_;
        size_t replica_ = 0;
        int64_t prompt_left_ = 0, gen_left_ = 0;
    };
    struct Routed {
        TokenStream stream;
        Lease lease;
    };
    // Picks a replica and submits there; throws as Engine::generate does. A text prompt is
    // tokenized here (as the engine would) to see its prefix.
    Routed generate(Request req);

    int64_t load(size_t i) const { return (*load_)[i]; }
    std::vector<EngineStats> stats() const;

private:
    size_t pick(const std::vector<uint64_t>& blocks, int64_t* matched_tokens);
    void remember(size_t r, const std::vector<uint64_t>& blocks);

    std::vector<Engine*> replicas_;
    std::shared_ptr<std::vector<int64_t>> load_;  // tokens in hand per replica
    // Per replica: prefix block hash -> when last routed there (for eviction).
    std::vector<std::unordered_map<uint64_t, uint64_t>> prefixes_;
    uint64_t tick_ = 0;
    size_t next_ = 0;  // where a tie starts, so idle replicas share the work
};

}  // namespace coinfer::server
