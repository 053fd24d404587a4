#include "aviary/ops/impl.h"

#include <algorithm>
#include <atomic>
#include <sstream>

#include "aviary/build_info.h"
#include "aviary/core/error.h"
#include "aviary/ops/validated_kernels.h"
#include "kernel_dispatch.h"

#ifdef AVIARY_TORCH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace aviary::ops {
namespace {

std::atomic<OpsImpl> g_impl{OpsImpl::kAuto};

std::string sm_name(int sm) {
  return "sm_" + std::to_string(sm);
}

std::string join_archs(const std::vector<int>& archs) {
  std::string out;
  for (int a : archs)
    out += (out.empty() ? "" : ",") + std::to_string(a);
  return out;
}

}  // namespace

const char* ops_impl_name(OpsImpl impl) {
  switch (impl) {
    case OpsImpl::kAuto:
      return "auto";
    case OpsImpl::kAviary:
      return "aviary";
    case OpsImpl::kTorch:
      return "torch";
  }
  return "auto";
}

const std::vector<std::string>& ops_impl_choices() {
  static const std::vector<std::string> choices = {"auto", "aviary", "torch"};
  return choices;
}

OpsImpl parse_ops_impl(const std::string& value, const std::string& where) {
  if (value == "auto") return OpsImpl::kAuto;
  if (value == "aviary") return OpsImpl::kAviary;
  if (value == "torch") return OpsImpl::kTorch;
  throw_invalid("'" + value + "' is not one of: auto, aviary, torch", where,
                "auto uses Aviary's kernels where validated on this GPU, aviary forces them, "
                "torch uses PyTorch's ops");
}

void set_ops_impl(OpsImpl impl) {
  g_impl.store(impl);
}

OpsImpl ops_impl() {
  return g_impl.load();
}

OpsConfig OpsConfig::from_section(ConfigReader& section) {
  OpsConfig c;
  c.impl = parse_ops_impl(section.get_choice("impl", ops_impl_choices(), std::string("auto")),
                          section.path_of("impl"));
  section.finish();
  return c;
}

Json OpsConfig::to_json() const {
  return {{"impl", ops_impl_name(impl)}};
}

const char* op_name(Op op) {
  switch (op) {
    case Op::kRmsNorm:
      return "rms_norm";
    case Op::kAttention:
      return "attention";
    case Op::kSwiGlu:
      return "swiglu";
    case Op::kCrossEntropy:
      return "cross_entropy";
    case Op::kRope:
      return "rope";
    case Op::kAttentionDecode:
      return "attention_decode";
    case Op::kLayerNorm:
      return "layer_norm";
    case Op::kAdamW:
      return "adamw";
  }
  return "unknown";
}

// One row per kernel family ops/ dispatches to. Adding a kernel: a row here, the dispatch in its
// op (src/ops/<op>.cpp), and a bench row (tools/aviary/cmd_bench.cpp). tools/gpu_check.sh reads
// this table (`aviary bench kernels --list --json`) to decide what passed.
const std::vector<KernelInfo>& kernel_registry() {
  static const std::vector<KernelInfo> registry = {
      // Forward and backward (the fused residual add is not used by ops/).
      {Op::kRmsNorm, "rmsnorm", "*RmsNorm*Kernel*-*Residual*", "OpsRmsNormCuda.*"},
      {Op::kLayerNorm, "layernorm", "*LayerNormKernel*", "OpsLayerNormCuda.*"},
      {Op::kSwiGlu, "swiglu", "*SwiGlu*Kernel*", "OpsSwiGluCuda.*"},
      // The optimizer step over every parameter tensor at once (fp32 master weights and moments).
      {Op::kAdamW, "adamw", "*AdamWKernel*", "OpsAdamWCuda.*"},
      // Forward and backward, in place on a chunk of logits inside the fused loss head.
      {Op::kCrossEntropy, "cross_entropy", "*CrossEntropyKernel*", "OpsCrossEntropyCuda.*"},
      // In place on a copy, forward and backward (the inverse rotation): both pairings, 1-D and
      // EVA-02 2-D, partial rotary.
      {Op::kRope, "rope", "*RopeKernel*", "OpsRopeCuda.*"},
      // ops::attention's decode steps (<= 64 queries over a KV cache, no gradient): split-KV.
      {Op::kAttentionDecode, "attention_decode", "*AttentionDecodeKernelTest*",
       "OpsAttentionDecodeCuda.*"},
      // Forward and backward together: training needs both, and the op takes both or neither.
      // Last: its sanitizer runs are the longest.
      {Op::kAttention, "attention", "*AttentionForwardKernelTest*:*AttentionBackwardKernelTest*",
       "OpsAttentionCuda.*"},
  };
  return registry;
}

