#include "aviary/models/aquila_weights.h"

#include <map>
#include <regex>
#include <set>

#include "aviary/core/error.h"
#include "aviary/core/strings.h"

namespace aviary {
namespace {

// Tensors some checkpoints carry that are derived, not learned (old HF LLaMA/Aquila exports).
bool is_ignorable(const std::string& name) {
  return name.find("rotary_emb.inv_freq") != std::string::npos;
}

// FlagAI name -> HF name, plus whether the rotary permutation applies (and with which heads).
struct Mapped {
  std::string hf;
  int rotary = 0;  // 0: none, 1: q (attention heads), 2: k (kv heads)
};

std::optional<Mapped> flagai_to_hf(const std::string& name) {
  static const std::map<std::string, Mapped> fixed = {
      {"tok_embeddings.weight", {"model.embed_tokens.weight"}},
      {"norm.weight", {"model.norm.weight"}},
      {"output.weight", {"lm_head.weight"}},
  };
  if (auto it = fixed.find(name); it != fixed.end()) return it->second;
  static const std::regex layer_re(R"(layers\.(\d+)\.(.+)\.weight)");
  std::smatch m;
  if (!std::regex_match(name, m, layer_re)) return std::nullopt;
  static const std::map<std::string, Mapped> per_layer = {
      {"attention.wq", {"self_attn.q_proj", 1}},  {"attention.wk", {"self_attn.k_proj", 2}},
      {"attention.wv", {"self_attn.v_proj"}},     {"attention.wo", {"self_attn.o_proj"}},
      {"feed_forward.w1", {"mlp.gate_proj"}},     {"feed_forward.w3", {"mlp.up_proj"}},
      {"feed_forward.w2", {"mlp.down_proj"}},     {"attention_norm", {"input_layernorm"}},
      {"ffn_norm", {"post_attention_layernorm"}},
  };
  auto it = per_layer.find(m[2].str());
  if (it == per_layer.end()) return std::nullopt;
  return Mapped{"model.layers." + m[1].str() + "." + it->second.hf + ".weight", it->second.rotary};
}

}  // namespace

torch::Tensor interleaved_to_half_rotary(const torch::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.reshape({heads, rows / heads / 2, 2, cols}).transpose(1, 2).reshape({rows, cols});
}

torch::Tensor half_to_interleaved_rotary(const torch::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.reshape({heads, 2, rows / heads / 2, cols}).transpose(1, 2).reshape({rows, cols});
}

AquilaWeightLayout detect_aquila_layout(const WeightReader& reader) {
  if (reader.contains("model.embed_tokens.weight")) return AquilaWeightLayout::kHF;
  if (reader.contains("tok_embeddings.weight")) return AquilaWeightLayout::kFlagAI;
  auto names = reader.names();
  throw_invalid(
      "not an Aquila/LLaMA checkpoint: neither 'model.embed_tokens.weight' (HF) nor "
      "'tok_embeddings.weight' (FlagAI) is present" +
          (names.empty() ? std::string(" (it has no tensors)")
                         : " (first tensor: '" + names.front() + "')"),
      names.empty() ? std::string("weights") : reader.file_of(names.front()),
      "check that the directory holds a decoder LM checkpoint");
}

std::vector<AquilaWeightSource> aquila_weight_sources(const AquilaForCausalLMImpl& model,
                                                      const WeightReader& reader) {
  const AquilaConfig& c = model.config();
  const auto layout = detect_aquila_layout(reader);

  // HF name -> (source name, rotary kind).
  std::map<std::string, Mapped> sources;
  for (const auto& name : reader.names()) {
    if (is_ignorable(name)) continue;
    if (layout == AquilaWeightLayout::kHF) {
      sources[name] = Mapped{name, 0};
      continue;
    }
    auto mapped = flagai_to_hf(name);
    if (!mapped) {
      throw_invalid("unexpected tensor in a FlagAI-format Aquila checkpoint",
                    reader.file_of(name) + ": " + name,
                    "expected tok_embeddings, layers.N.attention.w{q,k,v,o}, "
                    "layers.N.feed_forward.w{1,2,3}, layers.N.{attention,ffn}_norm, norm, output");
    }
    sources[mapped->hf] = Mapped{name, mapped->rotary};
  }

  std::vector<AquilaWeightSource> out;
  std::set<std::string> used;
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    auto it = sources.find(name);
    if (it == sources.end()) {
      throw_not_found("the checkpoint has no tensor '" + name + "' (" +
                          (layout == AquilaWeightLayout::kHF ? "HF" : "FlagAI") + " layout)",
                      reader.names().empty() ? "weights" : reader.file_of(reader.names().front()),
                      "check that config.json (num_hidden_layers=" +
                          std::to_string(c.num_hidden_layers) + ") matches the weights");
    }
    used.insert(name);
    const Mapped& src = it->second;
    const auto stored = reader.shape(src.hf);
    if (stored != item.value().sizes().vec()) {
      throw_invalid(
          "shape mismatch for tensor " + src.hf + ": checkpoint has " + shape_string(stored) +
              ", model expects " + shape_string(item.value().sizes()),
          reader.file_of(src.hf) + ": " + src.hf, "check that config.json matches the weights");
    }
    AquilaWeightSource source;
    source.param = name;
    source.tensor = src.hf;
    if (src.rotary != 0)
      source.rotary_heads = src.rotary == 1 ? c.num_attention_heads : c.num_key_value_heads;
    out.push_back(std::move(source));
  }
  for (const auto& [hf, src] : sources) {
    if (used.count(hf)) continue;
    if (hf == "lm_head.weight" && c.tie_word_embeddings) continue;  // redundant copy of the tie
    throw_invalid("the checkpoint has a tensor the model does not: '" + src.hf + "'",
                  reader.file_of(src.hf),
                  "check num_hidden_layers / architecture in config.json (config says " +
                      std::to_string(c.num_hidden_layers) + " layers)");
  }
  return out;
}

torch::Tensor read_aquila_weight(const WeightReader& reader, const AquilaWeightSource& source) {
  auto w = reader.get(source.tensor);
  return source.rotary_heads > 0 ? interleaved_to_half_rotary(w, source.rotary_heads) : w;
}

void load_aquila_weights(AquilaForCausalLMImpl& model, const WeightReader& reader) {
  torch::NoGradGuard no_grad;
  auto params = model.named_parameters();
  for (const auto& source : aquila_weight_sources(model, reader)) {
    if (source.rotary_heads == 0) {
      reader.load_into(source.tensor, params[source.param]);
    } else {
      params[source.param].copy_(read_aquila_weight(reader, source));
    }
  }
}

std::vector<std::pair<std::string, torch::Tensor>> aquila_hf_tensors(
    const AquilaForCausalLMImpl& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& item : model.named_parameters())
    out.emplace_back(item.key(), item.value());
  return out;
}

}  // namespace aviary
