// ops.impl (auto | aviary | torch): the config key, the validation record (kernels/validated.json)
// and the decision it drives, `aviary bench kernels`, and that on CPU every setting trains
// alike. The *Cuda* tests run the ops on a GPU and skip without one (tools/gpu_check.sh
// runs them on the device machine).
#include <cmath>
#include <filesystem>
#include <functional>
#include <set>
#include <sstream>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aviary/build_info.h"
#include "aviary/core/config.h"
#include "aviary/dist/comm.h"
#include "aviary/dist/data_parallel.h"
#include "aviary/kernels/adamw_reference.h"
#include "aviary/models/aquila.h"
#include "aviary/models/aquila_config.h"
#include "aviary/nn/document_mask.h"
#include "aviary/ops/adamw.h"
#include "aviary/ops/attention.h"
#include "aviary/ops/autocast.h"
#include "aviary/ops/cross_entropy.h"
#include "aviary/ops/impl.h"
#include "aviary/ops/layer_norm.h"
#include "aviary/ops/rms_norm.h"
#include "aviary/ops/rope.h"
#include "aviary/ops/swiglu.h"
#include "aviary/train/lm_loss.h"
#include "aviary/train/model_spec.h"
#include "aviary/train/optimizer.h"
#include "aviary/train/trainer.h"
#include "expect_error.h"
#include "ops/loss_head_chunks.h"
#include "test_util.h"

namespace aviary {
namespace {

namespace fs = std::filesystem;
using ops::KernelTarget;
using ops::Op;
using ops::OpsImpl;
using ops::ValidationRecord;
using test::expect_error;

// Restores the process-wide setting after a test changes it.
class ImplGuard {
 public:
  ImplGuard() : saved_(ops::ops_impl()) {}
  ~ImplGuard() { ops::set_ops_impl(saved_); }

 private:
  OpsImpl saved_;
};

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// ---------------------------------------------------------------- the config key

TEST(OpsConfig, ReadsEachValueAndDefaultsToAuto) {
  for (const auto& [value, impl] : std::vector<std::pair<std::string, OpsImpl>>{
           {"auto", OpsImpl::kAuto}, {"aviary", OpsImpl::kAviary}, {"torch", OpsImpl::kTorch}}) {
    Json node = {{"impl", value}};
    ConfigReader r(node, "ops", "run.yaml");
    auto c = ops::OpsConfig::from_section(r);
    EXPECT_EQ(c.impl, impl) << value;
    EXPECT_EQ(c.to_json()["impl"], value);
  }
  Json empty = Json::object();
  ConfigReader r(empty, "ops", "run.yaml");
  EXPECT_EQ(ops::OpsConfig::from_section(r).impl, OpsImpl::kAuto);
}

TEST(OpsConfig, UnknownValueNamesTheKeyAndTheChoices) {
  Json node = {{"impl", "cuda"}};
  ConfigReader r(node, "ops", "run.yaml");
  auto e = expect_error(ErrorKind::kInvalidArgument, [&] { ops::OpsConfig::from_section(r); });
  const std::string what = e.what();
  EXPECT_TRUE(contains(what, "run.yaml")) << what;
  EXPECT_TRUE(contains(what, "ops.impl")) << what;
  EXPECT_TRUE(contains(what, "'cuda'")) << what;
  EXPECT_TRUE(contains(what, "auto, aviary, torch")) << what;
}

TEST(OpsConfig, UnknownKeyIsRefused) {
  Json node = {{"implementation", "torch"}};
  ConfigReader r(node, "ops", "run.yaml");
  auto e = expect_error(ErrorKind::kInvalidArgument, [&] { ops::OpsConfig::from_section(r); });
  EXPECT_TRUE(contains(e.what(), "ops.implementation")) << e.what();
}

TEST(OpsConfig, ParseNamesWhere) {
  auto e =
      expect_error(ErrorKind::kInvalidArgument, [] { ops::parse_ops_impl("fast", "--ops-impl"); });
  EXPECT_TRUE(contains(e.what(), "--ops-impl")) << e.what();
  EXPECT_TRUE(contains(e.what(), "auto, aviary, torch")) << e.what();
}

// ---------------------------------------------------------------- the validation record

const char* kRecord = R"({
  "about": "test",
  "kernels": {
    "rmsnorm": [
      {"gpu": "NVIDIA H200", "sm": 90, "date": "2026-11-29", "commit": "0123abc",
       "test": "*RmsNormKernel*"},
      {"gpu": "NVIDIA A100-SXM4-80GB", "sm": 80, "date": "2026-11-30", "commit": "0123abd",
       "test": "*RmsNormKernel*"}
    ]
  }
})";

TEST(ValidationRecord, ParsesEntries) {
  auto record = ValidationRecord::parse(kRecord, "validated.json");
  ASSERT_EQ(record.entries().size(), 2u);
  EXPECT_EQ(record.entries()[0].kernel, "rmsnorm");
  EXPECT_EQ(record.entries()[0].gpu, "NVIDIA H200");
  EXPECT_EQ(record.entries()[0].sm, 90);
  EXPECT_EQ(record.entries()[1].date, "2026-11-30");
  EXPECT_TRUE(record.validated("rmsnorm", 90));
  EXPECT_TRUE(record.validated("rmsnorm", 80));
  EXPECT_FALSE(record.validated("rmsnorm", 89));
  EXPECT_FALSE(record.validated("attention_forward", 90));
}

TEST(ValidationRecord, MalformedRecordsNameFileAndKey) {
  struct Case {
    std::string text;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"{", {"validated.json", "not valid JSON"}},
      {"[]", {"validated.json", "kernels"}},
      {R"({"about": "x"})", {"validated.json", "kernels", "missing"}},
      {R"({"kernels": {"k": {}}})", {"kernels.k", "list"}},
      {R"({"kernels": {"k": [{"gpu": "g", "date": "d", "commit": "c", "test": "t"}]}})",
       {"kernels.k[0].sm", "missing"}},
      {R"({"kernels": {"k": [{"gpu": "g", "sm": "90", "date": "d", "commit": "c", "test": "t"}]}})",
       {"kernels.k[0].sm"}},
      {R"({"kernels": {"k": [{"gpu": "g", "sm": 90, "date": "d", "commit": "c", "test": "t",
           "passed": true}]}})",
       {"kernels.k[0].passed"}},
      {R"({"kernels": {}, "extra": 1})", {"extra"}},
  };
  for (const auto& c : cases) {
    auto e = expect_error(ErrorKind::kCorruption,
                          [&] { ValidationRecord::parse(c.text, "validated.json"); });
    for (const auto& n : c.needles)
      EXPECT_TRUE(contains(e.what(), n)) << n << " in " << e.what() << " for " << c.text;
  }
}

TEST(ValidationRecord, EmbeddedRecordParsesAndNamesOnlyKnownKernels) {
  const auto& record = ValidationRecord::embedded();
  // The same file, read from the source tree: the build embedded what is committed.
  auto from_file = ValidationRecord::parse(
      test::read_file(std::string(AVIARY_SOURCE_DIR) + "/kernels/validated.json"),
      "kernels/validated.json");
  ASSERT_EQ(record.entries().size(), from_file.entries().size());
  for (size_t i = 0; i < record.entries().size(); ++i) {
    const auto& v = record.entries()[i];
    EXPECT_EQ(v.kernel, from_file.entries()[i].kernel);
    EXPECT_EQ(v.sm, from_file.entries()[i].sm);
    bool known = false;
    for (const auto& k : ops::kernel_registry())
      known |= v.kernel == k.kernel;
    EXPECT_TRUE(known) << v.kernel << " is not in ops::kernel_registry()";
  }
}

// ---------------------------------------------------------------- the decision

KernelTarget h200(bool built = true) {
  KernelTarget t;
  t.cuda = true;
  t.sm = 90;
  t.kernels_built = built;
  t.built_archs = {80, 90};
  return t;
}

TEST(KernelChoice, CpuAndTorchNeverUseAKernel) {
  auto record = ValidationRecord::parse(kRecord, "validated.json");
  KernelTarget cpu;
  for (auto impl : {OpsImpl::kAuto, OpsImpl::kAviary, OpsImpl::kTorch})
    EXPECT_FALSE(ops::choose_kernel(impl, Op::kRmsNorm, cpu, record).use_kernel);
  auto choice = ops::choose_kernel(OpsImpl::kTorch, Op::kRmsNorm, h200(), record);
  EXPECT_FALSE(choice.use_kernel);
  EXPECT_TRUE(contains(choice.reason, "torch")) << choice.reason;
}

TEST(KernelChoice, AutoFollowsTheRecordPerArchitecture) {
  auto record = ValidationRecord::parse(kRecord, "validated.json");
  auto empty = ValidationRecord::parse(R"({"kernels": {}})", "empty.json");
  auto on_h200 = ops::choose_kernel(OpsImpl::kAuto, Op::kRmsNorm, h200(), record);
  EXPECT_TRUE(on_h200.use_kernel);
  EXPECT_TRUE(contains(on_h200.reason, "sm_90")) << on_h200.reason;
  auto not_recorded = ops::choose_kernel(OpsImpl::kAuto, Op::kRmsNorm, h200(), empty);
  EXPECT_FALSE(not_recorded.use_kernel);
  EXPECT_TRUE(contains(not_recorded.reason, "not validated")) << not_recorded.reason;
  KernelTarget ada = h200();
  ada.sm = 89;  // runs (PTX / sm_80 cubin), but nobody has checked it there
  EXPECT_FALSE(ops::choose_kernel(OpsImpl::kAuto, Op::kRmsNorm, ada, record).use_kernel);
  // Validated on sm_90, but this build has no kernels: PyTorch's op, no error.
  EXPECT_FALSE(ops::choose_kernel(OpsImpl::kAuto, Op::kRmsNorm, h200(false), record).use_kernel);
}

TEST(KernelChoice, AviaryForcesTheKernelOrSaysWhyNot) {
  auto empty = ValidationRecord::parse(R"({"kernels": {}})", "empty.json");
  EXPECT_TRUE(ops::choose_kernel(OpsImpl::kAviary, Op::kRmsNorm, h200(), empty).use_kernel);
  auto e = expect_error(ErrorKind::kUnsupported, [&] {
    ops::choose_kernel(OpsImpl::kAviary, Op::kRmsNorm, h200(false), empty);
  });
  EXPECT_TRUE(contains(e.what(), "ops.impl")) << e.what();
  EXPECT_TRUE(contains(e.what(), "rmsnorm")) << e.what();
  KernelTarget volta = h200();
  volta.sm = 70;  // older than every architecture built
  auto old = expect_error(ErrorKind::kUnsupported, [&] {
    ops::choose_kernel(OpsImpl::kAviary, Op::kRmsNorm, volta, empty);
  });
  EXPECT_TRUE(contains(old.what(), "sm_70")) << old.what();
  EXPECT_TRUE(contains(old.what(), "CMAKE_CUDA_ARCHITECTURES=70")) << old.what();
}

