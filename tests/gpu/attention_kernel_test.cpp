// Attention kernels (kernels/attention_{forward,decode,backward}.cu) against the CPU reference.
//
// Tolerance, FlashAttention-style: with x_exact from the reference in double (kExact) on the same
// rounded inputs, the kernel's max abs error must be at most 2x the max abs error of the same
// computation done the PyTorch way at the input precision (kTorch), plus a small atol stated at
// the assertion. lse (fp32) is compared with the exact value directly. Rows that see no key must
// give o = 0 and lse = +inf. Outputs start as NaN bytes, so a missed or stray write shows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "aviary/kernels/attention.h"
#include "aviary/kernels/attention_reference.h"
#include "gpu/gpu_test_util.h"

namespace aviary::kernels {
namespace {

using test::DeviceBuffer;

double out_atol(DType dtype) {
  return dtype == DType::bf16 ? 1e-3 : 2e-4;  // a fraction of one last place at |o| ~ 0.5
}

// Host buffer of 16-bit elements with random normal values (times `scale`), rounded to dtype.
std::vector<uint16_t> random_values(DType dtype, size_t n, uint32_t seed, float scale) {
  std::vector<uint16_t> v(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  for (auto& x : v)
    store_from_float(dtype, &x, 0, normal(rng));
  return v;
}

template <class T>
bool upload(DeviceBuffer& buf, const std::vector<T>& host) {
  return buf.status() == cudaSuccess && cudaMemcpy(buf.get(), host.data(), host.size() * sizeof(T),
                                                   cudaMemcpyHostToDevice) == cudaSuccess;
}

template <class T>
bool download(std::vector<T>* host, const DeviceBuffer& buf) {
  return cudaMemcpy(host->data(), buf.get(), host->size() * sizeof(T), cudaMemcpyDeviceToHost) ==
         cudaSuccess;
}

// Rows worth checking: all of them for small problems; otherwise the first and last 16 and every
// 7th (the CPU reference is O(len_q * len_k * dim) per head, in double).
bool checked_row(int i, int len_q, int64_t work) {
  return work <= (int64_t{1} << 22) || i < 16 || i >= len_q - 16 || i % 7 == 0;
}

// Max-error bookkeeping of one comparison.
struct Errors {
  double kernel = 0.0;  // max |kernel - exact|
  double torch = 0.0;   // max |kTorch reference - exact|
  double lse = 0.0;     // max |lse kernel - lse exact| / max(1, |lse exact|)
  int64_t bad = 0;      // non-finite outputs, wrong empty rows, wrong lse infinities
};

void compare_row(DType dtype, const uint16_t* o_row, float lse_k, const double* o_exact,
                 double lse_exact, const double* o_torch, int64_t dim, Errors* e) {
  for (int64_t d = 0; d < dim; ++d) {
    const double got = load_as_float(dtype, o_row, d);
    if (!std::isfinite(got)) {
      ++e->bad;
      continue;
    }
    e->kernel = std::max(e->kernel, std::abs(got - o_exact[d]));
    e->torch = std::max(e->torch, std::abs(o_torch[d] - o_exact[d]));
  }
  if (std::isinf(lse_exact)) {
    e->bad += !(std::isinf(lse_k) && lse_k > 0);
  } else if (!std::isfinite(lse_k)) {
    ++e->bad;
  } else {
    e->lse = std::max(e->lse, std::abs(lse_k - lse_exact) / std::max(1.0, std::abs(lse_exact)));
  }
}

// ---- forward -----------------------------------------------------------------------------------

struct FwdCase {
  std::string name;
  DType dtype;
  int64_t dim;
  int64_t hq, hkv;
  std::vector<int32_t> lens_q, lens_k;  // one entry per sequence
  bool varlen;                          // packed tokens; else all lengths must be equal
  bool causal;
  int64_t head_pad;  // extra elements between heads (strides stay multiples of 8)
  float q_scale;     // > 1 makes the softmax peakier
};

void PrintTo(const FwdCase& c, std::ostream* os) {
  *os << c.name;
}

class AttentionForwardKernelTest : public test::GpuTest,
                                   public ::testing::WithParamInterface<FwdCase> {};

TEST_P(AttentionForwardKernelTest, MatchesReference) {
  const FwdCase& c = GetParam();
  const int64_t batch = static_cast<int64_t>(c.lens_q.size());
  std::vector<int32_t> cu_q = {0}, cu_k = {0};
  for (int64_t b = 0; b < batch; ++b) {
    cu_q.push_back(cu_q.back() + c.lens_q[static_cast<size_t>(b)]);
    cu_k.push_back(cu_k.back() + c.lens_k[static_cast<size_t>(b)]);
  }
  const int64_t max_q = *std::max_element(c.lens_q.begin(), c.lens_q.end());
  const int64_t max_k = *std::max_element(c.lens_k.begin(), c.lens_k.end());
  const int64_t head_stride = c.dim + c.head_pad;
  const int64_t q_row = c.hq * head_stride, k_row = c.hkv * head_stride;
  const int64_t rows_q = cu_q.back(), rows_k = cu_k.back();  // fixed: batch * len
  const size_t nq = static_cast<size_t>(rows_q * q_row), nk = static_cast<size_t>(rows_k * k_row);
  const uint32_t seed = static_cast<uint32_t>(rows_q * 31 + rows_k * 7 + c.dim + c.hq);
  const auto q = random_values(c.dtype, nq, seed, c.q_scale);
  const auto k = random_values(c.dtype, nk, seed + 1, 1.0f);
  const auto v = random_values(c.dtype, nk, seed + 2, 1.0f);
  const int64_t lse_stride = rows_q + 5;  // varlen lse [hq, total_q] with a padded head stride

  DeviceBuffer d_q(nq * 2), d_k(nk * 2), d_v(nk * 2), d_o(nq * 2);
  DeviceBuffer d_lse(static_cast<size_t>(c.hq * lse_stride) * 4);
  DeviceBuffer d_cq(cu_q.size() * 4), d_ck(cu_k.size() * 4);
  ASSERT_TRUE(upload(d_q, q) && upload(d_k, k) && upload(d_v, v));
  ASSERT_TRUE(upload(d_cq, cu_q) && upload(d_ck, cu_k));
  AVIARY_CUDA_ASSERT(d_o.status());
  AVIARY_CUDA_ASSERT(d_lse.status());
  AVIARY_CUDA_ASSERT(cudaMemset(d_o.get(), 0xff, nq * 2));
  AVIARY_CUDA_ASSERT(cudaMemset(d_lse.get(), 0xff, static_cast<size_t>(c.hq * lse_stride) * 4));

  AttentionForwardParams p;
  p.dtype = c.dtype;
  p.q = d_q.get();
  p.k = d_k.get();
  p.v = d_v.get();
  p.o = d_o.get();
  p.lse = static_cast<float*>(d_lse.get());
  p.batch = batch;
  p.seqlen_q = max_q;
  p.seqlen_k = max_k;
  p.heads_q = c.hq;
  p.heads_kv = c.hkv;
  p.head_dim = c.dim;
  p.q_row_stride = p.o_row_stride = q_row;
  p.k_row_stride = p.v_row_stride = k_row;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = head_stride;
  if (c.varlen) {
    p.cu_seqlens_q = static_cast<const int32_t*>(d_cq.get());
    p.cu_seqlens_k = static_cast<const int32_t*>(d_ck.get());
    p.lse_head_stride = lse_stride;
  } else {
    p.q_batch_stride = p.o_batch_stride = max_q * q_row;
    p.k_batch_stride = p.v_batch_stride = max_k * k_row;
    p.lse_batch_stride = c.hq * max_q;
    p.lse_head_stride = max_q;
  }
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.dim)));
  p.causal = c.causal;
  const cudaError_t err = attention_forward(p, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());

