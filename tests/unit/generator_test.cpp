// Generation behaviour on the tiny fixture model: stop strings, streaming, sampling options.
#include <gtest/gtest.h>

#include "aviary/core/error.h"
#include "aviary/infer/chat.h"
#include "aviary/infer/language_model.h"
#include "test_util.h"

namespace aviary {
namespace {

std::unique_ptr<LanguageModel>& tiny() {
  static auto lm = LanguageModel::load(test::fixture("tiny-llama"));
  return lm;
}

GenerationOptions greedy(int64_t n) {
  GenerationOptions o;
  o.max_new_tokens = n;
  return o;
}

TEST(Generator, StreamingPiecesConcatenateToTheText) {
  auto o = greedy(24);
  std::string streamed;
  o.on_text = [&](size_t row, const std::string& piece) {
    EXPECT_EQ(row, 0u);
    streamed += piece;
    return true;
  };
  auto r = tiny()->generate("天下大事", o);
  EXPECT_EQ(streamed, r.text);
  EXPECT_EQ(r.finish_reason, "length");
  EXPECT_EQ(r.tokens.size(), 24u);
}

TEST(Generator, StopStringCutsTheTextAndEndsTheRow) {
  auto full = tiny()->generate("The quick brown fox", greedy(24));
  ASSERT_GE(full.text.size(), 6u);
  const std::string stop = full.text.substr(3, 3);
  auto o = greedy(24);
  o.stop_strings = {stop};
  std::string streamed;
  o.on_text = [&](size_t, const std::string& piece) {
    streamed += piece;
    return true;
  };
  auto r = tiny()->generate("The quick brown fox", o);
  EXPECT_EQ(r.finish_reason, "stop");
  EXPECT_EQ(r.text, full.text.substr(0, full.text.find(stop)));
  EXPECT_EQ(streamed, r.text);  // nothing past the stop string was ever streamed
}

TEST(Generator, CallbackCanStop) {
  auto o = greedy(24);
  int calls = 0;
  o.on_text = [&](size_t, const std::string&) { return ++calls < 2; };
  auto r = tiny()->generate("Hello", o);
  EXPECT_EQ(r.finish_reason, "callback");
  EXPECT_LT(r.tokens.size(), 24u);
}

TEST(Generator, SamplingIsReproducibleForASeed) {
  auto o = greedy(16);
  o.sampling.temperature = 1.0;
  o.sampling.seed = 7;
  auto a = tiny()->generate("Hello", o);
  auto b = tiny()->generate("Hello", o);
  EXPECT_EQ(a.tokens, b.tokens);
  o.sampling.seed = 8;
  bool differs = false;
  for (int s = 8; s < 12 && !differs; ++s) {
    o.sampling.seed = s;
    differs = tiny()->generate("Hello", o).tokens != a.tokens;
  }
  EXPECT_TRUE(differs);
}

TEST(Generator, TopKOneAndTinyTopPAreGreedy) {
  auto g = tiny()->generate("Hello", greedy(12));
  auto o = greedy(12);
  o.sampling.temperature = 1.5;
  o.sampling.top_k = 1;
  EXPECT_EQ(tiny()->generate("Hello", o).tokens, g.tokens);
  o.sampling.top_k = 0;
  o.sampling.top_p = 1e-6;
  EXPECT_EQ(tiny()->generate("Hello", o).tokens, g.tokens);
  o.sampling.top_p = 1.0;
  o.sampling.min_p = 0.999;
  EXPECT_EQ(tiny()->generate("Hello", o).tokens, g.tokens);
}

TEST(Generator, RepetitionPenaltyAvoidsRepeats) {
  auto o = greedy(32);
  auto plain = tiny()->generate("Hello", o);
  o.sampling.repetition_penalty = 50.0;
  auto penalised = tiny()->generate("Hello", o);
  std::set<int32_t> unique(penalised.tokens.begin(), penalised.tokens.end());
  std::set<int32_t> plain_unique(plain.tokens.begin(), plain.tokens.end());
  EXPECT_GT(unique.size(), plain_unique.size());
}

TEST(Generator, RejectsBadOptions) {
  auto o = greedy(4);
  o.sampling.top_p = 0;
  EXPECT_THROW(tiny()->generate("Hello", o), Error);
  o = greedy(-1);
  EXPECT_THROW(tiny()->generate("Hello", o), Error);
  EXPECT_THROW(tiny()->generate_ids({{5, 99999}}, greedy(2)), Error);
}

TEST(Generator, ZeroNewTokens) {
  auto r = tiny()->generate("Hello", greedy(0));
  EXPECT_TRUE(r.tokens.empty());
  EXPECT_TRUE(r.text.empty());
}

TEST(Generator, ChatSessionKeepsTurns) {
  ChatSession chat(*tiny(), ChatTemplate::by_name("aquila-chat"));
  auto o = greedy(8);
  chat.send("你好", o);
  chat.send("And then?", o);
  ASSERT_EQ(chat.messages().size(), 4u);
  EXPECT_EQ(chat.messages()[2].content, "And then?");
  EXPECT_EQ(chat.messages()[3].role, "assistant");
  chat.reset();
  EXPECT_TRUE(chat.messages().empty());
}

}  // namespace
}  // namespace aviary