TEST(KernelChoice, RegistryNamesAreUniqueAndHaveTests) {
  std::set<std::string> names;
  for (const auto& k : ops::kernel_registry()) {
    EXPECT_TRUE(names.insert(k.kernel).second) << k.kernel;
    EXPECT_FALSE(std::string(k.gpu_tests).empty()) << k.kernel;
    EXPECT_FALSE(std::string(k.op_tests).empty()) << k.kernel;
    EXPECT_EQ(ops::find_kernel(k.op), &k);
  }
#if AVIARY_CUDA_BUILT && defined(AVIARY_TORCH_CUDA)
  EXPECT_TRUE(ops::kernels_built());
#else
  EXPECT_FALSE(ops::kernels_built());
#endif
}

// ---------------------------------------------------------------- bench kernels

TEST(BenchKernels, CpuPrintsATableAgainstTheUnfusedSequence) {
  auto r = test::run_cli("bench kernels --cpu --threads 1 --seconds 0.02 --dtypes fp32");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "ceilings measured in this run")) << r.output;
  EXPECT_TRUE(contains(r.output, "| op | pass | shape |")) << r.output;
  for (const char* op : {"| rms_norm |", "| layer_norm |", "| rope |", "| swiglu |",
                         "| cross_entropy |", "| attention |", "| adamw |"})
    EXPECT_TRUE(contains(r.output, op)) << op << " in " << r.output;
  EXPECT_TRUE(contains(r.output, "unfused ATen")) << r.output;
  // In fp32 every op runs Aviary's CPU path; the table says which.
  EXPECT_TRUE(contains(r.output, "aviary: fused CPU loop")) << r.output;
  EXPECT_TRUE(contains(r.output, "aviary: CPU attention")) << r.output;
}

TEST(BenchKernels, CpuJsonHasFiguresThatAgree) {
  auto r = test::run_cli(
      "--log-level warn bench kernels --cpu --json --threads 1 --seconds 0.02 --ops rms_norm "
      "attention adamw --dtypes fp32 bf16");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = Json::parse(r.output.substr(r.output.find('{')));
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_GT(j["ceilings"]["copy_gbs"].get<double>(), 0.0);
  // One GEMM ceiling on CPU, fp32: bf16 arithmetic runs through fp32 there.
  ASSERT_EQ(j["ceilings"]["gemm_tflops"].size(), 1u);
  EXPECT_GT(j["ceilings"]["gemm_tflops"]["fp32"].get<double>(), 0.0);
  // rms_norm x 2 shapes + attention fwd and fwd+bwd, causal and over packed documents, and a
  // decode step, per dtype; one AdamW step, in fp32 only (the optimizer's state).
  ASSERT_EQ(j["rows"].size(), 15u) << j.dump(1);
  int adamw_rows = 0;
  for (const auto& row : j["rows"]) {
    if (row["op"] == "adamw") {
      ++adamw_rows;
      EXPECT_EQ(row["dtype"], "fp32");
      EXPECT_EQ(row["pass"], "step");
    }
    EXPECT_NE(row["op"], "rope");
    EXPECT_GT(row["ms"].get<double>(), 0.0);
    EXPECT_GT(row["baseline_ms"].get<double>(), 0.0);
    EXPECT_NEAR(row["speedup"].get<double>(),
                row["baseline_ms"].get<double>() / row["ms"].get<double>(), 1e-9);
    // Same maths both ways: fp32 agrees to rounding, bf16 to a few bf16 ulps of O(1) values.
    const double tol = row["dtype"] == "fp32" ? 1e-3 : 0.25;
    EXPECT_LE(row["max_abs_diff"].get<double>(), tol) << row.dump();
  }
  EXPECT_EQ(adamw_rows, 1);
}

// bench train: each case's figures, with the GEMM-only anchor above the whole step's speed (the
// step runs those GEMMs and more) and absent for LoRA (its step has no weight-gradient GEMMs),
// and the step's time split into its phases.
TEST(BenchTrain, JsonRowsCarryAGemmCeilingAboveTheStep) {
  auto r = test::run_cli(
      "--log-level warn bench train --json --threads 1 --steps 2 --warmup 1 --cases tiny:fp32 "
      "tiny:fp32:lora --tiny-model " +
      test::fixture("tiny-llama"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto rows = Json::parse(r.output.substr(r.output.find('[')));
  ASSERT_EQ(rows.size(), 2u) << rows.dump(1);
  const auto& full = rows[0];
  EXPECT_EQ(full["case"], "tiny");
  EXPECT_EQ(full["seq_len"], 128);
  EXPECT_EQ(full["micro_batch"], 8);
  EXPECT_NEAR(full["tokens_per_s"].get<double>() * full["step_time_s"].get<double>(), 128.0 * 8,
              1e-6);
  EXPECT_GT(full["peak_rss_mb"].get<double>(), 0.0);
  EXPECT_GT(full["gemm_ceiling_tokens_per_s"].get<double>(), full["tokens_per_s"].get<double>());
  // The phases split the timed step: each took some time, and together no more than the step.
  double phases = 0;
  for (const char* phase : {"forward", "backward", "clip", "optimizer"}) {
    const double t = full["phase_s"][phase].get<double>();
    EXPECT_GT(t, 0.0) << phase;
    phases += t;
  }
  EXPECT_LE(phases, full["step_time_s"].get<double>() * (1 + 1e-9));
  EXPECT_EQ(rows[1]["case"], "tiny+lora");
  EXPECT_TRUE(rows[1]["gemm_ceiling_tokens_per_s"].is_null());
}

TEST(BenchKernels, UnknownOpNamesTheFlag) {
  auto r = test::run_cli("bench kernels --cpu --ops rmsnorm");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(contains(r.output, "--ops")) << r.output;
  EXPECT_TRUE(contains(r.output, "rms_norm")) << r.output;
}

TEST(BenchKernels, WithoutAGpuAsksForCpu) {
  if (torch::cuda::is_available()) GTEST_SKIP() << "a GPU is visible";
  auto r = test::run_cli("bench kernels");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(contains(r.output, "--cpu")) << r.output;
}

TEST(BenchKernels, ListShowsTheRegistry) {
  auto r = test::run_cli("--log-level warn bench kernels --list --json --cpu");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = Json::parse(r.output.substr(r.output.find('[')));
  ASSERT_EQ(j.size(), ops::kernel_registry().size());
  EXPECT_EQ(j[0]["kernel"], "rmsnorm");
  EXPECT_EQ(j[0]["used"], false);  // CPU
}

TEST(OpsImplFlag, GenerateRejectsABadValue) {
  auto r = test::run_cli("generate --model '" + test::fixture("tiny-llama") +
                         "' --prompt hi -n 1 --ops-impl fast");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(contains(r.output, "--ops-impl")) << r.output;
}

// ---------------------------------------------------------------- training

Json tiny_config(const std::string& run_dir, const std::string& impl) {
  Json c;
  c["model"] = {{"arch", "aquila"}, {"init_from", test::fixture("tiny-llama")}};
  c["data"] = {{"datasets", Json::array({test::fixture("train-parity/data")})},
               {"seq_len", 32},
               {"shuffle", true}};
  c["train"] = {{"steps", 3}, {"global_batch", 4}, {"micro_batch", 4}, {"threads", 1}};
  c["optim"] = {{"lr", 5e-3}};
  c["checkpoint"] = {{"dir", run_dir + "/checkpoints"}, {"every", 0}};
  c["log"] = {{"dir", run_dir}, {"every", 1}, {"tensorboard", false}, {"progress", "none"}};
  c["ops"] = {{"impl", impl}};
  return c;
}

std::vector<double> losses(const std::string& metrics) {
  std::vector<double> out;
  std::istringstream in(test::read_file(metrics));
  std::string line;
  while (std::getline(in, line)) {
    auto j = Json::parse(line);
    if (j["type"] == "train") out.push_back(j["loss"].get<double>());
  }
  return out;
}

TEST(OpsImplTraining, CpuTrainsAlikeWithEverySetting) {
  ImplGuard guard;
  std::vector<std::vector<double>> runs;
  for (const std::string impl : {"torch", "aviary", "auto"}) {
    test::TempDir dir;
    Trainer trainer(tiny_config(dir.path(), impl), "ops.yaml");
    EXPECT_EQ(ops::ops_impl(), ops::parse_ops_impl(impl, "test"));
    EXPECT_EQ(trainer.resolved_config()["ops"]["impl"], impl);
    auto result = trainer.run();
    EXPECT_EQ(result.status, "completed");
    auto written = Json::parse(test::read_file(dir.file("config.json")));
    EXPECT_EQ(written["ops"]["impl"], impl);
    runs.push_back(losses(dir.file("metrics.jsonl")));
  }
  ASSERT_EQ(runs[0].size(), 3u);
  // aviary and auto run the same fused CPU loops, bit for bit; torch runs the ATen reference,
  // whose rounding differs (another exp, another summation order) by far less than 1e-5.
  EXPECT_EQ(runs[1], runs[2]);
  for (size_t i = 0; i < runs[0].size(); ++i)
    EXPECT_NEAR(runs[1][i], runs[0][i], 1e-5 * std::abs(runs[0][i])) << "step " << i;
}

// Training on CPU never counts a kernel launch, whatever the setting.
TEST(OpsImplTraining, CpuLaunchesNoKernel) {
  ImplGuard guard;
  std::vector<int64_t> before;
  for (const auto& k : ops::kernel_registry())
    before.push_back(ops::kernel_calls(k.op));
  test::TempDir dir;
  Trainer trainer(tiny_config(dir.path(), "aviary"), "ops.yaml");
  EXPECT_EQ(trainer.run().status, "completed");
  for (size_t i = 0; i < before.size(); ++i)
    EXPECT_EQ(ops::kernel_calls(ops::kernel_registry()[i].op), before[i]);
}

TEST(OpsImplTraining, BadValueIsRefusedBeforeTraining) {
  test::TempDir dir;
  auto e = expect_error(ErrorKind::kInvalidArgument,
                        [&] { Trainer trainer(tiny_config(dir.path(), "kernels"), "ops.yaml"); });
  EXPECT_TRUE(contains(e.what(), "ops.yaml")) << e.what();
  EXPECT_TRUE(contains(e.what(), "ops.impl")) << e.what();
  EXPECT_TRUE(contains(e.what(), "auto, aviary, torch")) << e.what();
  EXPECT_FALSE(fs::exists(dir.file("metrics.jsonl")));
}

// ---------------------------------------------------------------- on a GPU

bool have_cuda() {
  return torch::cuda::is_available();
}

// max |y - y_exact| where y_exact is HF's RMSNorm in double on the same (rounded) inputs.
double max_error(const torch::Tensor& y, const torch::Tensor& x, const torch::Tensor& w,
                 double eps) {
  auto xd = x.to(torch::kCPU, torch::kFloat64);
  auto rstd = torch::rsqrt(xd.pow(2).mean(-1, true) + eps);
  auto exact = w.to(torch::kCPU, torch::kFloat64) * (xd * rstd);
  return (y.to(torch::kCPU, torch::kFloat64) - exact).abs().max().item<double>();
}

TEST(OpsRmsNormCuda, KernelMatchesTheReferenceWithinTwiceItsError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(7);
  const double eps = 1e-5;
  for (auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    for (auto shape :
         std::vector<std::vector<int64_t>>{{1, 1}, {7, 113}, {3, 5, 1023}, {2, 4096}, {4, 8195}}) {
      auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
      auto x = torch::randn(shape, opts) * 3;
      auto w = (1 + 0.1 * torch::randn({shape.back()}, opts.dtype(torch::kFloat32))).to(dtype);
      ops::set_ops_impl(OpsImpl::kAviary);
      ASSERT_TRUE(ops::use_kernel(Op::kRmsNorm, x.device()));
      auto y_kernel = ops::rms_norm(x, w, eps);
      ops::set_ops_impl(OpsImpl::kTorch);
      auto y_torch = ops::rms_norm(x, w, eps);
      ASSERT_EQ(y_kernel.sizes(), x.sizes());
      ASSERT_EQ(y_kernel.scalar_type(), dtype);
      const double err_kernel = max_error(y_kernel, x, w, eps);
      const double err_torch = max_error(y_torch, x, w, eps);
      const double atol =
          dtype == torch::kFloat32 ? 1e-5 : 1e-3;  // stated here: see docs/kernels.md
      EXPECT_LE(err_kernel, 2 * err_torch + atol)
          << c10::toString(dtype) << " " << x.sizes() << " kernel " << err_kernel << " torch "
          << err_torch;
    }
  }
}

TEST(OpsRmsNormCuda, StridedRowsAndGradientsMatchTheReference) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(11);
  auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  // Rows of a wider buffer: a row stride of 160 for 129 columns, and a transposed (copied) input.
  auto base = torch::randn({37, 160}, opts);
  auto x = base.narrow(1, 3, 129);
  auto w = torch::randn({129}, opts);
  std::vector<torch::Tensor> grads[2];
  torch::Tensor outs[2];
  for (int k = 0; k < 2; ++k) {
    ops::set_ops_impl(k == 0 ? OpsImpl::kAviary : OpsImpl::kTorch);
    auto xr = x.detach().requires_grad_(), wr = w.detach().requires_grad_();
    outs[k] = ops::rms_norm(xr, wr, 1e-6);
    auto g = torch::ones_like(outs[k]);
    grads[k] = torch::autograd::grad({outs[k]}, {xr, wr}, {g});
  }
  EXPECT_LE(max_error(outs[0], x, w, 1e-6), 2 * max_error(outs[1], x, w, 1e-6) + 1e-3);
  // The backward kernel's dx and dweight against the exact gradients (double autograd over the
  // same maths), within twice the reference's error.
  auto xd = x.to(torch::kCPU, torch::kFloat64).requires_grad_();
  auto wd = w.to(torch::kCPU, torch::kFloat64).requires_grad_();
  auto yd = wd * (xd * torch::rsqrt(xd.pow(2).mean(-1, true) + 1e-6));
  auto exact = torch::autograd::grad({yd}, {xd, wd}, {torch::ones_like(yd)});
  for (size_t t = 0; t < 2; ++t) {
    auto err = [&](const torch::Tensor& g) {
      return (g.to(torch::kCPU, torch::kFloat64) - exact[t]).abs().max().item<double>();
    };
    const double scale = std::max(1.0, exact[t].abs().max().item<double>());
    EXPECT_LE(err(grads[0][t]), 2 * err(grads[1][t]) + 1e-3 * scale)
        << (t == 0 ? "dx" : "dweight") << ": kernel " << err(grads[0][t]) << ", reference "
        << err(grads[1][t]);
  }
  auto xt = torch::randn({64, 48}, opts).t();  // last dim not contiguous
  ops::set_ops_impl(OpsImpl::kAviary);
  auto yt = ops::rms_norm(xt, torch::ones({64}, opts), 1e-6);
  EXPECT_LE(max_error(yt, xt, torch::ones({64}, opts), 1e-6), 0.02);
}

TEST(OpsRmsNormCuda, AutoFollowsTheEmbeddedRecord) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAuto);
  const torch::Device device(torch::kCUDA, 0);
  const int sm = ops::device_sm(device);
  EXPECT_EQ(ops::use_kernel(Op::kRmsNorm, device),
            ops::kernels_built() && ValidationRecord::embedded().validated("rmsnorm", sm));
}

