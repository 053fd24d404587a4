#include "aviary/train/memory_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "aviary/dist/comm.h"
#include "aviary/dist/data_parallel.h"
#include "aviary/dist/fsdp.h"
#include "aviary/models/aquila.h"
#include "aviary/ops/impl.h"
#include "aviary/train/optimizer.h"
#include "expect_error.h"
#include "test_util.h"

namespace aviary {
namespace {

AquilaConfig tiny(int64_t hidden, int64_t inter, int64_t heads, int64_t kv_heads, int64_t vocab) {
  AquilaConfig c;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_hidden_layers = 2;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.vocab_size = vocab;
  c.max_position_embeddings = 256;
  return c;
}

struct Case {
  const char* name;
  AquilaConfig config;
  int64_t micro_batch, seq_len;
  const char* precision;
};

// Activation-heavy and weight-heavy shapes (fewer tokens than hidden units: weight gradients in
// transit dominate the backward), GQA and MHA, both precisions.
std::vector<Case> tiny_cases() {
  return {{"gqa-64", tiny(64, 176, 4, 2, 512), 4, 64, "fp32"},
          {"mha-128", tiny(128, 352, 4, 4, 1000), 2, 128, "fp32"},
          {"gqa-96", tiny(96, 256, 6, 2, 320), 3, 96, "fp32"},
          {"few-tokens", tiny(128, 352, 4, 2, 256), 1, 64, "fp32"},
          {"gqa-64-bf16", tiny(64, 176, 4, 2, 512), 4, 64, "bf16"}};
}

// One intra-op thread while measuring (CPU SDPA's buffers grow with the thread count), restored
// afterwards for the other suites in this executable.
class OneThread {
 public:
  OneThread() : saved_(torch::get_num_threads()) { torch::set_num_threads(1); }
  ~OneThread() { torch::set_num_threads(saved_); }

 private:
  int saved_;
};

double relative_error(int64_t planned, int64_t measured) {
  return std::abs(static_cast<double>(planned) - static_cast<double>(measured)) /
         static_cast<double>(measured);
}

// ops.impl for the measurement, with the plan told the same; the process's setting is restored.
class ImplForPlan {
 public:
  explicit ImplForPlan(bool cpu_loops) : saved_(ops::ops_impl()) {
    ops::set_ops_impl(cpu_loops ? ops::OpsImpl::kAuto : ops::OpsImpl::kTorch);
  }
  ~ImplForPlan() { ops::set_ops_impl(saved_); }

