//! Routed experts (stacked weights, grouped compute) and shared experts.

mod shared;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::activation;
use std::ops::Range;

use burn::tensor::{Device, Distribution, Tensor};

pub use shared::{SharedExperts, SharedExpertsConfig};

use crate::error::{MoeError, Result, invalid};
use crate::host;
use crate::router::check_dims;

/// The expert MLP's activation.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(h[..F]) * h[F..]` with a first projection of width `2F`.
    SwiGlu,
    /// Exact (erf) GELU.
    Gelu,
    /// SiLU.
    Silu,
    /// ReLU.
    Relu,
}

impl Activation {
    /// Width of the first projection for an FFN width `ffn_hidden`.
    pub fn fc1_width(self, ffn_hidden: usize) -> usize {
        match self {
            Activation::SwiGlu => 2 * ffn_hidden,
            _ => ffn_hidden,
        }
    }

    /// Applies the activation to `h` `[N, fc1_width]`, giving `[N, ffn_hidden]`.
    pub fn apply(self, h: Tensor<2>) -> Tensor<2> {
        match self {
            Activation::SwiGlu => {
                let [n, w] = h.dims();
                let f = w / 2;
                let gate = h.clone().slice([0..n, 0..f]);
                let up = h.slice([0..n, f..w]);
                activation::silu(gate) * up
            }
            Activation::Gelu => gelu_erf(h),
            Activation::Silu => activation::silu(h),
            Activation::Relu => activation::relu(h),
        }
    }
}

/// Exact (erf) GELU from differentiable primitives, `x · (1 + erf(x / √2)) / 2`. Burn 0.22.1's
/// CubeCL backend differentiates its fused `gelu` with the tanh approximation's derivative
/// (a relative error near 2·10⁻⁴ in the input gradient, outside Megatron-Core's golden
/// tolerance); through `erf` the gradient is the exact one on every backend.
fn gelu_erf(x: Tensor<2>) -> Tensor<2> {
    x.clone()
        .mul(x.div_scalar(std::f64::consts::SQRT_2).erf().add_scalar(1.0))
        .div_scalar(2.0)
}

/// How the experts compute their groups.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum ExpertsCompute {
    /// The grouped-GEMM kernel on devices that run the MoE kernels (see [`crate::kernels`]);
    /// elsewhere batched when every expert has the same number of tokens (drop-and-pad),
    /// sequential otherwise.
    Auto,
    /// One grouped GEMM per projection over all experts ([`crate::kernels::grouped_matmul`]:
    /// a single kernel launch, no padding, where the kernels run; one matmul per group
    /// elsewhere).
    Grouped,
    /// One pair of matmuls per non-empty expert (the reference).
    Sequential,
    /// Groups padded to the largest one and computed with two batched matmuls.
    Batched,
}

/// Configuration of the routed experts.
#[derive(Config, Debug)]
pub struct ExpertsConfig {
    /// Number of experts held by this module.
    pub num_experts: usize,
    /// Hidden size `H`.
    pub hidden: usize,
    /// FFN width `F` of one expert.
    pub ffn_hidden: usize,
    /// Activation.
    #[config(default = "Activation::SwiGlu")]
    pub activation: Activation,
    /// Compute strategy.
    #[config(default = "ExpertsCompute::Auto")]
    pub compute: ExpertsCompute,
    /// Standard deviation of the normal initialisation.
    #[config(default = 0.02)]
    pub init_std: f64,
}

impl ExpertsConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<()> {
        if self.num_experts == 0 {
            return Err(invalid("num_experts", "must be > 0"));
        }
        if self.hidden == 0 {
            return Err(invalid("hidden", "must be > 0"));
        }
        if self.ffn_hidden == 0 {
            return Err(invalid("ffn_hidden", "must be > 0"));
        }
        if !self.init_std.is_finite() || self.init_std < 0.0 {
            return Err(invalid("init_std", "must be finite and >= 0"));
        }
        Ok(())
    }

    /// Builds experts with normal(0, `init_std`) weights.
    pub fn init(&self, device: &Device) -> Result<Experts> {
        self.validate()?;
        let f1 = self.activation.fc1_width(self.ffn_hidden);
        let dist = Distribution::Normal(0.0, self.init_std);
        let w1 = Tensor::<3>::random([self.num_experts, self.hidden, f1], dist, device);
        let w2 = Tensor::<3>::random(
            [self.num_experts, self.ffn_hidden, self.hidden],
            dist,
            device,
        );
        Experts::from_weights(self.clone(), w1, w2)
    }
}

/// `E` expert MLPs with stacked weights: `w1` `[E, H, F1]`, `w2` `[E, F, H]`.
#[derive(Module, Debug)]
pub struct Experts {
    /// First projections `[E, H, F1]` (`F1 = 2F` for SwiGLU).
    pub w1: Param<Tensor<3>>,
    /// Second projections `[E, F, H]`.
    pub w2: Param<Tensor<3>>,
    #[module(skip)]
    config: ExpertsConfig,
}