// Attention in double on CPU (the exact result the kernel and SDPA are measured against): GQA by
// repeating K/V, the causal mask aligned to the bottom-right corner. Returns o and, given `grad`,
// dq, dk, dv.
std::vector<torch::Tensor> exact_attention(const torch::Tensor& q, const torch::Tensor& k,
                                           const torch::Tensor& v, bool causal,
                                           const torch::Tensor& grad) {
  auto qd = q.detach().to(torch::kCPU, torch::kFloat64).requires_grad_();
  auto kd = k.detach().to(torch::kCPU, torch::kFloat64).requires_grad_();
  auto vd = v.detach().to(torch::kCPU, torch::kFloat64).requires_grad_();
  const int64_t group = q.size(1) / k.size(1), tq = q.size(2), tk = k.size(2);
  auto scores = torch::matmul(qd, kd.repeat_interleave(group, 1).transpose(-2, -1)) /
                std::sqrt(static_cast<double>(q.size(3)));
  if (causal) {
    auto hidden = torch::ones({tq, tk}, torch::kBool).triu(tk - tq + 1);
    scores = scores.masked_fill(hidden, -INFINITY);
  }
  auto o = torch::matmul(torch::softmax(scores, -1), vd.repeat_interleave(group, 1));
  auto grads = torch::autograd::grad({o}, {qd, kd, vd}, {grad.to(torch::kCPU, torch::kFloat64)});
  return {o.detach(), grads[0], grads[1], grads[2]};
}

// Runs ops::attention under `impl` with gradients: o, dq, dk, dv.
std::vector<torch::Tensor> attention_with_grads(OpsImpl impl, const torch::Tensor& q,
                                                const torch::Tensor& k, const torch::Tensor& v,
                                                bool causal, const torch::Tensor& grad) {
  ops::set_ops_impl(impl);
  auto qr = q.detach().requires_grad_(), kr = k.detach().requires_grad_(),
       vr = v.detach().requires_grad_();
  auto o = ops::attention(qr, kr, vr, std::nullopt, causal);
  auto grads = torch::autograd::grad({o}, {qr, kr, vr}, {grad});
  return {o.detach(), grads[0], grads[1], grads[2]};
}

// The FlashAttention criterion (DESIGN.md): the kernel's error against the exact result is at
// most twice SDPA's at the same precision, plus an atol of a fraction of one bf16/f16 last place
// at the tensor's scale. For o, dq, dk and dv.
void expect_attention_within_twice_sdpa(const torch::Tensor& q, const torch::Tensor& k,
                                        const torch::Tensor& v, bool causal,
                                        const std::string& what) {
  auto grad = torch::randn_like(q);
  auto exact = exact_attention(q, k, v, causal, grad);
  auto kernel = attention_with_grads(OpsImpl::kAviary, q, k, v, causal, grad);
  auto sdpa = attention_with_grads(OpsImpl::kTorch, q, k, v, causal, grad);
  const char* names[] = {"o", "dq", "dk", "dv"};
  const double atol = q.scalar_type() == torch::kBFloat16 ? 1e-3 : 2e-4;
  for (size_t t = 0; t < 4; ++t) {
    ASSERT_EQ(kernel[t].sizes(), exact[t].sizes()) << what << " " << names[t];
    ASSERT_EQ(kernel[t].scalar_type(), q.scalar_type()) << what << " " << names[t];
    auto err = [&](const torch::Tensor& x) {
      return (x.to(torch::kCPU, torch::kFloat64) - exact[t]).abs().max().item<double>();
    };
    const double scale = std::max(1.0, exact[t].abs().max().item<double>());
    EXPECT_TRUE(torch::isfinite(kernel[t]).all().item<bool>()) << what << " " << names[t];
    EXPECT_LE(err(kernel[t]), 2 * err(sdpa[t]) + atol * scale)
        << what << " " << names[t] << ": kernel " << err(kernel[t]) << ", SDPA " << err(sdpa[t]);
  }
}

TEST(OpsAttentionCuda, KernelMatchesTheExactResultWithinTwiceSdpasError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(5);
  struct Shape {
    int64_t b, h, kvh, tq, tk;
    bool causal;
  };
  const std::vector<Shape> shapes = {
      {2, 4, 4, 113, 113, true},   // ragged tiles
      {1, 8, 2, 256, 256, true},   // GQA
      {2, 4, 2, 7, 300, true},     // a few new queries against a longer cache (bottom-right)
      {1, 4, 1, 200, 200, false},  // MQA, no mask
      {3, 2, 2, 1, 1, true},
  };
  for (auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    for (int64_t dim : {64, 128}) {
      for (const auto& s : shapes) {
        auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
        auto q = torch::randn({s.b, s.h, s.tq, dim}, opts);
        auto k = torch::randn({s.b, s.kvh, s.tk, dim}, opts);
        auto v = torch::randn({s.b, s.kvh, s.tk, dim}, opts);
        ops::set_ops_impl(OpsImpl::kAviary);
        ASSERT_TRUE(ops::use_kernel(Op::kAttention, q.device()));
        std::ostringstream what;
        what << c10::toString(dtype) << " d" << dim << " B" << s.b << " H" << s.h << "/" << s.kvh
             << " " << s.tq << "x" << s.tk << (s.causal ? " causal" : "");
        expect_attention_within_twice_sdpa(q, k, v, s.causal, what.str());
      }
    }
  }
}

