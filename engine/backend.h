#pragma once
// The interface both backends (cpu, cuda) implement: one forward pass over a ragged batch, with
// K/V kept in the backend's own paged storage.
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "batch.h"
#include "model.h"

namespace coinfer {

struct BackendOptions {
    int32_t n_blocks = 0;      // KV blocks in the pool (0: backend picks, e.g. from free memory)
    int32_t block_size = 16;   // tokens per KV block
    int32_t n_threads = 1;     // CPU threads for the CPU backend
    float gpu_memory_fraction = 0.9f;
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;
    virtual int32_t n_blocks() const = 0;
    virtual int32_t block_size() const = 0;
    // Runs the batch and writes logits [batch.logit_rows.size(), n_vocab] in logit_rows order.
    // An invalid batch (token out of vocab, position outside its block table, ...) is an Error
    // and leaves the cache untouched.
    virtual void forward(const Batch& batch, std::span<float> logits) = 0;
};

std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<const Model> model, const BackendOptions& opt);

// Checks a batch against the model and pool geometry (shared by the backends).
void validate_batch(const Batch& batch, const ModelConfig& config, int32_t n_blocks, int32_t block_size);

}  // namespace coinfer
