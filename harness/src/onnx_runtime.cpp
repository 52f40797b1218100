// ONNX Runtime GenAI's C API on a bundle's ONNX folder (genai_config.json, model.onnx): one
// generator per sequence; AppendTokens runs the model over the new tokens and GetLogits returns
// the last token's logits (measured equal, to the bit, to mobile-export's own onnx runtime).
//
// The onnxruntime-genai wheel ships libonnxruntime-genai.so but not its header, so the few
// functions of its C API the harness calls are declared here, as ort_genai_c.h declares them.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime.hpp"

#ifndef MOBILE_EXPORT_ORT_GENAI_VERSION
#define MOBILE_EXPORT_ORT_GENAI_VERSION "unknown"
#endif

extern "C" {
struct OgaResult;
struct OgaConfig;
struct OgaModel;
struct OgaGeneratorParams;
struct OgaGenerator;
struct OgaTensor;
enum OgaElementType { OgaElementType_float32 = 1, OgaElementType_float16 = 10 };
const char* OgaResultGetError(const OgaResult* result);
void OgaDestroyResult(OgaResult* result);
OgaResult* OgaCreateConfig(const char* config_path, OgaConfig** out);
OgaResult* OgaConfigOverlay(OgaConfig* config, const char* json);
void OgaDestroyConfig(OgaConfig* config);
OgaResult* OgaCreateModelFromConfig(const OgaConfig* config, OgaModel** out);
void OgaDestroyModel(OgaModel* model);
OgaResult* OgaCreateGeneratorParams(const OgaModel* model, OgaGeneratorParams** out);
void OgaDestroyGeneratorParams(OgaGeneratorParams* params);
OgaResult* OgaGeneratorParamsSetSearchNumber(OgaGeneratorParams* params, const char* name, double value);
OgaResult* OgaGeneratorParamsSetSearchBool(OgaGeneratorParams* params, const char* name, bool value);
OgaResult* OgaCreateGenerator(const OgaModel* model, const OgaGeneratorParams* params, OgaGenerator** out);
void OgaDestroyGenerator(OgaGenerator* generator);
OgaResult* OgaGenerator_AppendTokens(OgaGenerator* generator, const int32_t* input_ids, size_t count);
OgaResult* OgaGenerator_GetLogits(OgaGenerator* generator, OgaTensor** out);
OgaResult* OgaTensorGetType(OgaTensor* tensor, int* out);
OgaResult* OgaTensorGetShapeRank(OgaTensor* tensor, size_t* out);
OgaResult* OgaTensorGetShape(OgaTensor* tensor, int64_t* shape, size_t rank);
OgaResult* OgaTensorGetData(OgaTensor* tensor, void** out);
void OgaDestroyTensor(OgaTensor* tensor);
}

namespace harness {
namespace {

void check(OgaResult* result, const std::string& what) {
  if (result == nullptr) return;
  std::string reason = OgaResultGetError(result);
  OgaDestroyResult(result);
  throw std::runtime_error(what + ": " + reason);
}

float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
    }
  } else if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

class OnnxGenAIRuntime : public Runtime {
 public:
  explicit OnnxGenAIRuntime(std::string folder) : folder_(std::move(folder)) {}

  ~OnnxGenAIRuntime() override {
    if (generator_ != nullptr) OgaDestroyGenerator(generator_);
    if (params_ != nullptr) OgaDestroyGeneratorParams(params_);
    if (model_ != nullptr) OgaDestroyModel(model_);
  }

  void load() override {
    // GenAI runs a session on one intra-op thread unless genai_config.json says otherwise, where
    // ONNX Runtime itself (and mobile-export's host runtime) uses every core: the harness asks
    // for every core too, as an app tuning its session would, so the two runtimes compare fairly.
    OgaConfig* config = nullptr;
    check(OgaCreateConfig(folder_.c_str(), &config), "ONNX Runtime GenAI could not read " + folder_ + "/genai_config.json");
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    const std::string overlay = "{\"model\":{\"decoder\":{\"session_options\":{\"intra_op_num_threads\":" +
                                std::to_string(cores) + "}}}}";
    OgaResult* overlaid = OgaConfigOverlay(config, overlay.c_str());
    OgaResult* created = overlaid == nullptr ? OgaCreateModelFromConfig(config, &model_) : nullptr;
    OgaDestroyConfig(config);
    check(overlaid, "genai_config.json overlay");
    check(created, "ONNX Runtime GenAI could not load " + folder_);
    check(OgaCreateGeneratorParams(model_, &params_), "generator params");
    max_seq_len_ = context_length();
    check(OgaGeneratorParamsSetSearchNumber(params_, "max_length", double(max_seq_len_)), "max_length");
    check(OgaGeneratorParamsSetSearchBool(params_, "do_sample", false), "do_sample");
  }

