//! [`MoeLmConfig`]: the shape of a decoder-only MoE transformer.

use burn::config::Config;

use crate::error::{Result, invalid};
use crate::experts::SharedExpertsConfig;
use crate::layer::MoeLayerConfig;

/// A decoder-only MoE transformer LM: embedding, pre-norm blocks of RMSNorm → grouped-query
/// attention with RoPE → RMSNorm → SwiGLU FFN (an MoE layer on every `moe_every`-th layer,
/// dense otherwise), final RMSNorm, LM head (or the embedding, tied).
///
/// ```
/// use burn_moe::lm::MoeLmConfig;
/// use burn_moe::prelude::MoeLayerConfig;
///
/// // 2 layers of 4 SwiGLU experts, top-2, on hidden 64.
/// let config = MoeLmConfig::new(64, 64, 2, 4, 128)
///     .with_kv_heads(Some(2))
///     .with_moe(Some(MoeLayerConfig::swiglu(64, 64, 4, 2)));
/// config.validate().unwrap();
/// let (total, active) = config.parameter_count();
/// assert!(active < total);
/// ```
#[derive(Config, Debug)]
pub struct MoeLmConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Attention (query) heads.
    pub heads: usize,
    /// Dense FFN width (layers without MoE).
    pub ffn_hidden: usize,
    /// Key/value heads (grouped-query attention); `None`: one per query head.
    #[config(default = "None")]
    pub kv_heads: Option<usize>,
    /// An MoE layer on every `moe_every`-th layer (1: every layer, 0: none).
    #[config(default = 1)]
    pub moe_every: usize,
    /// The MoE layers (router, routed experts, shared experts); `None`: a dense model.
    #[config(default = "None")]
    pub moe: Option<MoeLayerConfig>,
    /// RoPE base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Standard deviation of the normal initialisation of every weight (norms start at one).
    #[config(default = 0.02)]
    pub init_std: f64,
    /// RMSNorm epsilon.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// Tie the output layer to the embedding (one `[vocab, hidden]` weight).
    #[config(default = false)]
    pub tie_embeddings: bool,
    /// Width of an attention head; `None`: `hidden / heads`.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    /// RMSNorms on the queries and keys before the rotary embedding.
    #[config(default = "QkNorm::Off")]
    pub qk_norm: QkNorm,
    /// Biases on the query, key and value projections (Qwen2's).
    #[config(default = false)]
    pub qkv_bias: bool,
    /// Layers (0-based) with a dense FFN even where `moe_every` puts an MoE layer (Qwen's
    /// `mlp_only_layers`).
    #[config(default = "Vec::new()")]
    pub dense_layers: Vec<usize>,
}

/// RMSNorms on the queries and keys, before the rotary embedding.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// None.
    Off,
    /// Over each head (Qwen3): one weight of `head_dim` for the query heads, one for the key
    /// heads.
    PerHead,
    /// Over the whole query and the whole key projection (OLMoE): weights of `heads·head_dim`
    /// and `kv_heads·head_dim` (one process per layer: refused under tensor parallelism).
    Whole,
}

impl QkNorm {
    /// How many heads the query and the key norm weight each span (each `head_dim` wide):
    /// one for per-head norms, all of them for whole-projection norms; `None` without.
    pub fn heads(self, heads: usize, kv_heads: usize) -> Option<(usize, usize)> {
        match self {
            Self::Off => None,
            Self::PerHead => Some((1, 1)),
            Self::Whole => Some((heads, kv_heads)),
        }
    }
}

impl MoeLmConfig {
    /// Key/value heads.
    pub fn kv(&self) -> usize {
        self.kv_heads.unwrap_or(self.heads)
    }