  std::vector<uint16_t> o(nq);
  std::vector<float> lse(static_cast<size_t>(c.hq * lse_stride));
  ASSERT_TRUE(download(&o, d_o) && download(&lse, d_lse));

  AttentionForwardParams host = p;
  host.q = q.data();
  host.k = k.data();
  host.v = v.data();
  host.cu_seqlens_q = c.varlen ? cu_q.data() : nullptr;
  host.cu_seqlens_k = c.varlen ? cu_k.data() : nullptr;
  Errors e;
  int64_t padding_writes = 0;
  std::vector<double> probs, o_exact(static_cast<size_t>(c.dim)),
      o_torch(static_cast<size_t>(c.dim));
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < c.hq; ++h) {
      const detail::AttnHeadView hv = detail::attention_head_view(host, b, h);
      for (int i = 0; i < hv.len_q; ++i) {
        const int64_t row = cu_q[static_cast<size_t>(b)] + i;  // fixed: b * len + i, the same
        for (int64_t d = c.dim; d < head_stride; ++d)          // head padding untouched
          padding_writes += o[static_cast<size_t>(row * q_row + h * head_stride + d)] != 0xffff;
        if (!checked_row(i, hv.len_q, hv.len_q * int64_t{hv.len_k} * c.hq)) continue;
        double lse_exact = 0.0, lse_torch = 0.0;
        detail::attention_probs(hv, i, AttentionRefPrecision::kExact, &probs, &lse_exact);
        detail::attention_output(hv, probs, AttentionRefPrecision::kExact, o_exact.data());
        detail::attention_probs(hv, i, AttentionRefPrecision::kTorch, &probs, &lse_torch);
        detail::attention_output(hv, probs, AttentionRefPrecision::kTorch, o_torch.data());
        const int64_t lse_i = detail::attention_lse_index(host, b, h, i);
        compare_row(c.dtype, &o[static_cast<size_t>(row * q_row + h * head_stride)],
                    lse[static_cast<size_t>(lse_i)], o_exact.data(), lse_exact, o_torch.data(),
                    c.dim, &e);
      }
    }
  }
  EXPECT_EQ(e.bad, 0) << "non-finite outputs or wrong lse of rows without visible keys";
  EXPECT_EQ(padding_writes, 0) << "the kernel wrote into the padding between heads";
  // FlashAttention criterion: <= 2x PyTorch's own error at this precision, + atol (bf16 1e-3,
  // f16 2e-4: below one last place of the outputs, covers cases where PyTorch's error is ~0).
  EXPECT_LE(e.kernel, 2.0 * e.torch + out_atol(c.dtype))
      << "max |o_kernel - o_exact| = " << e.kernel << ", max |o_torch - o_exact| = " << e.torch;
  // lse: fp32 from exact products, exp2f and an fp32 sum: relative 1e-5 is ~100 fp32 ulps.
  EXPECT_LE(e.lse, 1e-5) << "max relative lse error";
}

