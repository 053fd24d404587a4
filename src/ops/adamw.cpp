#include "aviary/ops/adamw.h"

#include <map>
#include <string>

#include <ATen/ops/_fused_adamw.h>

#include "aviary/core/error.h"
#include "aviary/ops/impl.h"
#include "kernel_dispatch.h"

#if AVIARY_OPS_KERNELS
#include <c10/cuda/CUDAGuard.h>

#include "aviary/kernels/adamw.h"
#endif

namespace aviary::ops {
namespace {

// torch/optim/adam.py _fused_adam: the step counts travel as fp32 scalars on the parameters'
// device (exact for counts below 2^24). ATen's kernel reads every list in the parameters' dtype,
// so gradients of another dtype are widened first.
void fused_adamw_aten(const AdamWTensors& t, const AdamWHyper& h) {
  std::vector<torch::Tensor> steps, grads;
  steps.reserve(t.steps.size());
  grads.reserve(t.grads.size());
  for (size_t i = 0; i < t.steps.size(); ++i) {
    const auto& p = t.params[i];
    steps.push_back(torch::full({}, static_cast<float>(t.steps[i]),
                                torch::dtype(torch::kFloat32).device(p.device())));
    grads.push_back(t.grads[i].scalar_type() == p.scalar_type() ? t.grads[i]
                                                                : t.grads[i].to(p.scalar_type()));
  }
  at::_fused_adamw_(t.params, grads, t.exp_avgs, t.exp_avg_sqs, {}, steps, h.lr, h.beta1, h.beta2,
                    h.weight_decay, h.eps, /*amsgrad=*/false, /*maximize=*/false);
}

#if AVIARY_OPS_KERNELS

bool kernel_supports(const AdamWTensors& t) {
  if (!t.grads[0].defined()) return false;
  const torch::Device device = t.params[0].device();
  const auto grad_dtype = t.grads[0].scalar_type();
  kernels::DType dtype;
  if (!device.is_cuda() || !kernel_dtype(grad_dtype, &dtype)) return false;
  const auto fp32_here = [&](const torch::Tensor& x) {
    return x.device() == device && x.scalar_type() == torch::kFloat32 && x.is_contiguous();
  };
  for (size_t i = 0; i < t.params.size(); ++i) {
    const int64_t n = t.params[i].numel();
    if (!t.grads[i].defined() || !fp32_here(t.params[i]) || !fp32_here(t.exp_avgs[i]) ||
        !fp32_here(t.exp_avg_sqs[i]) || t.exp_avgs[i].numel() != n ||
        t.exp_avg_sqs[i].numel() != n || t.grads[i].device() != device ||
        t.grads[i].scalar_type() != grad_dtype || !t.grads[i].is_contiguous() ||
        t.grads[i].numel() != n) {
      return false;
    }
  }
  return true;
}

// One launcher call per distinct step count (one, unless a parameter missed earlier steps).
void adamw_kernel(const AdamWTensors& t, const AdamWHyper& h) {
  const torch::Device device = t.params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(t.params[0]);
  std::map<int64_t, std::vector<size_t>> by_step;
  for (size_t i = 0; i < t.steps.size(); ++i)
    by_step[t.steps[i]].push_back(i);
  for (const auto& [step, members] : by_step) {
    std::vector<float*> params, exp_avgs, exp_avg_sqs;
    std::vector<const void*> grads;
    std::vector<int64_t> numels;
    for (size_t i : members) {
      params.push_back(t.params[i].data_ptr<float>());
      grads.push_back(t.grads[i].data_ptr());
      exp_avgs.push_back(t.exp_avgs[i].data_ptr<float>());
      exp_avg_sqs.push_back(t.exp_avg_sqs[i].data_ptr<float>());
      numels.push_back(t.params[i].numel());
    }
    kernels::AdamWParams p;
    p.num_tensors = static_cast<int64_t>(members.size());
    p.params = params.data();
    p.grads = grads.data();
    p.exp_avgs = exp_avgs.data();
    p.exp_avg_sqs = exp_avg_sqs.data();
    p.numels = numels.data();
    kernel_dtype(t.grads[0].scalar_type(), &p.grad_dtype);
    p.lr = h.lr;
    p.beta1 = h.beta1;
    p.beta2 = h.beta2;
    p.eps = h.eps;
    p.weight_decay = h.weight_decay;
    p.step = step;
    const cudaError_t err = kernels::adamw_step(p, stream);
    check_kernel(err, "kernels::adamw_step", "ops.adamw", Op::kAdamW);
  }
  // Written through raw pointers: tell autograd's version counters, as ATen's in-place ops do.
  for (size_t i = 0; i < t.params.size(); ++i) {
    for (const auto* x : {&t.params[i], &t.exp_avgs[i], &t.exp_avg_sqs[i]})
      x->unsafeGetTensorImpl()->bump_version();
  }
}

#endif  // AVIARY_OPS_KERNELS

}  // namespace

void adamw_step(const AdamWTensors& t, const AdamWHyper& h) {
  const size_t n = t.params.size();
  if (t.grads.size() != n || t.exp_avgs.size() != n || t.exp_avg_sqs.size() != n ||
      t.steps.size() != n) {
    throw_invalid("AdamW: " + std::to_string(n) + " parameters but " +
                      std::to_string(t.grads.size()) + " gradients, " +
                      std::to_string(t.exp_avgs.size()) + " + " +
                      std::to_string(t.exp_avg_sqs.size()) + " moments and " +
                      std::to_string(t.steps.size()) + " step counts",
                  "ops.adamw", "pass one of each per parameter");
  }
  for (int64_t s : t.steps) {
    if (s < 1) {
      throw_invalid("AdamW: step count " + std::to_string(s) + " (expected >= 1, after increment)",
                    "ops.adamw");
    }
  }
  if (n == 0) return;
#if AVIARY_OPS_KERNELS
  if (kernel_supports(t) && use_kernel(Op::kAdamW, t.params[0].device())) {
    adamw_kernel(t, h);
    return;
  }
#endif
  fused_adamw_aten(t, h);
}

}  // namespace aviary::ops
