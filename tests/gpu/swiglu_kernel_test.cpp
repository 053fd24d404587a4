// SwiGLU kernels (kernels/swiglu.cu) against their CPU reference and an exact one.
//
// Tolerance, FlashAttention-style: with outputs computed in double from the same dtype inputs,
// the kernel's max abs error must be at most 2x the reference's (fp32 math, one rounding: the
// computation at the input precision), plus a small atol stated at the assertion. The kernel and
// the reference use the same formulas, so f16/bf16 outputs must also agree bit for bit apart from
// rare last-place flips (CUDA's expf vs the host's exp differ in the last fp32 place).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "aviary/kernels/swiglu.h"
#include "aviary/kernels/swiglu_reference.h"
#include "gpu/fused_test_util.h"
#include "gpu/gpu_test_util.h"

namespace aviary::kernels {
namespace {

using test::DeviceBuffer;
using test::DeviceCopy;
using test::Stride;

double swiglu_atol(DType dtype) {
  switch (dtype) {
    case DType::f32:
      return 1e-5;
    case DType::f16:
      return 1e-4;
    case DType::bf16:
      return 1e-3;
  }
  return 0.0;
}

int64_t bit_mismatches(DType dtype, const std::vector<unsigned char>& a,
                       const std::vector<unsigned char>& b, int64_t rows, int64_t cols,
                       int64_t stride) {
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      n += float_bits(test::value_at(dtype, a, r * stride + c)) !=
           float_bits(test::value_at(dtype, b, r * stride + c));
  return n;
}

using Case = std::tuple<DType, int64_t /*cols*/, int64_t /*rows*/, Stride>;

class SwiGluKernelTest : public test::GpuTest, public ::testing::WithParamInterface<Case> {};

TEST_P(SwiGluKernelTest, ForwardAndBackwardMatchReference) {
  const auto [dtype, cols, rows, layout] = GetParam();
  const int64_t stride = test::stride_for(layout, dtype, cols);
  const uint32_t seed = static_cast<uint32_t>(cols * 7 + rows * 3 + int(dtype));
  // gate and up as the halves of one [rows, 2 * stride] fused projection buffer.
  std::vector<unsigned char> gate_up =
      test::random_matrix(dtype, rows, 2 * stride, 2 * stride, seed, 3.0f);
  for (int64_t r = 0; r < rows; ++r)  // re-poison the padding of both halves
    for (int64_t c = cols; c < stride; ++c)
      for (const int64_t base : {r * 2 * stride, r * 2 * stride + stride})
        store_from_float(dtype, gate_up.data(), base + c, NAN);
  const std::vector<unsigned char> dout = test::random_matrix(dtype, rows, cols, stride, seed + 1);
  const size_t bytes = static_cast<size_t>(rows * stride * dtype_size(dtype));
  const std::vector<unsigned char> poison(bytes, 0xff);

  DeviceCopy d_gu(gate_up), d_dout(dout), d_out(poison), d_dg(poison), d_du(poison);
  for (const DeviceCopy* d : {&d_gu, &d_dout, &d_out, &d_dg, &d_du})
    AVIARY_CUDA_ASSERT(d->err);

  const int64_t half_bytes = stride * dtype_size(dtype);
  SwiGluParams p;
  p.dtype = dtype;
  p.gate = d_gu.get();
  p.up = static_cast<unsigned char*>(d_gu.get()) + half_bytes;
  p.out = d_out.get();
  p.dout = d_dout.get();
  p.dgate = d_dg.get();
  p.dup = d_du.get();
  p.rows = rows;
  p.cols = cols;
  p.gate_row_stride = p.up_row_stride = 2 * stride;
  p.out_row_stride = p.dout_row_stride = p.dgate_row_stride = p.dup_row_stride = stride;
  cudaError_t err = swiglu_forward(p, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  err = swiglu_backward(p, nullptr);
  ASSERT_EQ(err, cudaSuccess) << cudaGetErrorString(err) << " at " << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<unsigned char> out(bytes), dg(bytes), du(bytes);
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_out.get(), &out));
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_dg.get(), &dg));
  AVIARY_CUDA_ASSERT(test::copy_to_host(d_du.get(), &du));

  std::vector<unsigned char> out_ref(poison), dg_ref(poison), du_ref(poison);
  SwiGluParams h = p;
  h.gate = gate_up.data();
  h.up = gate_up.data() + half_bytes;
  h.dout = dout.data();
  h.out = out_ref.data();
  h.dgate = dg_ref.data();
  h.dup = du_ref.data();
  swiglu_forward_reference(h);
  swiglu_backward_reference(h);

  std::vector<double> out_x(static_cast<size_t>(rows * cols)), dg_x(out_x.size()),
      du_x(out_x.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const double g = test::value_at(dtype, gate_up, r * 2 * stride + c);
      const double u = test::value_at(dtype, gate_up, r * 2 * stride + stride + c);
      const double d = test::value_at(dtype, dout, r * stride + c);
      const double s = 1.0 / (1.0 + std::exp(-g));
      const size_t i = static_cast<size_t>(r * cols + c);
      out_x[i] = g * s * u;
      dg_x[i] = d * u * s * (1.0 + g * (1.0 - s));
      du_x[i] = d * g * s;
    }
  }
  const struct {
    const char* name;
    const std::vector<unsigned char>& gpu;
    const std::vector<unsigned char>& ref;
    const std::vector<double>& exact;
  } outputs[] = {
      {"out", out, out_ref, out_x}, {"dgate", dg, dg_ref, dg_x}, {"dup", du, du_ref, du_x}};
  for (const auto& o : outputs) {
    const double e_gpu = test::max_error(dtype, o.gpu, rows, cols, stride, o.exact);
    const double e_ref = test::max_error(dtype, o.ref, rows, cols, stride, o.exact);
    // atol: f32 1e-5, f16 1e-4, bf16 1e-3 (the 2x bound alone is ~0 when every output is exact).
    EXPECT_LE(e_gpu, 2.0 * e_ref + swiglu_atol(dtype))
        << o.name << ": max |gpu - exact| = " << e_gpu << ", max |ref - exact| = " << e_ref;
    EXPECT_EQ(test::padding_writes(dtype, o.gpu, rows, cols, stride), 0) << o.name;
    if (dtype != DType::f32) {
      const int64_t n = rows * cols;
      EXPECT_LE(bit_mismatches(dtype, o.gpu, o.ref, rows, cols, stride), n / 100 + 1)
          << o.name << ": of " << n << " outputs differ from the reference";
    }
  }
}

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const auto [dtype, cols, rows, layout] = info.param;
  return std::string(dtype_name(dtype)) + "_c" + std::to_string(cols) + "_r" +
         std::to_string(rows) + "_" + test::stride_name(layout);
}