std::vector<FwdCase> forward_cases() {
  std::vector<FwdCase> cases;
  const auto fixed = [](int n, int32_t len) {
    return std::vector<int32_t>(static_cast<size_t>(n), len);
  };
  for (const DType dtype : {DType::bf16, DType::f16}) {
    for (const int64_t dim : {int64_t{64}, int64_t{128}}) {
      const bool bf = dtype == DType::bf16;
      const auto add = [&](std::string name, int64_t hq, int64_t hkv, std::vector<int32_t> lq,
                           std::vector<int32_t> lk, bool varlen, bool causal, int64_t pad = 0,
                           float q_scale = 1.0f) {
        name = std::string(bf ? "bf16" : "f16") + "_d" + std::to_string(dim) + "_" + name;
        cases.push_back({std::move(name), dtype, dim, hq, hkv, std::move(lq), std::move(lk), varlen,
                         causal, pad, q_scale});
      };
      add("s1", 4, 4, fixed(2, 1), fixed(2, 1), false, false);
      add("s1_causal", 4, 4, fixed(2, 1), fixed(2, 1), false, true);
      add("s113", 4, 4, fixed(2, 113), fixed(2, 113), false, false);
      add("s113_causal_gqa", 8, 2, fixed(1, 113), fixed(1, 113), false, true);
      add("s1023_causal_mqa", 4, 1, fixed(1, 1023), fixed(1, 1023), false, true);
      add("s1024", 2, 2, fixed(1, 1024), fixed(1, 1024), false, false, 8);
      add("s1024_causal_gqa", 8, 2, fixed(1, 1024), fixed(1, 1024), false, true);
      add("q77_k300_causal", 4, 2, fixed(2, 77), fixed(2, 300), false, true);
      add("q300_k77_causal", 4, 2, fixed(2, 300), fixed(2, 77), false, true);  // blind rows
      add("q1_k1000_gqa", 8, 2, fixed(3, 1), fixed(3, 1000), false, false);
      add("peaky_s257_causal", 4, 4, fixed(1, 257), fixed(1, 257), false, true, 0, 4.0f);
      add("varlen_causal_gqa", 8, 2, {130, 0, 1, 64, 500, 0, 65}, {130, 7, 1, 64, 600, 0, 300},
          true, true, 8);
      add("varlen_gqa", 8, 2, {130, 0, 1, 64, 500, 0, 65}, {130, 7, 1, 64, 600, 0, 300}, true,
          false);
      add("varlen_causal_q_longer", 4, 4, {100, 30}, {40, 30}, true, true);
    }
  }
  return cases;
}

std::string fwd_name(const ::testing::TestParamInfo<FwdCase>& info) {
  return info.param.name;
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionForwardKernelTest, ::testing::ValuesIn(forward_cases()),
                         fwd_name);

// ---- decode ------------------------------------------------------------------------------------

