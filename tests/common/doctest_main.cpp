// doctest's main, plus the skip status: a test binary that checked nothing because its model
// files or its GPU are missing (test::mark_skipped) exits 77, which meson counts as skipped.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "test_models.h"

namespace {

int g_asserts = 0;

// Records the run's assertion count; reports nothing.
struct AssertCount : doctest::IReporter {
    explicit AssertCount(const doctest::ContextOptions&) {}
    void report_query(const doctest::QueryData&) override {}
    void test_run_start() override {}
    void test_run_end(const doctest::TestRunStats& s) override { g_asserts = s.numAsserts; }
    void test_case_start(const doctest::TestCaseData&) override {}
    void test_case_reenter(const doctest::TestCaseData&) override {}
    void test_case_end(const doctest::CurrentTestCaseStats&) override {}
    void test_case_exception(const doctest::TestCaseException&) override {}
    void subcase_start(const doctest::SubcaseSignature&) override {}
    void subcase_end() override {}
    void log_assert(const doctest::AssertData&) override {}
    void log_message(const doctest::MessageData&) override {}
    void test_case_skipped(const doctest::TestCaseData&) override {}
};
DOCTEST_REGISTER_LISTENER("coinfer_assert_count", 1, AssertCount);

}  // namespace

int main(int argc, char** argv) {
    doctest::Context ctx(argc, argv);
    const int rc = ctx.run();
    if (ctx.shouldExit()) return rc;
    const std::string& why = coinfer::test::skip_reason();
    if (rc == 0 && g_asserts == 0 && !why.empty()) {
        std::fprintf(stderr, "SKIP (exit 77): nothing was checked: %s\n", why.c_str());
        return 77;
    }
    return rc;
}
