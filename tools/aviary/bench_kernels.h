// aviary bench kernels: each op of ops/ against its PyTorch equivalent (CUDA) or the unfused ATen
// sequence (--cpu), beside the GEMM and copy ceilings measured in the same run.
#pragma once

#include <CLI/CLI.hpp>

namespace aviary::cli {

void register_bench_kernels(CLI::App* bench);

}  // namespace aviary::cli
