#include "aviary/data/token_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "aviary/core/atomic_file.h"
#include "aviary/core/error.h"
#include "aviary/tokenizer/tokenizer.h"

namespace aviary::data {
namespace {

constexpr const char* kFormatName = "aviary-token-data";
constexpr const char* kPrepareHint = "re-run `aviary data prepare` to rebuild the dataset";

std::string errno_text() {
  return std::strerror(errno);
}

template <typename T>
T get_field(const nlohmann::json& j, const char* key, const std::string& context) {
  if (!j.is_object() || !j.contains(key)) {
    throw_corruption(std::string("missing key '") + key + "'", context, kPrepareHint);
  }
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    throw_corruption(
        std::string("key '") + key + "' has the wrong type (" + j.at(key).type_name() + ")",
        context, kPrepareHint);
  }
}

}  // namespace

// ---- prefix.json ------------------------------------------------------------------------------

nlohmann::json TokenDatasetMeta::to_json() const {
  nlohmann::json skipped_json = nlohmann::json::object();
  for (const auto& [reason, n] : skipped)
    skipped_json[reason] = n;
  return {
      {"format", kFormatName},
      {"version", kIdxVersion},
      {"tokenizer",
       {{"fingerprint", tokenizer_fingerprint},
        {"kind", tokenizer_kind},
        {"vocab_size", vocab_size},
        {"eos_id", eos_id}}},
      {"counts", {{"docs", num_docs}, {"tokens", num_tokens}, {"skipped", skipped_json}}},
      {"skipped_examples", skipped_examples},
      {"sources", sources},
      {"text_field", text_field},
      {"sft", sft},
  };
}

TokenDatasetMeta TokenDatasetMeta::from_json(const nlohmann::json& j, const std::string& context) {
  if (get_field<std::string>(j, "format", context) != kFormatName) {
    throw_corruption("not an Aviary token dataset description (format is not '" +
                         std::string(kFormatName) + "')",
                     context, kPrepareHint);
  }
  const auto version = get_field<uint32_t>(j, "version", context);
  if (version != kIdxVersion) {
    throw_corruption("unsupported token data version " + std::to_string(version) +
                         " (this build reads version " + std::to_string(kIdxVersion) + ")",
                     context, kPrepareHint);
  }
  TokenDatasetMeta m;
  const auto tok = get_field<nlohmann::json>(j, "tokenizer", context);
  m.tokenizer_fingerprint = get_field<std::string>(tok, "fingerprint", context + ": tokenizer");
  m.tokenizer_kind = get_field<std::string>(tok, "kind", context + ": tokenizer");
  m.vocab_size = get_field<int64_t>(tok, "vocab_size", context + ": tokenizer");
  m.eos_id = get_field<int64_t>(tok, "eos_id", context + ": tokenizer");
  const auto counts = get_field<nlohmann::json>(j, "counts", context);
  m.num_docs = get_field<int64_t>(counts, "docs", context + ": counts");
  m.num_tokens = get_field<int64_t>(counts, "tokens", context + ": counts");
  m.skipped = get_field<std::map<std::string, int64_t>>(counts, "skipped", context + ": counts");
  m.skipped_examples = get_field<std::vector<std::string>>(j, "skipped_examples", context);
  m.sources = get_field<std::vector<std::string>>(j, "sources", context);
  m.text_field = get_field<std::string>(j, "text_field", context);
  if (j.contains("sft") && !j["sft"].is_null()) {
    m.sft = j["sft"];
    if (!m.sft.is_object()) throw_corruption("key 'sft' is not an object", context, kPrepareHint);
  }
  if (m.vocab_size <= 0 || m.vocab_size > (int64_t{1} << 32)) {
    throw_corruption("tokenizer.vocab_size " + std::to_string(m.vocab_size) + " is out of range",
                     context, kPrepareHint);
  }
  return m;
}

// ---- writer -----------------------------------------------------------------------------------

