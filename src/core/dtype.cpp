#include "aviary/core/dtype.h"

#include <torch/cuda.h>

#include "aviary/core/error.h"

namespace aviary {

torch::ScalarType parse_dtype(const std::string& name, const std::string& context) {
  if (name == "fp32" || name == "float32" || name == "float") return torch::kFloat32;
  if (name == "bf16" || name == "bfloat16") return torch::kBFloat16;
  if (name == "fp16" || name == "float16" || name == "half") return torch::kFloat16;
  throw_invalid("unknown dtype '" + name + "'", context, "use one of fp32, bf16, fp16");
}

std::string dtype_name(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32:
      return "float32";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kFloat16:
      return "float16";
    case torch::kFloat64:
      return "float64";
    default:
      return c10::toString(dtype);
  }
}

torch::Device parse_device(const std::string& name, const std::string& context) {
  if (name == "auto") return torch::cuda::is_available() ? torch::Device("cuda:0") : torch::kCPU;
  if (name == "cpu") return torch::kCPU;
  if (name.rfind("cuda", 0) == 0) {
    if (!torch::cuda::is_available()) {
      throw_invalid("device '" + name + "' requested but CUDA is not available", context,
                    "run `aviary info` to see what this build supports, or use --device cpu");
    }
    try {
      torch::Device d(name);
      if (d.index() >= static_cast<int>(torch::cuda::device_count())) {
        throw_invalid("device '" + name + "' does not exist (" +
                          std::to_string(torch::cuda::device_count()) + " visible)",
                      context);
      }
      return d;
    } catch (const c10::Error&) {
      throw_invalid("cannot parse device '" + name + "'", context, "use cpu, cuda or cuda:N");
    }
  }
  throw_invalid("unknown device '" + name + "'", context, "use cpu, cuda, cuda:N or auto");
}

size_t dtype_size(torch::ScalarType dtype) {
  return c10::elementSize(dtype);
}

}  // namespace aviary