struct DecodeCase {
  std::string name;
  DType dtype;
  int64_t dim, hq, hkv, seqlen_q;
  std::vector<int32_t> seqlens_k;
  int64_t cap;  // cache capacity (max_seqlen_k)
  bool causal;
  int num_splits;  // 0: heuristic
};

void PrintTo(const DecodeCase& c, std::ostream* os) {
  *os << c.name;
}

class AttentionDecodeKernelTest : public test::GpuTest,
                                  public ::testing::WithParamInterface<DecodeCase> {};

TEST_P(AttentionDecodeKernelTest, MatchesReference) {
  const DecodeCase& c = GetParam();
  const int64_t batch = static_cast<int64_t>(c.seqlens_k.size());
  const int64_t q_row = c.hq * c.dim, k_row = c.hkv * c.dim;
  const size_t nq = static_cast<size_t>(batch * c.seqlen_q * q_row);
  const size_t nk = static_cast<size_t>(batch * c.cap * k_row);
  const uint32_t seed = static_cast<uint32_t>(batch * 13 + c.cap + c.dim + c.seqlen_q);
  const auto q = random_values(c.dtype, nq, seed, 1.0f);
  const auto k = random_values(c.dtype, nk, seed + 1, 1.0f);
  const auto v = random_values(c.dtype, nk, seed + 2, 1.0f);
  const size_t n_lse = static_cast<size_t>(batch * c.hq * c.seqlen_q);

  AttentionDecodeParams p;
  p.dtype = c.dtype;
  p.batch = batch;
  p.seqlen_q = c.seqlen_q;
  p.max_seqlen_k = c.cap;
  p.heads_q = c.hq;
  p.heads_kv = c.hkv;
  p.head_dim = c.dim;
  p.q_batch_stride = p.o_batch_stride = c.seqlen_q * q_row;
  p.q_row_stride = p.o_row_stride = q_row;
  p.q_head_stride = p.o_head_stride = c.dim;
  p.k_batch_stride = p.v_batch_stride = c.cap * k_row;
  p.k_row_stride = p.v_row_stride = k_row;
  p.k_head_stride = p.v_head_stride = c.dim;
  p.lse_batch_stride = c.hq * c.seqlen_q;
  p.lse_head_stride = c.seqlen_q;
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.dim)));
  p.causal = c.causal;
  p.num_splits = c.num_splits;
  const int splits = attention_decode_num_splits(p);
  ASSERT_GE(splits, 1);
  const size_t ws_bytes = attention_decode_workspace_bytes(p);
  EXPECT_EQ(ws_bytes == 0, splits == 1);

  DeviceBuffer d_q(nq * 2), d_k(nk * 2), d_v(nk * 2), d_o(nq * 2), d_lse(n_lse * 4);
  DeviceBuffer d_len(c.seqlens_k.size() * 4), d_ws(ws_bytes);
  ASSERT_TRUE(upload(d_q, q) && upload(d_k, k) && upload(d_v, v) && upload(d_len, c.seqlens_k));
  AVIARY_CUDA_ASSERT(d_o.status());
  AVIARY_CUDA_ASSERT(d_lse.status());
  AVIARY_CUDA_ASSERT(d_ws.status());
  AVIARY_CUDA_ASSERT(cudaMemset(d_o.get(), 0xff, nq * 2));
  AVIARY_CUDA_ASSERT(cudaMemset(d_lse.get(), 0xff, n_lse * 4));
  AVIARY_CUDA_ASSERT(cudaMemset(d_ws.get(), 0xff, ws_bytes));  // every used slot is written
  p.q = d_q.get();
  p.k_cache = d_k.get();
  p.v_cache = d_v.get();
  p.o = d_o.get();
  p.lse = static_cast<float*>(d_lse.get());
  p.seqlens_k = static_cast<const int32_t*>(d_len.get());
  p.workspace = static_cast<float*>(d_ws.get());
  p.workspace_bytes = ws_bytes;
  const cudaError_t err = attention_decode(p, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<uint16_t> o(nq);
  std::vector<float> lse(n_lse);
  ASSERT_TRUE(download(&o, d_o) && download(&lse, d_lse));

  AttentionDecodeParams host = p;
  host.q = q.data();
  host.k_cache = k.data();
  host.v_cache = v.data();
  host.seqlens_k = c.seqlens_k.data();
  std::vector<std::vector<double>> exact_o;
  std::vector<double> exact_lse;
  attention_decode_reference_rows(host, AttentionRefPrecision::kExact,
                                  [&](int64_t, int64_t, int64_t, const double* ov, double l) {
                                    exact_o.emplace_back(ov, ov + c.dim);
                                    exact_lse.push_back(l);
                                  });
  Errors e;
  size_t n = 0;
  attention_decode_reference_rows(
      host, AttentionRefPrecision::kTorch,
      [&](int64_t b, int64_t h, int64_t i, const double* ov, double) {
        const size_t at =
            static_cast<size_t>(b * p.o_batch_stride + i * p.o_row_stride + h * c.dim);
        compare_row(c.dtype, &o[at],
                    lse[static_cast<size_t>(b * p.lse_batch_stride + h * p.lse_head_stride + i)],
                    exact_o[n].data(), exact_lse[n], ov, c.dim, &e);
        ++n;
      });
  EXPECT_EQ(e.bad, 0) << "non-finite outputs or wrong lse of rows without visible keys";
  EXPECT_LE(e.kernel, 2.0 * e.torch + out_atol(c.dtype))
      << "max |o_kernel - o_exact| = " << e.kernel << ", max |o_torch - o_exact| = " << e.torch
      << " (" << splits << " splits)";
  EXPECT_LE(e.lse, 1e-5) << "max relative lse error (" << splits << " splits)";
}

