#include "aviary/ops/cross_entropy.h"

#include <torch/autograd.h>
#include <torch/nn/functional/loss.h>

#include <limits>

#include "aviary/core/error.h"
#include "aviary/ops/impl.h"
#include "cpu_loops.h"

namespace aviary::ops {
namespace {

class CrossEntropyCpuFunction : public torch::autograd::Function<CrossEntropyCpuFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& logits,
                               const torch::Tensor& targets, int64_t ignore_index,
                               LossReduction reduction) {
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    auto x = logits.stride(1) == 1 && (rows <= 1 || logits.stride(0) >= vocab)
                 ? logits
                 : logits.contiguous();
    auto t = targets.to(torch::kInt64).contiguous();
    auto loss = torch::empty({rows}, logits.options());
    auto lse = torch::empty({rows}, logits.options());
    const int64_t stride = rows > 1 ? x.stride(0) : vocab;
    const int64_t* tp = t.data_ptr<int64_t>();
    const int64_t bad =
        cpu::cross_entropy_forward(rows, vocab, x.data_ptr<float>(), stride, tp, ignore_index,
                                   loss.data_ptr<float>(), lse.data_ptr<float>());
    if (bad >= 0) {
      throw_invalid("target " + std::to_string(tp[bad]) + " of row " + std::to_string(bad) +
                        " is outside the vocabulary [0, " + std::to_string(vocab) + ")",
                    "cross_entropy",
                    "the data was tokenized with a larger vocabulary than the model's: check "
                    "the tokenizer and model.vocab_size");
    }
    int64_t counted = 0;
    for (int64_t r = 0; r < rows; ++r)
      counted += tp[r] != ignore_index ? 1 : 0;
    // Summed in double, in row order: the same result whatever the thread count.
    double total = 0.0;
    const float* lp = loss.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      total += lp[r];
    double value = total;
    double scale = 1.0;
    if (reduction == LossReduction::kMean) {
      value = counted > 0 ? total / static_cast<double>(counted)
                          : std::numeric_limits<double>::quiet_NaN();
      scale = counted > 0 ? 1.0 / static_cast<double>(counted) : 0.0;
    }
    ctx->save_for_backward({x, t, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["scale"] = scale;
    return torch::full({}, value, logits.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const int64_t rows = x.size(0), vocab = x.size(1);
    const float scale = static_cast<float>(ctx->saved_data["scale"].toDouble() *
                                           grads[0].to(torch::kFloat64).item<double>());
    auto grad = torch::empty({rows, vocab}, x.options());
    cpu::cross_entropy_backward(rows, vocab, x.data_ptr<float>(), rows > 1 ? x.stride(0) : vocab,
                                saved[1].data_ptr<int64_t>(),
                                ctx->saved_data["ignore_index"].toInt(), saved[2].data_ptr<float>(),
                                scale, grad.data_ptr<float>(), vocab);
    return {grad, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor cross_entropy_reference(const torch::Tensor& logits, const torch::Tensor& targets,
                                      int64_t ignore_index, LossReduction reduction) {
  namespace F = torch::nn::functional;
  auto options = F::CrossEntropyFuncOptions().ignore_index(ignore_index);
  if (reduction == LossReduction::kSum) options.reduction(torch::kSum);
  return F::cross_entropy(logits, targets, options);
}

torch::Tensor cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                            int64_t ignore_index, LossReduction reduction) {
  if (use_cpu_loops(logits) && logits.dim() == 2 && logits.size(1) > 0 && targets.dim() == 1 &&
      targets.size(0) == logits.size(0) && targets.device().is_cpu() &&
      !c10::isFloatingType(targets.scalar_type())) {
    return CrossEntropyCpuFunction::apply(logits, targets, ignore_index, reduction);
  }
  return cross_entropy_reference(logits, targets, ignore_index, reduction);
}

}  // namespace aviary::ops
