//! Load-balancing losses and the z-loss, as Megatron-Core's `moe_utils`.

use burn::tensor::Tensor;
use burn::tensor::activation;

use crate::router::config::ScoreFunction;

/// `log(sum(exp(x)))` over dim 1, `[T, E] -> [T]`, stable (the max is detached, which leaves
/// the gradient, `softmax(x)`, exact).
pub fn logsumexp(logits: Tensor<2>) -> Tensor<1> {
    let [t, _] = logits.dims();
    let max = logits.clone().detach().max_dim(1); // [T, 1]
    let lse = (logits - max.clone()).exp().sum_dim(1).log() + max;
    lse.reshape([t])
}

/// Router z-loss (ST-MoE): `coeff * mean(logsumexp(logits)^2)`.
pub fn z_loss(logits: Tensor<2>, coeff: f64) -> Tensor<1> {
    logsumexp(logits).square().mean().mul_scalar(coeff)
}

/// Scores over all experts used by the load-balancing losses: softmax, or sigmoid normalised
/// to sum 1 per token.
pub fn aux_scores(logits: Tensor<2>, score_function: ScoreFunction) -> Tensor<2> {
    match score_function {
        ScoreFunction::Softmax => activation::softmax(logits, 1),
        ScoreFunction::Sigmoid => {
            let s = activation::sigmoid(logits);
            s.clone() / s.sum_dim(1).add_scalar(1e-20)
        }
    }
}

/// Switch-transformer load-balancing loss:
/// `E * coeff / (k * T^2) * sum_e (sum_t probs[t, e]) * tokens_per_expert[e]`.
///
/// `probs` is `[N, M]` and `tokens_per_expert` `[M]` (for the sequence-level loss `M = B * E`).
pub fn switch_loss(
    probs: Tensor<2>,
    tokens_per_expert: Tensor<1>,
    total_num_tokens: f64,
    topk: usize,
    num_experts: usize,
    coeff: f64,
) -> Tensor<1> {
    let [_, m] = probs.dims();
    let aggregated = probs.sum_dim(0).reshape([m]);
    (aggregated * tokens_per_expert).sum().mul_scalar(
        num_experts as f64 * coeff / (topk as f64 * total_num_tokens * total_num_tokens),
    )
}