std::vector<DecodeCase> decode_cases() {
  std::vector<DecodeCase> cases;
  for (const DType dtype : {DType::bf16, DType::f16}) {
    for (const int64_t dim : {int64_t{64}, int64_t{128}}) {
      const auto add = [&](const std::string& name, int64_t hq, int64_t hkv, int64_t sq,
                           std::vector<int32_t> lens, int64_t cap, bool causal, int splits) {
        cases.push_back({std::string(dtype == DType::bf16 ? "bf16" : "f16") + "_d" +
                             std::to_string(dim) + "_" + name,
                         dtype, dim, hq, hkv, sq, std::move(lens), cap, causal, splits});
      };
      add("mixed_gqa_auto", 8, 2, 1, {1, 113, 1023, 0, 4000, 1024}, 4000, false, 0);
      add("mixed_gqa_1split", 8, 2, 1, {1, 113, 1023, 0, 1024}, 1024, false, 1);
      add("mixed_mqa_7splits", 32, 1, 1, {1, 113, 1023, 0, 1024}, 1024, false, 7);
      add("mha_batch1_auto", 4, 4, 1, {8191}, 8191, false, 0);
      add("gqa_q4_causal_auto", 8, 2, 4, {3, 2, 1000, 4}, 1000, true, 0);
      add("gqa_q4_causal_3splits", 8, 2, 4, {3, 2, 1000, 4}, 1000, true, 3);
    }
  }
  return cases;
}

std::string decode_name(const ::testing::TestParamInfo<DecodeCase>& info) {
  return info.param.name;
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionDecodeKernelTest, ::testing::ValuesIn(decode_cases()),
                         decode_name);

// ---- backward ----------------------------------------------------------------------------------

struct BwdCase {
  std::string name;
  DType dtype;
  int64_t dim, hq, hkv;
  std::vector<int32_t> lens_q, lens_k;
  bool varlen, causal;
};

void PrintTo(const BwdCase& c, std::ostream* os) {
  *os << c.name;
}

class AttentionBackwardKernelTest : public test::GpuTest,
                                    public ::testing::WithParamInterface<BwdCase> {};

