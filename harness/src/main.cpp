// mobile-export's native benchmark harness: device_tests/HARNESS.md (version 1), in one process.
//
//   HARNESS --bundle DIR --prompt FILE --new-tokens N --warmup W --output FILE
//
// Reads the manifest, loads the artifact (load_s), runs W warm-up generations, one timed greedy
// generation (prefill -> ttft_s, then N-1 decode steps), reads the process's peak memory, then
// runs the bundle's reference.json teacher-forced (reference_outputs) and writes the results
// file (a temporary file renamed into place). Any failure after the output path is known still
// writes a record with "status": "failed" and one line of "error", and exits non-zero.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.hpp"
#include "runtime.hpp"
#include "sha256.hpp"

#ifndef MOBILE_EXPORT_HARNESS_VERSION
#define MOBILE_EXPORT_HARNESS_VERSION "0"
#endif

namespace harness {
namespace {

constexpr int kSchemaVersion = 1;

struct Args {
  std::string bundle, prompt, output;
  long long new_tokens = -1, warmup = 0;
};

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

long long integer_arg(const std::string& flag, const std::string& value) {
  char* end = nullptr;
  long long parsed = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || parsed < 0) throw std::runtime_error(flag + " needs a non-negative integer, got '" + value + "'");
  return parsed;
}

Args parse_args(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) throw std::runtime_error(flag + " needs a value");
    std::string value = argv[++i];
    if (flag == "--bundle") args.bundle = value;
    else if (flag == "--prompt") args.prompt = value;
    else if (flag == "--output") args.output = value;
    else if (flag == "--new-tokens") args.new_tokens = integer_arg(flag, value);
    else if (flag == "--warmup") args.warmup = integer_arg(flag, value);
    else throw std::runtime_error("unknown argument " + flag);
  }
  if (args.bundle.empty() || args.prompt.empty() || args.output.empty() || args.new_tokens < 1) {
    throw std::runtime_error("usage: --bundle DIR --prompt FILE --new-tokens N (>= 1) --warmup W --output FILE");
  }
  return args;
}

// A field of /proc/self/status in bytes (VmHWM, VmRSS); -1 where the OS has none.
long long proc_status_bytes(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      std::istringstream in(line.substr(field.size() + 1));
      long long kb = 0;
      in >> kb;
      return kb * 1024;
    }
  }
  return -1;
}

