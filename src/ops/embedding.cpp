#include "aviary/ops/embedding.h"

#include <torch/autograd.h>

#include "aviary/ops/impl.h"
#include "cpu_loops.h"
#include "tensor_rows.h"

namespace aviary::ops {
namespace {

class EmbeddingCpuFunction : public torch::autograd::Function<EmbeddingCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& weight,
                               const torch::Tensor& ids) {
    ctx->save_for_backward({ids});
    ctx->saved_data["vocab"] = weight.size(0);
    return torch::embedding(weight, ids);  // checks the ids against the table
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto ids = ctx->get_saved_variables()[0].reshape({-1}).contiguous();
    const auto grad = as_rows(grads[0]);
    const int64_t vocab = ctx->saved_data["vocab"].toInt(), cols = grad.size(1);
    auto dweight = torch::empty({vocab, cols}, grad.options());
    cpu::embedding_backward(grad.size(0), cols, ids.data_ptr<int64_t>(), grad.data_ptr<float>(),
                            row_stride(grad), vocab, dweight.data_ptr<float>());
    return {dweight, torch::Tensor()};
  }
};

}  // namespace

torch::Tensor embedding_reference(const torch::Tensor& weight, const torch::Tensor& ids) {
  return torch::embedding(weight, ids);
}

torch::Tensor embedding(const torch::Tensor& weight, const torch::Tensor& ids) {
  if (use_cpu_loops(weight) && weight.dim() == 2 && ids.scalar_type() == torch::kInt64 &&
      ids.device().is_cpu() && ids.numel() > 0 && weight.size(1) > 0) {
    return EmbeddingCpuFunction::apply(weight, ids);
  }
  return embedding_reference(weight, ids);
}

}  // namespace aviary::ops