TokenDatasetWriter::TokenDatasetWriter(std::string prefix) : prefix_(std::move(prefix)) {
  const std::string bin_path = prefix_ + ".bin";
  const auto dir = std::filesystem::path(bin_path).parent_path();
  if (!dir.empty() && !std::filesystem::is_directory(dir)) {
    throw_not_found("output directory does not exist", dir.string(),
                    "create it first (mkdir -p) or choose another --output prefix");
  }
  for (int attempt = 0; attempt < 16 && !bin_; ++attempt) {
    bin_tmp_ = temp_sibling_path(bin_path);
    const int fd = ::open(bin_tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0) {
      if (errno == EEXIST) continue;
      throw_io("cannot create " + bin_tmp_ + ": " + errno_text(), bin_path,
               "check that the directory is writable");
    }
    bin_ = ::fdopen(fd, "wb");
    if (!bin_) {
      ::close(fd);
      ::unlink(bin_tmp_.c_str());
      throw_io("cannot open temp file: " + errno_text(), bin_tmp_);
    }
  }
  if (!bin_) throw_io("cannot find a free temp file name next to it", bin_path);
}

TokenDatasetWriter::~TokenDatasetWriter() {
  if (bin_) std::fclose(bin_);
  if (!finished_) ::unlink(bin_tmp_.c_str());
}

void TokenDatasetWriter::add_document(const uint32_t* tokens, size_t count,
                                      const uint8_t* trainable) {
  if (finished_) throw_invalid("add_document() after finish()", prefix_);
  if (num_docs() == 0) {
    masked_ = trainable != nullptr;
  } else if (masked_ != (trainable != nullptr)) {
    throw_invalid("a loss mask must be given for every document or for none", prefix_);
  }
  if (trainable) mask_.insert(mask_.end(), trainable, trainable + count);
  if (count > 0 && std::fwrite(tokens, sizeof(uint32_t), count, bin_) != count) {
    throw_io("cannot write tokens: " + errno_text(), bin_tmp_, "check free disk space");
  }
  offsets_.push_back(offsets_.back() + count);
}

void TokenDatasetWriter::finish(TokenDatasetMeta meta) {
  if (finished_) throw_invalid("finish() called twice", prefix_);
  if (num_docs() == 0) {
    throw_invalid("no documents to write: the dataset would be empty", prefix_,
                  "check the input files and the skipped-line report (wrong --text-field?)");
  }
  const std::string bin_path = prefix_ + ".bin";
  const std::string json_path = prefix_ + ".json";
  std::error_code ec;
  std::filesystem::remove(json_path, ec);  // invalidate an old dataset before replacing parts

  if (std::fflush(bin_) != 0 || ::fsync(::fileno(bin_)) != 0) {
    throw_io("cannot flush tokens: " + errno_text(), bin_tmp_, "check free disk space");
  }
  std::fclose(bin_);
  bin_ = nullptr;
  if (std::rename(bin_tmp_.c_str(), bin_path.c_str()) != 0) {
    throw_io("cannot rename " + bin_tmp_ + " into place: " + errno_text(), bin_path);
  }
  finished_ = true;  // the temp file is gone either way from here on

  write_file_atomic(prefix_ + ".idx", [&](std::FILE* f) {
    const uint32_t version = kIdxVersion;
    const uint32_t token_bytes = sizeof(uint32_t);
    const uint64_t n = static_cast<uint64_t>(num_docs());
    std::fwrite(kIdxMagic, 1, sizeof(kIdxMagic), f);
    std::fwrite(&version, sizeof(version), 1, f);
    std::fwrite(&token_bytes, sizeof(token_bytes), 1, f);
    std::fwrite(&n, sizeof(n), 1, f);
    std::fwrite(offsets_.data(), sizeof(uint64_t), offsets_.size(), f);
  });
  meta.num_docs = num_docs();
  meta.num_tokens = num_tokens();
  if (masked_) {
    write_file_atomic(prefix_ + ".mask",
                      std::string_view(reinterpret_cast<const char*>(mask_.data()), mask_.size()));
    if (meta.sft.is_null()) meta.sft = nlohmann::json::object();
  } else {
    std::filesystem::remove(prefix_ + ".mask", ec);
    meta.sft = nullptr;
  }
  write_file_atomic(json_path, meta.to_json().dump(2) + "\n");
}

// ---- reader -----------------------------------------------------------------------------------

struct TokenDataset::Mapping {
  const void* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data && size) ::munmap(const_cast<void*>(data), size);
  }

  static std::unique_ptr<Mapping> map(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno == ENOENT) {
        throw_not_found("file not found", path,
                        "pass the prefix given to `aviary data prepare --output` (without "
                        ".bin/.idx)");
      }
      throw_io("cannot open: " + errno_text(), path);
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      throw_io("cannot stat: " + errno_text(), path);
    }
    auto m = std::make_unique<Mapping>();
    m->size = static_cast<size_t>(st.st_size);
    if (m->size > 0) {
      void* p = ::mmap(nullptr, m->size, PROT_READ, MAP_SHARED, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw_io("cannot mmap: " + errno_text(), path);
      }
      m->data = p;
    }
    ::close(fd);
    return m;
  }
};