const KernelInfo* find_kernel(Op op) {
  for (const auto& k : kernel_registry()) {
    if (k.op == op) return &k;
  }
  return nullptr;
}

ValidationRecord ValidationRecord::parse(const std::string& text, const std::string& source) {
  Json root;
  try {
    root = Json::parse(text);
  } catch (const Json::parse_error& e) {
    throw_corruption(std::string("not valid JSON: ") + e.what(), source,
                     "restore it from git, or from the validated.json tools/gpu_check.sh wrote");
  }
  if (!root.is_object()) {
    throw_corruption("expected a JSON object with a 'kernels' mapping", source);
  }
  ValidationRecord out;
  try {
    ConfigReader top(root, "", source);
    top.get_string("about", std::string());
    Json kernels = top.get_raw("kernels");
    if (kernels.is_null()) top.fail("kernels", "required key is missing", "add \"kernels\": {}");
    if (!kernels.is_object()) {
      top.fail("kernels", "expected a mapping from kernel name to a list of validations");
    }
    top.finish();
    for (const auto& [name, list] : kernels.items()) {
      const std::string path = "kernels." + name;
      if (!list.is_array()) {
        throw_invalid(
            "expected a list of validations", std::string(source).append(": ").append(path),
            "[{\"gpu\": ..., \"sm\": 90, \"date\": ..., \"commit\": ..., \"test\": ...}]");
      }
      for (size_t i = 0; i < list.size(); ++i) {
        const std::string item = path + "[" + std::to_string(i) + "]";
        if (!list[i].is_object()) {
          throw_invalid(
              "expected an object", std::string(source).append(": ").append(item),
              "{\"gpu\": ..., \"sm\": 90, \"date\": ..., \"commit\": ..., \"test\": ...}");
        }
        ConfigReader r(list[i], item, source);
        KernelValidation v;
        v.kernel = name;
        v.gpu = r.get_string("gpu");
        v.sm = static_cast<int>(r.get_int("sm", std::nullopt, 10, 1000));
        v.date = r.get_string("date");
        v.commit = r.get_string("commit");
        v.test = r.get_string("test");
        r.finish();
        out.entries_.push_back(std::move(v));
      }
    }
  } catch (const Error& e) {
    throw Error(ErrorKind::kCorruption, e.message(), e.context(), e.hint());
  }
  return out;
}

const ValidationRecord& ValidationRecord::embedded() {
  static const ValidationRecord record =
      parse(detail::kValidatedKernelsJson, detail::kValidatedKernelsSource);
  return record;
}

bool ValidationRecord::validated(const std::string& kernel, int sm) const {
  return std::any_of(entries_.begin(), entries_.end(),
                     [&](const KernelValidation& v) { return v.kernel == kernel && v.sm == sm; });
}

bool kernels_built() {
  return AVIARY_OPS_KERNELS != 0;
}

std::vector<int> built_cuda_archs() {
  std::vector<int> archs;
  std::stringstream list(AVIARY_CUDA_ARCHS);
  std::string item;
  while (std::getline(list, item, ',')) {
    // CMake spellings: 90, 90-real, 90-virtual, 90a.
    int value = 0;
    for (char ch : item) {
      if (ch < '0' || ch > '9') break;
      value = value * 10 + (ch - '0');
    }
    if (value > 0) archs.push_back(value);
  }
  return archs;
}

int device_sm(const torch::Device& device) {
#ifdef AVIARY_TORCH_CUDA
  if (!device.is_cuda()) return 0;
  const auto* props = at::cuda::getDeviceProperties(
      device.has_index() ? device.index() : at::cuda::current_device());
  return props->major * 10 + props->minor;
#else
  (void)device;
  return 0;
#endif
}

std::string device_name(const torch::Device& device) {
#ifdef AVIARY_TORCH_CUDA
  if (!device.is_cuda()) return "";
  return at::cuda::getDeviceProperties(device.has_index() ? device.index()
                                                          : at::cuda::current_device())
      ->name;
#else
  (void)device;
  return "";
#endif
}

