// export_hf: a training checkpoint of an Aquila/LLaMA model -> a Hugging Face model directory.
#include <filesystem>
#include <fstream>
#include <sstream>

#include "aviary/core/atomic_file.h"
#include "aviary/core/dtype.h"
#include "aviary/core/error.h"
#include "aviary/io/weights.h"
#include "aviary/models/aquila_config.h"
#include "aviary/tokenizer/tokenizer_files.h"
#include "aviary/train/checkpoint.h"

namespace fs = std::filesystem;

namespace aviary {

void export_hf(const std::string& checkpoint_dir, const std::string& out_dir,
               const std::string& tokenizer, uint64_t max_shard_bytes) {
  if (!is_complete_checkpoint(checkpoint_dir)) {
    throw_corruption("not a complete checkpoint (no valid COMPLETE marker)", checkpoint_dir,
                     "export a step-NNNNNN directory whose save finished");
  }
  const std::string config_path = (fs::path(checkpoint_dir) / "config.json").string();
  Json run_config = read_checkpoint_config(checkpoint_dir);
  if (!run_config.is_object() || !run_config.contains("model") ||
      !run_config["model"].is_object()) {
    throw_corruption("the checkpoint config has no 'model' section", config_path);
  }
  if (run_config.contains("lora")) {
    throw_invalid("a LoRA checkpoint holds only the adapters, not a whole model", checkpoint_dir,
                  "use `aviary convert --merge-lora --model " + checkpoint_dir +
                      " --output DIR` (base + adapter merged), or the run's adapter/ directory "
                      "with peft");
  }
  const Json& model = run_config["model"];
  const std::string arch = model.value("arch", std::string("aquila"));
  if (arch != "aquila" && arch != "llama") {
    throw_unsupported(
        "export to an HF directory supports model.arch aquila / llama, not '" + arch + "'",
        config_path + ": model.arch");
  }
  ConfigReader reader(model, "model", config_path);
  AquilaConfig config = AquilaConfig::from_section(reader);

  auto weights = WeightReader::open(checkpoint_dir);
  NamedTensors tensors;
  for (const auto& name : weights->names()) {
    if (config.tie_word_embeddings && name == "lm_head.weight") continue;  // HF omits it
    tensors.emplace_back(name, weights->get(name));
  }
  if (tensors.empty()) throw_corruption("the checkpoint holds no model tensors", checkpoint_dir);
  config.torch_dtype = dtype_name(tensors.front().second.scalar_type());

  save_hf_weights(out_dir, tensors, max_shard_bytes);
  write_file_atomic((fs::path(out_dir) / "config.json").string(),
                    std::string_view(config.to_hf_json().dump(2) + "\n"));
  if (!tokenizer.empty()) copy_tokenizer(tokenizer, out_dir);
}

}  // namespace aviary
