// Tokenizer loading, special tokens, errors, and chat templates.
#include "aviary/tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <thread>

#include "aviary/core/error.h"
#include "aviary/tokenizer/chat_template.h"
#include "expect_error.h"
#include "test_util.h"

namespace aviary {
namespace {

using test::expect_error;

namespace fs = std::filesystem;
using test::fixture;
using test::TempDir;
using test::write_file;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// ---- loading errors -----------------------------------------------------------------------------

TEST(TokenizerLoad, MissingPathIsNotFound) {
  auto e = expect_error(ErrorKind::kNotFound, [] { Tokenizer::load("/nonexistent/aviary-tok"); });
  EXPECT_TRUE(contains(e.context(), "/nonexistent/aviary-tok"));
}

TEST(TokenizerLoad, EmptyDirectoryNamesTheFilesSearched) {
  TempDir dir;
  auto e = expect_error(ErrorKind::kNotFound, [&] { Tokenizer::load(dir.path()); });
  EXPECT_EQ(e.context(), dir.path());
  for (const char* name : {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model"}) {
    EXPECT_TRUE(contains(e.message(), name)) << e.message();
  }
}

TEST(TokenizerLoad, MalformedJsonNamesTheFile) {
  TempDir dir;
  write_file(dir.file("tokenizer.json"), "{\"model\": {\"type\": \"BPE\", ");
  auto e = expect_error(ErrorKind::kCorruption, [&] { Tokenizer::load(dir.path()); });
  EXPECT_TRUE(contains(e.context(), "tokenizer.json"));
}

TEST(TokenizerLoad, MalformedTokenizerConfigNamesTheFile) {
  TempDir dir;
  fs::copy_file(fixture("tokenizers/bpe/tokenizer.json"), dir.file("tokenizer.json"));
  write_file(dir.file("tokenizer_config.json"), "{\"bos_token\": 12}");
  auto e = expect_error(ErrorKind::kCorruption, [&] { Tokenizer::load(dir.path()); });
  EXPECT_TRUE(contains(e.context(), "tokenizer_config.json"));
  EXPECT_TRUE(contains(e.message(), "bos_token"));
}

TEST(TokenizerLoad, UnknownModelTypeIsUnsupported) {
  TempDir dir;
  write_file(dir.file("tokenizer.json"),
             R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}, "added_tokens": []})");
  auto e = expect_error(ErrorKind::kUnsupported, [&] { Tokenizer::load(dir.path()); });
  EXPECT_TRUE(contains(e.context(), "model.type"));
  EXPECT_TRUE(contains(e.message(), "WordPiece"));
}

TEST(TokenizerLoad, UnsupportedComponentsAreNamed) {
  TempDir dir;
  write_file(
      dir.file("tokenizer.json"),
      R"({"normalizer": {"type": "NFKC"}, "model": {"type": "BPE", "vocab": {}, "merges": []}})");
  auto e =
      expect_error(ErrorKind::kUnsupported, [&] { Tokenizer::load(dir.file("tokenizer.json")); });
  EXPECT_TRUE(contains(e.context(), "normalizer"));
  EXPECT_TRUE(contains(e.message(), "NFKC"));

  write_file(
      dir.file("tokenizer.json"),
      R"({"pre_tokenizer": {"type": "Metaspace"}, "model": {"type": "BPE", "vocab": {}, "merges": []}})");
  e = expect_error(ErrorKind::kUnsupported, [&] { Tokenizer::load(dir.file("tokenizer.json")); });
  EXPECT_TRUE(contains(e.context(), "pre_tokenizer.type"));

  write_file(
      dir.file("tokenizer.json"),
      R"J({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(?=a)"}, "behavior": "Isolated"},
                 "model": {"type": "BPE", "vocab": {}, "merges": []}})J");
  e = expect_error(ErrorKind::kUnsupported, [&] { Tokenizer::load(dir.file("tokenizer.json")); });
  EXPECT_TRUE(contains(e.message(), "lookaround"));
}

TEST(TokenizerLoad, UnsupportedTokenizerJsonFallsBackToModelFile) {
  TempDir dir;
  write_file(
      dir.file("tokenizer.json"),
      R"({"pre_tokenizer": {"type": "Metaspace"}, "model": {"type": "BPE", "vocab": {}, "merges": []}})");
  fs::copy_file(fixture("tokenizers/sp/tokenizer.model"), dir.file("tokenizer.model"));
  EXPECT_EQ(Tokenizer::load(dir.path())->kind(), "sentencepiece");
}

TEST(TokenizerLoad, VocabWithoutMergesNamesMergesFile) {
  TempDir dir;
  fs::copy_file(fixture("tokenizers/bpe-vocab-merges/vocab.json"), dir.file("vocab.json"));
  auto e = expect_error(ErrorKind::kNotFound, [&] { Tokenizer::load(dir.file("vocab.json")); });
  EXPECT_TRUE(contains(e.context(), "merges.txt"));
}

