// Instruction data: the four JSONL formats, chat-template rendering with loss masks (checked token
// by token), every bad-record kind, `aviary data prepare --sft`, SFT samples (padding, packing,
// truncation) and the masked loss.
#include <filesystem>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "aviary/data/prepare.h"
#include "aviary/data/sft.h"
#include "aviary/data/sft_dataset.h"
#include "aviary/data/token_dataset.h"
#include "aviary/models/aquila.h"
#include "aviary/tokenizer/tokenizer.h"
#include "aviary/train/lm_loss.h"
#include "expect_error.h"
#include "test_util.h"

namespace aviary {
namespace {

using data::SftFormat;
using test::fixture;
using test::TempDir;

// The same two-turn conversation in each format (Alpaca: its first turn only).
const char* kAquila =
    R"({"id": "1", "conversations": [{"from": "human", "value": "Compute 2+3."}, {"from": "gpt", "value": "5"}, {"from": "human", "value": "And 4+4?"}, {"from": "gpt", "value": "8"}], "instruction": ""})";
const char* kCoig =
    R"({"instruction": "", "conversations": [{"question": "Compute 2+3.", "answer": "5"}, {"question": "And 4+4?", "answer": "8"}]})";
const char* kAlpaca = R"({"instruction": "Compute the sum.", "input": "2+3", "output": "5"})";
const char* kMessages =
    R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 2+3."}, {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4+4?"}, {"role": "assistant", "content": "8"}]})";

std::unique_ptr<Tokenizer> tiny_tokenizer() {
  return Tokenizer::load(fixture("tiny-llama"));  // Aquila-style BPE: [CLS] = BOS, </s> = EOS
}

TEST(SftRecord, EachFormatParsesToTheSameTurns) {
  for (const char* line : {kAquila, kCoig, kMessages}) {
    auto r = data::parse_sft_record(line, SftFormat::kAuto);
    ASSERT_EQ(r.skip, "") << line << ": " << r.detail;
    std::vector<ChatMessage> turns = r.messages;
    if (turns.front().role == "system") turns.erase(turns.begin());
    ASSERT_EQ(turns.size(), 4u) << line;
    EXPECT_EQ(turns[0].role, "user");
    EXPECT_EQ(turns[0].content, "Compute 2+3.");
    EXPECT_EQ(turns[1].role, "assistant");
    EXPECT_EQ(turns[1].content, "5");
    EXPECT_EQ(turns[3].content, "8");
  }
  EXPECT_EQ(data::parse_sft_record(kAquila, SftFormat::kAuto).format, SftFormat::kAquila);
  EXPECT_EQ(data::parse_sft_record(kCoig, SftFormat::kAuto).format, SftFormat::kCoig);
  EXPECT_EQ(data::parse_sft_record(kMessages, SftFormat::kAuto).messages[0].content, "Be brief.");
  auto alpaca = data::parse_sft_record(kAlpaca, SftFormat::kAuto);
  EXPECT_EQ(alpaca.format, SftFormat::kAlpaca);
  ASSERT_EQ(alpaca.messages.size(), 2u);
  EXPECT_EQ(alpaca.messages[0].content, "Compute the sum.\n\n2+3");
  // Aquila's "instruction" is the system message.
  auto with_system = data::parse_sft_record(
      R"({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "instruction": "Sys"})",
      SftFormat::kAquila);
  ASSERT_EQ(with_system.messages.size(), 3u);
  EXPECT_EQ(with_system.messages[0].role, "system");
}

TEST(SftRecord, EveryBadRecordKindIsNamed) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"messages\": [", "invalid_json"},
      {"{\"instruction\": \"\xff\xfe\", \"output\": \"x\"}", "invalid_utf8"},
      {R"({"text": "plain pretraining text"})", "unknown_format"},
      {R"([1, 2, 3])", "unknown_format"},
      {R"({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]})",
       "unknown_role"},
      {R"({"conversations": [{"from": "alien", "value": "hi"}]})", "unknown_role"},
      {R"({"messages": [{"role": "user", "content": "hi"}]})", "no_assistant_turn"},
      {R"({"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "hi"}]})",
       "bad_turn_order"},
      {R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]})",
       "bad_turn_order"},
      {R"({"instruction": "hi", "input": "", "output": "   "})", "empty_turn"},
  };
  for (const auto& [line, reason] : cases) {
    auto r = data::parse_sft_record(line, SftFormat::kAuto);
    EXPECT_EQ(r.skip, reason) << line << " -> " << r.detail;
    EXPECT_FALSE(r.detail.empty());
  }
}