TEST(OpsAttentionCuda, TheModelsLayoutAutocastAndOddStridesWork) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(9);
  auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  // The projections' [B, T, H, D] viewed as [B, H, T, D], as nn/attention.cpp calls it.
  auto q = torch::randn({2, 150, 8, 64}, opts).transpose(1, 2);
  auto kv = torch::randn({2, 150, 4, 128}, opts);  // k and v side by side in one buffer
  auto k = kv.narrow(3, 0, 64).transpose(1, 2), v = kv.narrow(3, 64, 64).transpose(1, 2);
  expect_attention_within_twice_sdpa(q, k, v, true, "model layout");
  // A head dim that is not contiguous: copied for the kernel.
  auto qt = torch::randn({1, 4, 64, 96}, opts).transpose(2, 3);
  auto kt = torch::randn({1, 4, 64, 96}, opts).transpose(2, 3);
  expect_attention_within_twice_sdpa(qt, kt, kt, false, "head dim not contiguous");
  // fp32 inputs under bf16 autocast run the kernel in bf16, as SDPA does.
  ops::set_ops_impl(OpsImpl::kAviary);
  auto q32 = torch::randn({1, 4, 70, 64}, opts.dtype(torch::kFloat32)).requires_grad_();
  torch::Tensor o;
  {
    ops::AutocastGuard autocast(torch::kCUDA, true, torch::kBFloat16);
    o = ops::attention(q32, q32, q32, std::nullopt, true);
  }
  EXPECT_EQ(o.scalar_type(), torch::kBFloat16);
  auto dq = torch::autograd::grad({o}, {q32}, {torch::ones_like(o)})[0];
  EXPECT_EQ(dq.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::isfinite(dq).all().item<bool>());
}

// Packed documents (nn::document_attention on the GPU): the varlen kernels over the documents'
// boundaries against the dense mask's SDPA (ops.impl torch), both against the dense mask's
// attention in double: o, dq, dk, dv.
TEST(OpsAttentionCuda, PackedDocumentsRunVarlenWithinTwiceTheDenseMasksError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(19);
  const int64_t B = 2, H = 4, KVH = 2;
  const int32_t T = 150;
  // Row 0: documents of 40, 0 (empty), 73 and 37 tokens; row 1: one, its boundary past the end.
  const auto docs = nn::document_attention({{0, 40, 40, 113, T}, {0, T + 7}}, T, torch::kCUDA);
  ASSERT_TRUE(docs.mask.documents && docs.mask.documents->cu_tokens_device.defined());
  const auto& documents = *docs.mask.documents;
  const auto dense = documents.dense_mask(B, T, torch::kCUDA).to(torch::kCPU);
  for (auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    for (int64_t dim : {64, 128}) {
      auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
      // The model's layout: [B, T, H, D] projections viewed as [B, H, T, D].
      auto q = torch::randn({B, T, H, dim}, opts).transpose(1, 2);
      auto k = torch::randn({B, T, KVH, dim}, opts).transpose(1, 2);
      auto v = torch::randn({B, T, KVH, dim}, opts).transpose(1, 2);
      auto grad = torch::randn({B, H, T, dim}, opts);
      auto qd = q.to(torch::kCPU, torch::kFloat64).requires_grad_();
      auto kd = k.to(torch::kCPU, torch::kFloat64).requires_grad_();
      auto vd = v.to(torch::kCPU, torch::kFloat64).requires_grad_();
      auto scores = torch::matmul(qd, kd.repeat_interleave(H / KVH, 1).transpose(-2, -1)) /
                    std::sqrt(static_cast<double>(dim));
      auto o = torch::matmul(torch::softmax(scores.masked_fill(dense.logical_not(), -INFINITY), -1),
                             vd.repeat_interleave(H / KVH, 1));
      auto g = torch::autograd::grad({o}, {qd, kd, vd}, {grad.to(torch::kCPU, torch::kFloat64)});
      const std::vector<torch::Tensor> exact = {o.detach(), g[0], g[1], g[2]};
      std::vector<torch::Tensor> got[2];
      for (int impl = 0; impl < 2; ++impl) {
        ops::set_ops_impl(impl == 0 ? OpsImpl::kAviary : OpsImpl::kTorch);
        auto qr = q.detach().requires_grad_(), kr = k.detach().requires_grad_(),
             vr = v.detach().requires_grad_();
        auto out = ops::attention(qr, kr, vr, std::nullopt, false, &documents);
        if (impl == 0) {
          ASSERT_TRUE(out.grad_fn() &&
                      std::string(out.grad_fn()->name()).find("AttentionCudaFunction") !=
                          std::string::npos);
        }
        auto grads = torch::autograd::grad({out}, {qr, kr, vr}, {grad});
        got[impl] = {out.detach(), grads[0], grads[1], grads[2]};
      }
      const char* names[] = {"o", "dq", "dk", "dv"};
      const double atol = dtype == torch::kBFloat16 ? 1e-3 : 2e-4;
      for (size_t t = 0; t < 4; ++t) {
        auto err = [&](const torch::Tensor& x) {
          return (x.to(torch::kCPU, torch::kFloat64) - exact[t]).abs().max().item<double>();
        };
        const double scale = std::max(1.0, exact[t].abs().max().item<double>());
        EXPECT_LE(err(got[0][t]), 2 * err(got[1][t]) + atol * scale)
            << c10::toString(dtype) << " d" << dim << " " << names[t] << ": varlen "
            << err(got[0][t]) << ", SDPA " << err(got[1][t]);
      }
    }
  }
}

// Decode steps (no gradient, <= 8 new queries against more keys) over a KV cache's layout
// ([B, KVH, capacity, D] narrowed to the filled length): the split-KV kernel against SDPA, both
// against double.
TEST(OpsAttentionDecodeCuda, KernelMatchesTheExactResultWithinTwiceSdpasError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(31);
  struct Shape {
    int64_t b, h, kvh, tq, tk;
    bool causal = true;
  };
  // One new query; a few (causal: the bottom-right corner); the most a decode step takes (8), with
  // and without the mask; fewer keys than a split.
  const std::vector<Shape> shapes = {{2, 8, 2, 1, 113},        {1, 4, 4, 1, 4000},
                                     {3, 8, 1, 4, 1000},       {2, 4, 2, 8, 300},
                                     {2, 4, 2, 8, 300, false}, {1, 4, 1, 3, 4}};
  for (auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    for (int64_t dim : {64, 128}) {
      for (const Shape& s : shapes) {
        auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
        const int64_t capacity = s.tk + 37;
        auto q = torch::randn({s.b, s.tq, s.h, dim}, opts).transpose(1, 2);
        auto k = torch::randn({s.b, s.kvh, capacity, dim}, opts).narrow(2, 0, s.tk);
        auto v = torch::randn({s.b, s.kvh, capacity, dim}, opts).narrow(2, 0, s.tk);
        auto exact = exact_attention(q, k, v, s.causal, torch::zeros_like(q))[0];
        torch::Tensor got[2];
        for (int impl = 0; impl < 2; ++impl) {
          ops::set_ops_impl(impl == 0 ? OpsImpl::kAviary : OpsImpl::kTorch);
          if (impl == 0) {
            ASSERT_TRUE(ops::use_kernel(Op::kAttentionDecode, q.device()));
          }
          torch::NoGradGuard no_grad;
          const int64_t decode_calls = ops::kernel_calls(Op::kAttentionDecode),
                        attention_calls = ops::kernel_calls(Op::kAttention);
          got[impl] = ops::attention(q, k, v, std::nullopt, s.causal);
          // The decode kernel ran (once) under aviary, no kernel under torch.
          EXPECT_EQ(ops::kernel_calls(Op::kAttentionDecode), decode_calls + (impl == 0 ? 1 : 0));
          EXPECT_EQ(ops::kernel_calls(Op::kAttention), attention_calls);
        }
        ASSERT_EQ(got[0].sizes(), q.sizes());
        auto err = [&](const torch::Tensor& x) {
          return (x.to(torch::kCPU, torch::kFloat64) - exact).abs().max().item<double>();
        };
        const double atol = (dtype == torch::kBFloat16 ? 1e-3 : 2e-4) *
                            std::max(1.0, exact.abs().max().item<double>());
        EXPECT_LE(err(got[0]), 2 * err(got[1]) + atol)
            << c10::toString(dtype) << " d" << dim << " B" << s.b << " H" << s.h << "/" << s.kvh
            << " " << s.tq << "x" << s.tk << (s.causal ? " causal" : "") << ": decode "
            << err(got[0]) << ", SDPA " << err(got[1]);
      }
    }
  }
}

TEST(OpsAttentionDecodeCuda, CallsThatWantAGradientTakeTheTrainingKernels) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAviary);
  auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  auto q = torch::randn({1, 4, 1, 64}, opts).requires_grad_();
  auto k = torch::randn({1, 4, 50, 64}, opts);
  auto out = ops::attention(q, k, k, std::nullopt, true);
  ASSERT_TRUE(out.grad_fn() && std::string(out.grad_fn()->name()).find("AttentionCudaFunction") !=
                                   std::string::npos);
}

TEST(OpsAttentionDecodeCuda, AutoFollowsTheEmbeddedRecord) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAuto);
  const torch::Device device(torch::kCUDA, 0);
  EXPECT_EQ(ops::use_kernel(Op::kAttentionDecode, device),
            ops::kernels_built() &&
                ValidationRecord::embedded().validated("attention_decode", ops::device_sm(device)));
}

TEST(OpsAttentionCuda, WhatTheKernelCannotTakeGoesToSdpa) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  torch::manual_seed(3);
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  // fp32 without autocast, head dim 96, and a causal call with more queries than keys: SDPA's
  // result, bit for bit the torch setting's.
  const std::vector<std::vector<torch::Tensor>> inputs = {
      {torch::randn({1, 2, 33, 64}, cuda), torch::randn({1, 2, 33, 64}, cuda)},
      {torch::randn({1, 2, 33, 96}, cuda.dtype(torch::kBFloat16)),
       torch::randn({1, 2, 33, 96}, cuda.dtype(torch::kBFloat16))},
      {torch::randn({1, 2, 40, 64}, cuda.dtype(torch::kBFloat16)),
       torch::randn({1, 2, 30, 64}, cuda.dtype(torch::kBFloat16))},
  };
  for (const auto& in : inputs) {
    ops::set_ops_impl(OpsImpl::kAviary);
    auto ours = ops::attention(in[0], in[1], in[1], std::nullopt, true);
    ops::set_ops_impl(OpsImpl::kTorch);
    auto sdpa = ops::attention(in[0], in[1], in[1], std::nullopt, true);
    // equal_nan: SDPA may leave the rows that see no key NaN.
    EXPECT_TRUE(at::allclose(ours, sdpa, 0.0, 0.0, /*equal_nan=*/true))
        << in[0].sizes() << " " << in[0].scalar_type();
  }
}

TEST(OpsAttentionCuda, AutoFollowsTheEmbeddedRecord) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAuto);
  const torch::Device device(torch::kCUDA, 0);
  EXPECT_EQ(ops::use_kernel(Op::kAttention, device),
            ops::kernels_built() &&
                ValidationRecord::embedded().validated("attention", ops::device_sm(device)));
}