size_t argmax(const std::vector<float>& row) {
  return static_cast<size_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

std::vector<double> log_softmax(const std::vector<float>& row) {
  double best = *std::max_element(row.begin(), row.end());
  double total = 0;
  for (float v : row) total += std::exp(double(v) - best);
  double log_total = std::log(total) + best;
  std::vector<double> out(row.size());
  for (size_t i = 0; i < row.size(); ++i) out[i] = double(row[i]) - log_total;
  return out;
}

std::vector<int64_t> token_list(const Json& value) {
  std::vector<int64_t> out;
  for (const Json& item : value.array()) out.push_back(item.integer());
  return out;
}

struct Timed {
  double prefill_s = 0, decode_s = 0;
};

// One greedy generation of ``new_tokens`` after ``prompt`` (EOS does not stop it).
Timed generate(Runtime& runtime, const std::vector<int64_t>& prompt, long long new_tokens) {
  Timed timed;
  auto start = Clock::now();
  int64_t token = static_cast<int64_t>(argmax(runtime.step(prompt, 0)));
  timed.prefill_s = seconds_since(start);
  int64_t position = static_cast<int64_t>(prompt.size());
  start = Clock::now();
  for (long long i = 1; i < new_tokens; ++i) {
    token = static_cast<int64_t>(argmax(runtime.step({token}, position)));
    ++position;
  }
  timed.decode_s = seconds_since(start);
  return timed;
}

// reference.json run teacher-forced: per prompt {"tokens": [...], "logprobs": [[...], ...]}.
std::string reference_outputs(Runtime& runtime, const Json& reference) {
  std::ostringstream out;
  out << "[";
  bool first_prompt = true;
  for (const Json& prompt : reference["prompts"].array()) {
    const auto& steps = prompt["steps"].array();
    std::vector<int64_t> ids = token_list(prompt["token_ids"]);
    std::vector<int64_t> greedy = token_list(prompt["greedy_tokens"]);
    std::ostringstream tokens, logprobs;
    int64_t position = 0;
    for (size_t i = 0; i < steps.size(); ++i) {
      std::vector<float> row;
      if (i == 0) {
        row = runtime.step(ids, 0);
        position = static_cast<int64_t>(ids.size());
      } else {
        row = runtime.step({greedy.at(i - 1)}, position++);
      }
      std::vector<double> lp = log_softmax(row);
      tokens << (i ? "," : "") << argmax(row);
      logprobs << (i ? "," : "") << "[";
      const auto& top = steps[i]["top_ids"].array();
      for (size_t j = 0; j < top.size(); ++j) {
        long long id = top[j].integer();
        if (id < 0 || static_cast<size_t>(id) >= lp.size()) throw std::runtime_error("reference.json names a token outside the vocabulary");
        char buffer[32];
        std::snprintf(buffer, sizeof(buffer), "%.5f", lp[static_cast<size_t>(id)]);
        logprobs << (j ? "," : "") << buffer;
      }
      logprobs << "]";
    }
    out << (first_prompt ? "" : ",") << "{\"tokens\":[" << tokens.str() << "],\"logprobs\":[" << logprobs.str() << "]}";
    first_prompt = false;
  }
  out << "]";
  return out.str();
}

std::string header() {
  std::ostringstream out;
  out << "\"harness_schema_version\":" << kSchemaVersion << ",\"harness\":{\"name\":"
      << quote(std::string("mobile-export-native-") + runtime_name()) << ",\"version\":" << quote(MOBILE_EXPORT_HARNESS_VERSION)
      << "},\"runtime\":{\"name\":" << quote(runtime_name()) << ",\"version\":" << quote(runtime_version()) << "}";
  return out.str();
}

void write_atomically(const std::string& path, const std::string& text) {
  std::string folder = path.substr(0, path.find_last_of('/') == std::string::npos ? 0 : path.find_last_of('/'));
  for (size_t i = 1; i <= folder.size(); ++i) {  // create parent folders
    if (i == folder.size() || folder[i] == '/') ::mkdir(folder.substr(0, i).c_str(), 0755);
  }
  std::string staging = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(staging, std::ios::binary | std::ios::trunc);
    out << text << "\n";
    if (!out) throw std::runtime_error("cannot write " + staging);
  }
  if (std::rename(staging.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot rename into " + path);
}

std::string number(double value) {
  char buffer[40];
  std::snprintf(buffer, sizeof(buffer), "%.6g", value);
  return buffer;
}

int run(const Args& args) {
  const std::string manifest_text = read_file(args.bundle + "/manifest.json");
  const Json manifest = Json::parse(manifest_text);
  const Json& artifact = manifest["artifact"];
  const std::string format = artifact.has("format") ? artifact["format"].string() : "";
  const std::string file = artifact["file"].string();
  if (format != runtime_format()) {
    throw std::runtime_error("the bundle's artifact is " + (format.empty() ? std::string("of no format") : format) +
                             "; this harness runs " + runtime_format() + " bundles");
  }
  if (file.find('/') != std::string::npos || file.find("..") != std::string::npos) {
    throw std::runtime_error("the manifest's artifact file '" + file + "' is not a plain name in the bundle");
  }
  std::vector<int64_t> prompt = token_list(Json::parse(read_file(args.prompt))["token_ids"]);
  if (prompt.empty()) throw std::runtime_error("the prompt file has no token_ids");

  const long long rss_before = proc_status_bytes("VmRSS");
  std::unique_ptr<Runtime> runtime = open_runtime(args.bundle + "/" + file);
  auto start = Clock::now();
  runtime->load();
  const double load_s = seconds_since(start);
  if (static_cast<long long>(prompt.size()) + args.new_tokens > runtime->max_seq_len()) {
    throw std::runtime_error("prompt + new tokens exceed the model's context of " + std::to_string(runtime->max_seq_len()));
  }
  for (long long i = 0; i < args.warmup; ++i) generate(*runtime, prompt, args.new_tokens);
  const Timed timed = generate(*runtime, prompt, args.new_tokens);
  const long long peak = proc_status_bytes("VmHWM");

  std::string outputs = "null";
  std::ifstream reference_file(args.bundle + "/reference.json");
  if (reference_file) outputs = reference_outputs(*runtime, Json::parse(read_file(args.bundle + "/reference.json")));

  std::ostringstream out;
  out << "{" << header() << ",\"status\":\"ok\",\"error\":null"
      << ",\"bundle_manifest_sha256\":" << quote(sha256_hex(manifest_text)) << ",\"prompt_tokens\":" << prompt.size()
      << ",\"generated_tokens\":" << args.new_tokens << ",\"load_s\":" << number(load_s)
      << ",\"ttft_s\":" << number(timed.prefill_s) << ",\"prefill_s\":" << number(timed.prefill_s)
      << ",\"decode_s\":" << number(timed.decode_s)
      << ",\"prefill_tokens_per_s\":" << number(prompt.size() / std::max(timed.prefill_s, 1e-9))
      << ",\"decode_tokens_per_s\":" << number(args.new_tokens > 1 ? (args.new_tokens - 1) / std::max(timed.decode_s, 1e-9) : 0.0)
      << ",\"peak_memory_bytes\":" << peak << ",\"memory_source\":\"VmHWM (/proc/self/status)\""
      << ",\"rss_before_load_bytes\":" << rss_before << ",\"reference_outputs\":" << outputs << "}";
  write_atomically(args.output, out.str());
  return 0;
}

}  // namespace
}  // namespace harness

int main(int argc, char** argv) {
  std::string output;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--output") output = argv[i + 1];
  }
  try {
    return harness::run(harness::parse_args(argc, argv));
  } catch (const std::exception& exc) {
    std::string reason = exc.what();
    std::replace(reason.begin(), reason.end(), '\n', ' ');
    std::cerr << "error: " << reason << "\n";
    if (!output.empty()) {
      try {
        harness::write_atomically(output, "{" + harness::header() +
                                              ",\"status\":\"failed\",\"error\":" + harness::quote(reason) + "}");
      } catch (const std::exception&) {
      }
    }
    return 1;
  }
}