// The loss mask, token by token: the trainable runs decode to exactly the assistant replies plus
// their end-of-turn marker, in order; everything else (BOS, system, user turns, the "Assistant: "
// prefixes) carries no loss; and the tokens are the rendered conversation.
TEST(SftMask, OnlyAssistantRepliesAndTheirEndMarkerCarryLoss) {
  auto tok = tiny_tokenizer();
  for (const std::string name : {"aquila", "aquila-chat", "aquila-v2", "llama-2"}) {
    const auto tmpl = ChatTemplate::by_name(name);
    for (const char* line : {kAquila, kCoig, kAlpaca, kMessages}) {
      auto record = data::parse_sft_record(line, SftFormat::kAuto);
      auto encoded =
          data::encode_sft_conversation(tmpl, *tok, record.messages, data::SftLossOn::kAssistant);
      ASSERT_EQ(encoded.tokens.size(), encoded.trainable.size());
      ASSERT_EQ(encoded.tokens[0], *tok->bos_id());
      EXPECT_EQ(encoded.trainable[0], 0);
      std::vector<std::string> replies;
      std::string prompt_text;
      for (size_t b = 1; b < encoded.tokens.size();) {
        size_t e = b;
        while (e < encoded.tokens.size() && encoded.trainable[e] == encoded.trainable[b])
          ++e;
        const std::string text = tok->decode(
            std::vector<int32_t>(encoded.tokens.begin() + static_cast<std::ptrdiff_t>(b),
                                 encoded.tokens.begin() + static_cast<std::ptrdiff_t>(e)),
            false);
        if (encoded.trainable[b]) {
          replies.push_back(text);
        } else {
          prompt_text += text;
        }
        b = e;
      }
      std::vector<std::string> expected;
      for (const auto& m : record.messages) {
        if (m.role != "assistant") continue;
        expected.push_back(m.content);
      }
      ASSERT_EQ(replies.size(), expected.size()) << name << " " << line;
      for (size_t i = 0; i < replies.size(); ++i) {
        // llama-2 writes "[/INST] reply </s>": the space before the reply is part of it.
        std::string reply = replies[i];
        if (name == "llama-2" && !reply.empty() && reply[0] == ' ') reply.erase(0, 1);
        EXPECT_EQ(reply.rfind(expected[i], 0), 0u)
            << name << ": reply " << i << " is '" << replies[i] << "'";
        const std::string marker = reply.substr(expected[i].size());
        if (name == "aquila-chat") {
          EXPECT_EQ(marker, "###") << name;
        } else {
          EXPECT_EQ(marker, name == "llama-2" ? " </s>" : "</s>") << name;
        }
      }
      EXPECT_NE(prompt_text.find("Compute"), std::string::npos) << name;
      // The tokens are the rendered text (the template's special strings as their ids).
      EXPECT_EQ(tok->decode(std::vector<int32_t>(encoded.tokens.begin() + 1, encoded.tokens.end()),
                            false),
                tmpl.render(record.messages, false))
          << name << " " << line;
    }
  }
}

TEST(SftMask, LossOnAllTrainsEveryTokenButTheBos) {
  auto tok = tiny_tokenizer();
  auto record = data::parse_sft_record(kMessages, SftFormat::kAuto);
  auto encoded = data::encode_sft_conversation(ChatTemplate::by_name("aquila"), *tok,
                                               record.messages, data::SftLossOn::kAll);
  EXPECT_EQ(encoded.trainable[0], 0);
  for (size_t i = 1; i < encoded.trainable.size(); ++i)
    EXPECT_EQ(encoded.trainable[i], 1) << i;
}

