// coinfer tokenize -m MODEL [--no-bos] [--no-special] [--file F | TEXT]: prints a JSON id array.
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "io/gguf.h"
#include "io/tokenizer.h"

namespace coinfer::cli {

int cmd_tokenize(Args& args) {
    if (args.help()) {
        fmt::print(
            "usage: coinfer tokenize -m MODEL [--no-bos] [--no-special] [--file F | TEXT]\n\n"
            "Prints the token ids of TEXT (or of file F) as a JSON array.\n"
            "  -m, --model MODEL  a GGUF file with a tokenizer\n"
            "  --no-bos           do not add BOS/EOS (add_special off)\n"
            "  --no-special       do not recognise special tokens written in the text\n"
            "  --file F           read the text from F (bytes as they are)\n"
            "  --pieces           print [id, piece] pairs instead of bare ids\n");
        return 0;
    }
    auto model = args.value("--model", "-m");
    bool no_bos = args.flag("--no-bos");
    bool no_special = args.flag("--no-special");
    bool pieces = args.flag("--pieces");
    auto file = args.value("--file", "-f");
    auto pos = args.positionals();
    if (!model) throw UsageError("missing -m MODEL");
    std::string text;
    if (file) {
        if (!pos.empty()) throw UsageError("give either --file or TEXT, not both");
        std::ifstream in(*file, std::ios::binary);
        if (!in) throw Error(fmt::format("{}: cannot open", *file));
        std::ostringstream ss;
        ss << in.rdbuf();
        text = ss.str();
    } else {
        if (pos.size() != 1) throw UsageError("expected one TEXT argument (quote it) or --file F");
        text = pos[0];
    }
    GgufFile f = GgufFile::open(*model);
    Tokenizer tok = Tokenizer::from_gguf(f);
    auto ids = tok.encode(text, !no_bos, !no_special);
    if (!pieces) {
        fmt::print("[{}]\n", fmt::join(ids, ", "));
        return 0;
    }
    nlohmann::json out = nlohmann::json::array();
    for (TokenId id : ids) out.push_back({id, tok.token_to_piece(id, true)});
    fmt::print("{}\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    return 0;
}

}  // namespace coinfer::cli
