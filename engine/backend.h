#pragma once
// The interface both backends (cpu, cuda) implement: one forward pass over a ragged batch, with
// K/V kept in the backend's own paged storage.
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "batch.h"
#include "kv_codec.h"
#include "model.h"
#include "sampler.h"

namespace coinfer {

struct BackendOptions {
    int32_t n_blocks = 0;      // KV blocks in the pool (0: backend picks, e.g. from free memory)
    int32_t block_size = 16;   // tokens per KV block
    int32_t n_threads = 1;     // CPU threads for the CPU backend
    float gpu_memory_fraction = 0.9f;
    // cuda: keep every matrix product on the GEMV kernels, whose per-row sums do not depend on
    // the batch, so a request gives the same bits alone or in any batch. Off by default: batches
    // of 2 rows and more then go through tensor cores (F16 operands), several times faster.
    bool batch_invariant = false;
    // KV cache storage (kv_codec.h). auto: f32 on the cpu, f16 on cuda.
    KvType kv_type = KV_TYPE_AUTO;
    // Tokens of the largest step the caller will run: cuda reserves their activations before
    // sizing the KV pool (a larger step still runs, allocating then).
    int32_t max_step_tokens = 2048;
    int32_t cuda_device = 0;  // cuda: the device ordinal (as cudaSetDevice counts)
};

// One logit row's sampling inputs for on-device sampling (the whole engine/sampler.h chain).
struct DeviceSampleRow {
    std::vector<std::pair<int32_t, float>> logit_bias;      // applied in order
    // Nonzero: names the request, whose logit_bias is the same every step, so a backend may
    // upload it once and keep it on the device (0: sent with every step).
    uint64_t bias_key = 0;
    std::vector<std::pair<int32_t, int32_t>> penalty_counts;  // (token id, times seen in the window)
    float repeat_penalty = 1.0f;
    float frequency_penalty = 0.0f;
    float presence_penalty = 0.0f;
    // Steps 4-9; a temperature below SamplingParams::k_greedy_temperature makes the row greedy.
    float temperature = 0.0f;
    int32_t top_k = 0;
    float top_p = 1.0f;
    float min_p = 0.0f;
    uint64_t seed = 0;
    uint64_t token_index = 0;  // the Philox counter: generated-token number of the request
    int32_t n_logprobs = 0;    // top-n logprobs of the raw row wanted (0..SamplingParams::k_max_logprobs)
    // Constrained rows: bit (id & 31) of word id / 32 set = the token may be sampled; the others
    // are banned before the bias (a grammar's mask, (n_vocab + 31) / 32 words). Empty: no mask.
    std::vector<uint32_t> allowed{};
};
using DeviceGreedyRow = DeviceSampleRow;

// What comes back per row from on-device sampling.
struct DeviceSampleOut {
    int32_t id = -1;                        // -1 when no token survives
    float logprob = 0.0f;                   // log_softmax(raw)[id], when n_logprobs > 0
    std::vector<TokenLogprob> top_logprobs;  // n_logprobs entries, as top_logprobs() gives
};

// Thrown by a backend whose device can run nothing more (a sticky CUDA error, an injected
// fatal fault): the engine then fails every request and refuses new ones (engine_failed).
class FatalBackendError : public Error {
public:
    using Error::Error;
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

    // Backends that sample on the device (cuda) run the batch and pick each logit row's greedy
    // token there, so only ids come back: ids[i] for logit_rows[i], -1 when no token survives.
    virtual bool samples_on_device() const { return false; }
    virtual void forward_greedy(const Batch& batch, std::span<const DeviceGreedyRow> rows, std::span<int32_t> ids);
    // The same for every sampling chain: out[i] for logit_rows[i], choices equal to Sampler's.
    virtual void forward_sample(const Batch& batch, std::span<const DeviceSampleRow> rows,
                                std::span<DeviceSampleOut> out);
    // forward_sample in two halves, so that the host can plan the next step while the device
    // runs this one: launch_sample() queues the pass and the sampling and returns at once;
    // wait_sample() blocks until both are done and fills out[i] for logit_rows[i]. One step at a
    // time; `batch` and `rows` must stay alive until wait_sample returns. Errors may surface from
    // either call. The default runs the whole forward_sample inside wait_sample.
    virtual void launch_sample(const Batch& batch, std::span<const DeviceSampleRow> rows);
    virtual void wait_sample(std::span<DeviceSampleOut> out);
    // Optional first half of launch_sample: queues the pass alone, so that rows that take host
    // time (a grammar's masks) are built while the device runs it; launch_sample with the same
    // batch then queues only the sampling. The default does nothing (launch_sample does it all).
    virtual void launch_forward(const Batch& /*batch*/) {}
    // After launch_forward, when the step fails before its launch_sample: the pass is dropped
    // (it finishes on the device before anything queued later).
    virtual void abandon_forward() {}

private:
    const Batch* pending_batch_ = nullptr;  // the default launch/wait pair
    std::span<const DeviceSampleRow> pending_rows_;
};

std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<const Model> model, const BackendOptions& opt);
// Throws coinfer::Error when the build has no CUDA or no device is present.
std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<const Model> model, const BackendOptions& opt);
// True when this build has CUDA and a device is present (device "auto" picks cuda then).
bool cuda_device_available();
// CUDA devices present (0 without CUDA in the build).
int32_t cuda_device_count();

// A device as options and commands name it: "cpu", "cuda" (device 0), "cuda:N", or "auto"
// (cuda:0 when a device is present, else cpu). Throws coinfer::Error on any other name.
struct DeviceSpec {
    bool cuda = false;
    int32_t index = 0;  // cuda device ordinal
    std::string name() const;
};
DeviceSpec parse_device(std::string_view name);
// The backend `device` names (parse_device), with opt.cuda_device taken from it.
std::unique_ptr<Backend> make_backend(std::shared_ptr<const Model> model, std::string_view device, BackendOptions opt);

// Test hook: `inner`, with each forward pass failing with probability `rate` (bad_alloc or an
// Error, when queued or, for launch/wait backends, after the wait) from a seeded generator, and
// pass number `fatal_at` (1-based; 0: none) and every later one failing with FatalBackendError.
std::unique_ptr<Backend> make_fault_backend(std::unique_ptr<Backend> inner, double rate, uint64_t seed,
                                            int64_t fatal_at = 0);

// Checks a batch against the model and pool geometry (shared by the backends).
void validate_batch(const Batch& batch, const ModelConfig& config, int32_t n_blocks, int32_t block_size);

}  // namespace coinfer
