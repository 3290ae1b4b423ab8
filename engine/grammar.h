#pragma once
// Constrained decoding: a context-free grammar over bytes, and a per-request matcher that says
// which tokens may come next.
//
// Grammars are written in GBNF as llama.cpp reads it (rules `name ::= ...`, "literals" with
// escapes, [character classes], (groups), * + ? {m} {m,} {m,n}, `.`, # comments, root rule
// `root`), or compiled from a JSON Schema (json_schema.cpp). Characters are matched as UTF-8
// bytes, so a token that ends or starts inside a character is judged exactly.
//
// The matcher is a pushdown recognizer: its state is a set of stacks of grammar positions, each
// stack stored once as a node of a shared tree (a stack is its top position plus its parent's
// node), so a step copies no stack and a state is a short list of node ids. The next-token mask
// walks a trie of the vocabulary's byte strings, advancing the state byte by byte and cutting
// every subtree the grammar rejects; masks are cached per state, and a state recurs whenever the
// grammar loops (every character of a JSON string leaves the same state behind).
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "io/tokenizer.h"

namespace coinfer {

class Grammar {
public:
    // Bounds on what untrusted text may build (an error beyond them, never a hang).
    static constexpr size_t k_max_source_bytes = size_t(1) << 20;
    static constexpr size_t k_max_elements = size_t(1) << 20;  // after repetitions are expanded
    static constexpr int k_max_nesting = 64;                   // parentheses, schema depth
    static constexpr int k_max_repeat = 1000;                  // the n of {m,n}

    // Throws coinfer::Error naming line:column and the reason: syntax, an undefined rule, no
    // root, left recursion, or a language with no string in it.
    static std::shared_ptr<const Grammar> parse(std::string_view gbnf);
    // JSON Schema (json_schema.cpp): throws coinfer::Error naming the schema path.
    static std::shared_ptr<const Grammar> from_json_schema(std::string_view schema_json);
    // The GBNF a schema compiles to (for --help, tests and error reports).
    static std::string json_schema_to_gbnf(std::string_view schema_json);
    // Any JSON object (response_format {"type": "json_object"}).
    static std::shared_ptr<const Grammar> json_object();
    // parse() or from_json_schema() through a process-wide cache of recent sources (any
    // thread): a server checks a request's grammar on a worker, and the engine finds it compiled.
    static std::shared_ptr<const Grammar> cached_gbnf(const std::string& gbnf);
    static std::shared_ptr<const Grammar> cached_json_schema(const std::string& schema_json);

    // The compiled form. An element is a byte range, a rule reference or the end of an
    // alternative; each alternative is a run of elements closed by an end.
    enum ElemType : uint8_t { ELEM_RANGE, ELEM_REF, ELEM_END };
    struct Elem {
        ElemType type;
        uint8_t lo = 0, hi = 0;  // ELEM_RANGE: bytes lo..hi
        int32_t rule = -1;       // ELEM_REF
    };
    std::vector<Elem> elems;
    std::vector<std::vector<int32_t>> rule_alts;  // per rule: first element of each alternative
    std::vector<std::string> rule_names;
    int32_t root = -1;
};

// The vocabulary as byte strings in a trie, built once per tokenizer and shared by matchers.
class TokenTrie {
public:
    explicit TokenTrie(const Tokenizer& tok);
    // From the bytes of each token id ("" for a token never allowed) and the end-of-generation ids.
    TokenTrie(std::vector<std::string> pieces, std::vector<TokenId> eog);
    int32_t n_vocab() const { return n_vocab_; }
    const std::vector<TokenId>& eog_ids() const { return eog_; }
    size_t max_depth() const { return max_depth_; }  // bytes of the longest piece

