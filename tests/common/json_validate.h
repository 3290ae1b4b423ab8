#pragma once
// A JSON Schema validator for the subset engine/json_schema.cpp compiles (type, properties,
// required, additionalProperties, items, prefixItems, minItems, maxItems, enum, const, anyOf,
// oneOf, allOf, $ref, minLength, maxLength, formats date / time / date-time / uuid, integer
// minimum): the tests' independent check that constrained output obeys its schema.
#include <regex>
#include <string>

#include <nlohmann/json.hpp>

namespace coinfer::test {

inline size_t utf8_chars(const std::string& s) {
    size_t n = 0;
    for (unsigned char c : s) n += (c & 0xC0) != 0x80;
    return n;
}

// Empty when `v` obeys `s`; else where and why not.
inline std::string validate(const nlohmann::json& v, const nlohmann::json& s, const nlohmann::json& root,
                            const std::string& at = "$") {
    using json = nlohmann::json;
    if (s.is_boolean()) return s.get<bool>() ? "" : at + ": schema false";
    if (s.contains("$ref")) return validate(v, root.at(json::json_pointer(s["$ref"].get<std::string>().substr(1))), root, at);
    if (s.contains("const") && v != s["const"]) return at + ": not the const";
    if (s.contains("enum")) {
        bool found = false;
        for (const json& e : s["enum"]) found = found || v == e;
        if (!found) return at + ": not in the enum";
    }
    for (const char* k : {"anyOf", "oneOf"})
        if (s.contains(k)) {
            int n_ok = 0;
            for (const json& sub : s[k]) n_ok += validate(v, sub, root, at).empty();
            if (n_ok == 0 || (std::string(k) == "oneOf" && n_ok > 1)) return at + ": " + k + " fails";
        }
    if (s.contains("allOf"))
        for (const json& sub : s["allOf"]) {
            json loose = sub.is_object() && sub.contains("$ref")
                             ? root.at(json::json_pointer(sub["$ref"].get<std::string>().substr(1)))
                             : sub;
            loose["additionalProperties"] = true;  // allOf parts are merged, not closed one by one
            if (auto e = validate(v, loose, root, at); !e.empty()) return e;
        }
    json type = s.value("type", json());
    if (type.is_null() && (s.contains("properties") || s.contains("additionalProperties"))) type = "object";
    if (type.is_null() && (s.contains("items") || s.contains("prefixItems"))) type = "array";
    if (type.is_array()) {
        for (const json& t : type) {
            json one = s;
            one["type"] = t;
            if (validate(v, one, root, at).empty()) return "";
        }
        return at + ": none of the types";
    }
    if (!type.is_string()) return "";
    const std::string t = type.get<std::string>();
    if (t == "null") return v.is_null() ? "" : at + ": not null";
    if (t == "boolean") return v.is_boolean() ? "" : at + ": not a boolean";
    if (t == "integer") {
        if (!v.is_number_integer()) return at + ": not an integer";
        if (s.contains("minimum") && v.get<int64_t>() < s["minimum"].get<int64_t>()) return at + ": below minimum";
        return "";
    }
    if (t == "number") return v.is_number() ? "" : at + ": not a number";
    if (t == "string") {
        if (!v.is_string()) return at + ": not a string";
        const std::string str = v.get<std::string>();
        const size_t n = utf8_chars(str);
        if (s.contains("minLength") && n < s["minLength"].get<size_t>()) return at + ": too short";
        if (s.contains("maxLength") && n > s["maxLength"].get<size_t>()) return at + ": too long";
        const std::string f = s.value("format", "");
        static const std::string date = R"([0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01]))";
        static const std::string time = R"(([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))";
        if (f == "date" && !std::regex_match(str, std::regex(date))) return at + ": not a date";
        if (f == "time" && !std::regex_match(str, std::regex(time))) return at + ": not a time";
        if (f == "date-time" && !std::regex_match(str, std::regex(date + "T" + time))) return at + ": not a date-time";
        if (f == "uuid" && !std::regex_match(str, std::regex("[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")))
            return at + ": not a uuid";
        return "";
    }
    if (t == "array") {
        if (!v.is_array()) return at + ": not an array";
        if (s.contains("minItems") && v.size() < s["minItems"].get<size_t>()) return at + ": too few items";
        if (s.contains("maxItems") && v.size() > s["maxItems"].get<size_t>()) return at + ": too many items";
        const json* tuple = s.contains("prefixItems") ? &s["prefixItems"] : s.contains("items") && s["items"].is_array() ? &s["items"] : nullptr;
        if (tuple) {
            if (v.size() != tuple->size()) return at + ": tuple length";
            for (size_t i = 0; i < v.size(); ++i)
                if (auto e = validate(v[i], (*tuple)[i], root, at + "[" + std::to_string(i) + "]"); !e.empty()) return e;
        } else if (s.contains("items")) {
            for (size_t i = 0; i < v.size(); ++i)
                if (auto e = validate(v[i], s["items"], root, at + "[" + std::to_string(i) + "]"); !e.empty()) return e;
        }
        return "";
    }
    if (t == "object") {
        if (!v.is_object()) return at + ": not an object";
        json props = s.value("properties", json::object());
        if (s.contains("allOf"))
            for (const json& sub : s["allOf"]) {
                const json& part = sub.contains("$ref") ? root.at(json::json_pointer(sub["$ref"].get<std::string>().substr(1))) : sub;
                for (auto& [k, pv] : part.value("properties", json::object()).items()) props[k] = pv;
            }
        for (const json& r : s.value("required", json::array()))
            if (!v.contains(r.get<std::string>())) return at + ": missing " + r.get<std::string>();
        const json ap = s.value("additionalProperties", props.empty() ? json(true) : json(false));
        for (auto& [k, mv] : v.items()) {
            if (props.contains(k)) {
                if (auto e = validate(mv, props[k], root, at + "." + k); !e.empty()) return e;
            } else if (ap.is_boolean()) {
                if (!ap.get<bool>()) return at + ": unexpected member " + k;
            } else if (auto e = validate(mv, ap, root, at + "." + k); !e.empty()) {
                return e;
            }
        }
        return "";
    }
    return "";
}

}  // namespace coinfer::test
