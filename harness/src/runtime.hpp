// The runtime interface the harness drives, mirroring mobile_export.runtimes.base.Runtime:
// open an artifact, feed tokens at a position and read the last token's logits. Sequences start
// at position 0; the caches are overwritten from there, so no reset is needed.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace harness {

class Runtime {
 public:
  virtual ~Runtime() = default;
  // Load the artifact (timed by the caller as load_s); throws std::runtime_error with the reason.
  virtual void load() = 0;
  // Feed ``tokens`` at ``start_pos``; the last token's logits (fp32, vocabulary-sized).
  virtual std::vector<float> step(const std::vector<int64_t>& tokens, int64_t start_pos) = 0;
  virtual int64_t max_seq_len() const = 0;
};

// What this harness build runs: the artifact format ("executorch-pte", "onnxruntime-genai"),
// and the runtime's name and version for the results file.
const char* runtime_format();
const char* runtime_name();
const char* runtime_version();

// A runtime for the artifact at ``path`` (the manifest's artifact entry resolved in the bundle).
std::unique_ptr<Runtime> open_runtime(const std::string& path);

}  // namespace harness
