// A small JSON reader and writer for the harness's own files (manifest.json, reference.json,
// the prompt file, the results file). Written here rather than taken from a library because
// neither the ExecuTorch package nor the Android NDK ships one, and the harness must build
// with nothing but a C++17 compiler and the runtime it measures.
#pragma once

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace harness {

class Json {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  Json() = default;
  static Json parse(const std::string& text);  // throws std::runtime_error naming the offset

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool is_number() const { return kind_ == Kind::Number; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_array() const { return kind_ == Kind::Array; }
  bool is_object() const { return kind_ == Kind::Object; }

  double number() const;
  long long integer() const;  // a number with no fraction, else throws
  const std::string& string() const;
  const std::vector<Json>& array() const;
  bool has(const std::string& key) const;
  const Json& operator[](const std::string& key) const;  // throws naming the missing key

 private:
  friend class Parser;
  Kind kind_ = Kind::Null;
  bool boolean_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<Json> array_;
  std::map<std::string, Json> object_;
};

// A JSON string literal (quotes included) of ``text``.
std::string quote(const std::string& text);

// Reads a whole file; throws std::runtime_error naming it.
std::string read_file(const std::string& path);

}  // namespace harness