KernelChoice choose_kernel(OpsImpl impl, Op op, const KernelTarget& target,
                           const ValidationRecord& record) {
  const std::string name = op_name(op);
  const int sm = target.sm;
  const auto& built_archs = target.built_archs;
  if (!target.cuda) return {false, "cpu: the ATen reference"};
  if (impl == OpsImpl::kTorch) return {false, "torch: ops.impl is torch"};
  const KernelInfo* kernel = find_kernel(op);
  if (!kernel) return {false, "torch: no Aviary kernel for " + name + " yet"};
  // A cubin runs on its own architecture; the PTX CMake embeds for each listed architecture is
  // compiled by the driver for any newer one. So sm >= the lowest built architecture suffices.
  const bool runs_here = target.kernels_built && !built_archs.empty() &&
                         sm >= *std::min_element(built_archs.begin(), built_archs.end());
  if (!runs_here) {
    std::string why = !target.kernels_built
                          ? "this build has no CUDA kernels (no nvcc, or LibTorch "
                            "without CUDA)"
                          : "its kernels were built for CUDA architectures " +
                                join_archs(built_archs) + ", not " + sm_name(sm);
    if (impl == OpsImpl::kAviary) {
      throw_unsupported(
          "ops.impl aviary asks for the " + std::string(kernel->kernel) + " kernel, but " + why,
          "ops.impl",
          "use ops.impl auto or torch, or rebuild with nvcc and "
          "-DCMAKE_CUDA_ARCHITECTURES=" +
              std::to_string(sm));
    }
    return {false, "torch: " + why};
  }
  if (impl == OpsImpl::kAviary) return {true, "aviary: ops.impl is aviary"};
  if (record.validated(kernel->kernel, sm)) {
    return {true, "aviary: " + std::string(kernel->kernel) + " validated on " + sm_name(sm)};
  }
  return {false, "torch: " + std::string(kernel->kernel) + " not validated on " + sm_name(sm) +
                     " (kernels/validated.json)"};
}

KernelChoice kernel_choice(Op op, const torch::Device& device) {
  if (!device.is_cuda()) return {false, "cpu: the ATen reference"};
  static const std::vector<int> archs = built_cuda_archs();
  KernelTarget target;
  target.cuda = true;
  target.sm = device_sm(device);
  target.kernels_built = kernels_built();
  target.built_archs = archs;
  return choose_kernel(ops_impl(), op, target, ValidationRecord::embedded());
}

bool use_cpu_loops(const torch::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && ops_impl() != OpsImpl::kTorch;
}

bool use_cpu_loops_fp32_or_bf16(const torch::Tensor& t) {
  return use_cpu_loops(t) || (t.device().is_cpu() && t.scalar_type() == torch::kBFloat16 &&
                              ops_impl() != OpsImpl::kTorch);
}

namespace {

// use_kernel's answers, per (ops.impl, op, CUDA device index): 0 not yet decided, 1 no, 2 yes.
// The decision depends on nothing else for the life of the process (the record is embedded and
// the build fixed), and the ops ask it on every call. Throwing decisions are never stored.
constexpr int kOps = static_cast<int>(Op::kAdamW) + 1;
constexpr int kImpls = 3;
constexpr int kMemoDevices = 64;
std::atomic<int8_t> g_use_kernel_memo[kImpls][kOps][kMemoDevices];

int device_index(const torch::Device& device) {
#ifdef AVIARY_TORCH_CUDA
  return device.has_index() ? device.index() : at::cuda::current_device();
#else
  return device.has_index() ? device.index() : 0;
#endif
}

// kernel_calls' counts.
std::atomic<int64_t> g_kernel_calls[kOps];

}  // namespace

int64_t kernel_calls(Op op) {
  return g_kernel_calls[static_cast<int>(op)].load(std::memory_order_relaxed);
}

void count_kernel_call(Op op) {
  g_kernel_calls[static_cast<int>(op)].fetch_add(1, std::memory_order_relaxed);
}

bool use_kernel(Op op, const torch::Device& device) {
  if (!device.is_cuda()) return false;
  const int index = device_index(device);
  if (index < 0 || index >= kMemoDevices) return kernel_choice(op, device).use_kernel;
  auto& memo = g_use_kernel_memo[static_cast<int>(ops_impl())][static_cast<int>(op)][index];
  const int8_t known = memo.load(std::memory_order_relaxed);
  if (known != 0) return known == 2;
  const bool use = kernel_choice(op, device).use_kernel;
  memo.store(use ? 2 : 1, std::memory_order_relaxed);
  return use;
}

}  // namespace aviary::ops
