// JSON Schema to GBNF: each (sub)schema becomes a rule; the document is JSON with one blank, or
// a line break and indentation, between tokens. Supported: type (or a list of types), properties with required and
// optional ones (in the order declared), additionalProperties (false, true or a schema; false
// when properties are given and it is absent, as OpenAI's strict mode), items / prefixItems with
// minItems / maxItems, enum, const, anyOf / oneOf, allOf of objects, $ref into $defs or
// definitions (recursion included), string minLength / maxLength and the formats date, time,
// date-time and uuid, integer minimum 0 or 1. Anything else that would constrain the document
// is refused by name, never ignored.
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "grammar.h"
#include "io/error.h"

namespace coinfer {

namespace {

// Ordered: properties keep the order they are declared in, which the document follows.
using json = nlohmann::ordered_json;

std::string gbnf_literal(std::string_view s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        if (c == '"') out += "\\\"";
        else if (c == '\\') out += "\\\\";
        else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (c < 0x20) out += fmt::format("\\x{:02X}", c);
        else out += char(c);
    }
    return out + "\"";
}

class Converter {
public:
    explicit Converter(json root) : root_(std::move(root)) {}

    std::string run() {
        const std::string top = visit(root_, "root-value", "#", 0);
        // Blanks may lead (a tokenizer's piece often starts with one).
        std::string out = "root ::= " + prim("ws") + " " + top + "\n";
        for (const std::string& n : order_) out += n + " ::= " + rules_[n] + "\n";
        return out;
    }

private:
    [[noreturn]] static void fail(const std::string& path, const std::string& why) {
        throw_error("json_schema: at {}: {}", path, why);
    }

    std::string rule(const std::string& hint, const std::string& body) {
        // The same body is one rule, whatever asked for it.
        if (auto it = by_body_.find(body); it != by_body_.end()) return it->second;
        std::string name;
        for (char c : hint) name += (std::isalnum(static_cast<unsigned char>(c)) || c == '-') ? c : '-';
        if (name.empty()) name = "r";
        std::string n = name;
        for (int i = 1; rules_.count(n); ++i) n = fmt::format("{}-{}", name, i);
        if (rules_.size() > 20000) fail("#", "the schema compiles to more than 20,000 rules");
        rules_[n] = body;
        order_.push_back(n);
        by_body_[body] = n;
        return n;
    }

