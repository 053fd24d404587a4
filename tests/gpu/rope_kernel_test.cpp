// RoPE kernel (kernels/rope.cu) against its CPU reference and an exact one.
//
// Tolerance, FlashAttention-style: the exact result rotates the same dtype inputs by angles
// computed in double (pos * scale * theta^(-2i/S)); the kernel's max abs error must be at most 2x
// the reference's (fp32 angle, fp32 rotation, one rounding: the computation at the input
// precision), plus a small atol stated at the assertion. Kernel and reference build the same
// fp32 angles, so f16/bf16 outputs must also agree bit for bit apart from rare last-place flips
// (FMA contraction in the rotation).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "aviary/kernels/rope.h"
#include "aviary/kernels/rope_reference.h"
#include "gpu/fused_test_util.h"
#include "gpu/gpu_test_util.h"

namespace aviary::kernels {
namespace {

using test::DeviceCopy;

// Head geometries: (head_dim, rotary_dim, two_d).
struct Geometry {
  int64_t head_dim, rotary_dim;
  bool two_d;
};

const Geometry kGeometries[] = {
    {128, 128, false},  // LLaMA: vectorised in both styles
    {80, 32, false},    // partial rotary
    {72, 72, false},    // rotate-half half = 36: not a whole number of 16-byte packs at 16 bit
    {64, 64, true},     // EVA-02 2-D
    {40, 24, true},     // 2-D, partial, scalar path
};

using Case = std::tuple<DType, RopeStyle, int /*geometry*/, int64_t /*tokens*/, bool /*odd base*/>;

class RopeKernelTest : public test::GpuTest, public ::testing::WithParamInterface<Case> {};

// Exact rotation of one head row (double angles) of `src` into `exact`.
void exact_rotate(const RopeParams& p, const std::vector<unsigned char>& src, int64_t off,
                  const std::vector<double>& angles, double sign, std::vector<double>* exact) {
  const int64_t nseg = p.two_d ? 2 : 1;
  const int64_t seg_len = p.rotary_dim / nseg, half = seg_len / 2;
  for (int64_t c = 0; c < p.head_dim; ++c)
    (*exact)[static_cast<size_t>(off + c)] = test::value_at(p.dtype, src, off + c);
  for (int64_t seg = 0; seg < nseg; ++seg) {
    for (int64_t i = 0; i < half; ++i) {
      const int64_t a = off + seg * seg_len + (p.style == RopeStyle::interleaved ? 2 * i : i);
      const int64_t b = a + (p.style == RopeStyle::interleaved ? 1 : half);
      const double x0 = test::value_at(p.dtype, src, a), x1 = test::value_at(p.dtype, src, b);
      const double ang = angles[static_cast<size_t>(seg * half + i)];
      const double c = std::cos(ang), s = sign * std::sin(ang);
      (*exact)[static_cast<size_t>(a)] = x0 * c - x1 * s;
      (*exact)[static_cast<size_t>(b)] = x1 * c + x0 * s;
    }
  }
}

TEST_P(RopeKernelTest, MatchesReference) {
  const auto [dtype, style, gi, tokens, odd_base] = GetParam();
  const Geometry geo = kGeometries[gi];
  const int64_t q_heads = 4, k_heads = 2;
  const int64_t hd = geo.head_dim;
  // q and k inside one packed qkv buffer [tokens, q_heads + 2 * k_heads, head_dim] (+1 element
  // at the front when odd_base, which forces the scalar path).
  const int64_t token_stride = (q_heads + 2 * k_heads) * hd;
  const int64_t front = odd_base ? 1 : 0;
  const int64_t total = front + tokens * token_stride;
  const size_t elem = static_cast<size_t>(dtype_size(dtype));
  const std::vector<unsigned char> qkv =
      test::random_matrix(dtype, 1, total, total, static_cast<uint32_t>(tokens * 5 + gi));

  const int nseg = geo.two_d ? 2 : 1;
  const bool pos64 = tokens % 2 == 1;
  std::vector<int64_t> p64(static_cast<size_t>(tokens * nseg));
  for (int64_t i = 0; i < tokens * nseg; ++i)  // packed documents: positions restart
    p64[static_cast<size_t>(i)] = geo.two_d ? (i * 7) % 24 : (i * 37) % 5000;
  std::vector<int32_t> p32(p64.begin(), p64.end());
  std::vector<unsigned char> pos_bytes(pos64 ? p64.size() * 8 : p32.size() * 4);
  std::memcpy(pos_bytes.data(), pos64 ? static_cast<const void*>(p64.data()) : p32.data(),
              pos_bytes.size());

  for (const bool inverse : {false, true}) {
    DeviceCopy d_qkv(qkv), d_pos(pos_bytes);
    AVIARY_CUDA_ASSERT(d_qkv.err);
    AVIARY_CUDA_ASSERT(d_pos.err);
    RopeParams p;
    p.dtype = dtype;
    p.q = static_cast<unsigned char*>(d_qkv.get()) + front * elem;
    p.k = static_cast<unsigned char*>(d_qkv.get()) + (front + q_heads * hd) * elem;
    p.positions = d_pos.get();
    p.positions_int64 = pos64;
    p.two_d = geo.two_d;
    p.inverse = inverse;
    p.style = style;
    p.tokens = tokens;
    p.q_heads = q_heads;
    p.k_heads = k_heads;
    p.head_dim = hd;
    p.rotary_dim = geo.rotary_dim;
    p.q_token_stride = p.k_token_stride = token_stride;
    p.q_head_stride = p.k_head_stride = hd;
    p.theta = geo.two_d ? 10000.0f : 500000.0f;
    p.position_scale = geo.two_d ? 0.5f : 1.0f;
    const cudaError_t err = rope_apply(p, nullptr);
    ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
    AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<unsigned char> gpu(qkv.size());
    AVIARY_CUDA_ASSERT(test::copy_to_host(d_qkv.get(), &gpu));

    std::vector<unsigned char> ref(qkv);
    RopeParams h = p;
    h.q = ref.data() + front * elem;
    h.k = ref.data() + (front + q_heads * hd) * elem;
    h.positions = pos_bytes.data();
    rope_apply_reference(h);

    // Exact, over the whole buffer (v and the front element stay as they are).
    std::vector<double> exact(static_cast<size_t>(total));
    for (int64_t i = 0; i < total; ++i)
      exact[static_cast<size_t>(i)] = test::value_at(dtype, qkv, i);
    const int64_t seg_len = geo.rotary_dim / nseg, half = seg_len / 2;
    std::vector<double> angles(static_cast<size_t>(nseg * half));
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t seg = 0; seg < nseg; ++seg)
        for (int64_t i = 0; i < half; ++i)
          angles[static_cast<size_t>(seg * half + i)] =
              static_cast<double>(p64[static_cast<size_t>(t * nseg + seg)]) * p.position_scale *
              std::pow(static_cast<double>(p.theta), -2.0 * static_cast<double>(i) / seg_len);
      for (int64_t hh = 0; hh < q_heads + k_heads; ++hh)
        exact_rotate(h, qkv, front + t * token_stride + hh * hd, angles, inverse ? -1.0 : 1.0,
                     &exact);
    }
    const double e_gpu = test::max_error(dtype, gpu, 1, total, total, exact);
    const double e_ref = test::max_error(dtype, ref, 1, total, total, exact);
    // atol: f32 1e-5, f16 1e-4, bf16 1e-3 (angles up to ~5000 rad carry fp32 errors of ~3e-4
    // rad in both, so the 2x term dominates for f32).
    const double atol = dtype == DType::f32 ? 1e-5 : dtype == DType::f16 ? 1e-4 : 1e-3;
    EXPECT_LE(e_gpu, 2.0 * e_ref + atol)
        << "inverse " << inverse << ": max |gpu - exact| = " << e_gpu
        << ", max |ref - exact| = " << e_ref;
    // Untouched elements (v, the channels past rotary_dim, the front) are bit-identical, and
    // f16/bf16 outputs agree with the reference bit for bit but for rare flips.
    int64_t flips = 0, rotated = 0;
    for (int64_t i = 0; i < total; ++i) {
      const bool same = std::memcmp(&gpu[static_cast<size_t>(i) * elem],
                                    &ref[static_cast<size_t>(i) * elem], elem) == 0;
      const bool changed = std::memcmp(&ref[static_cast<size_t>(i) * elem],
                                       &qkv[static_cast<size_t>(i) * elem], elem) != 0;
      rotated += changed;
      if (!same) {
        if (!changed && std::memcmp(&gpu[static_cast<size_t>(i) * elem],
                                    &qkv[static_cast<size_t>(i) * elem], elem) != 0) {
          ADD_FAILURE() << "element " << i << " changed by the kernel only";
          return;
        }
        ++flips;
      }
    }
    if (dtype != DType::f32) {
      EXPECT_LE(flips, rotated / 200 + 1) << "of " << rotated << " rotated elements";
    }
  }
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const auto [dtype, style, gi, tokens, odd_base] = info.param;
  return std::string(dtype_name(dtype)) +
         (style == RopeStyle::interleaved ? "_interleaved" : "_rotatehalf") + "_g" +
         std::to_string(gi) + "_t" + std::to_string(tokens) + (odd_base ? "_oddbase" : "");
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RopeKernelTest,
    ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                       ::testing::Values(RopeStyle::rotate_half, RopeStyle::interleaved),
                       ::testing::Values(0, 1, 2, 3, 4),
                       ::testing::Values<int64_t>(1, 7, 113, 1023), ::testing::Bool()),
    case_name);

