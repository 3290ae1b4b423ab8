// Fuzz target for the HTTP/1.1 request parser of `coinfer serve` (examples/server/http.cpp).
//
// Each input is a byte stream as a client might send it on one connection (pipelined requests).
// It is parsed twice, all at once and in pieces cut where the input's bytes say; both runs must
// agree request for request, every byte must be accounted for, and nothing may crash or hang.
//
// libFuzzer (clang):
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address -DCOINFER_LIBFUZZER -I. \
//       tests/fuzz/fuzz_http.cpp examples/server/http.cpp -lfmt -o fuzz_http
//   ./fuzz_http -max_total_time=60
// Standalone (gcc, CI): without COINFER_LIBFUZZER this file has a main() that mutates a built-in
// seed corpus at random for a bounded time:
//   fuzz_http [--seconds S] [--iterations N] [--seed X] [FILE...]   (FILEs are replayed first)
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "examples/server/http.h"

namespace {

using namespace coinfer::http;

void require(bool cond, const char* what) {
    if (!cond) {
        std::fprintf(stderr, "fuzz_http: invariant violated: %s\n", what);
        std::abort();
    }
}

struct Outcome {
    std::vector<std::string> requests;  // a digest of each parsed request
    int error_status = 0;
    size_t n_consumed = 0;
};

std::string digest(const Request& r) {
    std::string d = r.method + ' ' + r.target + ' ' + std::to_string(r.version_minor) + (r.keep_alive ? " ka" : " close");
    for (const auto& [k, v] : r.headers) d += '\n' + k + ':' + v;
    d += "\n\n" + r.body;
    return d;
}

// Feeds `data` in pieces whose sizes come from `cuts` (0: all at once).
Outcome run(std::string_view data, const Limits& limits, const std::vector<size_t>& cuts) {
    Outcome out;
    Parser p(limits);
    size_t pos = 0, k = 0;
    while (pos < data.size()) {
        size_t piece = cuts.empty() ? data.size() - pos : std::max<size_t>(1, cuts[k++ % cuts.size()]);
        std::string_view chunk = data.substr(pos, std::min(piece, data.size() - pos));
        // One chunk may hold several pipelined requests.
        while (!chunk.empty()) {
            size_t n_used = 0;
            ParseStatus st = p.feed(chunk, n_used);
            require(n_used <= chunk.size(), "n_used beyond the input");
            chunk.remove_prefix(n_used);
            pos += n_used;
            if (st == PARSE_STATUS_DONE) {
                const Request& r = p.request();
                require(!r.method.empty() && !r.target.empty() && r.target[0] == '/', "request line");
                require(r.body.size() <= limits.max_body_bytes, "body over the limit");
                require(r.path.size() <= r.target.size(), "path");
                if (auto cl = r.header("content-length")) require(std::stoull(std::string(*cl)) == r.body.size(), "body length");
                out.requests.push_back(digest(r));
                p.reset();
                continue;
            }
            if (st == PARSE_STATUS_ERROR) {
                require(p.error_status() >= 400 && p.error_status() < 600, "error status");
                require(!p.error_message().empty(), "error message");
                out.error_status = p.error_status();
                out.n_consumed = pos;
                // Once failed, it stays failed.
                size_t again = 0;
                require(p.feed("GET / HTTP/1.1\r\n", again) == PARSE_STATUS_ERROR && again == 0, "sticky error");
                return out;
            }
            require(chunk.empty(), "NEED_MORE must use all input");
        }
    }
    out.n_consumed = pos;
    return out;
}

void check_one(const uint8_t* data, size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    Limits limits;
    limits.max_body_bytes = 4096;
    limits.max_head_bytes = 2048;
    limits.max_headers = 16;
    // The cut sizes come from the input's own bytes, so libFuzzer can steer them.
    std::vector<size_t> cuts;
    for (size_t i = 0; i < std::min<size_t>(size, 8); ++i) cuts.push_back(1 + static_cast<uint8_t>(in[i]) % 13);
    Outcome whole = run(in, limits, {});
    Outcome split = run(in, limits, cuts);
    Outcome bytes = run(in, limits, {1});
    require(whole.requests == split.requests && whole.requests == bytes.requests, "split parse differs");
    require(whole.error_status == split.error_status && whole.error_status == bytes.error_status, "split error differs");
    require(whole.n_consumed == split.n_consumed && whole.n_consumed == bytes.n_consumed, "split consumption differs");
    // The writer never throws on what the parser produced.
    std::string resp = format_response(200, "text/plain", in.substr(0, 64), true);
    require(resp.size() > 64 || size < 64, "format_response");
    std::string chunk = format_chunk(in.substr(0, 32));
    require(chunk.empty() == false, "format_chunk");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    check_one(data, size);
    return 0;
}

#ifndef COINFER_LIBFUZZER

namespace {

const char* const k_seeds[] = {
    "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET /v1/models?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "POST /v1/completions HTTP/1.1\r\nHost: localhost:8080\r\nContent-Type: application/json\r\n"
    "Content-Length: 27\r\n\r\n{\"prompt\":\"hi\",\"stream\":1}\n",
    "POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello"
    "GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET / HTTP/1.0\r\n\r\n",
    "\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\nX-Empty:\r\nX-Tab:\tv \t\r\n\r\n",
    "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "GET /x HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
};

const char* const k_tokens[] = {"\r\n", "\r\n\r\n", ": ", "Content-Length: ", "Host: h\r\n", " HTTP/1.1", "\n",
                                "Transfer-Encoding", "99999999999999999999", "0", "4096", "\t", "\x80", "\0"};

std::string mutate(std::mt19937_64& rng, const std::vector<std::string>& corpus) {
    std::string s = corpus[rng() % corpus.size()];
    const int n_mut = 1 + static_cast<int>(rng() % 6);
    for (int m = 0; m < n_mut; ++m) {
        const size_t pos = s.empty() ? 0 : rng() % (s.size() + 1);
        switch (rng() % 7) {
            case 0:  // flip a bit
                if (!s.empty()) s[pos % s.size()] ^= static_cast<char>(1u << (rng() % 8));
                break;
            case 1:  // random byte
                s.insert(pos, 1, static_cast<char>(rng() & 0xFF));
                break;
            case 2:  // delete a range
                if (!s.empty()) s.erase(pos % s.size(), 1 + rng() % 8);
                break;
            case 3: {  // an interesting token
                const char* t = k_tokens[rng() % (sizeof(k_tokens) / sizeof(k_tokens[0]))];
                s.insert(pos, t, std::max<size_t>(1, std::strlen(t)));
                break;
            }
            case 4: {  // splice another seed (pipelining)
                const std::string& o = corpus[rng() % corpus.size()];
                s.insert(pos, o.substr(0, rng() % (o.size() + 1)));
                break;
            }
            case 5:  // duplicate a range
                if (!s.empty()) {
                    size_t a = pos % s.size();
                    s.insert(a, s.substr(a, 1 + rng() % 32));
                }
                break;
            default:  // a long run (limits)
                s.insert(pos, 1 + rng() % 3000, "aX:\r"[rng() % 4]);
                break;
        }
    }
    if (s.size() > 64 * 1024) s.resize(64 * 1024);
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    double seconds = 10;
    long long iterations = 2'000'000;
    uint64_t seed = std::random_device{}();
    std::vector<std::string> files;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
        else if (a == "--iterations" && i + 1 < argc) iterations = std::atoll(argv[++i]);
        else if (a == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
        else files.push_back(a);
    }
    std::vector<std::string> corpus;
    for (const char* s : k_seeds) corpus.emplace_back(s);
    for (const auto& f : files) {
        std::ifstream in(f, std::ios::binary);
        std::stringstream ss;
        ss << in.rdbuf();
        corpus.push_back(ss.str());
    }
    for (const auto& c : corpus) check_one(reinterpret_cast<const uint8_t*>(c.data()), c.size());
    std::printf("fuzz_http: seed %llu\n", static_cast<unsigned long long>(seed));
    std::mt19937_64 rng(seed);
    const auto t0 = std::chrono::steady_clock::now();
    long long n = 0;
    for (; n < iterations; ++n) {
        if ((n & 255) == 0 &&
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > seconds)
            break;
        std::string s = mutate(rng, corpus);
        check_one(reinterpret_cast<const uint8_t*>(s.data()), s.size());
        // Keep a few inputs that got far (parsed requests) as new seeds.
        if ((n & 1023) == 0 && corpus.size() < 256) corpus.push_back(std::move(s));
    }
    std::printf("fuzz_http: %lld inputs in %.1f s, no failures\n", n,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return 0;
}

#endif
