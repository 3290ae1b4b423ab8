// The test-only fault hook (EngineOptions::fault_rate): a backend that forwards to another and
// fails a given fraction of its calls, the way a real step fails: an exception when the pass is
// queued, a bad_alloc, or an error surfacing from the wait after the work is done (the inner
// backend's own state is always left consistent, as a real failure must leave it).
#include <atomic>
#include <mutex>
#include <new>
#include <random>

#include "backend.h"
#include "io/error.h"

namespace coinfer {

namespace {

class FaultBackend final : public Backend {
public:
    FaultBackend(std::unique_ptr<Backend> inner, double rate, uint64_t seed, int64_t fatal_at)
        : inner_(std::move(inner)), rate_(rate), fatal_at_(fatal_at), rng_(seed) {}

    std::string name() const override { return inner_->name(); }
    int32_t n_blocks() const override { return inner_->n_blocks(); }
    int32_t block_size() const override { return inner_->block_size(); }
    bool samples_on_device() const override { return inner_->samples_on_device(); }

    void forward(const Batch& batch, std::span<float> logits) override {
        maybe_fail("forward");
        inner_->forward(batch, logits);
    }
    void forward_greedy(const Batch& batch, std::span<const DeviceGreedyRow> rows, std::span<int32_t> ids) override {
        maybe_fail("forward");
        inner_->forward_greedy(batch, rows, ids);
    }
    void forward_sample(const Batch& batch, std::span<const DeviceSampleRow> rows,
                        std::span<DeviceSampleOut> out) override {
        maybe_fail("forward");
        inner_->forward_sample(batch, rows, out);
    }
    void launch_sample(const Batch& batch, std::span<const DeviceSampleRow> rows) override {
        maybe_fail("launch");
        inner_->launch_sample(batch, rows);
    }
    void wait_sample(std::span<DeviceSampleOut> out) override {
        inner_->wait_sample(out);
        maybe_fail("wait");
    }

private:
    void maybe_fail(const char* where) {
        int kind = -1;
        {
            std::lock_guard lock(m_);
            if (fatal_at_ > 0 && ++n_calls_ >= fatal_at_) kind = 2;
            else if (std::uniform_real_distribution<double>(0.0, 1.0)(rng_) < rate_) kind = int(rng_() % 2);
        }
        if (kind == 2) throw FatalBackendError(fmt::format("injected fatal device fault in {}", where));
        if (kind == 0) throw std::bad_alloc();
        if (kind == 1) throw_error("injected fault in {}", where);
    }

    std::unique_ptr<Backend> inner_;
    const double rate_;
    const int64_t fatal_at_;
    int64_t n_calls_ = 0;
    std::mutex m_;
    std::mt19937_64 rng_;
};

}  // namespace

std::unique_ptr<Backend> make_fault_backend(std::unique_ptr<Backend> inner, double rate, uint64_t seed,
                                            int64_t fatal_at) {
    return std::make_unique<FaultBackend>(std::move(inner), rate, seed, fatal_at);
}

}  // namespace coinfer
