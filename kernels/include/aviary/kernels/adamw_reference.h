// CPU reference of the multi-tensor AdamW step, element by element in fp32 with the scalars and
// the operation order of torch's _single_tensor_adamw (AdamWParams in params.h): the oracle of
// the GPU tests. Header-only, CUDA-free. adamw_scalars() is shared with the launcher, so kernel and
// reference see the very same fp32 scalars.
#pragma once

#include <cmath>
#include <cstdint>

#include "aviary/kernels/dtype.h"
#include "aviary/kernels/params.h"

namespace aviary::kernels {

// The per-step scalars, computed in double as Python does and rounded to fp32 as ATen passes
// them to its kernels.
struct AdamWScalars {
  bool decay = false;         // weight_decay != 0
  float decay_factor = 1.0f;  // 1 - lr * wd
  float lerp_weight = 0.1f;   // 1 - beta1
  float beta2 = 0.999f;
  float one_minus_beta2 = 0.001f;
  float bias_correction2_sqrt = 1.0f;  // sqrt(1 - beta2^step)
  float eps = 1e-8f;
  float neg_step_size = -1e-3f;  // -lr / (1 - beta1^step)
};

inline AdamWScalars adamw_scalars(const AdamWParams& p) {
  AdamWScalars s;
  const double step = static_cast<double>(p.step);
  s.decay = p.weight_decay != 0.0;
  s.decay_factor = static_cast<float>(1.0 - p.lr * p.weight_decay);
  s.lerp_weight = static_cast<float>(1.0 - p.beta1);
  s.beta2 = static_cast<float>(p.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - p.beta2);
  s.bias_correction2_sqrt = static_cast<float>(std::pow(1.0 - std::pow(p.beta2, step), 0.5));
  s.eps = static_cast<float>(p.eps);
  s.neg_step_size = static_cast<float>(-(p.lr / (1.0 - std::pow(p.beta1, step))));
  return s;
}

// One element: updates *param, *m, *v in place from the gradient g (already widened to fp32).
inline void adamw_element(const AdamWScalars& s, float g, float* param, float* m, float* v) {
  float p = *param;
  if (s.decay) p = p * s.decay_factor;
  const float w = s.lerp_weight;
  *m = std::fabs(w) < 0.5f ? std::fma(w, g - *m, *m) : g - (g - *m) * (1.0f - w);  // ATen lerp
  *v = *v * s.beta2;
  *v = *v + s.one_minus_beta2 * g * g;
  const float denom = std::sqrt(*v) / s.bias_correction2_sqrt + s.eps;
  *param = p + s.neg_step_size * (*m / denom);
}

// Host pointers in the arrays; f16/bf16 buffers hold uint16_t bits.
inline void adamw_reference(const AdamWParams& p) {
  const AdamWScalars s = adamw_scalars(p);
  for (int64_t t = 0; t < p.num_tensors; ++t) {
    void* out = p.model_params != nullptr ? p.model_params[t] : nullptr;
    for (int64_t i = 0; i < p.numels[t]; ++i) {
      adamw_element(s, load_as_float(p.grad_dtype, p.grads[t], i), &p.params[t][i],
                    &p.exp_avgs[t][i], &p.exp_avg_sqs[t][i]);
      if (out != nullptr) store_from_float(p.model_dtype, out, i, p.params[t][i]);
    }
  }
}

}  // namespace aviary::kernels
