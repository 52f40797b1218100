// ExecuTorch's C++ runtime (extension::Module) on a bundle's model.pte: the program's
// forward(tokens [1, T] int64, input_pos [1] int64) returns the last token's logits.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <stdexcept>

#include "runtime.hpp"

#ifndef MOBILE_EXPORT_EXECUTORCH_VERSION
#define MOBILE_EXPORT_EXECUTORCH_VERSION "unknown"
#endif

namespace harness {
namespace {

using executorch::extension::Module;
using executorch::runtime::Error;

class ExecuTorchRuntime : public Runtime {
 public:
  explicit ExecuTorchRuntime(std::string path) : path_(std::move(path)) {}

  void load() override {
    module_ = std::make_unique<Module>(path_, Module::LoadMode::Mmap);
    if (module_->load() != Error::Ok) throw std::runtime_error("ExecuTorch could not load " + path_);
    Error method = module_->load_method("forward");
    if (method != Error::Ok) {
      throw std::runtime_error("ExecuTorch could not load the forward method of " + path_ + " (error " +
                               std::to_string(static_cast<int>(method)) + ")");
    }
    max_seq_len_ = metadata("get_max_seq_len");
    vocab_size_ = metadata("get_vocab_size");
  }

  std::vector<float> step(const std::vector<int64_t>& tokens, int64_t start_pos) override {
    if (start_pos + static_cast<int64_t>(tokens.size()) > max_seq_len_) {
      throw std::runtime_error("sequence of " + std::to_string(start_pos + tokens.size()) +
                               " tokens exceeds the model's context of " + std::to_string(max_seq_len_));
    }
    for (int64_t id : tokens) {  // an out-of-range id aborts inside the embedding kernel
      if (id < 0 || (vocab_size_ > 0 && id >= vocab_size_)) {
        throw std::runtime_error("token id " + std::to_string(id) + " is outside the vocabulary of " +
                                 std::to_string(vocab_size_));
      }
    }
    auto ids = executorch::extension::make_tensor_ptr({1, static_cast<int>(tokens.size())}, std::vector<int64_t>(tokens));
    auto pos = executorch::extension::make_tensor_ptr({1}, std::vector<int64_t>{start_pos});
    auto result = module_->forward({ids, pos});
    if (!result.ok()) {
      throw std::runtime_error("forward failed (error " + std::to_string(static_cast<int>(result.error())) + ")");
    }
    const auto& logits = result.get().at(0).toTensor();
    if (logits.scalar_type() != executorch::aten::ScalarType::Float) throw std::runtime_error("logits are not fp32");
    const int64_t vocab = logits.size(logits.dim() - 1);
    const float* data = logits.const_data_ptr<float>() + (logits.numel() - vocab);
    return std::vector<float>(data, data + vocab);
  }

  int64_t max_seq_len() const override { return max_seq_len_; }

 private:
  int64_t metadata(const std::string& method) {
    auto value = module_->execute(method);
    if (!value.ok() || value.get().empty()) throw std::runtime_error(path_ + " has no " + method + " method");
    return value.get().at(0).toInt();
  }

  std::string path_;
  std::unique_ptr<Module> module_;
  int64_t max_seq_len_ = 0;
  int64_t vocab_size_ = 0;
};

}  // namespace

const char* runtime_format() { return "executorch-pte"; }
const char* runtime_name() { return "executorch"; }
const char* runtime_version() { return MOBILE_EXPORT_EXECUTORCH_VERSION; }

std::unique_ptr<Runtime> open_runtime(const std::string& path) { return std::make_unique<ExecuTorchRuntime>(path); }

}  // namespace harness