TEST(TokenizerLoad, MergeWithUnknownTokenIsCorruption) {
  TempDir dir;
  write_file(dir.file("vocab.json"), R"({"a": 0, "b": 1, "ab": 2})");
  write_file(dir.file("merges.txt"), "#version: 0.2\na b\na zz\n");
  auto e = expect_error(ErrorKind::kCorruption, [&] { Tokenizer::load(dir.path()); });
  EXPECT_TRUE(contains(e.context(), "merges.txt: line 3"));
}

TEST(TokenizerLoad, CorruptSentencePieceModel) {
  TempDir dir;
  write_file(dir.file("tokenizer.model"), "this is not a protobuf");
  auto e = expect_error(ErrorKind::kCorruption, [&] { Tokenizer::load(dir.path()); });
  EXPECT_TRUE(contains(e.context(), "tokenizer.model"));
}

// ---- special tokens -----------------------------------------------------------------------------

TEST(BpeTokenizer, SpecialTokensFromConfig) {
  auto tok = Tokenizer::load(fixture("tokenizers/bpe"));
  EXPECT_EQ(tok->bos_id(), 1006);  // [CLS]
  EXPECT_EQ(tok->eos_id(), 1007);  // </s>
  EXPECT_EQ(tok->pad_id(), 0);     // <|endoftext|>
  EXPECT_EQ(tok->token_to_id("<|LDWANG|>"), 1002);
  EXPECT_EQ(tok->token_to_id("no such token"), std::nullopt);
  EXPECT_EQ(tok->id_to_token(1007), "</s>");
  for (int32_t id = 1000; id < 1008; ++id)
    EXPECT_TRUE(tok->is_special(id)) << id;
  EXPECT_TRUE(tok->is_special(0));
  EXPECT_FALSE(tok->is_special(500));
}

TEST(BpeTokenizer, AddedTokensAreCutOutAndSkippable) {
  auto tok = Tokenizer::load(fixture("tokenizers/bpe/tokenizer.json"));
  auto ids = tok->encode("hi</s>[CLS]there");
  auto plain_hi = tok->encode("hi");
  ASSERT_GE(ids.size(), plain_hi.size() + 2);
  EXPECT_EQ(ids[plain_hi.size()], 1007);
  EXPECT_EQ(ids[plain_hi.size() + 1], 1006);
  EXPECT_EQ(tok->decode(ids), "hi</s>[CLS]there");
  EXPECT_EQ(tok->decode(ids, /*skip_special_tokens=*/true), "hithere");
}

TEST(BpeTokenizer, OutOfRangeIdsThrow) {
  auto tok = Tokenizer::load(fixture("tokenizers/bpe"));
  EXPECT_EQ(tok->vocab_size(), 1008);
  expect_error(ErrorKind::kInvalidArgument, [&] { tok->id_to_token(1008); });
  expect_error(ErrorKind::kInvalidArgument, [&] { tok->id_to_token(-1); });
  expect_error(ErrorKind::kInvalidArgument, [&] { tok->decode({5, 1008}); });
}

TEST(BpeTokenizer, AddBosTokenFromConfigForVocabMerges) {
  TempDir dir;
  for (const char* f : {"vocab.json", "merges.txt"}) {
    fs::copy_file(fixture(std::string("tokenizers/bpe-vocab-merges/") + f), dir.file(f));
  }
  write_file(
      dir.file("tokenizer_config.json"),
      R"({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": true})");
  auto tok = Tokenizer::load(dir.path());
  auto plain = tok->encode("hello world");
  auto with = tok->encode("hello world", true);
  ASSERT_EQ(with.size(), plain.size() + 1);
  EXPECT_EQ(with[0], 0);
}

TEST(BpeTokenizer, ConcurrentEncodeMatchesSerial) {
  auto tok = Tokenizer::load(fixture("tokenizers/bpe"));
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) {
    texts.push_back("sample " + std::to_string(i * 7919) + " 你好世界 text number " +
                    std::to_string(i) + std::string(static_cast<size_t>(i % 5), ' ') + "end");
  }
  std::vector<std::vector<int32_t>> serial;
  for (const auto& t : texts)
    serial.push_back(tok->encode(t));
  auto fresh = Tokenizer::load(fixture("tokenizers/bpe"));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      for (int rep = 0; rep < 3; ++rep) {
        for (size_t i = 0; i < texts.size(); ++i) {
          if (fresh->encode(texts[i]) != serial[i]) ++mismatches[w];
        }
      }
    });
  }
  for (auto& t : threads)
    t.join();
  for (int m : mismatches)
    EXPECT_EQ(m, 0);
}

