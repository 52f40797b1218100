#include "json.hpp"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace harness {

class Parser {
 public:
  explicit Parser(const std::string& text) : text_(text) {}

  Json document() {
    Json value = parse_value(0);
    skip_space();
    if (pos_ != text_.size()) fail("trailing characters");
    return value;
  }

 private:
  const std::string& text_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(pos_) + ": " + what);
  }

  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' || text_[pos_] == '\r' || text_[pos_] == '\t')) {
      ++pos_;
    }
  }

  bool consume(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (text_.compare(pos_, n, word) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  // The items of an object or array after its opening bracket: ``item`` parses one, commas
  // between them, up to and including ``close``.
  template <typename Item>
  void items(char close, Item item) {
    skip_space();
    if (pos_ < text_.size() && text_[pos_] == close) {
      ++pos_;
      return;
    }
    while (true) {
      item();
      skip_space();
      if (pos_ < text_.size() && text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < text_.size() && text_[pos_] == close) {
        ++pos_;
        return;
      }
      fail(std::string("expected ',' or '") + close + "'");
    }
  }

  Json parse_value(int depth) {
    if (depth > 64) fail("nested too deeply");
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end");
    Json value;
    char c = text_[pos_];
    if (c == '{') {
      value.kind_ = Json::Kind::Object;
      ++pos_;
      items('}', [&] {
        skip_space();
        if (pos_ >= text_.size() || text_[pos_] != '"') fail("expected a key");
        std::string key = parse_string();
        skip_space();
        if (pos_ >= text_.size() || text_[pos_] != ':') fail("expected ':'");
        ++pos_;
        value.object_[key] = parse_value(depth + 1);
      });
      return value;
    }
    if (c == '[') {
      value.kind_ = Json::Kind::Array;
      ++pos_;
      items(']', [&] { value.array_.push_back(parse_value(depth + 1)); });
      return value;
    }
    if (c == '"') {
      value.kind_ = Json::Kind::String;
      value.string_ = parse_string();
      return value;
    }
    if (consume("true")) {
      value.kind_ = Json::Kind::Bool;
      value.boolean_ = true;
      return value;
    }
    if (consume("false")) {
      value.kind_ = Json::Kind::Bool;
      return value;
    }
    if (consume("null")) return value;
    if (c == '-' || (c >= '0' && c <= '9')) {
      size_t start = pos_;
      ++pos_;
      while (pos_ < text_.size() && std::string("0123456789.eE+-").find(text_[pos_]) != std::string::npos) ++pos_;
      std::string literal = text_.substr(start, pos_ - start);
      char* end = nullptr;
      value.number_ = std::strtod(literal.c_str(), &end);
      if (end == nullptr || *end != '\0') fail("bad number '" + literal + "'");
      value.kind_ = Json::Kind::Number;
      return value;
    }
    fail(std::string("unexpected character '") + c + "'");
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  unsigned hex4() {
    if (pos_ + 4 > text_.size()) fail("short \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      char h = text_[pos_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= h - '0';
      else if (h >= 'a' && h <= 'f') code |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') code |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return code;
  }

  std::string parse_string() {
    ++pos_;  // the opening quote
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) fail("unterminated string");
      char c = text_[pos_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) fail("unterminated escape");
      char e = text_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = hex4();
          if (code >= 0xD800 && code < 0xDC00 && consume("\\u")) {
            unsigned low = hex4();
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
};

Json Json::parse(const std::string& text) { return Parser(text).document(); }

double Json::number() const {
  if (kind_ != Kind::Number) throw std::runtime_error("expected a number");
  return number_;
}

long long Json::integer() const {
  double value = number();
  if (std::floor(value) != value || std::fabs(value) > 9.0e15) throw std::runtime_error("expected an integer");
  return static_cast<long long>(value);
}

const std::string& Json::string() const {
  if (kind_ != Kind::String) throw std::runtime_error("expected a string");
  return string_;
}

const std::vector<Json>& Json::array() const {
  if (kind_ != Kind::Array) throw std::runtime_error("expected an array");
  return array_;
}

bool Json::has(const std::string& key) const { return kind_ == Kind::Object && object_.count(key) > 0; }

const Json& Json::operator[](const std::string& key) const {
  if (kind_ != Kind::Object) throw std::runtime_error("expected an object with '" + key + "'");
  auto found = object_.find(key);
  if (found == object_.end()) throw std::runtime_error("missing '" + key + "'");
  return found->second;
}

std::string quote(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buffer[8];
          std::snprintf(buffer, sizeof(buffer), "\\u%04x", c);
          out += buffer;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

}  // namespace harness
