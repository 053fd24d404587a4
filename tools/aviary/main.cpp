// aviary: train, fine-tune and run Aquila / LLaMA models. See `aviary --help`.
#include <malloc.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>

#include <c10/util/Exception.h>
#include <CLI/CLI.hpp>

#include "aviary/build_info.h"
#include "aviary/core/error.h"
#include "aviary/core/logging.h"
#include "commands.h"

namespace {

// LibTorch's CPU thread pool is libgomp. With OMP_WAIT_POLICY unset, libgomp parks idle workers
// on futexes after a short spin; on small cloud VMs the wake-ups are so slow that 2 threads train
// up to 25x slower than 1 (measured on a 2-vCPU machine: tiny model 1.2k vs 31k tokens/s).
// "active" keeps workers spinning between parallel regions, as Intel's OpenMP does by default.
// libgomp reads the variable when it is loaded, before main(), so the process re-executes itself
// once with it set. Setting OMP_WAIT_POLICY (to anything) keeps the user's choice.
void ensure_omp_wait_policy(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  setenv("OMP_WAIT_POLICY", "active", 1);
  execv("/proc/self/exe", argv);
  // exec failed (no /proc?): carry on with libgomp's default.
}

// glibc's malloc gives every allocation above a threshold its own mmap, and hands the top of the
// heap back to the kernel once 128 KB of it is free; with its default dynamic threshold, a training
// step's activations and gradients (freed in backward or by zero_grad, allocated again in the next
// step) keep coming back as fresh pages the kernel must fault in and zero: 60-70k page faults per
// step of a 100M model. Serving allocations up to 1 GB from the heap and keeping up to 1 GB of its
// top free removes almost all of them (3k per step). Against the earlier 32 MB / 256 MB setting,
// on a 2-core Xeon, 100M model, 3 alternating runs: fp32 step 2.67-2.73 -> 2.54-2.60 s, bf16
// 1.23 -> 1.07-1.09 s, peak RSS +2-4%; the tiny model's (all tensors small) is unchanged. Tensors
// above 1 GB (a 7B model's logits) still come from mmap, so their reuse does not hold the peak. A
// GLIBC_TUNABLES or MALLOC_*_ setting from the user wins.
void tune_malloc_for_training() {
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if ((tunables != nullptr && std::strstr(tunables, "glibc.malloc.") != nullptr) ||
      std::getenv("MALLOC_TRIM_THRESHOLD_") != nullptr ||
      std::getenv("MALLOC_MMAP_THRESHOLD_") != nullptr) {
    return;
  }
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

}  // namespace

int main(int argc, char** argv) {
  ensure_omp_wait_policy(argv);
  tune_malloc_for_training();
  CLI::App app{"Aviary " AVIARY_VERSION
               ": train, fine-tune and run Aquila / LLaMA models.\n"
               "Run `aviary <command> --help` for the options of a command."};
  app.require_subcommand(1);
  app.set_version_flag("--version", AVIARY_VERSION);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error|off")
      ->capture_default_str();
  app.parse_complete_callback([&] { aviary::init_logging(log_level); });

  aviary::cli::register_train(app);
  aviary::cli::register_finetune(app);
  aviary::cli::register_eval(app);
  aviary::cli::register_export(app);
  aviary::cli::register_info(app);
  aviary::cli::register_generate(app);
  aviary::cli::register_chat(app);
  aviary::cli::register_tokenizer(app);
  aviary::cli::register_convert(app);
  aviary::cli::register_bench(app);
  aviary::cli::register_data(app);
  aviary::cli::register_launch(app);
  aviary::cli::register_plan(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const aviary::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: LibTorch: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