 private:
  ops::OpsImpl saved_;
};

// Plans and measures one step (accumulation 2, what the measurement runs) with the given
// implementation and checks the plan row by row; returns the plan.
MemoryPlan expect_plan_matches_measurement(const std::string& name, const AquilaConfig& config,
                                           MemoryPlanInputs in, bool cpu_loops) {
  ImplForPlan impl(cpu_loops);
  in.cpu_loops = cpu_loops;
  in.accumulation = 2;
  const auto plan = plan_memory(config, in);
  const auto got = measure_training_step(config, in);
  const int64_t planned_act =
      in.activation_checkpointing ? plan.activations_checkpointed : *plan.activations_full;
  SCOPED_TRACE(name + (in.activation_checkpointing ? " ckpt on" : " ckpt off") +
               (cpu_loops ? " fused" : " aten") + ": planned " + plan.to_json().dump() +
               " measured " + got.to_json().dump());
  // Parameters, gradients and AdamW's moments are exact up to a few small tensors (rope's
  // inv_freq, AdamW's step scalars).
  EXPECT_LT(relative_error(plan.weights, got.weights), 0.01);
  EXPECT_LT(relative_error(plan.gradients, got.gradients), 0.01);
  EXPECT_LT(relative_error(plan.optimizer, got.optimizer), 0.01);
  // The bound: 10%.
  EXPECT_LT(relative_error(planned_act, got.activations), 0.10);
  // At one process the total is the sum of the rows: the step's peak with accumulation.
  EXPECT_LT(relative_error(plan.total, got.total), 0.10);
  return plan;
}

MemoryPlanInputs step_inputs(int64_t micro_batch, int64_t seq_len, const std::string& precision,
                             bool checkpointing) {
  MemoryPlanInputs in;
  in.micro_batch = micro_batch;
  in.seq_len = seq_len;
  in.precision = precision;
  in.activation_checkpointing = checkpointing;
  return in;
}

// The claim: the plan agrees with what is measured within 10%, row by row, with Aviary's
// fused CPU ops (the default) and with ATen's (ops.impl torch), which keep more.
TEST(MemoryPlan, AgreesWithMeasuredStepWithin10Percent) {
  OneThread one_thread;
  for (const auto& c : tiny_cases()) {
    for (bool checkpointing : {false, true}) {
      for (bool cpu_loops : {true, false}) {
        expect_plan_matches_measurement(
            c.name, c.config, step_inputs(c.micro_batch, c.seq_len, c.precision, checkpointing),
            cpu_loops);
      }
    }
  }
}

// Packed documents (two per row, as the measurement packs them) at a length where a [L, L] mask
// is a fifth of the activations: Aviary's CPU attention runs each document alone and makes no mask;
// ATen's SDPA (ops.impl torch) gets the dense one and keeps an additive copy per layer.
TEST(MemoryPlan, DocumentMaskAgreesWithMeasuredStepWithin10Percent) {
  OneThread one_thread;
  for (const char* precision : {"fp32", "bf16"}) {
    for (bool checkpointing : {false, true}) {
      int64_t activations[2] = {0, 0};
      for (bool cpu_loops : {true, false}) {
        auto in = step_inputs(2, 256, precision, checkpointing);
        in.document_mask = true;
        const auto plan = expect_plan_matches_measurement(std::string("documents-") + precision,
                                                          tiny(64, 176, 4, 2, 512), in, cpu_loops);
        activations[cpu_loops ? 0 : 1] =
            checkpointing ? plan.activations_checkpointed : *plan.activations_full;
      }
      EXPECT_LT(activations[0], activations[1]) << precision;
    }
  }
}

LoraTrainingConfig lora_config(std::vector<std::string> targets, double dropout,
                               const char* base_dtype = "auto") {
  LoraTrainingConfig lora;
  lora.enabled = true;
  lora.adapter.r = 4;
  lora.adapter.alpha = 8;
  lora.adapter.dropout = dropout;
  lora.adapter.targets = std::move(targets);
  lora.base_dtype = base_dtype;
  return lora;
}

// LoRA: a frozen base (bf16 under bf16 autocast), adapters on some or all projections, with and
// without dropout (which keeps a mask and an input copy per adapter): the same 10% bound.
TEST(MemoryPlan, LoraAgreesWithMeasuredStepWithin10Percent) {
  OneThread one_thread;
  const std::vector<std::string> all = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                        "gate_proj", "up_proj", "down_proj"};
  struct LoraCase {
    const char* name;
    AquilaConfig config;
    int64_t micro_batch, seq_len;
    const char* precision;
    LoraTrainingConfig lora;
  };
  const std::vector<LoraCase> cases = {
      {"all-fp32", tiny(64, 176, 4, 2, 512), 4, 64, "fp32", lora_config(all, 0.0)},
      {"all-dropout-fp32", tiny(128, 352, 4, 4, 1000), 2, 128, "fp32", lora_config(all, 0.1)},
      {"qv-fp32", tiny(96, 256, 6, 2, 320), 3, 96, "fp32", lora_config({"q_proj", "v_proj"}, 0.05)},
      {"all-bf16-base", tiny(64, 176, 4, 2, 512), 4, 64, "bf16", lora_config(all, 0.0)},
      {"all-dropout-bf16", tiny(64, 176, 4, 2, 512), 4, 64, "bf16", lora_config(all, 0.1)},
      {"qv-bf16-fp32-base", tiny(64, 176, 4, 2, 512), 4, 64, "bf16",
       lora_config({"q_proj", "v_proj"}, 0.0, "fp32")}};
  for (const auto& c : cases) {
    for (bool checkpointing : {false, true}) {
      for (bool cpu_loops : {true, false}) {
        auto in = step_inputs(c.micro_batch, c.seq_len, c.precision, checkpointing);
        in.lora = c.lora;
        const auto plan = expect_plan_matches_measurement(c.name, c.config, in, cpu_loops);
        EXPECT_LT(plan.trainable, c.config.num_parameters() / 4);
      }
    }
  }
}

TEST(MemoryPlan, LoraNeedsLessThanFullTrainingAndRefusesFsdp) {
  const auto c = tiny(128, 352, 4, 2, 1000);
  MemoryPlanInputs in;
  in.micro_batch = 2;
  in.seq_len = 128;
  const auto full = plan_memory(c, in);
  in.lora = lora_config({"q_proj", "v_proj"}, 0.0);
  const auto lora = plan_memory(c, in);
  EXPECT_EQ(lora.trainable, 2 * (4 * (128 + 128) + 4 * (128 + 64)));
  EXPECT_EQ(lora.optimizer, 2 * 4 * lora.trainable);
  EXPECT_LT(lora.total, full.total);
  EXPECT_LT(*lora.activations_full, *full.activations_full);
  in.world = 2;
  in.strategy = "fsdp";
  auto e = test::expect_error(ErrorKind::kInvalidArgument, [&] { plan_memory(c, in); });
  EXPECT_NE(std::string(e.what()).find("parallel.strategy"), std::string::npos) << e.what();
  in.strategy = "zero2";
  const auto zero2 = plan_memory(c, in);
  EXPECT_LE(zero2.optimizer, lora.optimizer);
}

TEST(MemoryPlan, CheckpointingSavesActivations) {
  const auto c = tiny(128, 352, 4, 4, 1000);
  MemoryPlanInputs in;
  in.micro_batch = 8;
  in.seq_len = 256;
  const auto plan = plan_memory(c, in);
  EXPECT_LT(plan.activations_checkpointed, *plan.activations_full);
  EXPECT_FALSE(plan.checkpointing);
  EXPECT_EQ(plan.total, plan.weights + plan.gradients + plan.optimizer + *plan.activations_full);
}

// ------------------------------------------------------------------- sharded arithmetic

// One rank of a larger world, simulated in this process: collectives complete at once and
// allocate exactly what the real engines' outputs need (all-gather repeats this rank's shard, a
// reduce-scatter keeps this rank's slice), so the strategies' memory is theirs.
class SimulatedRank : public dist::Comm {
 public:
  SimulatedRank(int rank, int world) : rank_(rank), world_(world) {}
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  const char* backend() const override { return "simulated"; }