INSTANTIATE_TEST_SUITE_P(Shapes, SwiGluKernelTest,
                         ::testing::Combine(::testing::Values(DType::f32, DType::f16, DType::bf16),
                                            ::testing::Values<int64_t>(1, 7, 113, 1023, 8195),
                                            ::testing::Values<int64_t>(1, 3, 257),
                                            ::testing::Values(Stride::kContiguous, Stride::kPadded,
                                                              Stride::kOdd)),
                         case_name);

// In place: out over gate, and dgate over gate / dup over up, give the out-of-place results.
class SwiGluKernelInPlaceTest : public test::GpuTest {};

TEST_F(SwiGluKernelInPlaceTest, EqualsOutOfPlace) {
  const DType dtype = DType::bf16;
  const int64_t rows = 9, cols = 1000;
  const auto gate = test::random_matrix(dtype, rows, cols, cols, 1, 3.0f);
  const auto up = test::random_matrix(dtype, rows, cols, cols, 2, 1.0f);
  const auto dout = test::random_matrix(dtype, rows, cols, cols, 3, 1.0f);
  DeviceCopy g1(gate), u1(up), d1(dout), o1(gate), dg1(gate), du1(gate);
  DeviceCopy g2(gate), u2(up);
  for (const DeviceCopy* d : {&g1, &u1, &d1, &o1, &dg1, &du1, &g2, &u2})
    AVIARY_CUDA_ASSERT(d->err);
  SwiGluParams p;
  p.dtype = dtype;
  p.gate = g1.get();
  p.up = u1.get();
  p.out = o1.get();
  p.dout = d1.get();
  p.dgate = dg1.get();
  p.dup = du1.get();
  p.rows = rows;
  p.cols = cols;
  p.gate_row_stride = p.up_row_stride = p.out_row_stride = p.dout_row_stride = p.dgate_row_stride =
      p.dup_row_stride = cols;
  ASSERT_EQ(swiglu_forward(p, nullptr), cudaSuccess) << last_error_site();
  ASSERT_EQ(swiglu_backward(p, nullptr), cudaSuccess) << last_error_site();
  SwiGluParams q = p;
  q.gate = g2.get();
  q.up = u2.get();
  q.dgate = g2.get();
  q.dup = u2.get();
  ASSERT_EQ(swiglu_backward(q, nullptr), cudaSuccess) << last_error_site();
  SwiGluParams f = p;
  f.out = g1.get();  // forward over gate, after the backward used it
  ASSERT_EQ(swiglu_forward(f, nullptr), cudaSuccess) << last_error_site();
  AVIARY_CUDA_ASSERT(cudaDeviceSynchronize());
  const size_t bytes = gate.size();
  std::vector<unsigned char> a(bytes), b(bytes);
  AVIARY_CUDA_ASSERT(test::copy_to_host(dg1.get(), &a));
  AVIARY_CUDA_ASSERT(test::copy_to_host(g2.get(), &b));
  EXPECT_EQ(a, b) << "dgate in place";
  AVIARY_CUDA_ASSERT(test::copy_to_host(du1.get(), &a));
  AVIARY_CUDA_ASSERT(test::copy_to_host(u2.get(), &b));
  EXPECT_EQ(a, b) << "dup in place";
  AVIARY_CUDA_ASSERT(test::copy_to_host(o1.get(), &a));
  AVIARY_CUDA_ASSERT(test::copy_to_host(g1.get(), &b));
  EXPECT_EQ(a, b) << "out in place";
}

