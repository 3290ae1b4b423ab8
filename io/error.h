#pragma once
// coinfer::Error: the one exception type for untrusted input (model files, prompts, HTTP bodies,
// command-line arguments). Its message is meant for a user: it names the file, field or offset.
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace coinfer {

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void throw_error(fmt::format_string<Args...> f, Args&&... args) {
    throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace coinfer