TokenDataset::~TokenDataset() = default;

std::shared_ptr<TokenDataset> TokenDataset::open(const std::string& prefix,
                                                 const Options& options) {
  std::shared_ptr<TokenDataset> ds(new TokenDataset());
  ds->prefix_ = prefix;
  const std::string json_path = prefix + ".json";
  const std::string idx_path = prefix + ".idx";
  const std::string bin_path = prefix + ".bin";

  // prefix.json: the completion marker and the tokenizer it was made with.
  std::ifstream in(json_path);
  if (!in) {
    throw_not_found(
        "file not found (the dataset is missing or its preparation did not finish)", json_path,
        "pass the prefix given to `aviary data prepare --output`; " + std::string(kPrepareHint));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  const auto j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw_corruption("not valid JSON", json_path, kPrepareHint);
  ds->meta_ = TokenDatasetMeta::from_json(j, json_path);
  const auto& meta = ds->meta_;

  if (options.tokenizer && options.tokenizer->fingerprint() != meta.tokenizer_fingerprint) {
    throw_invalid("tokenizer fingerprint " + options.tokenizer->fingerprint() +
                      " differs from the one the data was prepared with (" +
                      meta.tokenizer_fingerprint + ", a " + meta.tokenizer_kind +
                      " tokenizer with " + std::to_string(meta.vocab_size) + " tokens)",
                  json_path, "re-run aviary data prepare with this tokenizer");
  }

  // prefix.idx
  ds->idx_map_ = Mapping::map(idx_path);
  const auto& idx = *ds->idx_map_;
  const auto* idx_bytes = static_cast<const char*>(idx.data);
  if (idx.size < kIdxHeaderBytes) {
    throw_corruption("truncated header: expected at least " + std::to_string(kIdxHeaderBytes) +
                         " bytes, the file has " + std::to_string(idx.size),
                     idx_path, kPrepareHint);
  }
  if (std::memcmp(idx_bytes, kIdxMagic, sizeof(kIdxMagic)) != 0) {
    throw_corruption("bad magic: not an Aviary .idx file (expected \"AVYIDX1\\0\")", idx_path,
                     kPrepareHint);
  }
  uint32_t version = 0, token_bytes = 0;
  uint64_t n = 0;
  std::memcpy(&version, idx_bytes + 8, 4);
  std::memcpy(&token_bytes, idx_bytes + 12, 4);
  std::memcpy(&n, idx_bytes + 16, 8);
  if (version != kIdxVersion) {
    throw_corruption("unsupported version " + std::to_string(version) + " (expected " +
                         std::to_string(kIdxVersion) + ")",
                     idx_path, kPrepareHint);
  }
  if (token_bytes != sizeof(uint32_t)) {
    throw_corruption("unsupported token size " + std::to_string(token_bytes) + " (expected 4)",
                     idx_path, kPrepareHint);
  }
  if (n == 0) {
    throw_invalid("the dataset is empty (0 documents)", idx_path,
                  "prepare it from inputs that contain text");
  }
  const uint64_t expected_idx = kIdxHeaderBytes + (n + 1) * sizeof(uint64_t);
  if (n > (uint64_t{1} << 56) || idx.size != expected_idx) {
    throw_corruption("size mismatch: the header says " + std::to_string(n) +
                         " documents, so the file should be " + std::to_string(expected_idx) +
                         " bytes, but it is " + std::to_string(idx.size) + " bytes" +
                         (idx.size < expected_idx ? " (truncated)" : ""),
                     idx_path, kPrepareHint);
  }
  ds->offsets_ = reinterpret_cast<const uint64_t*>(idx_bytes + kIdxHeaderBytes);
  ds->num_docs_ = static_cast<int64_t>(n);
  if (ds->offsets_[0] != 0) {
    throw_corruption(
        "the first document offset is " + std::to_string(ds->offsets_[0]) + ", expected 0",
        idx_path, kPrepareHint);
  }
  for (uint64_t d = 0; d < n; ++d) {
    if (ds->offsets_[d + 1] < ds->offsets_[d]) {
      throw_corruption("document offsets decrease at document " + std::to_string(d) + " (" +
                           std::to_string(ds->offsets_[d]) + " then " +
                           std::to_string(ds->offsets_[d + 1]) + ")",
                       idx_path, kPrepareHint);
    }
  }
  const uint64_t total = ds->offsets_[n];
  ds->num_tokens_ = static_cast<int64_t>(total);

  // prefix.bin
  ds->bin_map_ = Mapping::map(bin_path);
  const auto& bin = *ds->bin_map_;
  if (bin.size != total * sizeof(uint32_t)) {
    throw_corruption("size mismatch: " + idx_path + " ends at token " + std::to_string(total) +
                         ", so the file should be " + std::to_string(total * 4) +
                         " bytes, but it is " + std::to_string(bin.size) + " bytes" +
                         (bin.size < total * 4 ? " (truncated)" : ""),
                     bin_path, kPrepareHint);
  }
  ds->tokens_ = static_cast<const uint32_t*>(bin.data);

  if (meta.num_docs != ds->num_docs_ || meta.num_tokens != ds->num_tokens_) {
    throw_corruption("counts disagree with " + idx_path + ": the description says " +
                         std::to_string(meta.num_docs) + " documents / " +
                         std::to_string(meta.num_tokens) + " tokens, the index has " +
                         std::to_string(ds->num_docs_) + " / " + std::to_string(ds->num_tokens_),
                     json_path, kPrepareHint);
  }
  if (!meta.sft.is_null()) {
    const std::string mask_path = ds->prefix_ + ".mask";
    ds->mask_map_ = Mapping::map(mask_path);
    if (ds->mask_map_->size != total) {
      throw_corruption(
          "size mismatch: an SFT loss mask has one byte per token, so the file "
          "should be " +
              std::to_string(total) + " bytes, but it is " + std::to_string(ds->mask_map_->size) +
              " bytes",
          mask_path, kPrepareHint);
    }
    ds->trainable_ = static_cast<const uint8_t*>(ds->mask_map_->data);
  }
  if (options.verify_tokens) {
    const auto vocab = static_cast<uint64_t>(meta.vocab_size);
    uint32_t max_id = 0;
    for (uint64_t i = 0; i < total; ++i)
      max_id = std::max(max_id, ds->tokens_[i]);
    if (max_id >= vocab) {
      uint64_t at = 0;
      while (ds->tokens_[at] < vocab)
        ++at;
      throw_corruption("token id " + std::to_string(ds->tokens_[at]) + " at position " +
                           std::to_string(at) + " is outside the vocabulary (size " +
                           std::to_string(vocab) + ")",
                       bin_path, kPrepareHint);
    }
  }
  return ds;
}

void TokenDataset::copy_tokens(int64_t begin, int64_t count, int32_t* out) const {
  if (begin < 0 || count < 0 || begin + count > num_tokens_) {
    throw_invalid("token range [" + std::to_string(begin) + ", " + std::to_string(begin + count) +
                      ") is outside the dataset (" + std::to_string(num_tokens_) + " tokens)",
                  prefix_ + ".bin");
  }
  const auto vocab = static_cast<uint32_t>(std::min<int64_t>(meta_.vocab_size, UINT32_MAX));
  const uint32_t* src = tokens_ + begin;
  uint32_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    out[i] = static_cast<int32_t>(src[i]);
    bad |= static_cast<uint32_t>(src[i] >= vocab);
  }
  if (bad) {
    for (int64_t i = 0; i < count; ++i) {
      if (src[i] >= vocab) {
        throw_corruption("token id " + std::to_string(src[i]) + " at position " +
                             std::to_string(begin + i) + " is outside the vocabulary (size " +
                             std::to_string(meta_.vocab_size) + ")",
                         prefix_ + ".bin", kPrepareHint);
      }
    }
  }
}

std::vector<int32_t> TokenDataset::document(int64_t doc) const {
  if (doc < 0 || doc >= num_docs_) {
    throw_invalid("document " + std::to_string(doc) + " is out of range (the dataset has " +
                      std::to_string(num_docs_) + ")",
                  prefix_ + ".idx");
  }
  std::vector<int32_t> out(static_cast<size_t>(doc_length(doc)));
  copy_tokens(doc_begin(doc), doc_length(doc), out.data());
  return out;
}

}  // namespace aviary::data
