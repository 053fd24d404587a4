// Cross-entropy of logits against integer targets, with an ignored target value. On fp32 CPU
// logits it is one fused op (src/ops/cpu_loops.h): the forward keeps only the logits and one
// log-sum-exp per row, the backward writes softmax - one_hot in one pass, where ATen's
// log_softmax + nll_loss keeps the [rows, vocab] log-probabilities and makes two more tensors of
// that size in backward. On CUDA, when ops.impl picks it (ops/impl.h), Aviary's kernel
// (kernels/cross_entropy.cu) does the same over fp32, bf16 or fp16 logits with fp32 sums, and the
// loss is fp32 whatever the logits' dtype. Otherwise the ATen reference, torch's cross_entropy.
#pragma once

#include <torch/types.h>

namespace aviary::ops {

enum class LossReduction {
  kMean,  // over the targets that are not ignored (NaN when all are, as torch)
  kSum,
};

// logits: [rows, vocab]; targets: int64 [rows]. Throws kInvalidArgument naming the first row
// whose target is neither ignore_index nor in [0, vocab), or for a negative z_loss.
// z_loss > 0 adds PaLM's auxiliary term z_loss * lse^2 to each counted row's loss (lse: the
// log-sum-exp of its logits), which keeps the softmax normaliser near 1 in long pretraining runs;
// the gradient's softmax part is scaled by 1 + 2 z_loss lse. Every path (CPU loop, CUDA kernel,
// reference) computes it in fp32.
torch::Tensor cross_entropy(const torch::Tensor& logits, const torch::Tensor& targets,
                            int64_t ignore_index = -100,
                            LossReduction reduction = LossReduction::kMean, double z_loss = 0.0);

// cross_entropy(hidden @ weight^T, targets): the loss head of a language model (lm_head, then
// the loss) without its [rows, vocab] logits. hidden: [rows, width]; weight: [vocab, width]. On CPU
// the logits are made a chunk of rows at a time (about 64 MB) and turned into their gradient at
// once, so the forward leaves only the gradients of hidden and weight (the latter only when weight
// requires one) for backward to scale by grad_out:
//   fp32            fp32 GEMMs throughout;
//   bf16 autocast   (fp32 weight, hidden fp32 or bf16: ops::use_cpu_bf16_linear) autocast's bf16
//                   casts of both, fp32 logits from a bf16 x bf16 -> fp32 GEMM, their gradient
//                   rounded once to bf16 for the gradient GEMMs, which write weight's gradient (and
//                   an fp32 hidden's) in fp32. Autocast's lm_head would round the logits and both
//                   gradients to bf16 and hold [rows, vocab] logits in bf16 and fp32.
// On CUDA (when ops.impl picks the cross_entropy kernel) the same chunked op: cuBLAS makes each
// chunk of logits in the compute dtype (autocast's under CUDA autocast, else the inputs' shared
// dtype), the kernel turns it into its gradient in place, and weight's gradient is summed in fp32.
// Otherwise (and under ops.impl torch) it is the reference: matmul, then cross_entropy in fp32.
torch::Tensor linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                   const torch::Tensor& targets, int64_t ignore_index = -100,
                                   LossReduction reduction = LossReduction::kMean,
                                   double z_loss = 0.0);

// Whether linear_cross_entropy(hidden, weight, targets) runs as a fused op (on CPU: fp32, or under
// CPU bf16 autocast over an fp32 weight; on CUDA: the kernel's conditions) rather than the
// reference; a caller that would otherwise make the logits itself (train/lm_loss.cpp) asks this
// first.
bool fused_linear_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                const torch::Tensor& targets);

// Rows of logits per chunk of the fused linear_cross_entropy (for the memory plan): about 64 MB
// of fp32 logits, 512 rows of a 32k vocabulary. Fewer, larger chunks make longer GEMMs and fewer
// passes of the weight gradient's accumulation over [vocab, width]; measured on a 100M model's
// step (2-core Xeon), 64 MB was 3% faster than 28 MB and as fast as one 128 MB chunk.
int64_t linear_cross_entropy_chunk_rows(int64_t rows, int64_t vocab);

// The ATen reference (the oracle of the fused loop's tests).
torch::Tensor cross_entropy_reference(const torch::Tensor& logits, const torch::Tensor& targets,
                                      int64_t ignore_index = -100,
                                      LossReduction reduction = LossReduction::kMean,
                                      double z_loss = 0.0);

}  // namespace aviary::ops