// silu(gate) * up and its gradients, in double on CPU: out, dgate, dup.
std::vector<torch::Tensor> exact_swiglu(const torch::Tensor& gate, const torch::Tensor& up,
                                        const torch::Tensor& grad) {
  auto g = gate.to(torch::kCPU, torch::kFloat64), u = up.to(torch::kCPU, torch::kFloat64);
  auto d = grad.to(torch::kCPU, torch::kFloat64);
  auto sig = torch::sigmoid(g);
  return {g * sig * u, d * u * sig * (1 + g * (1 - sig)), d * g * sig};
}

TEST(OpsSwiGluCuda, KernelMatchesTheExactResultWithinTwiceTorchsError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(13);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    for (auto shape :
         std::vector<std::vector<int64_t>>{{1, 1}, {7, 113}, {3, 5, 1023}, {4, 8195}}) {
      auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
      // gate and up as the two halves of one buffer (strided rows), as a fused gate-up gives them.
      std::vector<int64_t> wide = shape;
      wide.back() *= 2;
      auto buffer = torch::randn(wide, opts) * 3;
      auto gate = buffer.narrow(-1, 0, shape.back()),
           up = buffer.narrow(-1, shape.back(), shape.back());
      auto grad = torch::randn(shape, opts);
      auto exact = exact_swiglu(gate, up, grad);
      std::vector<torch::Tensor> got[2];
      for (int k = 0; k < 2; ++k) {
        ops::set_ops_impl(k == 0 ? OpsImpl::kAviary : OpsImpl::kTorch);
        if (k == 0) {
          ASSERT_TRUE(ops::use_kernel(Op::kSwiGlu, gate.device()));
        }
        auto g = gate.detach().requires_grad_(), u = up.detach().requires_grad_();
        auto out = ops::swiglu(g, u);
        auto grads = torch::autograd::grad({out}, {g, u}, {grad});
        got[k] = {out.detach(), grads[0], grads[1]};
      }
      const double atol = dtype == torch::kFloat32 ? 1e-5 : 1e-3;
      const char* names[] = {"out", "dgate", "dup"};
      for (size_t t = 0; t < 3; ++t) {
        ASSERT_EQ(got[0][t].sizes(), gate.sizes());
        ASSERT_EQ(got[0][t].scalar_type(), dtype);
        auto err = [&](const torch::Tensor& x) {
          return (x.to(torch::kCPU, torch::kFloat64) - exact[t]).abs().max().item<double>();
        };
        const double scale = std::max(1.0, exact[t].abs().max().item<double>());
        EXPECT_LE(err(got[0][t]), 2 * err(got[1][t]) + atol * scale)
            << c10::toString(dtype) << " " << gate.sizes() << " " << names[t] << ": kernel "
            << err(got[0][t]) << ", torch " << err(got[1][t]);
      }
    }
  }
}

TEST(OpsSwiGluCuda, AutoFollowsTheEmbeddedRecord) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAuto);
  const torch::Device device(torch::kCUDA, 0);
  EXPECT_EQ(ops::use_kernel(Op::kSwiGlu, device),
            ops::kernels_built() &&
                ValidationRecord::embedded().validated("swiglu", ops::device_sm(device)));
}

// Cross-entropy with ignore_index in double on CPU, from the same (rounded) logits: the loss and
// the logits' gradient for grad_out 1.
std::pair<double, torch::Tensor> exact_cross_entropy(const torch::Tensor& logits,
                                                     const torch::Tensor& targets,
                                                     int64_t ignore_index,
                                                     ops::LossReduction reduction) {
  auto x = logits.to(torch::kCPU, torch::kFloat64);
  auto t = targets.to(torch::kCPU);
  auto counted = t.ne(ignore_index);
  auto safe = t.masked_fill(counted.logical_not(), 0);
  auto logp = torch::log_softmax(x, 1);
  auto rows = -logp.gather(1, safe.unsqueeze(1)).squeeze(1) * counted;
  const double count = counted.sum().item<double>();
  const double scale = reduction == ops::LossReduction::kMean ? 1.0 / count : 1.0;
  auto grad = (logp.exp() - torch::one_hot(safe, x.size(1)).to(torch::kFloat64)) *
              counted.unsqueeze(1) * scale;
  return {rows.sum().item<double>() * scale, grad};
}

TEST(OpsCrossEntropyCuda, KernelMatchesTheExactLossAndGradientWithinTwiceTorchsError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(17);
  constexpr int64_t kIgnore = -100;
  for (auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    for (auto [rows, vocab] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {37, 1000}, {300, 32007}, {5, 151851}}) {
      for (auto reduction : {ops::LossReduction::kMean, ops::LossReduction::kSum}) {
        auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
        // Logits as a slice of a wider buffer (a strided row), a fifth of the targets ignored.
        auto logits = (torch::randn({rows, vocab + 3}, opts) * 4).narrow(1, 0, vocab);
        auto targets = torch::randint(0, vocab, {rows}, torch::kInt64);
        targets.masked_fill_(torch::rand({rows}) < 0.2, kIgnore);
        targets[0] = vocab - 1;
        targets = targets.to(torch::kCUDA);
        const auto [exact_loss, exact_grad] =
            exact_cross_entropy(logits, targets, kIgnore, reduction);
        double loss[2];
        torch::Tensor grad[2];
        for (int k = 0; k < 2; ++k) {
          ops::set_ops_impl(k == 0 ? OpsImpl::kAviary : OpsImpl::kTorch);
          if (k == 0) {
            ASSERT_TRUE(ops::use_kernel(Op::kCrossEntropy, logits.device()));
          }
          auto x = logits.detach().requires_grad_();
          auto out = ops::cross_entropy(x, targets, kIgnore, reduction);
          if (k == 0) {
            EXPECT_EQ(out.scalar_type(), torch::kFloat32);  // whatever the logits' dtype
            EXPECT_TRUE(out.grad_fn() &&
                        std::string(out.grad_fn()->name()).find("CrossEntropyCuda") !=
                            std::string::npos)
                << (out.grad_fn() ? out.grad_fn()->name() : "no grad_fn");
          }
          loss[k] = out.item<double>();
          grad[k] = torch::autograd::grad({out}, {x})[0];
          ASSERT_EQ(grad[k].scalar_type(), dtype);
        }
        const std::string where = std::string(c10::toString(dtype)) + " " + std::to_string(rows) +
                                  "x" + std::to_string(vocab) +
                                  (reduction == ops::LossReduction::kMean ? " mean" : " sum");
        const double loss_err = std::abs(loss[0] - exact_loss);
        EXPECT_LE(loss_err, 2 * std::abs(loss[1] - exact_loss) + 1e-5 * std::abs(exact_loss) + 1e-6)
            << where << ": kernel " << loss[0] << ", torch " << loss[1] << ", exact " << exact_loss;
        auto err = [&](const torch::Tensor& g) {
          return (g.to(torch::kCPU, torch::kFloat64) - exact_grad).abs().max().item<double>();
        };
        const double atol = (dtype == torch::kFloat32 ? 1e-6 : 1e-3) *
                            std::max(1e-3, exact_grad.abs().max().item<double>());
        EXPECT_LE(err(grad[0]), 2 * err(grad[1]) + atol)
            << where << ": kernel " << err(grad[0]) << ", torch " << err(grad[1]);
      }
    }
  }
}

// The z-loss term through the kernel (bf16 logits, both reductions) against the fp32 reference
// that ops.impl torch runs.
TEST(OpsCrossEntropyCuda, ZLossKernelMatchesTheReference) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(23);
  const double z = 1e-3;
  for (auto [rows, vocab] : std::vector<std::pair<int64_t, int64_t>>{{37, 1000}, {5, 151851}}) {
    for (auto reduction : {ops::LossReduction::kMean, ops::LossReduction::kSum}) {
      auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
      auto logits = torch::randn({rows, vocab}, opts) * 4;
      auto targets = torch::randint(0, vocab, {rows}, torch::kInt64);
      targets[rows - 1] = -100;
      targets = targets.to(torch::kCUDA);
      double loss[2];
      torch::Tensor grad[2];
      for (int k = 0; k < 2; ++k) {
        ops::set_ops_impl(k == 0 ? OpsImpl::kAviary : OpsImpl::kTorch);
        auto x = logits.detach().requires_grad_();
        auto out = ops::cross_entropy(x, targets, -100, reduction, z);
        loss[k] = out.item<double>();
        grad[k] = torch::autograd::grad({out}, {x})[0].to(torch::kFloat32);
      }
      EXPECT_NEAR(loss[0], loss[1], 1e-5 * std::abs(loss[1])) << rows << "x" << vocab;
      // Both gradients are rounded to bf16 once (the kernel's from fp32 sums).
      EXPECT_LE((grad[0] - grad[1]).abs().max().item<double>(),
                1e-2 * grad[1].abs().max().item<double>())
          << rows << "x" << vocab;
    }
  }
}

TEST(OpsCrossEntropyCuda, KernelMeanOverNoTargetIsNanWithZeroGradients) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAviary);
  auto x = torch::randn({4, 50}, torch::TensorOptions().device(torch::kCUDA)).requires_grad_();
  auto targets =
      torch::full({4}, -100, torch::TensorOptions().dtype(torch::kInt64).device(torch::kCUDA));
  auto mean = ops::cross_entropy(x, targets, -100, ops::LossReduction::kMean);
  EXPECT_TRUE(std::isnan(mean.item<double>()));
  EXPECT_EQ(torch::autograd::grad({mean}, {x})[0].abs().max().item<double>(), 0.0);
  auto sum = ops::cross_entropy(x, targets, -100, ops::LossReduction::kSum);
  EXPECT_EQ(sum.item<double>(), 0.0);
}

// Forces several chunks of the fused loss head on small inputs.
class SmallCudaLossHeadChunks {
 public:
  SmallCudaLossHeadChunks() { ops::set_loss_head_chunk_floats(40 * 1000); }
  ~SmallCudaLossHeadChunks() { ops::set_loss_head_chunk_floats(0); }
};