impl Experts {
    /// Builds experts from given weights.
    pub fn from_weights(config: ExpertsConfig, w1: Tensor<3>, w2: Tensor<3>) -> Result<Self> {
        config.validate()?;
        let f1 = config.activation.fc1_width(config.ffn_hidden);
        check_dims(
            "w1",
            &w1.dims(),
            &[config.num_experts, config.hidden, f1],
            "[num_experts, hidden, fc1_width]",
        )?;
        check_dims(
            "w2",
            &w2.dims(),
            &[config.num_experts, config.ffn_hidden, config.hidden],
            "[num_experts, ffn_hidden, hidden]",
        )?;
        Ok(Self {
            w1: Param::from_tensor(w1),
            w2: Param::from_tensor(w2),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ExpertsConfig {
        &self.config
    }

    /// This rank's shard of the full experts: experts `local` (expert parallelism) and, with
    /// expert-tensor parallelism over `etp` ranks, the `etp_rank`-th column chunk of each first
    /// projection (of the gate and of the up half for SwiGLU) and row chunk of each second.
    pub fn shard(&self, local: Range<usize>, etp_rank: usize, etp: usize) -> Result<Self> {
        let cfg = &self.config;
        if local.is_empty() || local.end > cfg.num_experts {
            return Err(invalid(
                "local",
                format!("experts {local:?} are not within 0..{}", cfg.num_experts),
            ));
        }
        if etp == 0 || etp_rank >= etp || !cfg.ffn_hidden.is_multiple_of(etp) {
            return Err(invalid(
                "etp",
                format!(
                    "ffn_hidden {} cannot be split over {etp} expert-tensor-parallel ranks",
                    cfg.ffn_hidden
                ),
            ));
        }
        let (h, f) = (cfg.hidden, cfg.ffn_hidden);
        let k = f / etp;
        let cols = etp_rank * k..(etp_rank + 1) * k;
        // Fresh leaves: a slice of a parameter cannot become a parameter under autodiff (and
        // `detach` of a Burn 0.22 parameter keeps it tracked), so the shard is copied once.
        let fresh = |t: Tensor<3>| {
            let bytes = (t.shape().num_elements() * t.dtype().size()) as u64;
            burn_parallel::transfers::read("copying expert weights to shard them", bytes);
            burn_parallel::transfers::upload("copying expert weights to shard them", bytes);
            Tensor::<3>::from_data(t.to_data(), &t.device())
        };
        let w1 = fresh(self.w1.val()).slice([local.clone(), 0..h, 0..cfg.activation.fc1_width(f)]);
        let w1 = match cfg.activation {
            Activation::SwiGlu => {
                let gate = w1.clone().slice([0..local.len(), 0..h, cols.clone()]);
                let up = w1.slice([0..local.len(), 0..h, f + cols.start..f + cols.end]);
                Tensor::cat(vec![gate, up], 2)
            }
            _ => w1.slice([0..local.len(), 0..h, cols.clone()]),
        };
        let w2 = fresh(self.w2.val()).slice([local.clone(), cols, 0..h]);
        let mut config = cfg.clone();
        config.num_experts = local.len();
        config.ffn_hidden = k;
        Self::from_weights(config, w1, w2)
    }

    /// Runs each expert on its group of rows and scales the activations by the rows'
    /// probabilities (before the second projection, as Megatron-Core's experts do).
    ///
    /// # Shapes
    /// - tokens: `[N, H]`, grouped expert-major with `tokens_per_expert[e]` rows for expert `e`
    /// - probs: `[N]`
    /// - output: `[N, H]`
    pub fn forward(
        &self,
        tokens: Tensor<2>,
        tokens_per_expert: &[usize],
        probs: Tensor<1>,
    ) -> Result<Tensor<2>> {
        let cfg = &self.config;
        let [n, h] = tokens.dims();
        if h != cfg.hidden {
            return Err(MoeError::ShapeMismatch {
                name: "expert tokens",
                expected: format!("[rows, hidden = {}]", cfg.hidden),
                got: vec![n, h],
            });
        }
        if tokens_per_expert.len() != cfg.num_experts {
            return Err(MoeError::InvalidArgument {
                name: "tokens_per_expert",
                reason: format!(
                    "has {} entries for {} experts",
                    tokens_per_expert.len(),
                    cfg.num_experts
                ),
            });
        }
        let total: usize = tokens_per_expert.iter().sum();
        if total != n || probs.dims() != [n] {
            return Err(MoeError::InvalidArgument {
                name: "tokens_per_expert",
                reason: format!(
                    "sums to {total} but there are {n} rows and {} probs",
                    probs.dims()[0]
                ),
            });
        }
        if n == 0 {
            // No rows (a rank whose experts receive nothing): still an output of the graph, so
            // the dispatcher's collectives run in the backward pass on every rank.
            return Ok(tokens.mul_scalar(0.0));
        }
        // The experts compute in their weights' precision (the rows and their probabilities
        // are cast to it) and return the rows in the precision they came in.
        let (given, dtype) = (tokens.dtype(), self.w1.val().dtype());
        let tokens = tokens.cast(dtype);
        let probs = probs.cast(dtype).reshape([n, 1]);
        let uniform = tokens_per_expert.windows(2).all(|w| w[0] == w[1]);
        let kernels = crate::kernels::kernels_available(&tokens.device());
        let out = match cfg.compute {
            ExpertsCompute::Grouped => self.forward_grouped(tokens, tokens_per_expert, probs)?,
            ExpertsCompute::Auto if kernels => {
                self.forward_grouped(tokens, tokens_per_expert, probs)?
            }
            ExpertsCompute::Sequential => self.forward_sequential(tokens, tokens_per_expert, probs),
            ExpertsCompute::Batched => self.forward_batched(tokens, tokens_per_expert, probs),
            ExpertsCompute::Auto if uniform => {
                self.forward_batched(tokens, tokens_per_expert, probs)
            }
            ExpertsCompute::Auto => self.forward_sequential(tokens, tokens_per_expert, probs),
        };
        Ok(out.cast(given))
    }

    /// Two grouped GEMMs over all experts.
    fn forward_grouped(
        &self,
        tokens: Tensor<2>,
        counts: &[usize],
        probs: Tensor<2>,
    ) -> Result<Tensor<2>> {
        let hidden = crate::kernels::grouped_matmul(tokens, self.w1.val(), counts)?;
        let act = self.config.activation.apply(hidden) * probs;
        crate::kernels::grouped_matmul(act, self.w2.val(), counts)
    }

    /// The reference: one pair of matmuls per non-empty expert.
    fn forward_sequential(
        &self,
        tokens: Tensor<2>,
        counts: &[usize],
        probs: Tensor<2>,
    ) -> Tensor<2> {
        let cfg = &self.config;
        let [n, h] = tokens.dims();
        let f1 = cfg.activation.fc1_width(cfg.ffn_hidden);
        let w1 = self.w1.val();
        let w2 = self.w2.val();
        let mut outputs = Vec::with_capacity(counts.len());
        let mut start = 0;
        for (e, &count) in counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let rows = start..start + count;
            start += count;
            let x = tokens.clone().slice([rows.clone(), 0..h]);
            let w1e: Tensor<2> = w1.clone().slice([e..e + 1, 0..h, 0..f1]).reshape([h, f1]);
            let w2e: Tensor<2> = w2
                .clone()
                .slice([e..e + 1, 0..cfg.ffn_hidden, 0..h])
                .reshape([cfg.ffn_hidden, h]);
            let act = cfg.activation.apply(x.matmul(w1e)) * probs.clone().slice([rows, 0..1]);
            outputs.push(act.matmul(w2e));
        }
        if outputs.is_empty() {
            return Tensor::zeros([n, h], (&tokens.device(), tokens.dtype()));
        }
        Tensor::cat(outputs, 0)
    }

    /// Groups padded to the largest one, two batched matmuls, padding rows dropped.
    fn forward_batched(&self, tokens: Tensor<2>, counts: &[usize], probs: Tensor<2>) -> Tensor<2> {
        let cfg = &self.config;
        let [n, h] = tokens.dims();
        let e = counts.len();
        let device = tokens.device();
        let cap = counts.iter().copied().max().unwrap_or(0);
        let dtype = tokens.dtype();
        if n == 0 || cap == 0 {
            return Tensor::zeros([n, h], (&device, dtype));
        }
        let uniform = counts.iter().all(|&c| c == cap);
        let (padded, padded_probs, valid) = if uniform {
            (
                tokens.reshape([e, cap, h]),
                probs.reshape([e, cap, 1]),
                None,
            )
        } else {
            // Row n of the extended input is a zero row used as padding.
            let mut gather = Vec::with_capacity(e * cap);
            let mut valid = Vec::with_capacity(n);
            let mut start = 0;
            for (expert, &count) in counts.iter().enumerate() {
                gather.extend((start..start + count).map(|r| r as i64));
                gather.extend(std::iter::repeat_n(n as i64, cap - count));
                valid.extend((0..count).map(|i| (expert * cap + i) as i64));
                start += count;
            }
            let gather = host::upload_i64(&gather, &device, "uploading the padding gather index");
            let x = Tensor::cat(vec![tokens, Tensor::zeros([1, h], (&device, dtype))], 0)
                .select(0, gather.clone())
                .reshape([e, cap, h]);
            let p = Tensor::cat(vec![probs, Tensor::zeros([1, 1], (&device, dtype))], 0)
                .select(0, gather)
                .reshape([e, cap, 1]);
            (
                x,
                p,
                Some(host::upload_i64(
                    &valid,
                    &device,
                    "uploading the rows kept after padding",
                )),
            )
        };
        let f1 = cfg.activation.fc1_width(cfg.ffn_hidden);
        let hidden = padded.matmul(self.w1.val()).reshape([e * cap, f1]);
        let act = cfg
            .activation
            .apply(hidden)
            .reshape([e, cap, cfg.ffn_hidden])
            * padded_probs;
        let out = act.matmul(self.w2.val()).reshape([e * cap, h]);
        match valid {
            None => out,
            Some(rows) => out.select(0, rows),
        }
    }
}