  std::shared_ptr<dist::Work> all_reduce_async(torch::Tensor, dist::ReduceOp) override {
    return done();
  }
  std::shared_ptr<dist::Work> reduce_async(torch::Tensor, int, dist::ReduceOp) override {
    return done();
  }
  std::shared_ptr<dist::Work> broadcast_async(torch::Tensor, int) override { return done(); }
  std::shared_ptr<dist::Work> all_gather_async(torch::Tensor output, torch::Tensor input) override {
    torch::NoGradGuard no_grad;
    output.view({world_, -1}).copy_(input.reshape({1, -1}).expand({world_, input.numel()}));
    return done();
  }
  std::shared_ptr<dist::Work> reduce_scatter_async(torch::Tensor output, torch::Tensor input,
                                                   dist::ReduceOp) override {
    torch::NoGradGuard no_grad;
    output.copy_(input.narrow(0, rank_ * output.numel(), output.numel()));
    return done();
  }
  void barrier() override {}
  std::unique_ptr<dist::Comm> split(int, int) override {
    throw std::runtime_error("SimulatedRank cannot split");
  }
  [[noreturn]] void abort(const std::string& why) override { throw std::runtime_error(why); }

 private:
  struct Done : dist::Work {
    void wait() override {}
  };
  static std::shared_ptr<dist::Work> done() { return std::make_shared<Done>(); }
  int rank_, world_;
};

int64_t numel_of(const NamedTensors& named) {
  int64_t n = 0;
  for (const auto& [name, t] : named)
    n += t.numel();
  return n;
}

// zero1 / zero2: the plan's owners are DataParallel's, exactly, for every rank.
TEST(MemoryPlanSharded, ZeroOptimizerIsTheBusiestOwnersShard) {
  const auto c = tiny(64, 176, 4, 2, 512);
  const int64_t params = c.num_parameters();
  for (int world : {2, 3, 4, 7}) {
    AquilaForCausalLM model(c, torch::TensorOptions().dtype(torch::kFloat32));
    dist::DataParallel::NamedParams named;
    for (const auto& item : model->named_parameters())
      named.emplace_back(item.key(), item.value());
    int64_t busiest = 0, sum = 0;
    for (int r = 0; r < world; ++r) {
      SimulatedRank comm(r, world);
      dist::ParallelConfig parallel;
      parallel.strategy = "zero1";
      dist::DataParallel ddp(comm, named, parallel);
      const int64_t owned = numel_of(ddp.owned());
      busiest = std::max(busiest, owned);
      sum += owned;
    }
    ASSERT_EQ(sum, params);
    MemoryPlanInputs in;
    in.world = world;
    for (const char* strategy : {"zero1", "zero2"}) {
      in.strategy = strategy;
      const auto plan = plan_memory(c, in);
      SCOPED_TRACE(std::string(strategy) + " x" + std::to_string(world));
      EXPECT_EQ(plan.optimizer, 8 * busiest);
      EXPECT_EQ(plan.weights, 4 * params);
      // As implemented, every rank accumulates the full .grad and every bucket's fp32 buffer
      // during backward; zero2 drops the other owners' gradients only afterwards.
      EXPECT_EQ(plan.gradients, 8 * params);
      EXPECT_EQ(plan.gradients_after_sync,
                std::string(strategy) == "zero2" ? 4 * busiest : 4 * params);
    }
    in.strategy = "ddp";
    in.reduce_dtype = "bf16";
    const auto ddp = plan_memory(c, in);
    EXPECT_EQ(ddp.optimizer, 8 * params);
    EXPECT_EQ(ddp.gradients, 6 * params);
  }
}

// fsdp: shards are each unit's two segments padded to a multiple of W, as FSDP builds them.
TEST(MemoryPlanSharded, FsdpShardsArePaddedSegments) {
  const auto c = tiny(64, 176, 4, 2, 500);  // odd sizes, so that padding shows
  const int64_t h = c.hidden_size, kv = c.num_key_value_heads * c.head_dim();
  const int64_t block_decay = 2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size;
  const int64_t root_decay = 2 * c.vocab_size * h;
  OptimizerConfig optim;
  for (int world : {3, 4, 7}) {
    auto ceil_div = [&](int64_t n) { return (n + world - 1) / world; };
    const int64_t shard = c.num_hidden_layers * (ceil_div(block_decay) + ceil_div(2 * h)) +
                          ceil_div(root_decay) + ceil_div(h);
    const int64_t padded_block = world * (ceil_div(block_decay) + ceil_div(2 * h));
    const int64_t padded_root = world * (ceil_div(root_decay) + ceil_div(h));
    // The real FSDP's shards on every rank.
    for (int r = 0; r < world; ++r) {
      AquilaForCausalLM model(c, torch::TensorOptions().dtype(torch::kFloat32));
      std::vector<dist::FullyShardedDataParallel::Unit> units;
      dist::FullyShardedDataParallel::Unit root;
      root.name = "root";
      for (const auto& item : model->named_parameters()) {
        if (item.key().rfind("model.layers.", 0) != 0)
          root.params.emplace_back(item.key(), item.value());
      }
      size_t index = 0;
      for (const auto& layer : *model->model->layers) {
        dist::FullyShardedDataParallel::Unit unit;
        unit.name = "model.layers." + std::to_string(index++);
        unit.block = layer->as<nn::DecoderBlock>();
        for (const auto& item : layer->named_parameters())
          unit.params.emplace_back(unit.name + "." + item.key(), item.value());
        units.push_back(std::move(unit));
      }
      units.push_back(std::move(root));
      SimulatedRank comm(r, world);
      dist::FullyShardedDataParallel fsdp(
          comm, std::move(units), [&](const std::string& name) { return optim.is_no_decay(name); });
      EXPECT_EQ(numel_of(fsdp.decay_shards()) + numel_of(fsdp.no_decay_shards()), shard)
          << "rank " << r << " of " << world;
    }
    MemoryPlanInputs in;
    in.world = world;
    in.strategy = "fsdp";
    const auto plan = plan_memory(c, in);
    SCOPED_TRACE("fsdp x" + std::to_string(world));
    EXPECT_EQ(plan.optimizer, 8 * shard);
    EXPECT_EQ(plan.weights, 4 * (shard + padded_root + 2 * padded_block));
    // At the root unit's turn after backward: the blocks' shard gradients (their reduce-scatter
    // outputs; one block's flat at a time, done by then), the root unit's full .grad, its padded
    // flat and its reduce-scatter output.
    const int64_t block_shard = ceil_div(block_decay) + ceil_div(2 * h);
    EXPECT_EQ(plan.gradients, 4 * (c.num_hidden_layers * block_shard + (root_decay + h) +
                                   padded_root + padded_root / world));
    EXPECT_EQ(plan.gradients_after_sync, 4 * shard);
    EXPECT_TRUE(plan.checkpointing);  // forced, as the trainer does
    EXPECT_FALSE(plan.activations_full.has_value());
  }
}

TEST(MemoryPlanSharded, OneProcessIsThePlainStepForEveryStrategy) {
  const auto c = tiny(64, 176, 4, 2, 512);
  MemoryPlanInputs in;
  const auto ddp = plan_memory(c, in);
  for (const char* strategy : {"zero1", "zero2", "fsdp"}) {
    in.strategy = strategy;
    const auto plan = plan_memory(c, in);
    EXPECT_EQ(plan.to_json()["total"], ddp.to_json()["total"]) << strategy;
    EXPECT_TRUE(plan.activations_full.has_value()) << strategy;
  }
  EXPECT_EQ(ddp.gradients, 4 * c.num_parameters());
}

// The sharded strategies measured on simulated ranks of a world of 4: the trainer's wrapping, the
// real DataParallel / FSDP code, the counting allocator. The plan speaks for the busiest rank.
TEST(MemoryPlanSharded, SimulatedRanksMatchThePlan) {
  OneThread one_thread;
  struct Sharded {
    AquilaConfig config;
    int64_t micro_batch, seq_len;
    const char* precision;
    bool checkpointing;
    const char* reduce_dtype;
    const char* fsdp_param_dtype;
  };
  // Activation-heavy in fp32 without checkpointing; weight-heavy in bf16 with checkpointing, bf16
  // gradient buckets, and fsdp gathering in bf16.
  const std::vector<Sharded> cases = {
      {tiny(64, 176, 4, 2, 512), 4, 64, "fp32", false, "fp32", "fp32"},
      {tiny(128, 352, 4, 4, 1000), 1, 32, "bf16", true, "bf16", "bf16"}};
  for (const auto& c : cases) {
    for (const char* strategy : {"ddp", "zero1", "zero2", "fsdp"}) {
      MemoryPlanInputs in;
      in.world = 4;
      in.strategy = strategy;
      in.micro_batch = c.micro_batch;
      in.seq_len = c.seq_len;
      in.precision = c.precision;
      in.activation_checkpointing = c.checkpointing;
      in.reduce_dtype = c.reduce_dtype;
      if (std::string(strategy) == "fsdp") in.param_dtype = c.fsdp_param_dtype;
      in.accumulation = 2;
      const auto plan = plan_memory(c.config, in);
      MeasuredMemory busiest;
      for (int rank = 0; rank < 4; ++rank) {
        SimulatedRank comm(rank, 4);
        const auto got = measure_training_step(c.config, in, &comm);
        busiest.optimizer = std::max(busiest.optimizer, got.optimizer);
        busiest.total = std::max(busiest.total, got.total);
      }
      SCOPED_TRACE(std::string(strategy) + " " + c.precision + ": planned " +
                   plan.to_json().dump() + " measured (busiest rank) " + busiest.to_json().dump());
      EXPECT_LT(relative_error(plan.optimizer, busiest.optimizer), 0.01);
      EXPECT_LT(relative_error(plan.total, busiest.total), 0.10);
    }
  }
}

TEST(MemoryPlan, RejectsBadInputs) {
  const auto c = tiny(64, 176, 4, 2, 512);
  MemoryPlanInputs in;
  in.strategy = "zero3";
  EXPECT_NE(std::string(
                test::expect_error(ErrorKind::kInvalidArgument, [&] { plan_memory(c, in); }).what())
                .find("zero3"),
            std::string::npos);
  in.strategy = "ddp";
  in.world = 4;
  test::expect_error(ErrorKind::kInvalidArgument, [&] { measure_training_step(c, in); });
}

TEST(MemoryPlan, ReadsTheTrainingConfigLikeTheTrainer) {
  // init_from: the sizes come from the model directory's config.json.
  Json config = {{"model", {{"arch", "llama"}, {"init_from", test::fixture("tiny-llama")}}},
                 {"data", {{"seq_len", 128}, {"datasets", {"unused"}}}},
                 {"train", {{"global_batch", 12}, {"precision", "bf16"}, {"steps", 5}}},
                 {"parallel", {{"strategy", "zero2"}, {"reduce_dtype", "bf16"}}}};
  auto read = read_plan_config(config, "test.yaml", 4);
  const auto hf = AquilaConfig::from_hf_file(test::fixture("tiny-llama/config.json"));
  EXPECT_EQ(read.model.num_parameters(), hf.num_parameters());
  EXPECT_EQ(read.model.hidden_size, 32);
  EXPECT_EQ(read.inputs.world, 4);
  EXPECT_EQ(read.inputs.micro_batch, 3);  // global_batch / world, as the trainer
  EXPECT_EQ(read.inputs.accumulation, 1);
  EXPECT_EQ(read.inputs.seq_len, 128);
  EXPECT_EQ(read.inputs.precision, "bf16");
  EXPECT_EQ(read.inputs.strategy, "zero2");
  EXPECT_EQ(read.inputs.reduce_dtype, "bf16");
  EXPECT_EQ(read.inputs.device, "cpu");
  EXPECT_TRUE(read.notes.empty());
  // A batch the trainer would refuse is planned, with a note; a wrong value is an error.
  config["train"]["micro_batch"] = 5;
  EXPECT_EQ(read_plan_config(config, "test.yaml", 4).notes.size(), 1u);
  config["train"]["precision"] = "fp16";
  auto e = test::expect_error(ErrorKind::kInvalidArgument,
                              [&] { read_plan_config(config, "test.yaml", 4); });
  EXPECT_NE(std::string(e.what()).find("train.precision"), std::string::npos) << e.what();
}

TEST(MemoryPlanCli, PrintsEveryStrategyAndRefusesMeasureAcrossRanks) {
  const std::string config = std::string(AVIARY_SOURCE_DIR) + "/configs/quickstart.yaml";
  auto r = test::run_cli("plan --config " + config + " --nproc 4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* s : {"### ddp x 4 (the config's strategy)", "### zero1 x 4", "### zero2 x 4",
                        "### fsdp x 4", "activations (ckpt off) | n/a"}) {
    EXPECT_NE(r.output.find(s), std::string::npos) << s << "\n" << r.output;
  }
  r = test::run_cli("plan --config " + config + " --nproc 4 --measure");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--nproc 1"), std::string::npos) << r.output;
  r = test::run_cli("plan --config " + config + " --nproc 2 --json --set train.precision=bf16");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = Json::parse(r.output.substr(r.output.find('{')));
  EXPECT_EQ(j["precision"], "bf16");
  EXPECT_EQ(j["plans"].size(), 4u);
  EXPECT_EQ(j["plans"][3]["strategy"], "fsdp");

  // A LoRA config whose init_from is not downloaded: the error points to --model, which plans it
  // (adapters only; fsdp is refused with LoRA, so it has no table).
  const std::string lora = std::string(AVIARY_SOURCE_DIR) + "/configs/aquila-7b-lora.yaml";
  r = test::run_cli("plan --config " + lora + " --nproc 2");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--model"), std::string::npos) << r.output;
  r = test::run_cli("plan --config " + lora + " --nproc 2 --model aquila-7b");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* s : {"LoRA r 8 on 7 projections", "### ddp x 2 (the config's strategy)",
                        "fsdp: refused with LoRA", "frozen base in bf16"}) {
    EXPECT_NE(r.output.find(s), std::string::npos) << s << "\n" << r.output;
  }
  EXPECT_EQ(r.output.find("### fsdp"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace aviary
