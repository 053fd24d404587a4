// One AdamW step over many parameter tensors at once: the update of torch.optim.AdamW with fp32
// parameters (the master weights) and fp32 moments. CUDA takes Aviary's multi-tensor kernel
// (kernels/adamw.cu: one pass over parameter, gradient and both moments, in the operation order of
// torch's single-tensor AdamW with every rounding pinned, so that it equals its CPU reference bit
// for bit) where ops.impl allows it; everything else PyTorch's
// at::_fused_adamw_, the kernel of torch.optim.AdamW(fused=True).
//
// train/optimizer.h's AdamW calls this for each param group when `optim.fused` is true.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

namespace aviary::ops {

struct AdamWHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled: p *= 1 - lr * weight_decay
};

// The tensors of one param group, index for index. steps[i] is tensor i's step count after this
// step's increment (>= 1). The kernel needs everything on one CUDA device, parameters and moments
// fp32 and contiguous, gradients contiguous and of one dtype (fp32, bf16 or fp16); anything else
// takes at::_fused_adamw_.
struct AdamWTensors {
  std::vector<torch::Tensor> params;       // updated in place
  std::vector<torch::Tensor> grads;        // same shapes as params
  std::vector<torch::Tensor> exp_avgs;     // updated in place
  std::vector<torch::Tensor> exp_avg_sqs;  // updated in place
  std::vector<int64_t> steps;
};

// Throws kInvalidArgument when the lists differ in length or a step is < 1.
void adamw_step(const AdamWTensors& tensors, const AdamWHyper& hyper);

}  // namespace aviary::ops
