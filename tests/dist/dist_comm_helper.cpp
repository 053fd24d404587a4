// Runs as every rank of `aviary launch -n W -- dist_comm_helper`: checks each collective of the
// mpi engine against the value it must produce, prints "rank R: N checks passed" and exits 0, or
// names the failing check and exits 1. tests/dist/dist_test.cpp starts it at world sizes 2 and 4.
#include <cstdio>
#include <string>

#include <torch/torch.h>

#include "aviary/dist/comm.h"

using aviary::dist::ReduceOp;

int main() {
  auto env = aviary::dist::DistEnvironment::detect();
  auto comm = aviary::dist::open_comm(env, {"mpi", 60});
  const int r = comm->rank();
  const int w = comm->world();
  int checks = 0;
  auto expect = [&](bool ok, const std::string& what) {
    if (!ok) {
      std::fprintf(stderr, "rank %d: FAILED %s\n", r, what.c_str());
      std::exit(1);
    }
    ++checks;
  };
  const double tri = w * (w + 1) / 2.0;  // 1 + 2 + ... + w

  for (auto dtype : {torch::kFloat32, torch::kFloat64, torch::kInt64, torch::kBFloat16}) {
    const std::string name = c10::toString(dtype);
    auto t = torch::full({1000}, r + 1, dtype);
    comm->all_reduce(t, ReduceOp::kSum);
    expect(torch::all(t.to(torch::kFloat64) == tri).item<bool>(), "all_reduce sum " + name);
    auto m = torch::full({7}, r, dtype);
    comm->all_reduce(m, ReduceOp::kMax);
    expect(torch::all(m.to(torch::kFloat64) == w - 1).item<bool>(), "all_reduce max " + name);
  }
  // Reduce to root 1: only the root's tensor changes.
  auto red = torch::full({5}, static_cast<float>(r + 1));
  comm->reduce_async(red, 1, ReduceOp::kSum)->wait();
  expect(r == 1 ? torch::all(red == tri).item<bool>() : torch::all(red == r + 1).item<bool>(),
         "reduce to root 1");
  // Broadcast from the last rank.
  auto b = torch::full({3, 4}, static_cast<float>(r));
  comm->broadcast(b, w - 1);
  expect(torch::all(b == w - 1).item<bool>(), "broadcast from the last rank");
  // All-gather: rank i contributes [i, i, i].
  auto in = torch::full({3}, static_cast<double>(r), torch::kFloat64);
  auto out = torch::empty({3 * w}, torch::kFloat64);
  comm->all_gather(out, in);
  expect(torch::equal(out, torch::arange(w, torch::kFloat64).repeat_interleave(3)), "all_gather");
  // Reduce-scatter: rank i sends arange(2w) * (i + 1); slot r holds the sum of its 2 elements.
  auto rs_in = torch::arange(2 * w, torch::kFloat32) * static_cast<float>(r + 1);
  auto rs_out = torch::empty({2}, torch::kFloat32);
  comm->reduce_scatter(rs_out, rs_in, ReduceOp::kSum);
  auto want = torch::arange(2 * r, 2 * r + 2, torch::kFloat32) * static_cast<float>(tri);
  expect(torch::allclose(rs_out, want), "reduce_scatter");
  // Many async collectives in flight complete in issue order with the right values.
  std::vector<torch::Tensor> bufs;
  std::vector<std::shared_ptr<aviary::dist::Work>> works;
  for (int i = 0; i < 16; ++i) {
    bufs.push_back(torch::full({1 << 14}, static_cast<float>(i * (r + 1))));
    works.push_back(comm->all_reduce_async(bufs.back(), ReduceOp::kSum));
  }
  for (int i = 15; i >= 0; --i)
    works[static_cast<size_t>(i)]->wait();
  for (int i = 0; i < 16; ++i)
    expect(torch::all(bufs[static_cast<size_t>(i)] == i * tri).item<bool>(), "async all_reduce");
  expect(comm->broadcast_string(r == 0 ? "from rank zero" : "", 0) == "from rank zero",
         "broadcast_string");
  expect(comm->all_reduce_scalar(r, ReduceOp::kMin) == 0, "all_reduce_scalar min");
  // Split (hybrid sharding's groups): consecutive pairs, and ranks of the same parity, with
  // collectives on the sub-communicators interleaved with the parent's.
  if (w % 2 == 0) {
    auto pairs = comm->split(r / 2, r);
    auto parity = comm->split(r % 2, -r);  // ranked in reverse
    expect(pairs->world() == 2 && pairs->rank() == r % 2, "split into pairs");
    expect(parity->world() == w / 2 && parity->rank() == (w / 2 - 1) - r / 2, "split by parity");
    auto p = torch::full({4}, static_cast<float>(r + 1));
    auto pw = pairs->all_reduce_async(p, ReduceOp::kSum);
    auto whole = torch::full({2}, 1.0f);
    comm->all_reduce(whole, ReduceOp::kSum);
    pw->wait();
    expect(torch::all(p == static_cast<float>(2 * (r / 2) * 2 + 3)).item<bool>(),
           "all_reduce within a pair");
    expect(torch::all(whole == static_cast<float>(w)).item<bool>(), "all_reduce between splits");
    auto g = torch::full({1}, static_cast<double>(r), torch::kFloat64);
    auto gathered = torch::empty({w / 2}, torch::kFloat64);
    parity->all_gather(gathered, g);
    // Reverse rank order: the highest rank of this parity first.
    auto want = torch::arange(w / 2, torch::kFloat64).flip(0) * 2 + (r % 2);
    expect(torch::equal(gathered, want), "all_gather by parity");
    parity->barrier();
  }
  comm->barrier();
  const auto& s = comm->stats();
  expect(s.calls > 20 && s.all_reduce > 0 && s.all_gather == 3 * w * 8u, "stats");
  std::printf("rank %d: %d checks passed\n", r, checks);
  return 0;
}