TEST(SentencePieceTokenizer, BosAndSpecials) {
  auto tok = Tokenizer::load(fixture("tokenizers/sp"));
  EXPECT_EQ(tok->kind(), "sentencepiece");
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->unk_id(), 0);
  EXPECT_TRUE(tok->is_special(1));
  EXPECT_FALSE(tok->is_special(300));
  auto ids = tok->encode("hello", true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(tok->decode(ids, true), "hello");
  expect_error(ErrorKind::kInvalidArgument, [&] { tok->id_to_token(1000); });
}

TEST(SentencePieceTokenizer, AddedTokensJsonExtendsVocab) {
  TempDir dir;
  fs::copy_file(fixture("tokenizers/sp/tokenizer.model"), dir.file("tokenizer.model"));
  write_file(dir.file("added_tokens.json"), R"({"<pad>": 1000})");
  write_file(dir.file("special_tokens_map.json"), R"({"pad_token": "<pad>"})");
  auto tok = Tokenizer::load(dir.path());
  EXPECT_EQ(tok->vocab_size(), 1001);
  EXPECT_EQ(tok->pad_id(), 1000);
  EXPECT_TRUE(tok->is_special(1000));
  auto ids = tok->encode("a<pad>b");
  EXPECT_NE(std::find(ids.begin(), ids.end(), 1000), ids.end());
  EXPECT_EQ(tok->decode(ids), "a<pad>b");
  EXPECT_EQ(tok->decode(ids, true), "ab");
}

// ---- chat templates -----------------------------------------------------------------------------

const std::string kSys =
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.";

const std::vector<ChatMessage> kSingle = {{"user", "Hello!"}};
const std::vector<ChatMessage> kMulti = {
    {"user", "Hello!"}, {"assistant", "Hi!"}, {"user", "How are you?"}};

struct TemplateCase {
  const char* name;
  std::string single;  // kSingle with a generation prompt
  std::string multi;   // kMulti with a generation prompt
};

TEST(ChatTemplate, RendersEveryTemplateExactly) {
  const std::vector<TemplateCase> cases = {
      {"aquila-chat", kSys + "###Human: Hello!###Assistant:",
       kSys + "###Human: Hello!###Assistant: Hi!###Human: How are you?###Assistant:"},
      {"aquila", kSys + "###Human: Hello!###Assistant:",
       kSys + "###Human: Hello!###Assistant: Hi!</s>Human: How are you?###Assistant:"},
      {"aquila-legacy", kSys + "\n\n### Human: Hello!\n### Assistant: ",
       kSys +
           "\n\n### Human: Hello!\n### Assistant: Hi!</s>### Human: How are you?\n### Assistant: "},
      {"aquila-v1", "<|startofpiece|>Hello!<|endofpiece|>",
       "<|startofpiece|>Hello!<|endofpiece|>Hi!</s><|startofpiece|>How are you?<|endofpiece|>"},
      {"aquila-v2", kSys + "\n\n<|startofpiece|>Hello!<|endofpiece|>",
       kSys + "\n\n<|startofpiece|>Hello!<|endofpiece|>Hi!</s><|startofpiece|>How are you?"
              "<|endofpiece|>"},
      {"llama-2", "<s>[INST] Hello! [/INST]",
       "<s>[INST] Hello! [/INST] Hi! </s><s>[INST] How are you? [/INST]"},
  };
  ASSERT_EQ(cases.size(), ChatTemplate::names().size());
  for (const auto& c : cases) {
    auto t = ChatTemplate::by_name(c.name);
    EXPECT_EQ(t.name(), c.name);
    EXPECT_EQ(t.render(kSingle, true), c.single) << c.name;
    EXPECT_EQ(t.render(kMulti, true), c.multi) << c.name;
    EXPECT_FALSE(t.stop_strings().empty()) << c.name;
  }
}