// The CUDA loss head (lm_head + cross-entropy, chunked) against the unfused head (torch's matmul,
// then the reference loss) under ops.impl torch, both against double on the same rounded inputs:
// fp32; bf16 autocast over fp32 weights (the trainer's mixed precision); pure bf16. The loss is
// scaled by 3 so that backward's grad_out is not 1.
TEST(OpsCrossEntropyCuda, LossHeadMatchesTheExactHeadWithinTwiceTheUnfusedError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  SmallCudaLossHeadChunks chunks;  // 40 rows of a 1000-word vocabulary per chunk
  torch::manual_seed(23);
  constexpr int64_t kIgnore = -100;
  const int64_t rows = 203, width = 64, vocab = 1000;
  struct Mode {
    const char* name;
    torch::ScalarType params;
    bool autocast;
  };
  for (const Mode mode :
       {Mode{"fp32", torch::kFloat32, false}, Mode{"bf16 autocast", torch::kFloat32, true},
        Mode{"bf16", torch::kBFloat16, false}}) {
    for (auto reduction : {ops::LossReduction::kMean, ops::LossReduction::kSum}) {
      auto opts = torch::TensorOptions().dtype(mode.params).device(torch::kCUDA);
      auto hidden = torch::randn({rows, width}, opts);
      auto weight = torch::randn({vocab, width}, opts) * 0.3;
      auto targets = torch::randint(0, vocab, {rows}, torch::kInt64);
      targets.masked_fill_(torch::rand({rows}) < 0.1, kIgnore);
      targets = targets.to(torch::kCUDA);
      // Exact, in double from the inputs as the GEMMs see them (rounded to bf16 under autocast).
      const auto compute = mode.autocast ? torch::kBFloat16 : mode.params;
      auto h64 = hidden.to(compute).to(torch::kCPU, torch::kFloat64).requires_grad_();
      auto w64 = weight.to(compute).to(torch::kCPU, torch::kFloat64).requires_grad_();
      auto exact = 3 * ops::cross_entropy_reference(torch::mm(h64, w64.t()), targets.cpu(), kIgnore,
                                                    reduction);
      auto exact_grads = torch::autograd::grad({exact}, {h64, w64});
      double loss[2];
      std::vector<torch::Tensor> grads[2];
      for (int k = 0; k < 2; ++k) {
        ops::set_ops_impl(k == 0 ? OpsImpl::kAviary : OpsImpl::kTorch);
        auto h = hidden.detach().requires_grad_(), w = weight.detach().requires_grad_();
        ops::AutocastGuard autocast(torch::kCUDA, mode.autocast);
        ASSERT_EQ(ops::fused_linear_cross_entropy(h, w, targets), k == 0) << mode.name;
        auto out = 3 * ops::linear_cross_entropy(h, w, targets, kIgnore, reduction);
        loss[k] = out.item<double>();
        grads[k] = torch::autograd::grad({out}, {h, w});
      }
      const std::string where =
          std::string(mode.name) + (reduction == ops::LossReduction::kMean ? " mean" : " sum");
      const double exact_loss = exact.item<double>();
      EXPECT_LE(std::abs(loss[0] - exact_loss),
                2 * std::abs(loss[1] - exact_loss) + 1e-5 * std::abs(exact_loss))
          << where << ": fused " << loss[0] << ", unfused " << loss[1] << ", exact " << exact_loss;
      const char* names[] = {"dhidden", "dweight"};
      for (int g = 0; g < 2; ++g) {
        ASSERT_EQ(grads[0][g].scalar_type(), mode.params) << where << " " << names[g];
        auto err = [&](const torch::Tensor& x) {
          return (x.to(torch::kCPU, torch::kFloat64) - exact_grads[g]).abs().max().item<double>();
        };
        const double atol = (compute == torch::kFloat32 ? 1e-5 : 1e-3) *
                            std::max(1e-3, exact_grads[g].abs().max().item<double>());
        EXPECT_LE(err(grads[0][g]), 2 * err(grads[1][g]) + atol)
            << where << " " << names[g] << ": fused " << err(grads[0][g]) << ", unfused "
            << err(grads[1][g]);
      }
    }
  }
}

TEST(OpsCrossEntropyCuda, AutoFollowsTheEmbeddedRecord) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAuto);
  const torch::Device device(torch::kCUDA, 0);
  EXPECT_EQ(ops::use_kernel(Op::kCrossEntropy, device),
            ops::kernels_built() &&
                ValidationRecord::embedded().validated("cross_entropy", ops::device_sm(device)));
}

// x rotated (rotate-half) by angles pos * scale / theta^(2i/D) in double on CPU, and the gradient
// of <out, grad>: grad rotated by minus the angles.
std::pair<torch::Tensor, torch::Tensor> exact_rope(const torch::Tensor& x,
                                                   const torch::Tensor& positions, double theta,
                                                   double scale, const torch::Tensor& grad) {
  const int64_t D = x.size(3);
  auto i = torch::arange(0, D / 2, torch::kFloat64);
  auto inv_freq = torch::pow(theta, -2.0 * i / static_cast<double>(D)) * scale;
  auto angles = positions.to(torch::kCPU, torch::kFloat64).unsqueeze(-1) * inv_freq;  // [B,T,D/2]
  auto cos = torch::cat({angles.cos(), angles.cos()}, -1).unsqueeze(1);
  auto sin = torch::cat({angles.sin(), angles.sin()}, -1).unsqueeze(1);
  auto rotate = [&](const torch::Tensor& t, double sign) {
    auto td = t.to(torch::kCPU, torch::kFloat64);
    auto rotated = torch::cat({-td.narrow(-1, D / 2, D / 2), td.narrow(-1, 0, D / 2)}, -1);
    return td * cos + sign * rotated * sin;
  };
  return {rotate(x, 1.0), rotate(grad, -1.0)};
}

// The angle source the model gives its rotary tables (what the CUDA kernel rotates by) makes the
// tables' own angles, without scaling, with linear scaling, and with dynamic NTK scaling both
// after positions past max_position_embeddings grew the base and after short ones reset it.
TEST(AquilaRope, TheTablesAngleSourceGivesTheirAngles) {
  auto config = AquilaConfig::from_hf_file(test::fixture("tiny-llama") + "/config.json");
  const int64_t D = config.head_dim(), max_pos = config.max_position_embeddings;
  auto check = [&](AquilaForCausalLM& model, int64_t longest, const std::string& what) {
    auto positions = torch::stack(
        {torch::arange(longest - 40, longest, torch::kInt64), torch::arange(0, 40, torch::kInt64)});
    const auto tables = model->rotary_tables(positions, torch::kFloat32);
    ASSERT_TRUE(tables.positions.defined()) << what;
    ASSERT_TRUE(torch::equal(tables.positions, positions)) << what;
    ASSERT_GT(tables.theta, 0.0) << what;
    auto i = torch::arange(0, D / 2, torch::kFloat64);
    auto inv_freq =
        tables.position_scale * torch::pow(tables.theta, -2.0 * i / static_cast<double>(D));
    auto angles = positions.to(torch::kFloat64).unsqueeze(-1) * inv_freq;
    auto want = torch::cat({angles.cos(), angles.sin()}, -1);
    auto got = torch::cat({tables.cos.narrow(-1, 0, D / 2), tables.sin.narrow(-1, 0, D / 2)}, -1)
                   .to(torch::kFloat64);
    // The tables' fp32 angles are within a few ulps of the largest angle.
    const double tol = 8.0 * std::ldexp(1.0, -24) * angles.abs().max().item<double>() + 1e-6;
    EXPECT_LE((got - want).abs().max().item<double>(), tol) << what;
  };
  for (const std::string type : {"none", "linear", "dynamic"}) {
    config.rope_scaling.type = type;
    config.rope_scaling.factor = type == "none" ? 1.0 : 4.0;
    AquilaForCausalLM model(config, torch::TensorOptions().dtype(torch::kFloat32));
    check(model, 100, type);
    if (type == "dynamic") {
      check(model, 3 * max_pos, "dynamic, base grown");
      check(model, 100, "dynamic, base reset");
    }
  }
}

// Runs `rope` on x under ops.impl aviary (where it must take RopeCudaFunction) and torch, and
// checks the kernel's values and gradients (for upstream `grad`) within twice the reference's
// error of the exact ones, plus an atol for the dtype.
void expect_rope_kernel_within_twice_the_reference(
    const std::function<torch::Tensor(const torch::Tensor&)>& rope, const torch::Tensor& x,
    const torch::Tensor& grad, const torch::Tensor& exact, const torch::Tensor& exact_grad,
    const std::string& what) {
  torch::Tensor out[2], dx[2];
  for (int k = 0; k < 2; ++k) {
    ops::set_ops_impl(k == 0 ? OpsImpl::kAviary : OpsImpl::kTorch);
    auto xr = x.detach().requires_grad_();
    out[k] = rope(xr);
    if (k == 0) {
      ASSERT_TRUE(out[k].grad_fn() &&
                  std::string(out[k].grad_fn()->name()).find("RopeCudaFunction") !=
                      std::string::npos)
          << what;
    }
    dx[k] = torch::autograd::grad({out[k]}, {xr}, {grad})[0];
  }
  const double atol = x.scalar_type() == torch::kFloat32 ? 1e-5 : 1e-3;
  for (int g = 0; g < 2; ++g) {
    const auto want = (g == 0 ? exact : exact_grad).detach();
    const torch::Tensor* got = g == 0 ? out : dx;
    ASSERT_EQ(got[0].scalar_type(), x.scalar_type()) << what;
    ASSERT_EQ(got[0].sizes(), x.sizes()) << what;
    auto err = [&](const torch::Tensor& t) {
      return (t.to(torch::kCPU, torch::kFloat64) - want).abs().max().item<double>();
    };
    const double scale = std::max(1.0, want.abs().max().item<double>());
    EXPECT_LE(err(got[0]), 2 * err(got[1]) + atol * scale)
        << what << (g == 0 ? " out" : " dx") << ": kernel " << err(got[0]) << ", reference "
        << err(got[1]);
  }
}

TEST(OpsRopeCuda, KernelMatchesTheExactRotationWithinTwiceTheReferencesError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(29);
  struct Case {
    int64_t b, h, t, d;
    double theta, scale;
  };
  for (const Case c : {Case{2, 4, 37, 64, 10000.0, 1.0}, Case{1, 8, 300, 128, 1e6, 0.25},
                       Case{3, 2, 1, 128, 10000.0, 1.0}}) {
    for (auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
      auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
      // The model's layout; positions that restart (a packed row) and run past 256.
      auto x = torch::randn({c.b, c.t, c.h, c.d}, opts).transpose(1, 2);
      auto positions = (torch::arange(c.t, torch::kInt64) % 211 + 40)
                           .unsqueeze(0)
                           .expand({c.b, c.t})
                           .contiguous()
                           .to(torch::kCUDA);
      auto grad = torch::randn({c.b, c.h, c.t, c.d}, opts);
      const auto [exact, exact_grad] = exact_rope(x, positions, c.theta, c.scale, grad);
      ops::RopeTables tables = ops::rope_tables(
          positions, ops::rope_inv_freq(c.d, c.theta).to(torch::kCUDA) * c.scale, dtype);
      tables.positions = positions;
      tables.theta = c.theta;
      tables.position_scale = c.scale;
      ops::set_ops_impl(OpsImpl::kAviary);
      ASSERT_TRUE(ops::use_kernel(Op::kRope, x.device()));
      std::ostringstream what;
      what << c10::toString(dtype) << " B" << c.b << " H" << c.h << " T" << c.t << " D" << c.d;
      expect_rope_kernel_within_twice_the_reference(
          [&](const torch::Tensor& xr) { return ops::apply_rope(xr, tables); }, x, grad, exact,
          exact_grad, what.str());
    }
  }
}