// Gradients vs the reference backward: kernel error <= 2x the error of torch-style bf16/f16
// autograd (kTorch) vs exact, + atol. o and lse come from the reference (kExact, o rounded to the
// dtype as a forward kernel would store it), so this isolates the backward kernels. Run twice:
// the results must be bitwise identical (no atomics).
TEST_P(AttentionBackwardKernelTest, MatchesReferenceAndIsDeterministic) {
  const BwdCase& c = GetParam();
  const int64_t batch = static_cast<int64_t>(c.lens_q.size());
  std::vector<int32_t> cu_q = {0}, cu_k = {0};
  for (int64_t b = 0; b < batch; ++b) {
    cu_q.push_back(cu_q.back() + c.lens_q[static_cast<size_t>(b)]);
    cu_k.push_back(cu_k.back() + c.lens_k[static_cast<size_t>(b)]);
  }
  const int64_t max_q = *std::max_element(c.lens_q.begin(), c.lens_q.end());
  const int64_t max_k = *std::max_element(c.lens_k.begin(), c.lens_k.end());
  const int64_t q_row = c.hq * c.dim, k_row = c.hkv * c.dim;
  const int64_t rows_q = cu_q.back(), rows_k = cu_k.back();
  const size_t nq = static_cast<size_t>(rows_q * q_row), nk = static_cast<size_t>(rows_k * k_row);
  const uint32_t seed = static_cast<uint32_t>(rows_q * 17 + rows_k * 3 + c.dim + c.hkv);
  const auto q = random_values(c.dtype, nq, seed, 1.0f);
  const auto k = random_values(c.dtype, nk, seed + 1, 1.0f);
  const auto v = random_values(c.dtype, nk, seed + 2, 1.0f);
  const auto dout = random_values(c.dtype, nq, seed + 3, 1.0f);

  // Forward on the host: o (dtype) and lse ([hq, rows_q] varlen, [b, hq, s] fixed).
  AttentionForwardParams f;
  f.dtype = c.dtype;
  f.batch = batch;
  f.seqlen_q = max_q;
  f.seqlen_k = max_k;
  f.heads_q = c.hq;
  f.heads_kv = c.hkv;
  f.head_dim = c.dim;
  f.q_row_stride = f.o_row_stride = q_row;
  f.k_row_stride = f.v_row_stride = k_row;
  f.q_head_stride = f.k_head_stride = f.v_head_stride = f.o_head_stride = c.dim;
  if (c.varlen) {
    f.cu_seqlens_q = cu_q.data();
    f.cu_seqlens_k = cu_k.data();
    f.lse_head_stride = rows_q;
  } else {
    f.q_batch_stride = f.o_batch_stride = max_q * q_row;
    f.k_batch_stride = f.v_batch_stride = max_k * k_row;
    f.lse_batch_stride = c.hq * max_q;
    f.lse_head_stride = max_q;
  }
  f.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.dim)));
  f.causal = c.causal;
  std::vector<uint16_t> o(nq);
  std::vector<float> lse(static_cast<size_t>(c.hq * rows_q));
  f.q = q.data();
  f.k = k.data();
  f.v = v.data();
  f.o = o.data();
  f.lse = lse.data();
  attention_forward_reference(f);

  AttentionBackwardParams p;
  p.dtype = c.dtype;
  p.batch = batch;
  p.seqlen_q = max_q;
  p.seqlen_k = max_k;
  p.heads_q = c.hq;
  p.heads_kv = c.hkv;
  p.head_dim = c.dim;
  p.q_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride = f.q_batch_stride;
  p.k_batch_stride = p.v_batch_stride = p.dk_batch_stride = p.dv_batch_stride = f.k_batch_stride;
  p.q_row_stride = p.o_row_stride = p.do_row_stride = p.dq_row_stride = q_row;
  p.k_row_stride = p.v_row_stride = p.dk_row_stride = p.dv_row_stride = k_row;
  p.q_head_stride = p.o_head_stride = p.do_head_stride = p.dq_head_stride = c.dim;
  p.k_head_stride = p.v_head_stride = p.dk_head_stride = p.dv_head_stride = c.dim;
  p.lse_batch_stride = f.lse_batch_stride;
  p.lse_head_stride = f.lse_head_stride;
  p.softmax_scale = f.softmax_scale;
  p.causal = c.causal;
  const size_t ws = attention_backward_workspace_bytes(p);

  DeviceBuffer d_q(nq * 2), d_k(nk * 2), d_v(nk * 2), d_o(nq * 2), d_do(nq * 2);
  DeviceBuffer d_dq(nq * 2), d_dk(nk * 2), d_dv(nk * 2), d_lse(lse.size() * 4), d_ws(ws);
  DeviceBuffer d_cq(cu_q.size() * 4), d_ck(cu_k.size() * 4);
  ASSERT_TRUE(upload(d_q, q) && upload(d_k, k) && upload(d_v, v) && upload(d_o, o) &&
              upload(d_do, dout) && upload(d_lse, lse) && upload(d_cq, cu_q) && upload(d_ck, cu_k));
  AVIARY_CUDA_ASSERT(d_dq.status());
  AVIARY_CUDA_ASSERT(d_dk.status());
  AVIARY_CUDA_ASSERT(d_dv.status());
  AVIARY_CUDA_ASSERT(d_ws.status());
  p.q = d_q.get();
  p.k = d_k.get();
  p.v = d_v.get();
  p.o = d_o.get();
  p.dout = d_do.get();
  p.lse = static_cast<const float*>(d_lse.get());
  p.dq = d_dq.get();
  p.dk = d_dk.get();
  p.dv = d_dv.get();
  p.workspace = d_ws.get();
  p.workspace_bytes = ws;
  if (c.varlen) {
    p.cu_seqlens_q = static_cast<const int32_t*>(d_cq.get());
    p.cu_seqlens_k = static_cast<const int32_t*>(d_ck.get());
  }
  std::vector<uint16_t> dq[2], dk[2], dv[2];
  for (int run = 0; run < 2; ++run) {
    AVIARY_CUDA_ASSERT(cudaMemset(d_dq.get(), 0xff, nq * 2));
    AVIARY_CUDA_ASSERT(cudaMemset(d_dk.get(), 0xff, nk * 2));
    AVIARY_CUDA_ASSERT(cudaMemset(d_dv.get(), 0xff, nk * 2));
    const cudaError_t err = attention_backward(p, nullptr);
    ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
    AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
    dq[run].resize(nq);
    dk[run].resize(nk);
    dv[run].resize(nk);
    ASSERT_TRUE(download(&dq[run], d_dq) && download(&dk[run], d_dk) && download(&dv[run], d_dv));
  }
  EXPECT_TRUE(dq[0] == dq[1] && dk[0] == dk[1] && dv[0] == dv[1]) << "not deterministic";

  AttentionBackwardParams host = p;
  host.q = q.data();
  host.k = k.data();
  host.v = v.data();
  host.o = o.data();
  host.dout = dout.data();
  host.lse = lse.data();
  host.dq = host.dk = host.dv = nullptr;
  host.cu_seqlens_q = c.varlen ? cu_q.data() : nullptr;
  host.cu_seqlens_k = c.varlen ? cu_k.data() : nullptr;
  const AttentionGrads exact = attention_backward_reference(host);
  const AttentionGrads torch_like =
      attention_backward_reference(host, AttentionRefPrecision::kTorch);
  // Dense reference layout == the contiguous layout used here (row-major [rows][heads][dim]).
  const char* names[] = {"dq", "dk", "dv"};
  const std::vector<uint16_t>* got[] = {&dq[0], &dk[0], &dv[0]};
  const std::vector<double>* ex[] = {&exact.dq, &exact.dk, &exact.dv};
  const std::vector<double>* tl[] = {&torch_like.dq, &torch_like.dk, &torch_like.dv};
  for (int t = 0; t < 3; ++t) {
    double err_k = 0.0, err_t = 0.0, mag = 0.0;
    int64_t bad = 0;
    for (size_t i = 0; i < ex[t]->size(); ++i) {
      const double g = load_as_float(c.dtype, got[t]->data(), static_cast<int64_t>(i));
      const double e = (*ex[t])[i];
      if (!std::isfinite(g)) {
        ++bad;
        continue;
      }
      err_k = std::max(err_k, std::abs(g - e));
      err_t = std::max(err_t, std::abs((*tl[t])[i] - e));
      mag = std::max(mag, std::abs(e));
    }
    EXPECT_EQ(bad, 0) << names[t] << ": non-finite or unwritten elements";
    // 2x PyTorch's own error at this precision, + atol relative to the gradient's scale (bf16
    // 1e-3, f16 2e-4 times max(1, max |grad|)).
    EXPECT_LE(err_k, 2.0 * err_t + out_atol(c.dtype) * std::max(1.0, mag))
        << names[t] << ": max |kernel - exact| = " << err_k << ", max |torch - exact| = " << err_t
        << ", max |exact| = " << mag;
  }
}