    /// Width of an attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads.max(1))
    }

    /// Whether layer `layer` (0-based) has an MoE FFN.
    pub fn is_moe(&self, layer: usize) -> bool {
        self.moe.is_some()
            && self.moe_every > 0
            && (layer + 1).is_multiple_of(self.moe_every)
            && !self.dense_layers.contains(&layer)
    }

    /// Index of MoE layer `layer` among the model's MoE layers.
    pub fn moe_index(&self, layer: usize) -> Option<usize> {
        self.is_moe(layer)
            .then(|| (0..layer).filter(|&l| self.is_moe(l)).count())
    }

    /// Checks every size and that the parts agree.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("vocab", self.vocab),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("ffn_hidden", self.ffn_hidden),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        match self.head_dim {
            None if !self.hidden.is_multiple_of(self.heads) => {
                return Err(invalid(
                    "heads",
                    format!("{} heads do not divide hidden {}", self.heads, self.hidden),
                ));
            }
            Some(0) => return Err(invalid("head_dim", "must be positive")),
            _ => {}
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(invalid(
                if self.head_dim.is_some() {
                    "head_dim"
                } else {
                    "heads"
                },
                format!(
                    "the head dimension {} must be even for RoPE",
                    self.head_dim()
                ),
            ));
        }
        if let Some(&l) = self.dense_layers.iter().find(|&&l| l >= self.layers) {
            return Err(invalid(
                "dense_layers",
                format!("layer {l} is not among the model's {} layers", self.layers),
            ));
        }
        let kv = self.kv();
        if kv == 0 || !self.heads.is_multiple_of(kv) {
            return Err(invalid(
                "kv_heads",
                format!("{kv} key/value heads do not divide {} heads", self.heads),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(invalid("rope_theta", "must be a finite number above 1"));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return Err(invalid("init_std", "must be positive"));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(invalid("norm_eps", "must be positive"));
        }
        if let Some(moe) = &self.moe {
            moe.validate()?;
            if moe.router.hidden != self.hidden {
                return Err(invalid(
                    "moe.router.hidden",
                    format!(
                        "is {} but the model's hidden size is {}",
                        moe.router.hidden, self.hidden
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Parameters of the whole model: `(total, active per token)`.
    pub fn parameter_count(&self) -> (u64, u64) {
        let (h, v) = (self.hidden as u64, self.vocab as u64);
        let heads = self.heads as u64;
        let kv = self.kv() as u64;
        let dh = self.head_dim() as u64;
        let qk_norm = self
            .qk_norm
            .heads(self.heads, self.kv())
            .map_or(0, |(q, k)| (q + k) as u64 * dh);
        let bias = if self.qkv_bias {
            (heads + 2 * kv) * dh
        } else {
            0
        };
        let attention = h * (heads + 2 * kv) * dh + heads * dh * h + 2 * h + qk_norm + bias;
        let dense = 3 * h * self.ffn_hidden as u64;
        // Embedding, output layer (unless tied to it), final norm.
        let io = if self.tie_embeddings {
            v * h + h
        } else {
            2 * v * h + h
        };
        let (mut total, mut active) = (io, io);
        for layer in 0..self.layers {
            let (t, a) = match &self.moe {
                Some(moe) if self.is_moe(layer) => {
                    let e = moe.experts.num_experts as u64;
                    let fe = moe.experts.ffn_hidden as u64;
                    let width = moe.experts.activation.fc1_width(moe.experts.ffn_hidden) as u64;
                    let expert = h * width + fe * h;
                    let shared = moe.shared.as_ref().map_or(0, |s| {
                        let w = s.activation.fc1_width(s.ffn_hidden) as u64;
                        h * w + s.ffn_hidden as u64 * h + if s.gate { h } else { 0 }
                    });
                    let router = e * h;
                    (
                        router + e * expert + shared,
                        router + moe.router.topk as u64 * expert + shared,
                    )
                }
                _ => (dense, dense),
            };
            total += attention + t;
            active += attention + a;
        }
        (total, active)
    }

    /// Mixtral 8x22B (Mistral AI): 56 layers of hidden 6144, 48 query and 8 key/value heads,
    /// 8 SwiGLU experts of width 16384 on every layer, top-2 with a load-balancing loss of
    /// 0.01 (Megatron's default for it), vocabulary 32768, RoPE base 10⁶, untied output
    /// layer. About 141 B parameters, 39 B active per token. Dropless, as Megatron trains
    /// it; the routing options are the router's to change.
    pub fn mixtral_8x22b() -> Self {
        let mut moe = MoeLayerConfig::swiglu(6144, 16384, 8, 2);
        moe.router = moe.router.with_aux_loss_coeff(1e-2);
        Self::new(32768, 6144, 56, 48, 16384)
            .with_kv_heads(Some(8))
            .with_moe(Some(moe))
            .with_rope_theta(1e6)
    }

    /// Qwen2-57B-A14B (Qwen): 28 layers of hidden 3584, 28 query and 4 key/value heads, 64
    /// SwiGLU experts of width 2560 (top-8, probabilities not renormalised: softmax over all
    /// experts, then top-k) beside a shared expert of width 20480 behind a sigmoid gate,
    /// vocabulary 151936, RoPE base 10⁶, untied output layer. About 57 B parameters, 14 B
    /// active per token. (Qwen2's query/key/value biases are not part of this model.)
    pub fn qwen2_57b_a14b() -> Self {
        let mut moe = MoeLayerConfig::swiglu(3584, 2560, 64, 8)
            .with_shared(Some(SharedExpertsConfig::new(3584, 20480).with_gate(true)));
        moe.router = moe.router.with_pre_softmax(true).with_aux_loss_coeff(1e-3);
        Self::new(151936, 3584, 28, 28, 18944)
            .with_kv_heads(Some(4))
            .with_moe(Some(moe))
            .with_rope_theta(1e6)
    }

    /// Llama-3-8×70B, the upcycled model of the MoE Parallel Folding paper's Table 1:
    /// Llama-3-70B's 80 layers (hidden 8192, 64 query and 8 key/value heads, vocabulary
    /// 128256, RoPE base 5·10⁵) with its FFN (width 28672) copied into 8 experts, top-2.
    pub fn llama3_8x70b() -> Self {
        let mut moe = MoeLayerConfig::swiglu(8192, 28672, 8, 2);
        moe.router = moe.router.with_aux_loss_coeff(1e-2);
        Self::new(128256, 8192, 80, 64, 28672)
            .with_kv_heads(Some(8))
            .with_moe(Some(moe))
            .with_rope_theta(5e5)
    }
}