// The positional entry point on the kernel: every convention (rotate-half and interleaved, 1-D
// and EVA-02's 2-D, partial rotary, positions broadcast over the batch), values and gradients,
// within twice the ATen reference's error of the rotation in fp64 (plus an ulp of the dtype).
TEST(OpsRopeCuda, PositionalSpecsMatchTheExactRotationInEveryConvention) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(31);
  struct Case {
    ops::RopeStyle style;
    bool two_d, broadcast;
    int64_t b, h, t, d, rotary_dim;
    double theta, scale;
  };
  const Case cases[] = {
      {ops::RopeStyle::kRotateHalf, false, false, 2, 4, 37, 128, 0, 1e6, 1.0},
      {ops::RopeStyle::kRotateHalf, false, true, 2, 3, 20, 96, 32, 10000.0, 0.5},
      {ops::RopeStyle::kInterleaved, false, false, 3, 2, 113, 256, 64, 10000.0, 1.0},
      {ops::RopeStyle::kInterleaved, true, true, 2, 4, 257, 64, 0, 10000.0, 16.0 / 14.0},
      {ops::RopeStyle::kInterleaved, true, false, 1, 2, 1, 128, 64, 100.0, 1.0},
  };
  for (const Case& c : cases) {
    ops::RopeSpec spec;
    spec.style = c.style;
    spec.rotary_dim = c.rotary_dim;
    spec.theta = c.theta;
    spec.position_scale = c.scale;
    const int64_t pb = c.broadcast ? 1 : c.b;
    auto positions = (c.two_d ? torch::randint(0, 16, {pb, c.t, 2}, torch::kInt64)
                              : torch::randint(0, 9000, {pb, c.t}, torch::kInt64))
                         .to(torch::kCUDA);
    for (auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
      auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
      auto x = torch::randn({c.b, c.t, c.h, c.d}, opts).transpose(1, 2);  // the model's layout
      auto grad = torch::randn({c.b, c.h, c.t, c.d}, opts);
      auto x64 = x.to(torch::kCPU, torch::kFloat64).requires_grad_();
      auto exact = ops::apply_rope_reference(x64, positions.cpu(), spec);
      auto exact_grad =
          torch::autograd::grad({exact}, {x64}, {grad.to(torch::kCPU, torch::kFloat64)})[0];
      std::ostringstream what;
      what << c10::toString(dtype) << (c.two_d ? " 2-D" : " 1-D")
           << (c.style == ops::RopeStyle::kInterleaved ? " interleaved" : " rotate-half")
           << " rotary_dim " << c.rotary_dim << " B" << c.b << " T" << c.t << " D" << c.d;
      expect_rope_kernel_within_twice_the_reference(
          [&](const torch::Tensor& xr) { return ops::apply_rope(xr, positions, spec); }, x, grad,
          exact, exact_grad, what.str());
    }
  }
}

TEST(OpsRopeCuda, TablesWithoutAnAngleSourceTakeTheReference) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAviary);
  auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  auto x = torch::randn({1, 2, 8, 64}, opts);
  auto positions =
      torch::arange(8, torch::TensorOptions().dtype(torch::kInt64).device(torch::kCUDA))
          .unsqueeze(0);
  auto tables = ops::rope_tables(positions, ops::rope_inv_freq(64, 10000.0), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(ops::apply_rope(x, tables), ops::apply_rope_reference(x, tables)));
}

TEST(OpsRopeCuda, AutoFollowsTheEmbeddedRecord) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAuto);
  const torch::Device device(torch::kCUDA, 0);
  EXPECT_EQ(ops::use_kernel(Op::kRope, device),
            ops::kernels_built() &&
                ValidationRecord::embedded().validated("rope", ops::device_sm(device)));
}

// One data-parallel training step over the NCCL engine at world size 1 (issue 4): the same
// update as a plain step, since the all-reduce of one rank is the identity.
TEST(DistNcclCuda, OneGpuTrainingStepMatchesAPlainStep) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!dist::nccl_available()) GTEST_SKIP() << "this build has no NCCL engine";
  CausalLMSpec spec;
  spec.config = AquilaConfig::from_hf_file(test::fixture("tiny-llama") + "/config.json");
  const auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCUDA);
  auto tokens = torch::randint(0, spec.config.vocab_size, {4, 33}, torch::kInt64).to(torch::kCUDA);
  OptimizerConfig optim;
  optim.lr = 1e-3;
  std::vector<torch::Tensor> after[2];
  double loss[2];
  for (int k = 0; k < 2; ++k) {
    auto model = build_causal_lm(spec, opts, 1234);
    model->train();
    NamedTensors named;
    std::vector<torch::Tensor> params;
    for (const auto& item : model->named_parameters()) {
      named.emplace_back(item.key(), item.value());
      params.push_back(item.value());
    }
    std::unique_ptr<dist::Comm> comm;
    std::unique_ptr<dist::DataParallel> ddp;
    std::unique_ptr<AdamW> optimizer;
    if (k == 1) {
      dist::DistEnvironment env;  // rank 0 of 1
      dist::CommOptions options;
      options.backend = "nccl";
      options.cuda = true;
      options.timeout_s = 60;
      comm = dist::open_comm(env, options);
      ASSERT_STREQ(comm->backend(), "nccl");
      dist::ParallelConfig parallel;
      parallel.backend = "nccl";
      ddp = std::make_unique<dist::DataParallel>(*comm, named, parallel);
      optimizer = make_adamw(ddp->owned(), optim);
      ddp->sync_next_backward();
    } else {
      optimizer = make_adamw(named, optim);
    }
    LmLossOptions loss_options;
    loss_options.bf16 = true;
    auto l = causal_lm_loss(*model, tokens, loss_options);
    l.backward();
    if (ddp) {
      ddp->finish_gradient_sync();
      ddp->clip_grad_norm(1.0);
    } else {
      clip_grad_norm(params, 1.0);
    }
    optimizer->step();
    if (ddp) ddp->sync_parameters();
    loss[k] = l.item<double>();
    for (const auto& p : params)
      after[k].push_back(p.detach().cpu());
  }
  EXPECT_EQ(loss[0], loss[1]);
  ASSERT_EQ(after[0].size(), after[1].size());
  for (size_t i = 0; i < after[0].size(); ++i)
    EXPECT_TRUE(torch::allclose(after[0][i], after[1][i], 1e-5, 1e-6)) << "parameter " << i;
}

// ---------------------------------------------------------------- LayerNorm

// y, dx, dweight and dbias of F.layer_norm in double on CPU, on the same (rounded) inputs.
std::vector<torch::Tensor> exact_layer_norm(const torch::Tensor& x, const torch::Tensor& w,
                                            const torch::Tensor& b, const torch::Tensor& dy,
                                            double eps) {
  auto xd = x.detach().to(torch::kCPU, torch::kFloat64).requires_grad_();
  auto wd = w.detach().to(torch::kCPU, torch::kFloat64).requires_grad_();
  auto bd = b.detach().to(torch::kCPU, torch::kFloat64).requires_grad_();
  auto centred = xd - xd.mean(-1, true);
  auto y = centred * torch::rsqrt(centred.pow(2).mean(-1, true) + eps) * wd + bd;
  auto g = torch::autograd::grad({y}, {xd, wd, bd}, {dy.to(torch::kCPU, torch::kFloat64)});
  return {y.detach(), g[0], g[1], g[2]};
}

// ops::layer_norm under `impl` with gradients: y, dx, dweight, dbias.
std::vector<torch::Tensor> run_layer_norm(OpsImpl impl, const torch::Tensor& x,
                                          const torch::Tensor& w, const torch::Tensor& b,
                                          const torch::Tensor& dy, double eps) {
  ops::set_ops_impl(impl);
  auto xr = x.detach().requires_grad_(), wr = w.detach().requires_grad_(),
       br = b.detach().requires_grad_();
  auto y = ops::layer_norm(xr, wr, br, eps);
  auto g = torch::autograd::grad({y}, {xr, wr, br}, {dy});
  return {y.detach(), g[0], g[1], g[2]};
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& exact) {
  return (a.to(torch::kCPU, torch::kFloat64) - exact).abs().max().item<double>();
}

TEST(OpsLayerNorm, CpuIsAtensFusedOpWithAndWithoutBias) {
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAviary);
  torch::manual_seed(3);
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    auto x = (torch::randn({3, 5, 96}) * 2 + 0.5).to(dtype);
    auto w = (1 + 0.1 * torch::randn({96})).to(dtype), b = (0.1 * torch::randn({96})).to(dtype);
    const auto exact = exact_layer_norm(x, w, b, torch::ones_like(x), 1e-5);
    auto y = ops::layer_norm(x, w, b, 1e-5);
    EXPECT_EQ(y.scalar_type(), dtype);
    EXPECT_LE(max_abs_diff(y, exact[0]), dtype == torch::kFloat32 ? 1e-5 : 0.05);
    EXPECT_TRUE(torch::equal(ops::layer_norm(x, w, torch::Tensor(), 1e-5),
                             at::layer_norm(x, {96}, w, {}, 1e-5)));
  }
}

TEST(OpsLayerNormCuda, KernelMatchesTheExactResultWithinTwiceTorchsError) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(17);
  const double eps = 1e-6;
  // 20000 columns: wider than the backward kernel takes (ATen's backward from the kernel's
  // statistics).
  for (auto dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    for (auto shape : std::vector<std::vector<int64_t>>{
             {1, 1}, {7, 113}, {3, 5, 1023}, {2, 4096}, {4, 8195}, {3, 20000}}) {
      auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
      const int64_t cols = shape.back();
      auto x = torch::randn(shape, opts) * 3 + 1;
      auto w = (1 + 0.1 * torch::randn({cols}, opts.dtype(torch::kFloat32))).to(dtype);
      auto b = (0.1 * torch::randn({cols}, opts.dtype(torch::kFloat32))).to(dtype);
      auto dy = torch::randn(shape, opts);
      ops::set_ops_impl(OpsImpl::kAviary);
      ASSERT_TRUE(ops::use_kernel(Op::kLayerNorm, x.device()));
      const auto ours = run_layer_norm(OpsImpl::kAviary, x, w, b, dy, eps);
      const auto torchs = run_layer_norm(OpsImpl::kTorch, x, w, b, dy, eps);
      const auto exact = exact_layer_norm(x, w, b, dy, eps);
      ASSERT_EQ(ours[0].sizes(), x.sizes());
      ASSERT_EQ(ours[0].scalar_type(), dtype);
      const char* names[] = {"y", "dx", "dweight", "dbias"};
      for (size_t t = 0; t < 4; ++t) {
        // Stated here (docs/kernels.md): twice PyTorch's error plus a rounding step of the
        // dtype, relative to the magnitude (weight gradients sum over every row).
        const double scale = std::max(1.0, exact[t].abs().max().item<double>());
        const double atol = (dtype == torch::kFloat32 ? 1e-5 : 4e-3) * scale;
        EXPECT_LE(max_abs_diff(ours[t], exact[t]), 2 * max_abs_diff(torchs[t], exact[t]) + atol)
            << c10::toString(dtype) << " " << x.sizes() << " " << names[t];
      }
    }
  }
}