    struct Node {
        uint32_t first_child = 0;  // children are nodes [first_child, first_child + n_children)
        uint16_t n_children = 0;
        uint8_t byte = 0;          // the edge into this node
        uint32_t first_token = 0;  // tokens whose bytes end here: ids_[first_token, +n_tokens)
        uint32_t n_tokens = 0;
    };
    std::vector<Node> nodes;  // node 0 is the root
    std::vector<TokenId> ids;
    std::vector<std::string> pieces;  // per token id (empty: never allowed, e.g. control)

private:
    void build();
    int32_t n_vocab_ = 0;
    size_t max_depth_ = 0;
    std::vector<TokenId> eog_;
};

// What the matchers of one grammar over one vocabulary share: the stack nodes, each node's
// successors, and the masks of states seen before (a state is the same list of node ids in any
// request, so a schema's masks are computed once per context, not once per request). Not
// thread-safe: its matchers run on one thread (the engine's step loop).
class GrammarContext {
public:
    GrammarContext(std::shared_ptr<const Grammar> grammar, std::shared_ptr<const TokenTrie> trie);
    const Grammar& grammar() const { return *g_; }
    const TokenTrie& trie() const { return *trie_; }
    size_t n_nodes() const { return nodes_.size(); }

private:
    friend class GrammarMatcher;
    using State = std::vector<int32_t>;  // sorted node ids; node 0 is the empty (accepting) stack
    int32_t node(int32_t pos, int32_t parent);
    // Adds to `out` every stack that `pos` over `parent` expands to (ranges on top, or empty).
    void expand(int32_t pos, int32_t parent, State& out);
    // The stacks a node becomes once its top range has matched (computed once per node).
    const State& follow(int32_t id);
    void advance(const State& from, uint8_t byte, State& out);
    // States as ids, with their transitions memoized: a trie walk through a state that loops
    // (a string's characters) costs a table lookup per trie node.
    int32_t intern(const State& s);
    int32_t step(int32_t sid, uint8_t byte);  // the next state's id, or -2 when the byte is refused
    void walk(uint32_t trie_node, int32_t sid, std::vector<uint32_t>& words);
    void fill_mask(const State& state, std::vector<uint32_t>& words);

    std::shared_ptr<const Grammar> g_;
    std::shared_ptr<const TokenTrie> trie_;
    struct Node {
        int32_t pos;     // an ELEM_RANGE element (or an ELEM_REF while expanding)
        int32_t parent;  // the rest of the stack
    };
    std::vector<Node> nodes_;
    std::unordered_map<uint64_t, int32_t> node_ids_;
    std::vector<uint32_t> seen_;           // per node: the generation that last added it to a State
    std::vector<State> follow_;            // per node, once computed
    std::vector<char> follow_done_;
    std::vector<std::array<uint64_t, 4>> bytes_;  // per element: the bytes its range takes
    uint32_t generation_ = 0;
    State initial_;
    std::vector<std::pair<int32_t, int32_t>> work_;
    std::unordered_map<std::string, int32_t> state_ids_;
    std::vector<State> states_;
    std::vector<std::array<int32_t, 256>> trans_;  // per state id: -1 not computed yet, -2 refused
    std::unordered_map<int32_t, std::vector<uint32_t>> mask_cache_;  // by state id
};

class GrammarMatcher {
public:
    explicit GrammarMatcher(std::shared_ptr<GrammarContext> ctx);
    GrammarMatcher(std::shared_ptr<const Grammar> grammar, std::shared_ptr<const TokenTrie> trie);

    // Takes a token: its bytes must be allowed (an end-of-generation token only when can_end()).
    // False, with the state unchanged, otherwise.
    bool accept_token(TokenId id);
    // Takes bytes; false (state unchanged) when the grammar rejects them.
    bool accept_bytes(std::string_view bytes);
    // Whether accept_token(id) would succeed, leaving the state as it is (the mask, token by token).
    bool allows(TokenId id);
    // The tokens allowed next, as bits: bit id of words[id / 32]. Resized to the vocabulary.
    void fill_mask(std::vector<uint32_t>& words) { ctx_->fill_mask(state_, words); }
    // The text so far is a whole sentence of the grammar / nothing more can follow it.
    bool can_end() const;
    bool must_end() const;
    size_t n_stacks() const { return state_.size(); }

private:
    std::shared_ptr<GrammarContext> ctx_;
    GrammarContext::State state_;
};

}  // namespace coinfer