std::vector<BwdCase> backward_cases() {
  std::vector<BwdCase> cases;
  const auto fixed = [](int n, int32_t len) {
    return std::vector<int32_t>(static_cast<size_t>(n), len);
  };
  for (const DType dtype : {DType::bf16, DType::f16}) {
    for (const int64_t dim : {int64_t{64}, int64_t{128}}) {
      const auto add = [&](const std::string& name, int64_t hq, int64_t hkv,
                           std::vector<int32_t> lq, std::vector<int32_t> lk, bool varlen,
                           bool causal) {
        cases.push_back({std::string(dtype == DType::bf16 ? "bf16" : "f16") + "_d" +
                             std::to_string(dim) + "_" + name,
                         dtype, dim, hq, hkv, std::move(lq), std::move(lk), varlen, causal});
      };
      add("s1", 2, 2, fixed(2, 1), fixed(2, 1), false, false);
      add("s113_causal_gqa", 8, 2, fixed(1, 113), fixed(1, 113), false, true);
      add("s256_mqa", 4, 1, fixed(1, 256), fixed(1, 256), false, false);
      add("s511_causal", 2, 2, fixed(1, 511), fixed(1, 511), false, true);
      add("q77_k300_causal_gqa", 4, 2, fixed(2, 77), fixed(2, 300), false, true);
      add("q200_k77_causal", 2, 1, fixed(1, 200), fixed(1, 77), false, true);  // blind rows
      add("varlen_causal_gqa", 4, 2, {130, 0, 1, 64, 0, 65}, {130, 7, 1, 64, 0, 200}, true, true);
      // Long odd length, bf16 only: the CPU reference backward is O(len^2 dim) in double.
      if (dtype == DType::bf16)
        add("s1023_causal_mqa", 2, 1, fixed(1, 1023), fixed(1, 1023), false, true);
    }
  }
  return cases;
}

