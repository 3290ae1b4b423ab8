#pragma once
// A small command-line reader for the coinfer subcommands. Options are looked up by name and
// consumed; whatever is left over is positional, and an unconsumed "-x" is an unknown option.
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

namespace coinfer::cli {

// A bad command line: reported as one line, exit code 2.
class UsageError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

class Args {
public:
    explicit Args(std::vector<std::string> argv) : argv_(std::move(argv)), used_(argv_.size(), false) {}

    bool help() { return flag("--help", "-h"); }

    bool flag(std::string_view name, std::string_view alias = {}) {
        bool found = false;
        for (size_t i = 0; i < argv_.size(); ++i)
            if (!used_[i] && (argv_[i] == name || (!alias.empty() && argv_[i] == alias)))
                used_[i] = found = true;
        return found;
    }

    // Every value of a repeatable option, in order.
    std::vector<std::string> values(std::string_view name, std::string_view alias = {}) {
        std::vector<std::string> out;
        for (size_t i = 0; i < argv_.size(); ++i) {
            if (used_[i]) continue;
            const std::string& a = argv_[i];
            std::string_view n = a;
            std::optional<std::string> inline_value;
            if (auto eq = a.find('='); eq != std::string::npos && a.rfind("--", 0) == 0) {
                n = std::string_view(a).substr(0, eq);
                inline_value = a.substr(eq + 1);
            }
            if (n != name && (alias.empty() || n != alias)) continue;
            used_[i] = true;
            if (inline_value) {
                out.push_back(*inline_value);
            } else {
                if (i + 1 >= argv_.size()) throw UsageError(fmt::format("option {} needs a value", name));
                used_[i + 1] = true;
                out.push_back(argv_[++i]);
            }
        }
        return out;
    }

    std::optional<std::string> value(std::string_view name, std::string_view alias = {}) {
        auto v = values(name, alias);
        if (v.size() > 1) throw UsageError(fmt::format("option {} given more than once", name));
        if (v.empty()) return std::nullopt;
        return v[0];
    }

    std::optional<int64_t> int_value(std::string_view name, std::string_view alias = {}) {
        auto v = value(name, alias);
        if (!v) return std::nullopt;
        try {
            size_t pos = 0;
            long long x = std::stoll(*v, &pos);
            if (pos == v->size()) return x;
        } catch (const std::exception&) {
        }
        throw UsageError(fmt::format("option {}: '{}' is not an integer", name, *v));
    }

    std::optional<double> float_value(std::string_view name, std::string_view alias = {}) {
        auto v = value(name, alias);
        if (!v) return std::nullopt;
        try {
            size_t pos = 0;
            double x = std::stod(*v, &pos);
            if (pos == v->size()) return x;
        } catch (const std::exception&) {
            // "nan" parses; only unparseable text lands here
        }
        throw UsageError(fmt::format("option {}: '{}' is not a number", name, *v));
    }

    // The arguments not consumed by any option. Call after every option was read.
    std::vector<std::string> positionals() {
        std::vector<std::string> out;
        for (size_t i = 0; i < argv_.size(); ++i) {
            if (used_[i]) continue;
            const std::string& a = argv_[i];
            if (a.size() > 1 && a[0] == '-' && !is_number(a))
                throw UsageError(fmt::format("unknown option {}", a));
            out.push_back(a);
        }
        return out;
    }

private:
    static bool is_number(const std::string& s) {
        char* end = nullptr;
        std::strtod(s.c_str(), &end);
        return end && *end == '\0';
    }

    std::vector<std::string> argv_;
    std::vector<bool> used_;
};

}  // namespace coinfer::cli