// Argument checks run before any CUDA call, so these run without a device too.
TEST(RopeKernelParams, RejectsBadParams) {
  float q[64] = {};
  int32_t pos[2] = {0, 1};
  RopeParams p;
  p.dtype = DType::f32;
  p.q = q;
  p.positions = pos;
  p.tokens = 2;
  p.q_heads = 2;
  p.head_dim = 16;
  p.rotary_dim = 16;
  p.q_token_stride = 32;
  p.q_head_stride = 16;
  p.rotary_dim = 15;  // odd
  EXPECT_EQ(rope_apply(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("kernels/rope.cu:"), std::string::npos);
  p.rotary_dim = 18;  // > head_dim
  EXPECT_EQ(rope_apply(p, nullptr), cudaErrorInvalidValue);
  p.rotary_dim = 14;
  p.two_d = true;  // 2-D needs a multiple of 4
  EXPECT_EQ(rope_apply(p, nullptr), cudaErrorInvalidValue);
  p.two_d = false;
  p.q_head_stride = 8;  // heads overlap
  EXPECT_EQ(rope_apply(p, nullptr), cudaErrorInvalidValue);
  p.q_head_stride = 16;
  p.theta = 0.0f;
  EXPECT_EQ(rope_apply(p, nullptr), cudaErrorInvalidValue);
  p.theta = 10000.0f;
  p.positions = nullptr;
  EXPECT_EQ(rope_apply(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("null pointer"), std::string::npos);
  p.positions = pos;
  p.style = static_cast<RopeStyle>(5);
  EXPECT_EQ(rope_apply(p, nullptr), cudaErrorInvalidValue);
  p.style = RopeStyle::rotate_half;
  p.k = q;  // k over q
  p.k_heads = 1;
  p.k_token_stride = 32;
  p.k_head_stride = 16;
  EXPECT_EQ(rope_apply(p, nullptr), cudaErrorInvalidValue);
  p.k = nullptr;
  p.tokens = 0;  // nothing to do
  p.positions = nullptr;
  EXPECT_EQ(rope_apply(p, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace aviary::kernels
