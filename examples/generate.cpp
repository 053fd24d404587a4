// examples/generate.cpp — load an HF Aquila/LLaMA directory and stream a completion.
//
//   generate MODEL_DIR "prompt text" [max_new_tokens]
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include <aviary/aviary.h>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR PROMPT [MAX_NEW_TOKENS]\n", argv[0]);
    return 2;
  }
  try {
    aviary::LoadOptions load;  // fp32/bf16 as stored, on the CPU
    auto lm = aviary::LanguageModel::load(argv[1], load);

    aviary::GenerationOptions gen;
    gen.max_new_tokens = argc > 3 ? std::atoi(argv[3]) : 32;
    gen.on_text = [](size_t, const std::string& piece) {
      std::cout << piece << std::flush;  // stream as tokens arrive
      return true;                       // false would stop generation
    };
    auto result = lm->generate(argv[2], gen);
    std::cout << "\n[" << result.tokens.size() << " tokens, finish: " << result.finish_reason
              << "]\n";
  } catch (const aviary::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
