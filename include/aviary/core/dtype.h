// Names for dtypes and devices as they appear in configs and on the command line.
#pragma once

#include <string>

#include <torch/types.h>

namespace aviary {

// "fp32"/"float32"/"float", "bf16"/"bfloat16", "fp16"/"float16"/"half". Throws with the list.
torch::ScalarType parse_dtype(const std::string& name, const std::string& context = "dtype");
// "float32", "bfloat16", "float16", ... (the HF `torch_dtype` spelling).
std::string dtype_name(torch::ScalarType dtype);
// "cpu", "cuda", "cuda:N", or "auto" (cuda:0 when available, else cpu). Throws if CUDA is asked
// for but unavailable.
torch::Device parse_device(const std::string& name, const std::string& context = "device");
size_t dtype_size(torch::ScalarType dtype);

}  // namespace aviary
