// Which implementation an op runs: Aviary's CUDA kernels (kernels/) or PyTorch's own ops.
//
//   ops:
//     impl: auto     # auto | aviary | torch
//
//   torch   PyTorch's ops everywhere (SDPA, ATen's rms_norm, ...).
//   aviary  on CUDA, Aviary's kernel wherever one exists for the op and dtype; an error if the
//           op has a kernel family but this build lacks it for the device (built without nvcc,
//           or for other architectures).
//   auto    (default) Aviary's kernel only if kernels/validated.json, embedded at build time,
//           records it as having passed tools/gpu_check.sh on this GPU's architecture;
//           PyTorch's op otherwise.
//
// On CPU, fp32 tensors take Aviary's fused CPU loops (SwiGLU, rotary embedding, cross-entropy,
// the embedding's gradient: one pass where ATen's composition makes several; attention without a
// mask) unless the setting is torch, and so do bf16 SwiGLU, rotary embedding and attention, and
// under bf16 autocast the linears and the loss head (ops/linear.h, ops/cross_entropy.h); other
// dtypes take the ATen reference, which is also the oracle both the loops and the CUDA kernels are
// tested against (docs/kernels.md).
//
// The setting is process-wide (set_ops_impl): the trainer applies the config's `ops` section, and
// the CLI's --ops-impl flag does the same for generate, chat, eval and bench.
#pragma once

#include <string>
#include <vector>

#include <torch/types.h>

#include "aviary/core/config.h"

namespace aviary::ops {

enum class OpsImpl { kAuto, kAviary, kTorch };

const char* ops_impl_name(OpsImpl impl);  // "auto" | "aviary" | "torch"
const std::vector<std::string>& ops_impl_choices();
// Throws kInvalidArgument naming `where` and the allowed values.
OpsImpl parse_ops_impl(const std::string& value, const std::string& where);

void set_ops_impl(OpsImpl impl);
OpsImpl ops_impl();

// The `ops` config section.
struct OpsConfig {
  OpsImpl impl = OpsImpl::kAuto;  // auto | aviary | torch (see above)

  static OpsConfig from_section(ConfigReader& section);  // finish() included
  Json to_json() const;
};

// The ops that have (or will have) a kernel family. Names are the record's and bench's.
enum class Op {
  kRmsNorm,
  kAttention,
  kSwiGlu,
  kCrossEntropy,
  kRope,
  kAttentionDecode,
  kLayerNorm,
  kAdamW,  // the last (src/ops/impl.cpp counts the ops by it)
};

// "rms_norm", "attention", "swiglu", "cross_entropy", "rope", "attention_decode" (ops::attention's
// decode steps: its own kernel family, validated on its own), "layer_norm", "adamw" (the
// optimizer step, ops/adamw.h).
const char* op_name(Op op);

// One kernel family that ops/ dispatches to.
struct KernelInfo {
  Op op;
  const char* kernel;     // name in kernels/validated.json, e.g. "rmsnorm"
  const char* gpu_tests;  // gtest filter over aviary_gpu_tests (label gpu) that proves it
  const char* op_tests;   // gtest filter over aviary_unit_tests: the op on CUDA vs its reference
};

const std::vector<KernelInfo>& kernel_registry();
const KernelInfo* find_kernel(Op op);  // nullptr: no kernel family for the op yet

// One validation of a kernel on real hardware, as tools/gpu_check.sh records it.
struct KernelValidation {
  std::string kernel;  // registry name
  std::string gpu;     // device name, e.g. "NVIDIA H200"
  int sm = 0;          // compute capability major * 10 + minor, e.g. 90
  std::string date;    // YYYY-MM-DD
  std::string commit;  // git commit the check ran on
  std::string test;    // the tests that passed (gtest filters)
};

// kernels/validated.json:
//   {"about": "...", "kernels": {"rmsnorm": [{"gpu": ..., "sm": 90, "date": ...,
//    "commit": ..., "test": ...}, ...], ...}}
class ValidationRecord {
 public:
  // Throws kCorruption naming `source` and the key path on a malformed record.
  static ValidationRecord parse(const std::string& text, const std::string& source);
  // The record embedded into libaviary at build time.
  static const ValidationRecord& embedded();

  bool validated(const std::string& kernel, int sm) const;
  const std::vector<KernelValidation>& entries() const { return entries_; }

 private:
  std::vector<KernelValidation> entries_;
};

// The decision for one op on one device, and why.
struct KernelChoice {
  bool use_kernel = false;
  std::string reason;  // "torch: ops.impl is torch", "aviary: validated on sm_90", ...
};

// What the decision needs to know about the build and the device.
struct KernelTarget {
  bool cuda = false;             // the tensors are on a CUDA device
  int sm = 0;                    // its compute capability, major * 10 + minor (90 = H100/H200)
  bool kernels_built = false;    // libaviary has kernels/ compiled in (nvcc + LibTorch CUDA)
  std::vector<int> built_archs;  // CMAKE_CUDA_ARCHITECTURES compiled in
};

// The pure decision (testable without a GPU). A kernel runs on sm >= the lowest built
// architecture (its own cubin, or the PTX the driver compiles for newer ones). Throws
// kUnsupported for `aviary` when the op has a kernel family that cannot run on the target.
KernelChoice choose_kernel(OpsImpl impl, Op op, const KernelTarget& target,
                           const ValidationRecord& record);

// True when `t` is an fp32 CPU tensor and ops.impl is not torch: the op runs Aviary's fused CPU
// loop (src/ops/cpu_loops.h) rather than its ATen reference.
bool use_cpu_loops(const torch::Tensor& t);
// The same for the loops that also take bf16 (SwiGLU, the rotary embedding): fp32 or bf16.
bool use_cpu_loops_fp32_or_bf16(const torch::Tensor& t);

// The process's decision for `op` on `device` (CPU: never a kernel). use_kernel is what the ops
// ask on every call: its answer is remembered per ops.impl setting, op and device.
KernelChoice kernel_choice(Op op, const torch::Device& device);
bool use_kernel(Op op, const torch::Device& device);

// How many kernel launches ops/ has made for `op`'s family in this process (a forward and a
// backward count one each; AdamW one per step count): what tests and tools check to know which
// path ran. count_kernel_call is ops/'s side.
int64_t kernel_calls(Op op);
void count_kernel_call(Op op);

// Whether this libaviary has kernels/ compiled in, and for which architectures (empty without).
bool kernels_built();
std::vector<int> built_cuda_archs();
// Compute capability of a CUDA device as major * 10 + minor, and its name (0 and "" without CUDA
// tensors or for a CPU device).
int device_sm(const torch::Device& device);
std::string device_name(const torch::Device& device);

}  // namespace aviary::ops