    std::string prim(const std::string& name) {
        static const std::map<std::string, std::string> k = {
            // One blank, or a line break and its indentation: room to lay a document out,
            // none to ramble in.
            {"ws", "(\" \" | \"\\n\" [ \\t]{0,16})?"},
            // \u escapes of lone surrogates are JSON by the grammar but refused by parsers: none.
            {"char", R"([^"\\\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2})))"},
            {"string", R"("\"" char* "\"" ws)"},
            {"integer", R"("-"? ([0-9] | [1-9] [0-9]{1,15}) ws)"},
            {"number", R"("-"? ([0-9] | [1-9] [0-9]{1,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})? ws)"},
            {"boolean", R"(("true" | "false") ws)"},
            {"null", R"("null" ws)"},
            {"value", "object | array | string | number | boolean | null"},
            {"object", R"("{" ws (string ":" ws value ("," ws string ":" ws value)*)? "}" ws)"},
            {"array", R"("[" ws (value ("," ws value)*)? "]" ws)"},
            {"date", R"([0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [1-2] [0-9] | "3" [0-1]))"},
            {"time", R"(([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})? ("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9]))"},
            {"hex", "[0-9a-fA-F]"},
        };
        static const std::map<std::string, std::vector<std::string>> deps = {
            {"char", {}}, {"string", {"char", "ws"}}, {"integer", {"ws"}}, {"number", {"ws"}}, {"boolean", {"ws"}},
            {"null", {"ws"}}, {"value", {"object", "array", "string", "number", "boolean", "null"}},
            {"object", {"ws", "string", "value"}}, {"array", {"ws", "value"}}, {"date", {}}, {"time", {}}, {"hex", {}},
            {"ws", {}}};
        if (!rules_.count(name)) {
            rules_[name] = k.at(name);
            order_.push_back(name);
            for (const std::string& d : deps.at(name)) prim(d);
        }
        return name;
    }

    const json& resolve(const std::string& ref, const std::string& path) {
        if (!ref.starts_with("#")) fail(path, "only local $ref (#/...) is supported: '" + ref + "'");
        try {
            return root_.at(json::json_pointer(ref.substr(1)));
        } catch (const json::exception&) {
            fail(path, "$ref '" + ref + "' points at nothing");
        }
    }

    std::string visit(const json& s, const std::string& hint, const std::string& path, int depth) {
        if (depth > Grammar::k_max_nesting) fail(path, fmt::format("the schema nests deeper than {}", Grammar::k_max_nesting));
        if (s.is_boolean()) {
            if (!s.get<bool>()) fail(path, "the schema false admits no value");
            return prim("value");
        }
        if (!s.is_object()) fail(path, "a schema must be an object or a boolean");
        for (const char* k : {"pattern", "patternProperties", "not", "if", "dependentSchemas", "dependentRequired",
                              "minProperties", "maxProperties", "uniqueItems", "contains", "multipleOf",
                              "exclusiveMinimum", "exclusiveMaximum", "propertyNames", "unevaluatedProperties"})
            if (s.contains(k)) fail(path, fmt::format("'{}' is not supported", k));
        if (auto it = s.find("$ref"); it != s.end()) {
            if (!it->is_string()) fail(path, "$ref must be a string");
            const std::string ref = it->get<std::string>();
            if (auto r = refs_.find(ref); r != refs_.end()) return r->second;
            // Named before its body is built: a recursive schema refers to the name.
            std::string n = ref.substr(ref.rfind('/') + 1);
            std::string name;
            for (char c : n) name += std::isalnum(static_cast<unsigned char>(c)) ? c : '-';
            name = "ref-" + (name.empty() ? std::string("x") : name);
            for (int i = 1; rules_.count(name); ++i) name = fmt::format("ref-{}-{}", n, i);
            refs_[ref] = name;
            rules_[name] = "";
            order_.push_back(name);
            rules_[name] = visit(resolve(ref, path), name, ref, depth + 1);
            return name;
        }
        if (auto it = s.find("const"); it != s.end()) return rule(hint, gbnf_literal(it->dump()) + " " + prim("ws"));
        if (auto it = s.find("enum"); it != s.end()) {
            if (!it->is_array() || it->empty()) fail(path, "enum must be a non-empty array");
            std::string body;
            for (const json& v : *it) body += (body.empty() ? "" : " | ") + gbnf_literal(v.dump());
            return rule(hint, "(" + body + ") " + prim("ws"));
        }
        for (const char* k : {"anyOf", "oneOf"}) {
            if (auto it = s.find(k); it != s.end()) {
                if (!it->is_array() || it->empty()) fail(path, fmt::format("{} must be a non-empty array", k));
                std::string body;
                for (size_t i = 0; i < it->size(); ++i)
                    body += (i ? " | " : "") + visit((*it)[i], hint + "-" + std::to_string(i), fmt::format("{}/{}/{}", path, k, i), depth + 1);
                return rule(hint, body);
            }
        }
        if (auto it = s.find("allOf"); it != s.end()) {
            if (!it->is_array() || it->empty()) fail(path, "allOf must be a non-empty array");
            // Objects merge (properties and required); nothing else is combined.
            json merged = {{"type", "object"}, {"properties", json::object()}, {"required", json::array()}};
            for (size_t i = 0; i < it->size(); ++i) {
                const json* part = &(*it)[i];
                if (part->is_object() && part->contains("$ref")) part = &resolve((*part)["$ref"].get<std::string>(), path);
                if (!part->is_object() || !part->contains("properties"))
                    fail(path, "allOf is supported for object schemas with properties only");
                for (auto& [k, v] : (*part)["properties"].items()) merged["properties"][k] = v;
                if (part->contains("required"))
                    for (const json& r : (*part)["required"]) merged["required"].push_back(r);
            }
            return visit(merged, hint, path + "/allOf", depth + 1);
        }
        json type = s.value("type", json());
        if (type.is_null()) {
            if (s.contains("properties") || s.contains("additionalProperties")) type = "object";
            else if (s.contains("items") || s.contains("prefixItems")) type = "array";
            else return prim("value");
        }
        if (type.is_array()) {
            if (type.empty()) fail(path, "type must not be an empty list");
            std::string body;
            for (size_t i = 0; i < type.size(); ++i) {
                json one = s;
                one["type"] = type[i];
                body += (i ? " | " : "") + visit(one, hint + "-" + type[i].dump(), path, depth + 1);
            }
            return rule(hint, body);
        }
        if (!type.is_string()) fail(path, "type must be a string or a list of strings");
        const std::string t = type.get<std::string>();
        if (t == "object") return object(s, hint, path, depth);
        if (t == "array") return array(s, hint, path, depth);
        if (t == "string") return string(s, hint, path);
        if (t == "integer") {
            if (s.contains("maximum")) fail(path, "integer maximum is not supported");
            if (auto m = s.find("minimum"); m != s.end()) {
                if (*m == 0) return rule(hint, "([0-9] | [1-9] [0-9]{1,15}) " + prim("ws"));
                if (*m == 1) return rule(hint, "[1-9] [0-9]{0,15} " + prim("ws"));
                fail(path, "integer minimum other than 0 or 1 is not supported");
            }
            return prim("integer");
        }
        if (t == "number") {
            if (s.contains("minimum") || s.contains("maximum")) fail(path, "number bounds are not supported");
            return prim("number");
        }
        if (t == "boolean") return prim("boolean");
        if (t == "null") return prim("null");
        fail(path, "unknown type '" + t + "'");
    }

    std::string object(const json& s, const std::string& hint, const std::string& path, int depth) {
        const json props = s.value("properties", json::object());
        if (!props.is_object()) fail(path, "properties must be an object");
        std::set<std::string> required;
        if (auto r = s.find("required"); r != s.end()) {
            if (!r->is_array()) fail(path, "required must be an array");
            for (const json& k : *r) {
                if (!k.is_string()) fail(path, "required lists property names");
                if (!props.contains(k.get<std::string>()))
                    fail(path, "required names '" + k.get<std::string>() + "', which is not among the properties");
                required.insert(k.get<std::string>());
            }
        }
        // Extra members: a schema for their values, or none allowed.
        std::string extra;
        const json ap = s.value("additionalProperties", props.empty() ? json(true) : json(false));
        if (!(ap.is_boolean() && !ap.get<bool>())) {
            const std::string v = ap.is_boolean() ? prim("value") : visit(ap, hint + "-extra", path + "/additionalProperties", depth + 1);
            extra = rule(hint + "-kv", prim("string") + " \":\" " + prim("ws") + " " + v);
        }
        std::vector<std::pair<std::string, bool>> kvs;  // (rule, required)
        for (auto& [k, v] : props.items()) {
            const std::string val = visit(v, hint + "-" + k, path + "/properties/" + k, depth + 1);
            kvs.push_back({rule(hint + "-" + k + "-kv", gbnf_literal(json(k).dump()) + " " + prim("ws") + " \":\" " + prim("ws") + " " + val),
                           required.count(k) > 0});
        }
        // A_i: members i.. with none written yet; B_i: with some written (so each comes after a
        // comma). Required ones must appear; optional ones may be skipped; extras come last.
        const size_t n = kvs.size();
        std::vector<std::string> a(n + 1), b(n + 1);
        if (extra.empty()) {
            a[n] = "";
            b[n] = "";
        } else {
            const std::string more = rule(hint + "-more", "(\",\" " + prim("ws") + " " + extra + ")*");
            a[n] = rule(hint + "-a", "(" + extra + " " + more + ")?");
            b[n] = more;
        }
        for (size_t i = n; i-- > 0;) {
            const std::string& kv = kvs[i].first;
            const std::string with_b = b[i + 1].empty() ? "" : " " + b[i + 1];
            const std::string after = "\",\" " + prim("ws") + " " + kv + with_b;
            if (kvs[i].second) {
                a[i] = rule(hint + "-a", kv + with_b);
                b[i] = rule(hint + "-b", after);
            } else {
                a[i] = rule(hint + "-a", kv + with_b + (a[i + 1].empty() ? " | " : " | " + a[i + 1]));
                b[i] = rule(hint + "-b", after + (b[i + 1].empty() ? " | " : " | " + b[i + 1]));
            }
        }
        return rule(hint, "\"{\" " + prim("ws") + (a[0].empty() ? "" : " " + a[0]) + " \"}\" " + prim("ws"));
    }

    std::string array(const json& s, const std::string& hint, const std::string& path, int depth) {
        const int64_t lo = s.value("minItems", int64_t(0));
        const int64_t hi = s.value("maxItems", int64_t(-1));
        if (lo < 0 || (hi >= 0 && hi < lo)) fail(path, "minItems / maxItems out of order");
        if (lo > Grammar::k_max_repeat || hi > Grammar::k_max_repeat)
            fail(path, fmt::format("minItems / maxItems above {} are refused", Grammar::k_max_repeat));
        const std::string ws = prim("ws");
        if (auto p = s.find("prefixItems"); p != s.end() || (s.contains("items") && s["items"].is_array())) {
            const json& items = p != s.end() ? *p : s["items"];
            std::string body = "\"[\" " + ws;
            for (size_t i = 0; i < items.size(); ++i)
                body += (i ? " \",\" " + ws + " " : " ") + visit(items[i], hint + "-" + std::to_string(i), fmt::format("{}/prefixItems/{}", path, i), depth + 1);
            return rule(hint, body + " \"]\" " + ws);
        }
        const std::string item = s.contains("items") ? visit(s["items"], hint + "-item", path + "/items", depth + 1) : prim("value");
        if (hi == 0) return rule(hint, "\"[\" " + ws + " \"]\" " + ws);
        const std::string rest_rep = hi < 0 ? fmt::format("{{{},}}", std::max<int64_t>(lo - 1, 0))
                                            : fmt::format("{{{},{}}}", std::max<int64_t>(lo - 1, 0), hi - 1);
        const std::string list = item + " (\",\" " + ws + " " + item + ")" + rest_rep;
        return rule(hint, "\"[\" " + ws + (lo >= 1 ? " " + list : " (" + list + ")?") + " \"]\" " + ws);
    }

    std::string string(const json& s, const std::string& hint, const std::string& path) {
        if (auto f = s.find("format"); f != s.end()) {
            const std::string fmt_name = f->is_string() ? f->get<std::string>() : "";
            if (fmt_name == "date") return rule(hint, "\"\\\"\" " + prim("date") + " \"\\\"\" " + prim("ws"));
            if (fmt_name == "time") return rule(hint, "\"\\\"\" " + prim("time") + " \"\\\"\" " + prim("ws"));
            if (fmt_name == "date-time")
                return rule(hint, "\"\\\"\" " + prim("date") + " \"T\" " + prim("time") + " \"\\\"\" " + prim("ws"));
            if (fmt_name == "uuid") {
                const std::string h = prim("hex");
                return rule(hint, fmt::format("\"\\\"\" {0}{{8}} \"-\" {0}{{4}} \"-\" {0}{{4}} \"-\" {0}{{4}} \"-\" {0}{{12}} \"\\\"\" {1}", h, prim("ws")));
            }
            fail(path, "string format '" + fmt_name + "' is not supported (date, time, date-time, uuid are)");
        }
        const int64_t lo = s.value("minLength", int64_t(0));
        const int64_t hi = s.value("maxLength", int64_t(-1));
        if (lo < 0 || (hi >= 0 && hi < lo)) fail(path, "minLength / maxLength out of order");
        if (lo > Grammar::k_max_repeat || hi > Grammar::k_max_repeat)
            fail(path, fmt::format("minLength / maxLength above {} are refused", Grammar::k_max_repeat));
        if (lo == 0 && hi < 0) return prim("string");
        const std::string rep = hi < 0 ? fmt::format("{{{},}}", lo) : fmt::format("{{{},{}}}", lo, hi);
        return rule(hint, "\"\\\"\" " + prim("char") + rep + " \"\\\"\" " + prim("ws"));
    }

    json root_;
    std::map<std::string, std::string> rules_;
    std::vector<std::string> order_;
    std::map<std::string, std::string> by_body_;
    std::map<std::string, std::string> refs_;
};

}  // namespace

std::string Grammar::json_schema_to_gbnf(std::string_view schema_json) {
    if (schema_json.size() > k_max_source_bytes) throw_error("json_schema: {} bytes (at most {})", schema_json.size(), k_max_source_bytes);
    json s;
    try {
        s = json::parse(schema_json);
    } catch (const json::parse_error& e) {
        throw_error("json_schema: not valid JSON: {}", e.what());
    }
    return Converter(std::move(s)).run();
}

std::shared_ptr<const Grammar> Grammar::from_json_schema(std::string_view schema_json) {
    const std::string gbnf = json_schema_to_gbnf(schema_json);
    try {
        return parse(gbnf);
    } catch (const Error& e) {
        throw_error("json_schema: {}", e.what());
    }
}

}  // namespace coinfer