std::string bwd_name(const ::testing::TestParamInfo<BwdCase>& info) {
  return info.param.name;
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionBackwardKernelTest, ::testing::ValuesIn(backward_cases()),
                         bwd_name);

// ---- argument checks (no device needed: they run before any CUDA call)
// ---------------------------

TEST(AttentionKernelParams, ForwardRejectsBadParams) {
  alignas(16) static uint16_t buf[256];
  AttentionForwardParams p;
  p.dtype = DType::bf16;
  p.q = p.k = p.v = buf;
  p.o = buf + 128;
  p.batch = 1;
  p.seqlen_q = p.seqlen_k = 1;
  p.heads_q = p.heads_kv = 1;
  p.head_dim = 96;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = 128;
  p.softmax_scale = 0.1f;
  EXPECT_EQ(attention_forward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("kernels/attention_forward.cu:"), std::string::npos)
      << last_error_site();
  EXPECT_NE(std::string(last_error_site()).find("head_dim"), std::string::npos);
  p.head_dim = 64;
  p.heads_q = 3;
  p.heads_kv = 2;
  EXPECT_EQ(attention_forward(p, nullptr), cudaErrorInvalidValue);
  p.heads_q = 2;
  p.dtype = DType::f32;
  EXPECT_EQ(attention_forward(p, nullptr), cudaErrorInvalidValue);
  p.dtype = DType::bf16;
  p.q_row_stride = 100;  // not a multiple of 8
  EXPECT_EQ(attention_forward(p, nullptr), cudaErrorInvalidValue);
  p.q_row_stride = 128;
  p.q = buf + 1;  // misaligned
  EXPECT_EQ(attention_forward(p, nullptr), cudaErrorInvalidValue);
  p.q = buf;
  p.softmax_scale = 0.0f;
  EXPECT_EQ(attention_forward(p, nullptr), cudaErrorInvalidValue);
  p.softmax_scale = 0.1f;
  p.cu_seqlens_q = reinterpret_cast<const int32_t*>(buf);  // without cu_seqlens_k
  EXPECT_EQ(attention_forward(p, nullptr), cudaErrorInvalidValue);
  p.cu_seqlens_q = nullptr;
  p.batch = 0;  // nothing to do: fine even with null pointers
  p.q = nullptr;
  EXPECT_EQ(attention_forward(p, nullptr), cudaSuccess);
}

TEST(AttentionKernelParams, DecodeChecksWorkspaceAndSplits) {
  alignas(16) static uint16_t buf[512];
  static int32_t lens[1] = {1};
  AttentionDecodeParams p;
  p.dtype = DType::f16;
  p.q = p.k_cache = p.v_cache = buf;
  p.o = buf + 256;
  p.seqlens_k = lens;
  p.batch = 1;
  p.seqlen_q = 1;
  p.max_seqlen_k = 4096;
  p.heads_q = p.heads_kv = 1;
  p.head_dim = 64;
  p.softmax_scale = 0.125f;
  p.num_sms = 132;
  // One (batch, head) block on 132 SMs: many splits, but at least 256 keys each.
  const int splits = attention_decode_num_splits(p);
  EXPECT_EQ(splits, 16);
  EXPECT_EQ(attention_decode_workspace_bytes(p), size_t{16} * 1 * (64 + 1) * 4);
  EXPECT_EQ(attention_decode(p, nullptr), cudaErrorInvalidValue);  // no workspace
  EXPECT_NE(std::string(last_error_site()).find("workspace"), std::string::npos)
      << last_error_site();
  // Enough blocks to fill the GPU: one split, no workspace.
  p.batch = 200;
  EXPECT_EQ(attention_decode_num_splits(p), 1);
  EXPECT_EQ(attention_decode_workspace_bytes(p), 0u);
  p.batch = 1;
  p.max_seqlen_k = 100;  // short: one split
  EXPECT_EQ(attention_decode_num_splits(p), 1);
  p.num_splits = 5;  // forced
  EXPECT_EQ(attention_decode_num_splits(p), 5);
  p.seqlen_q = 65;
  EXPECT_EQ(attention_decode(p, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace aviary::kernels