TEST(OpsLayerNormCuda, StridedRowsAndNoBias) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(19);
  auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  auto x = torch::randn({37, 160}, opts).narrow(1, 3, 129);  // row stride 160
  auto w = torch::randn({129}, opts);
  ops::set_ops_impl(OpsImpl::kAviary);
  auto xr = x.detach().requires_grad_(), wr = w.detach().requires_grad_();
  auto y = ops::layer_norm(xr, wr, torch::Tensor(), 1e-5);
  auto g = torch::autograd::grad({y}, {xr, wr}, {torch::ones_like(y)});
  const auto exact = exact_layer_norm(x, w, torch::zeros_like(w), torch::ones_like(x), 1e-5);
  EXPECT_LE(max_abs_diff(y, exact[0]), 0.05);
  EXPECT_LE(max_abs_diff(g[0], exact[1]),
            0.05 * std::max(1.0, exact[1].abs().max().item<double>()));
  EXPECT_LE(max_abs_diff(g[1], exact[2]),
            0.05 * std::max(1.0, exact[2].abs().max().item<double>()));
}

TEST(OpsLayerNormCuda, AutoFollowsTheEmbeddedRecord) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAuto);
  const torch::Device device(torch::kCUDA, 0);
  EXPECT_EQ(ops::use_kernel(Op::kLayerNorm, device),
            ops::kernels_built() &&
                ValidationRecord::embedded().validated("layernorm", ops::device_sm(device)));
}

// ---------------------------------------------------------------- AdamW

// Tensors of awkward sizes (one element, an odd count, past one 64K-element kernel chunk, empty)
// with their state after `steps` earlier steps.
ops::AdamWTensors adamw_state(const torch::Device& device, torch::ScalarType grad_dtype) {
  ops::AdamWTensors t;
  const auto fp32 = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  int64_t step = 1;
  for (int64_t n : {int64_t{1}, int64_t{1001}, int64_t{65537}, int64_t{0}, int64_t{4096}}) {
    t.params.push_back(torch::randn({n}, fp32));
    t.grads.push_back((torch::randn({n}, fp32) * 0.1).to(grad_dtype));
    t.exp_avgs.push_back(torch::randn({n}, fp32) * 0.01);
    t.exp_avg_sqs.push_back(torch::rand({n}, fp32) * 1e-3);
    t.steps.push_back(step);
    step = step == 1 ? 7 : 1;  // two step counts in one call
  }
  return t;
}

ops::AdamWHyper adamw_hyper() {
  ops::AdamWHyper h;
  h.lr = 1e-2;
  h.beta1 = 0.9;
  h.beta2 = 0.95;
  h.eps = 1e-8;
  h.weight_decay = 0.1;
  return h;
}

TEST(OpsAdamW, RefusesMismatchedListsAndStepsBelowOne) {
  auto t = adamw_state(torch::kCPU, torch::kFloat32);
  t.grads.pop_back();
  auto e = expect_error(ErrorKind::kInvalidArgument, [&] { ops::adamw_step(t, adamw_hyper()); });
  EXPECT_TRUE(contains(e.what(), "5 parameters but 4 gradients")) << e.what();
  t = adamw_state(torch::kCPU, torch::kFloat32);
  t.steps[2] = 0;
  e = expect_error(ErrorKind::kInvalidArgument, [&] { ops::adamw_step(t, adamw_hyper()); });
  EXPECT_TRUE(contains(e.what(), "step count 0")) << e.what();
  ops::AdamWTensors none;
  ops::adamw_step(none, adamw_hyper());  // nothing to do
}

TEST(OpsAdamW, CpuWidensLowPrecisionGradientsForAtensFusedKernel) {
  torch::manual_seed(23);
  auto bf16 = adamw_state(torch::kCPU, torch::kBFloat16);
  ops::AdamWTensors widened;
  for (size_t i = 0; i < bf16.params.size(); ++i) {
    widened.params.push_back(bf16.params[i].clone());
    widened.grads.push_back(bf16.grads[i].to(torch::kFloat32));
    widened.exp_avgs.push_back(bf16.exp_avgs[i].clone());
    widened.exp_avg_sqs.push_back(bf16.exp_avg_sqs[i].clone());
    widened.steps.push_back(bf16.steps[i]);
  }
  const auto before = bf16.params[1].clone();
  ops::adamw_step(bf16, adamw_hyper());
  ops::adamw_step(widened, adamw_hyper());
  EXPECT_FALSE(torch::equal(bf16.params[1], before));
  for (size_t i = 0; i < bf16.params.size(); ++i) {
    EXPECT_TRUE(torch::equal(bf16.params[i], widened.params[i])) << i;
    EXPECT_TRUE(torch::equal(bf16.exp_avg_sqs[i], widened.exp_avg_sqs[i])) << i;
  }
}

TEST(OpsAdamWCuda, KernelIsTheSingleTensorArithmeticBitForBit) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAviary);
  const torch::Device cuda(torch::kCUDA, 0);
  ASSERT_TRUE(ops::use_kernel(Op::kAdamW, cuda));
  const auto h = adamw_hyper();
  for (auto grad_dtype : {torch::kFloat32, torch::kBFloat16, torch::kFloat16}) {
    torch::manual_seed(29);
    auto gpu = adamw_state(cuda, grad_dtype);
    // The CPU reference (kernels/adamw_reference.h) on copies, one call per step count.
    std::vector<torch::Tensor> p, g, m, v;
    for (size_t i = 0; i < gpu.params.size(); ++i) {
      p.push_back(gpu.params[i].cpu());
      g.push_back(gpu.grads[i].cpu());
      m.push_back(gpu.exp_avgs[i].cpu());
      v.push_back(gpu.exp_avg_sqs[i].cpu());
    }
    const int64_t calls = ops::kernel_calls(Op::kAdamW);
    for (int round = 0; round < 3; ++round) {
      ops::adamw_step(gpu, h);
      EXPECT_EQ(ops::kernel_calls(Op::kAdamW), calls + 2 * (round + 1));  // two step counts
      for (size_t i = 0; i < p.size(); ++i) {
        float* pp = p[i].data_ptr<float>();
        const void* gp = g[i].data_ptr();
        float* mp = m[i].data_ptr<float>();
        float* vp = v[i].data_ptr<float>();
        const int64_t n = p[i].numel();
        kernels::AdamWParams r;
        r.num_tensors = 1;
        r.params = &pp;
        r.grads = &gp;
        r.exp_avgs = &mp;
        r.exp_avg_sqs = &vp;
        r.numels = &n;
        r.grad_dtype = grad_dtype == torch::kFloat32    ? kernels::DType::f32
                       : grad_dtype == torch::kBFloat16 ? kernels::DType::bf16
                                                        : kernels::DType::f16;
        r.lr = h.lr;
        r.beta1 = h.beta1;
        r.beta2 = h.beta2;
        r.eps = h.eps;
        r.weight_decay = h.weight_decay;
        r.step = gpu.steps[i];
        kernels::adamw_reference(r);
      }
      for (auto& s : gpu.steps)
        ++s;
    }
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT_TRUE(torch::equal(gpu.params[i].cpu(), p[i])) << c10::toString(grad_dtype) << " " << i;
      EXPECT_TRUE(torch::equal(gpu.exp_avgs[i].cpu(), m[i]))
          << c10::toString(grad_dtype) << " " << i;
      EXPECT_TRUE(torch::equal(gpu.exp_avg_sqs[i].cpu(), v[i]))
          << c10::toString(grad_dtype) << " " << i;
    }
  }
}

TEST(OpsAdamWCuda, TheTrainersOptimizerAgreesWithTorchsFusedAdamW) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  if (!ops::kernels_built()) GTEST_SKIP() << "this build has no CUDA kernels";
  ImplGuard guard;
  torch::manual_seed(31);
  const auto fp32 = torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCUDA);
  NamedTensors start = {{"layers.0.weight", torch::randn({64, 48}, fp32)},
                        {"layers.0.norm.weight", torch::ones({48}, fp32)},
                        {"head.weight", torch::randn({1000, 3}, fp32)}};
  std::vector<torch::Tensor> grads;
  for (const auto& [name, p] : start)
    grads.push_back(torch::randn_like(p) * 0.1);
  std::vector<torch::Tensor> after[2];
  for (int k = 0; k < 2; ++k) {
    ops::set_ops_impl(k == 0 ? OpsImpl::kAviary : OpsImpl::kTorch);
    NamedTensors named;
    for (const auto& [name, p] : start)
      named.emplace_back(name, p.clone().requires_grad_());
    OptimizerConfig config;
    config.lr = 1e-2;
    auto optimizer = make_adamw(named, config);
    const int64_t calls = ops::kernel_calls(Op::kAdamW);
    for (int step = 0; step < 4; ++step) {
      for (size_t i = 0; i < named.size(); ++i)
        named[i].second.mutable_grad() = grads[i] * (1 + step);
      optimizer->step();
    }
    // One launch per param group and step (decay, no-decay) under aviary; none under torch.
    EXPECT_EQ(ops::kernel_calls(Op::kAdamW), calls + (k == 0 ? 8 : 0));
    for (const auto& [name, p] : named)
      after[k].push_back(p.detach().cpu());
  }
  // The kernel is the single-tensor arithmetic, ATen's fused kernel another rounding of it.
  for (size_t i = 0; i < after[0].size(); ++i)
    EXPECT_TRUE(torch::allclose(after[0][i], after[1][i], 1e-6, 1e-7)) << start[i].first;
}

TEST(OpsAdamWCuda, AutoFollowsTheEmbeddedRecord) {
  if (!have_cuda()) GTEST_SKIP() << "no CUDA device";
  ImplGuard guard;
  ops::set_ops_impl(OpsImpl::kAuto);
  const torch::Device device(torch::kCUDA, 0);
  EXPECT_EQ(ops::use_kernel(Op::kAdamW, device),
            ops::kernels_built() &&
                ValidationRecord::embedded().validated("adamw", ops::device_sm(device)));
}

}  // namespace
}  // namespace aviary