  std::vector<float> step(const std::vector<int64_t>& tokens, int64_t start_pos) override {
    if (start_pos == 0) {  // a new sequence: a fresh generator (its own KV cache)
      if (generator_ != nullptr) OgaDestroyGenerator(generator_);
      generator_ = nullptr;
      length_ = 0;
      check(OgaCreateGenerator(model_, params_, &generator_), "generator");
    }
    if (generator_ == nullptr || start_pos != length_) {
      throw std::runtime_error("ONNX Runtime GenAI appends tokens in order: step at " + std::to_string(start_pos) +
                               ", sequence at " + std::to_string(length_));
    }
    if (start_pos + static_cast<int64_t>(tokens.size()) > max_seq_len_) {
      throw std::runtime_error("sequence exceeds the model's context of " + std::to_string(max_seq_len_));
    }
    std::vector<int32_t> ids(tokens.begin(), tokens.end());
    check(OgaGenerator_AppendTokens(generator_, ids.data(), ids.size()), "append tokens");
    length_ += static_cast<int64_t>(tokens.size());
    OgaTensor* logits = nullptr;
    check(OgaGenerator_GetLogits(generator_, &logits), "logits");
    std::vector<float> row;
    try {
      row = last_row(logits);
    } catch (...) {
      OgaDestroyTensor(logits);
      throw;
    }
    OgaDestroyTensor(logits);
    return row;
  }

  int64_t max_seq_len() const override { return max_seq_len_; }

 private:
  // genai_config.json's search.max_length (the bundle's context length).
  int64_t context_length() const;

  static std::vector<float> last_row(OgaTensor* tensor) {
    int type = 0;
    size_t rank = 0;
    check(OgaTensorGetType(tensor, &type), "logits type");
    check(OgaTensorGetShapeRank(tensor, &rank), "logits rank");
    std::vector<int64_t> shape(rank);
    check(OgaTensorGetShape(tensor, shape.data(), rank), "logits shape");
    void* data = nullptr;
    check(OgaTensorGetData(tensor, &data), "logits data");
    if (rank == 0) throw std::runtime_error("logits have no shape");
    int64_t count = 1;
    for (int64_t dim : shape) count *= dim;
    const int64_t vocab = shape.back();
    std::vector<float> row(static_cast<size_t>(vocab));
    if (type == OgaElementType_float32) {
      const float* values = static_cast<const float*>(data) + (count - vocab);
      std::copy(values, values + vocab, row.begin());
    } else if (type == OgaElementType_float16) {
      const uint16_t* values = static_cast<const uint16_t*>(data) + (count - vocab);
      for (int64_t i = 0; i < vocab; ++i) row[static_cast<size_t>(i)] = half_to_float(values[i]);
    } else {
      throw std::runtime_error("logits of element type " + std::to_string(type) + " (not fp32/fp16)");
    }
    return row;
  }

  std::string folder_;
  OgaModel* model_ = nullptr;
  OgaGeneratorParams* params_ = nullptr;
  OgaGenerator* generator_ = nullptr;
  int64_t length_ = 0;
  int64_t max_seq_len_ = 0;
};

}  // namespace
}  // namespace harness

#include "json.hpp"

namespace harness {
namespace {

int64_t OnnxGenAIRuntime::context_length() const {
  const Json config = Json::parse(read_file(folder_ + "/genai_config.json"));
  return config["search"]["max_length"].integer();
}

}  // namespace

const char* runtime_format() { return "onnxruntime-genai"; }
const char* runtime_name() { return "onnxruntime-genai"; }
const char* runtime_version() { return MOBILE_EXPORT_ORT_GENAI_VERSION; }

// The artifact entry of an ONNX bundle names model.onnx; GenAI opens the folder holding it.
std::unique_ptr<Runtime> open_runtime(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return std::make_unique<OnnxGenAIRuntime>(slash == std::string::npos ? "." : path.substr(0, slash));
}

}  // namespace harness
