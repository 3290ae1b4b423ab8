#pragma once
// The coinfer subcommands. Each takes its arguments (after the subcommand name) and returns the
// process exit code. coinfer::Error means bad input (exit 1), cli::UsageError a bad command line (2).
#include "args.h"

namespace coinfer::cli {

int cmd_gguf(Args& args);
int cmd_tokenize(Args& args);
int cmd_generate(Args& args);
int cmd_perplexity(Args& args);
int cmd_serve(Args& args);
int cmd_bench(Args& args);
int cmd_synth(Args& args);

}  // namespace coinfer::cli