TEST(ChatTemplate, SystemMessages) {
  std::vector<ChatMessage> m = {
      {"system", "Be brief."}, {"user", " Hello! "}, {"assistant", "Hi!"}};
  EXPECT_EQ(ChatTemplate::by_name("llama-2").render(m, false),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hello! [/INST] Hi! </s>");
  EXPECT_EQ(ChatTemplate::by_name("aquila").render(m, false),
            "Be brief.###Human:  Hello! ###Assistant: Hi!</s>");
  EXPECT_EQ(ChatTemplate::by_name("aquila-legacy").render(m, false),
            "Be brief.\n\n### Human:  Hello! \n### Assistant: Hi!</s>");
  EXPECT_EQ(ChatTemplate::by_name("aquila-v1").render(m, false),
            "Be brief.<|startofpiece|> Hello! <|endofpiece|>Hi!</s>");
}

TEST(ChatTemplate, SegmentsMarkAssistantTurnsTrainable) {
  std::vector<ChatMessage> m = {
      {"user", "Q1"}, {"assistant", "A1"}, {"user", "Q2"}, {"assistant", "A2"}};
  auto segs = ChatTemplate::by_name("aquila").render_segments(m, false);
  ASSERT_EQ(segs.size(), 4u);
  EXPECT_EQ(segs[0].text, kSys + "###Human: Q1###Assistant: ");
  EXPECT_FALSE(segs[0].trainable);
  EXPECT_EQ(segs[1].text, "A1</s>");
  EXPECT_TRUE(segs[1].trainable);
  EXPECT_EQ(segs[2].text, "Human: Q2###Assistant: ");
  EXPECT_FALSE(segs[2].trainable);
  EXPECT_EQ(segs[3].text, "A2</s>");
  EXPECT_TRUE(segs[3].trainable);

  auto llama = ChatTemplate::by_name("llama-2").render_segments(m, false);
  ASSERT_EQ(llama.size(), 4u);
  EXPECT_EQ(llama[1].text, " A1 </s>");
  EXPECT_TRUE(llama[1].trainable);
  EXPECT_FALSE(llama[2].trainable);

  for (const auto& name : ChatTemplate::names()) {
    auto t = ChatTemplate::by_name(name);
    std::string joined;
    for (const auto& s : t.render_segments(m, false))
      joined += s.text;
    EXPECT_EQ(joined, t.render(m, false)) << name;
    EXPECT_TRUE(t.render_segments(m, false).back().trainable) << name;
  }
}

TEST(ChatTemplate, RenderedTemplateTokenizesSpecialsAsSingleIds) {
  auto tok = Tokenizer::load(fixture("tokenizers/bpe"));
  auto text = ChatTemplate::by_name("aquila-v1").render(kMulti, true);
  auto ids = tok->encode(text);
  EXPECT_EQ(ids.front(), 1000);                            // <|startofpiece|>
  EXPECT_EQ(ids.back(), 1001);                             // <|endofpiece|>
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 1007), 1);  // </s>
}

TEST(ChatTemplate, InvalidConversationsThrow) {
  auto t = ChatTemplate::by_name("aquila");
  auto e = expect_error(ErrorKind::kInvalidArgument, [&] {
    t.render({{"user", "a"}, {"robot", "b"}}, false);
  });
  EXPECT_TRUE(contains(e.message(), "robot"));
  expect_error(ErrorKind::kInvalidArgument, [&] {
    t.render({{"user", "a"}, {"system", "s"}}, false);
  });
  expect_error(ErrorKind::kInvalidArgument, [&] {
    t.render({{"user", "a"}, {"user", "b"}}, true);
  });
  expect_error(ErrorKind::kInvalidArgument, [&] { t.render({{"assistant", "a"}}, false); });
  expect_error(ErrorKind::kInvalidArgument, [&] {
    t.render({{"user", "a"}, {"assistant", "b"}}, true);
  });
  expect_error(ErrorKind::kInvalidArgument, [&] { t.render({}, true); });
}

TEST(ChatTemplate, UnknownNameListsKnownNames) {
  auto e = expect_error(ErrorKind::kInvalidArgument, [] { ChatTemplate::by_name("vicuna"); });
  for (const auto& name : ChatTemplate::names())
    EXPECT_TRUE(contains(e.hint(), name)) << name;
}

TEST(ChatTemplate, DetectsFromModelDirectory) {
  TempDir root;
  auto make = [&](const std::string& name, const std::string& config) {
    std::string dir = root.file(name);
    fs::create_directory(dir);
    if (!config.empty()) write_file(dir + "/config.json", config);
    return dir;
  };
  EXPECT_EQ(ChatTemplate::detect(make("AquilaChat2-34B", "")), "aquila-legacy");
  EXPECT_EQ(ChatTemplate::detect(make("AquilaChat2-34B-16K", "")), "aquila");
  EXPECT_EQ(ChatTemplate::detect(make("AquilaChat2-7B", "")), "aquila-v1");
  EXPECT_EQ(ChatTemplate::detect(make("AquilaChat2-70B-Expr", "")), "aquila-v2");
  EXPECT_EQ(ChatTemplate::detect(make("m1", R"({"_name_or_path": "BAAI/AquilaChat-7B"})")),
            "aquila-chat");
  std::string llama = make("m2", "");
  write_file(llama + "/tokenizer_config.json",
             R"({"chat_template": "{{ bos_token + '[INST] ' }}<<SYS>>"})");
  EXPECT_EQ(ChatTemplate::detect(llama), "llama-2");
  EXPECT_EQ(ChatTemplate::detect(make("tiny-model", R"({"architectures": ["AquilaForCausalLM"]})")),
            std::nullopt);
}

}  // namespace
}  // namespace aviary
