#include <gtest/gtest.h>

#include "aviary/core/config.h"
#include "aviary/core/error.h"
#include "aviary/models/aquila_config.h"
#include "expect_error.h"
#include "test_util.h"

namespace aviary {
namespace {

TEST(Config, ReadsYamlWithTypes) {
  test::TempDir dir;
  test::write_file(dir.file("c.yaml"),
                   "model:\n  hidden_size: 64\n  eps: 1e-5\n  name: x\n  on: true\n");
  Json j = load_config_file(dir.file("c.yaml"));
  ConfigReader root(j, "", "c.yaml");
  auto model = root.child("model");
  EXPECT_EQ(model.get_int("hidden_size"), 64);
  EXPECT_DOUBLE_EQ(model.get_double("eps"), 1e-5);
  EXPECT_EQ(model.get_string("name"), "x");
  EXPECT_TRUE(model.get_bool("on"));
  model.finish();
  root.finish();
}

TEST(Config, UnknownKeySuggestsTheClosest) {
  Json j = Json::parse(R"({"model": {"hiden_size": 3}})");
  ConfigReader root(j, "", "run.yaml");
  auto model = root.child("model");
  model.get_int("hidden_size", 8);
  auto e = test::expect_error([&] { model.finish(); });
  EXPECT_EQ(e.context(), "run.yaml: model.hiden_size");
  EXPECT_NE(e.hint().find("hidden_size"), std::string::npos);
}

TEST(Config, WrongTypeAndRangeNameTheKeyPath) {
  Json j = Json::parse(R"({"optim": {"lr": "fast", "steps": -1}})");
  ConfigReader root(j, "", "run.yaml");
  auto optim = root.child("optim");
  auto e1 = test::expect_error([&] { optim.get_double("lr"); });
  EXPECT_EQ(e1.context(), "run.yaml: optim.lr");
  EXPECT_NE(e1.message().find("expected a number"), std::string::npos);
  auto e2 = test::expect_error([&] { optim.get_int("steps", 1, 1); });
  EXPECT_NE(e2.message().find("out of range"), std::string::npos);
  auto e3 = test::expect_error([&] { optim.get_choice("missing", {"a", "b"}); });
  EXPECT_NE(e3.message().find("missing"), std::string::npos);
}

TEST(Config, OverridesParseYamlValues) {
  Json j = Json::parse(R"({"optim": {"lr": 1}})");
  apply_config_override(j, "optim.lr=3e-4");
  apply_config_override(j, "model.arch=aquila");
  apply_config_override(j, "data.paths=[a, b]");
  EXPECT_DOUBLE_EQ(j["optim"]["lr"].get<double>(), 3e-4);
  EXPECT_EQ(j["model"]["arch"], "aquila");
  EXPECT_EQ(j["data"]["paths"].size(), 2u);
  EXPECT_THROW(apply_config_override(j, "novalue"), Error);
  EXPECT_THROW(apply_config_override(j, "optim.lr.x=1"), Error);
}

TEST(Config, InvalidYamlNamesFileAndLine) {
  test::TempDir dir;
  test::write_file(dir.file("bad.yaml"), "model:\n  a: [1, 2\n");
  auto e = test::expect_error([&] { load_config_file(dir.file("bad.yaml")); });
  EXPECT_NE(e.context().find("bad.yaml"), std::string::npos);
  EXPECT_NE(e.message().find("line"), std::string::npos);
}

TEST(AquilaConfig, ReadsLegacyAndV5RopeFormats) {
  Json legacy = aquila_preset("aquila2-34b");
  legacy["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  auto a = AquilaConfig::from_hf_json(legacy, "config.json");
  EXPECT_EQ(a.num_key_value_heads, 8);
  EXPECT_EQ(a.rope_scaling.type, "linear");
  EXPECT_DOUBLE_EQ(a.rope_scaling.factor, 4.0);
  Json v5 = aquila_preset("aquila-7b");
  v5["rope_parameters"] = {{"rope_type", "dynamic"}, {"factor", 2.0}, {"rope_theta", 1e6}};
  auto b = AquilaConfig::from_hf_json(v5, "config.json");
  EXPECT_EQ(b.rope_scaling.type, "dynamic");
  EXPECT_DOUBLE_EQ(b.rope_theta, 1e6);
  EXPECT_EQ(b.eos_token_ids, std::vector<int64_t>{100007});
}

TEST(AquilaConfig, PresetsHavePublishedSizes) {
  Json j = Json::parse(R"({"preset": "aquila-33b"})");
  ConfigReader r(j, "model", "run.yaml");
  auto c = AquilaConfig::from_section(r);
  EXPECT_EQ(c.hidden_size, 6656);
  EXPECT_EQ(c.num_hidden_layers, 60);
  EXPECT_EQ(c.num_attention_heads, 52);
  // Aquila-7B: 7.30e9 parameters (6.48e9 in blocks + 2 x 0.41e9 for its 100008-token vocab).
  auto seven = AquilaConfig::from_hf_json(aquila_preset("aquila-7b"), "preset");
  EXPECT_NEAR(seven.num_parameters() / 1e9, 7.2955, 0.001);
  Json bad = Json::parse(R"({"preset": "aquila-8b"})");
  ConfigReader rb(bad, "model", "run.yaml");
  auto e = test::expect_error([&] { AquilaConfig::from_section(rb); });
  EXPECT_EQ(e.context(), "run.yaml: model.preset");
}

TEST(AquilaConfig, RejectsInconsistentSizes) {
  Json j = aquila_preset("aquila2-34b");
  j["num_key_value_heads"] = 5;
  auto e = test::expect_error([&] { AquilaConfig::from_hf_json(j, "config.json"); });
  EXPECT_EQ(e.context(), "config.json: num_key_value_heads");
  Json k = aquila_preset("aquila-7b");
  k["eos_token_id"] = 200000;
  EXPECT_THROW(AquilaConfig::from_hf_json(k, "config.json"), Error);
}

}  // namespace
}  // namespace aviary

namespace aviary {
namespace {

TEST(AquilaConfig, EveryBundledPresetConfigParses) {
  for (const char* name : {"aquila-7b", "aquila-33b", "aquila2-7b", "aquila2-34b", "aquila2-70b"}) {
    const std::string path = std::string(AVIARY_SOURCE_DIR) + "/configs/" + name + ".yaml";
    Json j = load_config_file(path);
    ConfigReader root(j, "", path);
    auto model = root.child("model");
    EXPECT_EQ(model.get_choice("arch", {"aquila"}), "aquila");
    auto c = AquilaConfig::from_section(model);
    model.finish();
    root.finish();
    EXPECT_EQ(c.vocab_size, 100008) << name;
  }
}

}  // namespace
}  // namespace aviary
