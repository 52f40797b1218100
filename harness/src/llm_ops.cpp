// ExecuTorch kernels for the two LLM custom ops our .pte files call outside XNNPACK:
// llama::update_cache.out (write new K/V rows into the program's cache) and
// llama::custom_sdpa.out (attention of the new queries over the cache).
//
// Written here because the ExecuTorch wheel ships these kernels only inside
// libcustom_ops_aot_lib.so, which links libtorch and the Python extension module (it needs a
// Python interpreter to load), so a plain native harness cannot link it; on Android they are
// not shipped as a library at all. fp32 only (what the xnnpack backend emits: fp32 activations
// and caches). The harness's reference.json check compares the outputs with the original
// model, so a disagreement in these kernels shows as a failed parity record, never as figures.
//
// Layouts (as ExecuTorch's own kernels): query [B, S, H, D], caches [B, max_len, H_kv, D],
// out like query; GQA maps query head h to cache head h / (H / H_kv). Query i sits at absolute
// position start_pos + i and sees keys 0 .. start_pos + S - 1, causally (key <= its position)
// when is_causal, else as the additive mask [S, max_len] allows.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace mobile_export_harness {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

bool fp32_4d(const Tensor& t) { return t.dim() == 4 && t.scalar_type() == ScalarType::Float; }

}  // namespace

Tensor& update_cache_out(KernelRuntimeContext& ctx, const Tensor& value, Tensor& cache, int64_t start_pos,
                         Tensor& out) {
  (void)out;  // a placeholder output, as in ExecuTorch's kernel: the cache is updated in place
  ET_KERNEL_CHECK_MSG(ctx, fp32_4d(value) && fp32_4d(cache), InvalidArgument, out,
                      "update_cache: fp32 [B, S, H, D] value and cache expected");
  const int64_t batch = value.size(0), seq = value.size(1), heads = value.size(2), dim = value.size(3);
  ET_KERNEL_CHECK_MSG(ctx, cache.size(0) == batch && cache.size(2) == heads && cache.size(3) == dim,
                      InvalidArgument, out, "update_cache: value and cache shapes differ");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + seq <= cache.size(1), InvalidArgument, out,
                      "update_cache: rows beyond the cache");
  const int64_t row = heads * dim;
  const float* src = value.const_data_ptr<float>();
  float* dst = cache.mutable_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(dst + (b * cache.size(1) + start_pos) * row, src + b * seq * row, sizeof(float) * seq * row);
  }
  return out;
}

Tensor& custom_sdpa_out(KernelRuntimeContext& ctx, const Tensor& query, const Tensor& key_cache,
                        const Tensor& value_cache, int64_t start_pos, const std::optional<Tensor>& attn_mask,
                        double dropout_p, bool is_causal, std::optional<double> scale, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, fp32_4d(query) && fp32_4d(key_cache) && fp32_4d(value_cache), InvalidArgument, out,
                      "custom_sdpa: fp32 [B, S, H, D] tensors expected");
  ET_KERNEL_CHECK_MSG(ctx, dropout_p == 0.0, InvalidArgument, out, "custom_sdpa: dropout is not supported");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, query.sizes()) == Error::Ok, InvalidArgument, out);
  const int64_t batch = query.size(0), seq = query.size(1), heads = query.size(2), dim = query.size(3);
  const int64_t max_len = key_cache.size(1), kv_heads = key_cache.size(2);
  const int64_t keys = start_pos + seq;
  ET_KERNEL_CHECK_MSG(ctx, kv_heads > 0 && heads % kv_heads == 0 && key_cache.size(3) == dim, InvalidArgument, out,
                      "custom_sdpa: query and cache heads do not match");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && keys <= max_len, InvalidArgument, out,
                      "custom_sdpa: positions beyond the cache");
  const float* mask = nullptr;
  if (attn_mask.has_value()) {
    const Tensor& m = attn_mask.value();
    ET_KERNEL_CHECK_MSG(ctx, m.scalar_type() == ScalarType::Float && m.numel() == seq * max_len, InvalidArgument, out,
                        "custom_sdpa: an fp32 [S, max_len] mask expected");
    mask = m.const_data_ptr<float>();
  }
  const float factor = scale.has_value() ? static_cast<float>(scale.value()) : 1.0f / std::sqrt(float(dim));
  const int64_t group = heads / kv_heads;
  const float* q = query.const_data_ptr<float>();
  const float* k = key_cache.const_data_ptr<float>();
  const float* v = value_cache.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  std::vector<float> scores(keys);
  const float minus_inf = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < seq; ++i) {
      const int64_t position = start_pos + i;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t kh = h / group;
        const float* qv = q + ((b * seq + i) * heads + h) * dim;
        float best = minus_inf;
        for (int64_t j = 0; j < keys; ++j) {
          float s = minus_inf;
          const bool visible = is_causal ? j <= position : true;
          if (visible) {
            const float* kv = k + ((b * max_len + j) * kv_heads + kh) * dim;
            float dot = 0.0f;
            for (int64_t d = 0; d < dim; ++d) dot += qv[d] * kv[d];
            s = dot * factor + (mask != nullptr ? mask[i * max_len + j] : 0.0f);
          }
          scores[j] = s;
          best = std::max(best, s);
        }
        float* ov = o + ((b * seq + i) * heads + h) * dim;
        std::fill(ov, ov + dim, 0.0f);
        if (best == minus_inf) continue;  // nothing visible: zeros, as a fully masked row
        float total = 0.0f;
        for (int64_t j = 0; j < keys; ++j) {
          scores[j] = scores[j] == minus_inf ? 0.0f : std::exp(scores[j] - best);
          total += scores[j];
        }
        for (int64_t j = 0; j < keys; ++j) {
          if (scores[j] == 0.0f) continue;
          const float weight = scores[j] / total;
          const float* vv = v + ((b * max_len + j) * kv_heads + kh) * dim;
          for (int64_t d = 0; d < dim; ++d) ov[d] += weight * vv[d];
        }
      }
    }
  }
  return out;
}

}  // namespace mobile_export_harness

EXECUTORCH_LIBRARY(llama, "update_cache.out", mobile_export_harness::update_cache_out);
EXECUTORCH_LIBRARY(llama, "custom_sdpa.out", mobile_export_harness::custom_sdpa_out);
