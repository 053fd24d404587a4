// Bad input through the real CLI: each case must exit non-zero with one clear error line that
// names the file, tensor or key at fault.
#include <gtest/gtest.h>

#include <filesystem>

#include <nlohmann/json.hpp>

#include "test_util.h"

namespace fs = std::filesystem;

namespace aviary {
namespace {

// A writable copy of the tiny fixture model.
std::string copy_tiny_model(const test::TempDir& dir) {
  const std::string dst = dir.file("model");
  fs::copy(test::fixture("tiny-llama"), dst, fs::copy_options::recursive);
  return dst;
}

void edit_config(const std::string& model, const std::function<void(nlohmann::json&)>& edit) {
  auto j = nlohmann::json::parse(test::read_file(model + "/config.json"));
  edit(j);
  test::write_file(model + "/config.json", j.dump(1));
}

// Runs `aviary generate` on `model` and checks the error contract.
void expect_one_line_error(const std::string& model, const std::vector<std::string>& needles) {
  auto r = test::run_cli("generate --model '" + model + "' --prompt hi -n 2");
  EXPECT_NE(r.exit_code, 0) << r.output;
  ASSERT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  for (const auto& n : needles)
    EXPECT_NE(r.output.find(n), std::string::npos) << n << " in " << r.output;
}

TEST(CliErrors, GenerateWorksOnTheIntactFixture) {
  auto r = test::run_cli("generate --model '" + test::fixture("tiny-llama") +
                         "' --prompt 'The quick brown fox' -n 8 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = nlohmann::json::parse(r.output.substr(r.output.find('[')));
  EXPECT_EQ(j[0]["tokens"].size(), 8u);
}

TEST(CliErrors, MissingConfigField) {
  test::TempDir dir;
  auto model = copy_tiny_model(dir);
  edit_config(model, [](nlohmann::json& j) { j.erase("hidden_size"); });
  expect_one_line_error(model, {"config.json", "hidden_size", "missing"});
}

TEST(CliErrors, TruncatedSafetensors) {
  test::TempDir dir;
  auto model = copy_tiny_model(dir);
  fs::resize_file(model + "/model.safetensors", fs::file_size(model + "/model.safetensors") / 2);
  expect_one_line_error(model, {"model.safetensors", "truncated"});
}

TEST(CliErrors, SafetensorsHeaderOffsetsLie) {
  test::TempDir dir;
  auto model = copy_tiny_model(dir);
  std::string bytes = test::read_file(model + "/model.safetensors");
  // Rewrite the header's first data_offsets end to overlap the next tensor, keeping its length.
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  std::string header = bytes.substr(8, n);
  auto j = nlohmann::json::parse(header);
  std::string victim;
  for (auto& [name, info] : j.items()) {
    if (name == "__metadata__") continue;
    if (info["data_offsets"][0].get<uint64_t>() == 0) {
      info["data_offsets"][1] = info["data_offsets"][1].get<uint64_t>() + 4;
      victim = name;
    }
  }
  std::string new_header = j.dump();
  ASSERT_LE(new_header.size(), header.size());
  new_header.append(header.size() - new_header.size(), ' ');
  bytes.replace(8, n, new_header);
  test::write_file(model + "/model.safetensors", bytes);
  expect_one_line_error(model, {"model.safetensors", victim});
}

TEST(CliErrors, ShapeMismatchBetweenConfigAndWeights) {
  test::TempDir dir;
  auto model = copy_tiny_model(dir);
  edit_config(model, [](nlohmann::json& j) { j["intermediate_size"] = 96; });
  expect_one_line_error(model, {"model.safetensors", "mlp", "shape mismatch"});
}

TEST(CliErrors, MissingTokenizer) {
  test::TempDir dir;
  auto model = copy_tiny_model(dir);
  fs::remove(model + "/tokenizer.json");
  expect_one_line_error(model, {model, "tokenizer"});
}

TEST(CliErrors, UnknownArchitecture) {
  test::TempDir dir;
  auto model = copy_tiny_model(dir);
  edit_config(model, [](nlohmann::json& j) { j["architectures"] = {"GPTNeoXForCausalLM"}; });
  expect_one_line_error(model, {"config.json", "architectures", "GPTNeoXForCausalLM"});
}

TEST(CliErrors, MoreLayersInConfigThanInWeights) {
  test::TempDir dir;
  auto model = copy_tiny_model(dir);
  edit_config(model, [](nlohmann::json& j) { j["num_hidden_layers"] = 3; });
  expect_one_line_error(model, {"model.layers.2", "num_hidden_layers"});
}

TEST(CliErrors, MissingModelDirectory) {
  expect_one_line_error("/nonexistent/model", {"/nonexistent/model", "does not exist"});
}

TEST(CliErrors, TokenizerEncodeDecodeRoundTrip) {
  const std::string tok = test::fixture("tiny-llama");
  auto enc = test::run_cli("tokenizer encode -t '" + tok + "' --text '天下大事 hello'");
  ASSERT_EQ(enc.exit_code, 0) << enc.output;
  auto dec = test::run_cli("tokenizer decode -t '" + tok + "' --ids '" + enc.output + "'");
  ASSERT_EQ(dec.exit_code, 0) << dec.output;
  EXPECT_EQ(dec.output, "天下大事 hello\n");
  auto bad = test::run_cli("tokenizer decode -t '" + tok + "' --ids '5 99999'");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("99999"), std::string::npos) << bad.output;
}

TEST(CliErrors, ChatReadsTurnsFromStdin) {
  test::TempDir dir;
  test::write_file(dir.file("turns.txt"), "你好\n/reset\nhello again\n/exit\n");
  const std::string model = test::fixture("tiny-llama");
  auto r = test::run_cli("chat -m '" + model + "' --template aquila-chat -n 4 < '" +
                         dir.file("turns.txt") + "'");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  // Two replies, each ended by a newline (a reply may itself contain newlines).
  EXPECT_GE(std::count(r.output.begin(), r.output.end(), '\n'), 2) << r.output;
  auto no_template = test::run_cli("chat -m '" + model + "' < /dev/null");
  EXPECT_NE(no_template.exit_code, 0);
  EXPECT_NE(no_template.output.find("--template"), std::string::npos) << no_template.output;
}

TEST(CliErrors, InfoRuns) {
  auto r = test::run_cli("info");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("libtorch"), std::string::npos);
}

}  // namespace
}  // namespace aviary