std::string write_records(const TempDir& dir, const std::vector<std::string>& lines) {
  std::string text;
  for (const auto& l : lines)
    text += l + "\n";
  const std::string path = dir.file("sft.jsonl");
  test::write_file(path, text);
  return path;
}

TEST(SftPrepare, WritesMaskAndReportsEachSkippedRecordByLine) {
  TempDir dir;
  const std::string input =
      write_records(dir, {kAquila, kCoig, "{broken", kAlpaca,
                          R"({"messages": [{"role": "user", "content": "x"}]})", kMessages,
                          R"({"messages": [{"role": "robot", "content": "x"}]})"});
  auto r = test::run_cli("data prepare --sft -i " + input + " -o " + dir.file("sft") + " -t " +
                         fixture("tiny-llama") + " --chat-template aquila --quiet");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("sft.jsonl:3: invalid_json"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("sft.jsonl:5: no_assistant_turn"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("sft.jsonl:7: unknown_role"), std::string::npos) << r.output;
  auto ds = data::TokenDataset::open(dir.file("sft"));
  EXPECT_EQ(ds->num_docs(), 4);
  ASSERT_NE(ds->trainable(), nullptr);
  EXPECT_EQ(ds->meta().sft["chat_template"], "aquila");
  EXPECT_EQ(ds->meta().sft["formats"]["alpaca"], 1);
  EXPECT_EQ(ds->meta().skipped.at("invalid_json"), 1);
  // The mask on disk is what encode_sft_conversation gives for the first record.
  auto tok = tiny_tokenizer();
  auto first = data::encode_sft_conversation(
      ChatTemplate::by_name("aquila"), *tok,
      data::parse_sft_record(kAquila, SftFormat::kAuto).messages, data::SftLossOn::kAssistant);
  ASSERT_EQ(ds->doc_length(0), static_cast<int64_t>(first.tokens.size()));
  for (size_t i = 0; i < first.tokens.size(); ++i) {
    EXPECT_EQ(ds->tokens()[i], static_cast<uint32_t>(first.tokens[i]));
    EXPECT_EQ(ds->trainable()[i], first.trainable[i]);
  }
  auto inspect = test::run_cli("data inspect " + dir.file("sft") + " -t " + fixture("tiny-llama"));
  ASSERT_EQ(inspect.exit_code, 0) << inspect.output;
  EXPECT_NE(inspect.output.find("[[5</s>]]"), std::string::npos) << inspect.output;
}

TEST(SftPrepare, AnAllInvalidFileIsAClearError) {
  TempDir dir;
  const std::string input =
      write_records(dir, {"not json", R"({"messages": []})", R"({"text": "hello"})"});
  auto r = test::run_cli("data prepare --sft -i " + input + " -o " + dir.file("sft") + " -t " +
                         fixture("tiny-llama") + " --quiet");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("no documents found"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("invalid_json"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("unknown_format"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(dir.file("sft.json")));
}

// An SFT token dataset of documents with the given lengths; token j of document d is
// 10 + 10 * d + j, trainable from the middle of each document on.
std::shared_ptr<data::TokenDataset> synthetic(const TempDir& dir, const std::vector<int>& lengths) {
  data::TokenDatasetWriter writer(dir.file("syn"));
  for (size_t d = 0; d < lengths.size(); ++d) {
    std::vector<uint32_t> tokens;
    std::vector<uint8_t> mask;
    for (int j = 0; j < lengths[d]; ++j) {
      tokens.push_back(static_cast<uint32_t>(10 + 10 * d + static_cast<size_t>(j)));
      mask.push_back(j >= lengths[d] / 2 ? 1 : 0);
    }
    writer.add_document(tokens.data(), tokens.size(), mask.data());
  }
  data::TokenDatasetMeta meta;
  meta.vocab_size = 1000;
  meta.eos_id = 2;
  writer.finish(meta);
  return data::TokenDataset::open(dir.file("syn"));
}

TEST(SftDataset, PadsPacksAndTruncates) {
  TempDir dir;
  auto ds = synthetic(dir, {4, 3, 9, 2});
  data::SftDatasetOptions options;
  options.seq_len = 7;  // 8 tokens per sample
  options.pad_id = 2;
  data::SftDataset unpacked(ds, options);
  EXPECT_EQ(unpacked.size(), 4);
  EXPECT_EQ(unpacked.truncated(), 1);  // the 9-token conversation
  std::vector<int32_t> row(8);
  std::vector<uint8_t> mask(8);
  std::vector<int32_t> cu;
  unpacked.get(1, row.data(), &cu);
  unpacked.get_loss_mask(1, mask.data());
  EXPECT_EQ(row, (std::vector<int32_t>{20, 21, 22, 2, 2, 2, 2, 2}));
  EXPECT_EQ(mask, (std::vector<uint8_t>{0, 1, 1, 0, 0, 0, 0, 0}));
  EXPECT_EQ(cu, (std::vector<int32_t>{0, 3, 8}));
  unpacked.get(2, row.data(), nullptr);
  EXPECT_EQ(row.back(), 37);  // cut after 8 tokens

  options.pack = true;
  data::SftDataset packed(ds, options);
  ASSERT_EQ(packed.size(), 3);  // [4 + 3], [8 (truncated)], [2]
  packed.get(0, row.data(), &cu);
  packed.get_loss_mask(0, mask.data());
  EXPECT_EQ(row, (std::vector<int32_t>{10, 11, 12, 13, 20, 21, 22, 2}));
  EXPECT_EQ(mask, (std::vector<uint8_t>{0, 0, 1, 1, 0, 1, 1, 0}));
  EXPECT_EQ(cu, (std::vector<int32_t>{0, 4, 7, 8}));
  EXPECT_EQ(packed.conversations(), 4);

  // Truncation that leaves no target drops the conversation.
  options.seq_len = 2;
  options.pack = false;
  data::SftDataset short_rows(ds, options);
  EXPECT_EQ(short_rows.dropped(), 1);  // the 9-token one: its replies start at token 4
  EXPECT_EQ(short_rows.size(), 3);
}

TEST(SftDataset, RefusesPlainTokenData) {
  auto e = test::expect_error(ErrorKind::kInvalidArgument, [] {
    data::SftDataset(data::TokenDataset::open(fixture("train-parity/data")), {});
  });
  EXPECT_NE(std::string(e.what()).find("--sft"), std::string::npos);
}

TEST(SftLoss, CountsOnlyMaskedTargets) {
  AquilaConfig c;
  c.vocab_size = 50;
  c.hidden_size = 16;
  c.intermediate_size = 32;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.max_position_embeddings = 32;
  AquilaForCausalLM model(c, torch::TensorOptions().dtype(torch::kFloat32));
  model->init_weights(0.2, 3);
  auto tokens = torch::randint(0, 50, {2, 9}, torch::kInt64);
  auto mask = torch::zeros({2, 9}, torch::kUInt8);
  mask.index_put_({0, torch::indexing::Slice(4, 9)}, 1);
  mask.index_put_({1, 8}, 1);
  LmLossOptions options;
  options.loss_mask = mask;
  auto loss = causal_lm_loss(*model, tokens, options);
  // By hand: logits of the whole batch, cross-entropy at the 6 masked targets.
  torch::NoGradGuard no_grad;
  auto positions = torch::arange(8).unsqueeze(0).expand({2, 8});
  auto logits = model->forward(tokens.narrow(1, 0, 8), positions, {}, nullptr);
  auto logp = torch::log_softmax(logits, -1);
  double sum = 0;
  int n = 0;
  for (int64_t r = 0; r < 2; ++r) {
    for (int64_t t = 1; t < 9; ++t) {
      if (mask[r][t].item<int>() == 0) continue;
      sum -= logp[r][t - 1][tokens[r][t].item<int64_t>()].item<double>();
      ++n;
    }
  }
  EXPECT_EQ(count_loss_targets(mask), 6);
  EXPECT_NEAR(loss.item<double>(), sum / n, 1e-5);  // fp32 sums of 6 terms
  options.normalizer = 12.0;
  EXPECT_NEAR(causal_lm_loss(*model, tokens, options).item<double>(), sum / 12.0, 1e-5);
}

}  // namespace
}  // namespace aviary
