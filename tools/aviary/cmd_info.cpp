#include <cstdio>
#include <thread>

#include <torch/cuda.h>
#include <torch/torch.h>
#include <torch/version.h>

#include "aviary/build_info.h"
#include "commands.h"

namespace aviary::cli {

void register_info(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("info", "Print the version, build options, LibTorch, devices and threads");
  cmd->callback([] {
    std::printf("aviary          %s (%s, %s)\n", AVIARY_VERSION, AVIARY_BUILD_TYPE,
                AVIARY_CXX_COMPILER);
    std::printf("libtorch        %s (built against %s)\n", TORCH_VERSION,
                AVIARY_TORCH_VERSION_BUILT);
    std::printf("cuda kernels    %s%s%s\n", AVIARY_CUDA_BUILT ? "built for sm_" : "not built",
                AVIARY_CUDA_ARCHS, "");
#ifdef AVIARY_TORCH_CUDA
    const bool torch_cuda = true;
#else
    const bool torch_cuda = false;
#endif
    std::printf("cuda tensors    %s\n",
                torch_cuda ? "linked" : "not linked (CPU-only LibTorch use)");
    const bool available = torch::cuda::is_available();
    std::printf("cuda available  %s\n", available ? "yes" : "no");
    if (available) {
      for (int i = 0; i < static_cast<int>(torch::cuda::device_count()); ++i) {
        std::printf("  device cuda:%d\n", i);
      }
    }
    std::printf("cpu threads     %d intra-op (hardware: %u)\n", torch::get_num_threads(),
                std::thread::hardware_concurrency());
  });
}

}  // namespace aviary::cli