// Argument checks run before any CUDA call, so these run without a device too.
TEST(SwiGluKernelParams, RejectsBadParams) {
  float buf[16] = {};
  SwiGluParams p;
  p.dtype = DType::f32;
  p.gate = buf;
  p.up = buf + 4;
  p.out = buf + 8;
  p.rows = 1;
  p.cols = 4;
  p.gate_row_stride = p.up_row_stride = p.out_row_stride = 4;
  p.cols = 0;
  EXPECT_EQ(swiglu_forward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("kernels/swiglu.cu:"), std::string::npos);
  p.cols = 4;
  p.up_row_stride = 3;
  EXPECT_EQ(swiglu_forward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("row stride"), std::string::npos);
  p.up_row_stride = 4;
  p.out = buf;  // over gate, but with another stride
  p.out_row_stride = 5;
  EXPECT_EQ(swiglu_forward(p, nullptr), cudaErrorInvalidValue);
  p.out_row_stride = 4;
  p.out = buf + 8;
  p.gate = nullptr;
  EXPECT_EQ(swiglu_forward(p, nullptr), cudaErrorInvalidValue);
  EXPECT_NE(std::string(last_error_site()).find("null pointer"), std::string::npos);
  p.gate = buf;
  p.dtype = static_cast<DType>(9);
  EXPECT_EQ(swiglu_forward(p, nullptr), cudaErrorInvalidValue);
  p.dtype = DType::f32;
  p.rows = 0;  // nothing to do: null pointers are fine
  p.gate = p.up = nullptr;
  p.out = nullptr;
  EXPECT_EQ(swiglu_forward(p, nullptr), cudaSuccess);
  // Backward: missing gradients.
  p.rows = 1;
  p.gate = buf;
  p.up = buf + 4;
  p.dout = buf + 8;
  p.dgate = buf + 12;
  p.dup = nullptr;
  p.dout_row_stride = p.dgate_row_stride = p.dup_row_stride = 4;
  EXPECT_EQ(swiglu_backward(p, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace aviary::kernels
