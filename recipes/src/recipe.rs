//! TOML recipes: parsing, `--set section.key=value` overrides and validation.
//!
//! Every key is known (unknown keys are errors), every value is checked, and errors name the
//! key (`model.heads`, `parallel.tp`, …) in one line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{RecipeError, Result};

/// A training recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Where the run writes and its seed.
    pub run: RunConfig,
    /// The model.
    pub model: ModelConfig,
    /// The data source.
    pub data: DataConfig,
    /// The optimisation.
    pub training: TrainingConfig,
    /// The parallel layout.
    #[serde(default)]
    pub parallel: ParallelConfig,
    /// The cluster `plan` estimates for (H100 defaults).
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// The planner's efficiency numbers (defaults fitted to the seed paper).
    #[serde(default)]
    pub calibration: Option<crate::cluster::Calibration>,
}

/// `[run]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Everything the run writes goes here (relative paths are relative to the working
    /// directory).
    pub dir: PathBuf,
    /// Seed of the model initialisation and of the data.
    pub seed: u64,
    /// Peak TFLOP/s of one rank's device, for the MFU estimate (default: 0.19, the AVX2 f32
    /// peak of two x86 cores measured for ../shared/DESIGN.md).
    #[serde(default)]
    pub peak_tflops: Option<f64>,
}

/// `[model]`: a decoder-only transformer with MoE FFNs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size (256 for byte-level text).
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention); defaults to `heads`.
    #[serde(default)]
    pub kv_heads: Option<usize>,
    /// Dense FFN width (layers without MoE).
    pub ffn_hidden: usize,
    /// MoE on every `moe_every`-th layer (1 = every layer, 0 = none).
    #[serde(default = "one")]
    pub moe_every: usize,
    /// Routed experts.
    #[serde(default = "one")]
    pub experts: usize,
    /// Experts per token.
    #[serde(default = "one")]
    pub topk: usize,
    /// FFN width of one expert; defaults to `ffn_hidden`.
    #[serde(default)]
    pub expert_ffn_hidden: Option<usize>,
    /// FFN width of the shared expert (none when absent).
    #[serde(default)]
    pub shared_expert_ffn_hidden: Option<usize>,
    /// Switch aux-loss coefficient.
    #[serde(default)]
    pub aux_loss_coeff: f64,
    /// z-loss coefficient.
    #[serde(default)]
    pub z_loss_coeff: Option<f64>,
    /// Capacity factor (dropless when absent).
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// RoPE base.
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    /// Standard deviation of the initialisation.
    #[serde(default = "init_std")]
    pub init_std: f64,
    /// RMSNorm epsilon.
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    /// Tie the output layer to the embedding (one `[vocab, hidden]` weight; with pipeline
    /// parallelism the last stage holds a copy whose gradient is summed with the first's).
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Scale the shared expert's output by a learned sigmoid gate (Qwen2-MoE).
    #[serde(default)]
    pub shared_expert_gate: bool,
    /// Activation of the routed and shared experts.
    #[serde(default)]
    pub expert_activation: ExpertActivation,
    /// `[model.router]`: every option of the library's `RouterConfig`, by its name.
    #[serde(default)]
    pub router: Option<RouterTable>,
    /// Width of an attention head (absent: `hidden / heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorms on the queries and keys before RoPE: `"off"`, `"per_head"` (Qwen3),
    /// `"whole"` (the whole projections, OLMoE; `parallel.tp = 1`).
    #[serde(default, skip_serializing_if = "QkNormName::is_off")]
    pub qk_norm: QkNormName,
    /// Biases on the query, key and value projections (Qwen2).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qkv_bias: bool,
    /// Layers (0-based) with a dense FFN where `moe_every` would put an MoE layer (Qwen's
    /// `mlp_only_layers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dense_layers: Vec<usize>,
}

/// `model.qk_norm` (burn-moe's `QkNorm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum QkNormName {
    /// None.
    #[default]
    Off,
    /// Over each head.
    PerHead,
    /// Over the whole query and key projections.
    Whole,
}

impl QkNormName {
    fn is_off(&self) -> bool {
        *self == Self::Off
    }
}

/// The experts' activation (burn-moe's `Activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExpertActivation {
    /// `silu(gate) · up` (a first projection of twice the width).
    #[default]
    Swiglu,
    /// Exact (erf) GELU.
    Gelu,
    /// SiLU.
    Silu,
    /// ReLU.
    Relu,
}

/// Router score function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreFunctionName {
    /// Softmax over the experts.
    Softmax,
    /// Element-wise sigmoid (DeepSeek-V3).
    Sigmoid,
}

/// Top-k or Sinkhorn routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingName {
    /// Top-k of the scores (group-limited with `num_groups`).
    Topk,
    /// Sinkhorn-balanced assignment in training.
    Sinkhorn,
}

/// Which tokens an over-full expert keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DropPolicyName {
    /// The highest-probability tokens.
    Probs,
    /// The first tokens by position.
    Position,
}

/// `[model.router]`: the options of burn-moe's `RouterConfig` (Megatron's `--moe-router-*`
/// flags) by their library names, each at the library's default when absent. The number of
/// experts and `topk` stay in `[model]`; `pre_softmax` defaults to `topk == 1` (a softmax over
/// one selected logit gives the router no gradient). `aux_loss_coeff`, `z_loss_coeff` and
/// `capacity_factor` may be given here or, as before, in `[model]` (then `capacity_factor`
/// also pads to capacity), not in both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RouterTable {
    /// `"softmax"` or `"sigmoid"`.
    pub score_function: Option<ScoreFunctionName>,
    /// Softmax before the top-k.
    pub pre_softmax: Option<bool>,
    /// `"topk"` or `"sinkhorn"`.
    pub routing: Option<RoutingName>,
    /// Expert groups of group-limited routing.
    pub num_groups: Option<usize>,
    /// Groups each token may use.
    pub group_topk: Option<usize>,
    /// Multiplier of the routing probabilities.
    pub scaling_factor: Option<f64>,
    /// Aux-loss-free balancing bias (sigmoid routing), updated after every step.
    pub expert_bias: Option<bool>,
    /// Step of the expert-bias update.
    pub bias_update_rate: Option<f64>,
    /// Capacity factor (dropless when absent).
    pub capacity_factor: Option<f64>,
    /// `"probs"` or `"position"`.
    pub drop_policy: Option<DropPolicyName>,
    /// Pad every expert to exactly its capacity.
    pub pad_to_capacity: Option<bool>,
    /// Switch (micro-batch) load-balancing loss coefficient.
    pub aux_loss_coeff: Option<f64>,
    /// Sequence-level load-balancing loss coefficient.
    pub seq_aux_loss_coeff: Option<f64>,
    /// Global-batch load-balancing loss coefficient (counts accumulated over the step's
    /// micro-batches).
    pub global_aux_loss_coeff: Option<f64>,
    /// Router z-loss coefficient.
    pub z_loss_coeff: Option<f64>,
    /// Multiplicative input jitter `U(1 − eps, 1 + eps)` in training.
    pub input_jitter_eps: Option<f64>,
}

fn one() -> usize {
    1
}
fn rope_theta() -> f64 {
    10_000.0
}
fn init_std() -> f64 {
    0.02
}
fn norm_eps() -> f64 {
    1e-6
}

/// Where tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A seeded sparse Markov chain over the vocabulary with a known entropy rate.
    Markov,
    /// Byte-level tokens of a text file or of every file in a folder.
    Bytes,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The source.
    pub source: Source,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// File or folder (`bytes` source).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Successors per state (`markov` source).
    #[serde(default = "branching")]
    pub branching: usize,
}

fn branching() -> usize {
    4
}

/// Numeric precision of the parameters and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats.
    F32,
    /// bf16 matrices and activations; router, norms, softmax, losses, gradients and the
    /// optimizer's state in f32 ([`burn_moe::lm::Precision::Bf16`]).
    Bf16,
}

impl From<Precision> for burn_moe::lm::Precision {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => Self::F32,
            Precision::Bf16 => Self::Bf16,
        }
    }
}

/// `[training]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per micro-batch per data-parallel rank.
    pub micro_batch: usize,
    /// Sequences per optimizer step over all data-parallel ranks.
    pub global_batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// AdamW weight decay.
    #[serde(default = "weight_decay")]
    pub weight_decay: f64,
    /// AdamW β1.
    #[serde(default = "beta1")]
    pub beta1: f64,
    /// AdamW β2.
    #[serde(default = "beta2")]
    pub beta2: f64,
    /// AdamW ε.
    #[serde(default = "eps")]
    pub eps: f64,
    /// Gradient clipping by global norm (none when absent).
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// Recompute activations in the backward pass (Burn's balanced gradient checkpointing:
    /// memory-bound intermediates are recomputed, compute-bound ones kept).
    #[serde(default)]
    pub recompute: bool,
    /// Precision.
    #[serde(default = "precision")]
    pub precision: Precision,
    /// Write a JSONL metrics line every this many steps.
    #[serde(default = "one")]
    pub log_every: usize,
    /// Checkpoint every this many steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Checkpoints kept.
    #[serde(default = "keep")]
    pub keep_checkpoints: usize,
}

fn weight_decay() -> f64 {
    0.1
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.95
}
fn eps() -> f64 {
    1e-8
}
fn precision() -> Precision {
    Precision::F32
}
fn keep() -> usize {
    2
}

/// Expert-parallel token dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dispatcher {
    /// All-to-all-v over EP.
    Alltoall,
    /// All-gather over ETP×EP.
    Allgather,
}

/// How context-parallel attention exchanges keys and values (Megatron's `--cp-comm-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CpComm {
    /// Ring attention: key/value blocks passed around the CP group.
    #[default]
    P2p,
    /// All-gather the keys and values (short contexts).
    Allgather,
}

/// `[parallel]`: attention TP × CP × DP × PP and MoE ETP × EP × EDP on the same ranks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Tensor parallel (with sequence parallelism when > 1).
    #[serde(default = "one")]
    pub tp: usize,
    /// Context parallel.
    #[serde(default = "one")]
    pub cp: usize,
    /// Pipeline parallel.
    #[serde(default = "one")]
    pub pp: usize,
    /// Virtual pipeline stages per rank.
    #[serde(default)]
    pub virtual_pp: Option<usize>,
    /// Context-parallel attention: `p2p` (ring) or `allgather`.
    #[serde(default)]
    pub cp_comm: CpComm,
    /// Layers of each virtual pipeline stage (`pp × virtual_pp` entries in virtual-stage
    /// order, summing to the layers); an even split when absent.
    #[serde(default)]
    pub pp_layers: Option<Vec<usize>>,
    /// Micro-batches per step and data-parallel rank, when given: must equal
    /// `global_batch / (micro_batch × dp)` (the pipeline runs them all each step).
    #[serde(default)]
    pub microbatches: Option<usize>,
    /// Expert parallel.
    #[serde(default = "one")]
    pub ep: usize,
    /// Expert tensor parallel.
    #[serde(default = "one")]
    pub etp: usize,
    /// Dispatcher.
    #[serde(default = "dispatcher")]
    pub dispatcher: Dispatcher,
    /// Number of GPUs the recipe is written for (full-scale recipes); the world size of a
    /// run comes from the launcher.
    #[serde(default)]
    pub gpus: Option<usize>,
}

fn dispatcher() -> Dispatcher {
    Dispatcher::Alltoall
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            tp: 1,
            cp: 1,
            pp: 1,
            virtual_pp: None,
            microbatches: None,
            pp_layers: None,
            cp_comm: CpComm::default(),
            ep: 1,
            etp: 1,
            dispatcher: Dispatcher::Alltoall,
            gpus: None,
        }
    }
}

pub(crate) use crate::error::bad;

/// A library error of the layer split, named by its `[parallel]` key.
fn parallel_key(e: burn_moe::MoeError) -> RecipeError {
    match e {
        burn_moe::MoeError::InvalidConfig { field, reason } => RecipeError::Invalid {
            key: format!("parallel.{field}"),
            reason,
        },
        other => other.into(),
    }
}

impl Recipe {
    /// The layer split the recipe asks for (`parallel.pp_layers`, or uniform).
    pub fn layer_split(&self) -> Result<burn_moe::lm::LayerSplit> {
        let p = &self.parallel;
        let chunks = p.virtual_pp.unwrap_or(1);
        match &p.pp_layers {
            Some(counts) => {
                burn_moe::lm::LayerSplit::given(self.model.layers, p.pp, chunks, counts)
            }
            None => burn_moe::lm::LayerSplit::uniform(self.model.layers, p.pp, chunks),
        }
        .map_err(parallel_key)
    }

    /// Peak TFLOP/s per rank used for MFU.
    pub fn run_peak_tflops(&self) -> f64 {
        self.run.peak_tflops.unwrap_or(0.19)
    }

    /// Reads a recipe file and applies `overrides` (`section.key=value`, TOML values).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        Self::parse(&read_recipe_text(path)?, overrides)
    }

    /// Parses recipe text and applies `overrides`. A `[cluster]` table without `gpus` (for
    /// example one made by `--set cluster.memory_gib=…`) takes `parallel.gpus`.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table = parse_table(text, overrides)?;
        let gpus = table.get("parallel").and_then(|p| p.get("gpus")).cloned();
        if let (Some(gpus), Some(toml::Value::Table(cluster))) = (gpus, table.get_mut("cluster"))
            && !cluster.contains_key("gpus")
        {
            cluster.insert("gpus".into(), gpus);
        }
        Self::deserialize(toml::Value::Table(table)).map_err(|e| from_serde(&e.to_string()))
    }

    /// Checks every value that does not depend on the world size.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.run.peak_tflops
            && !(p.is_finite() && p > 0.0)
        {
            return Err(bad("run.peak_tflops", "must be a positive number"));
        }
        if self.run.dir.as_os_str().is_empty() {
            return Err(bad("run.dir", "must not be empty"));
        }
        let m = &self.model;
        let positive = [
            ("model.vocab", m.vocab),
            ("model.hidden", m.hidden),
            ("model.layers", m.layers),
            ("model.heads", m.heads),
            ("model.ffn_hidden", m.ffn_hidden),
            ("model.experts", m.experts),
            ("model.topk", m.topk),
            ("data.seq_len", self.data.seq_len),
            ("training.steps", self.training.steps),
            ("training.micro_batch", self.training.micro_batch),
            ("training.global_batch", self.training.global_batch),
            ("training.log_every", self.training.log_every),
            ("training.keep_checkpoints", self.training.keep_checkpoints),
            ("parallel.tp", self.parallel.tp),
            ("parallel.cp", self.parallel.cp),
            ("parallel.pp", self.parallel.pp),
            ("parallel.ep", self.parallel.ep),
            ("parallel.etp", self.parallel.etp),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        self.validate_model()?;
        self.validate_data()?;
        self.validate_training()?;
        self.validate_parallel()?;
        self.validate_router()
    }

    /// The `[model]` keys' own ranges and their agreement with each other.
    fn validate_model(&self) -> Result<()> {
        let m = &self.model;
        if m.head_dim.is_none() && !m.hidden.is_multiple_of(m.heads) {
            return Err(bad(
                "model.heads",
                format!("{} heads do not divide hidden = {}", m.heads, m.hidden),
            ));
        }
        let head_dim = m.head_dim.unwrap_or(m.hidden / m.heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(
                if m.head_dim.is_some() {
                    "model.head_dim"
                } else {
                    "model.heads"
                },
                "the head dimension must be even (and positive) for RoPE",
            ));
        }
        let kv = m.kv_heads.unwrap_or(m.heads);
        if kv == 0 || !m.heads.is_multiple_of(kv) {
            return Err(bad(
                "model.kv_heads",
                format!("{kv} key/value heads do not divide {} heads", m.heads),
            ));
        }
        if m.moe_every > m.layers {
            return Err(bad(
                "model.moe_every",
                format!(
                    "is {} but the model has {} layers: no layer would have an MoE FFN (0 \
                     asks for a dense model)",
                    m.moe_every, m.layers
                ),
            ));
        }
        if m.topk > m.experts {
            return Err(bad(
                "model.topk",
                format!("{} exceeds the {} experts", m.topk, m.experts),
            ));
        }
        if m.expert_ffn_hidden == Some(0) {
            return Err(bad("model.expert_ffn_hidden", "must be at least 1"));
        }
        if m.shared_expert_ffn_hidden == Some(0) {
            return Err(bad("model.shared_expert_ffn_hidden", "must be at least 1"));
        }
        if !(m.aux_loss_coeff.is_finite() && m.aux_loss_coeff >= 0.0) {
            return Err(bad("model.aux_loss_coeff", "must be a finite number >= 0"));
        }
        if let Some(z) = m.z_loss_coeff
            && !(z.is_finite() && z >= 0.0)
        {
            return Err(bad("model.z_loss_coeff", "must be a finite number >= 0"));
        }
        if let Some(c) = m.capacity_factor
            && !(c.is_finite() && c > 0.0)
        {
            return Err(bad("model.capacity_factor", "must be a positive number"));
        }
        if !(m.rope_theta.is_finite() && m.rope_theta > 1.0) {
            return Err(bad("model.rope_theta", "must be a finite number > 1"));
        }
        if !(m.init_std.is_finite() && m.init_std > 0.0) {
            return Err(bad("model.init_std", "must be a positive number"));
        }
        Ok(())
    }

    /// The `[data]` source and its keys.
    fn validate_data(&self) -> Result<()> {
        let m = &self.model;
        match self.data.source {
            Source::Markov => {
                if self.data.branching == 0 || self.data.branching > m.vocab {
                    return Err(bad(
                        "data.branching",
                        format!("must be in 1..={} (the vocabulary)", m.vocab),
                    ));
                }
                if self.data.path.is_some() {
                    return Err(bad("data.path", "is only used by source = \"bytes\""));
                }
            }
            Source::Bytes => {
                let Some(path) = &self.data.path else {
                    return Err(bad("data.path", "is required by source = \"bytes\""));
                };
                if !path.exists() {
                    return Err(bad(
                        "data.path",
                        format!("{} does not exist", path.display()),
                    ));
                }
                if m.vocab != 256 {
                    return Err(bad("model.vocab", "must be 256 for byte-level tokens"));
                }
            }
        }
        Ok(())
    }

    /// The `[training]` optimizer, schedule and batch keys.
    fn validate_training(&self) -> Result<()> {
        let t = &self.training;
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(bad("training.lr", "must be a positive number"));
        }
        if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return Err(bad("training.min_lr", "must be in [0, training.lr]"));
        }
        if t.warmup_steps > t.steps {
            return Err(bad("training.warmup_steps", "exceeds training.steps"));
        }
        for (key, b) in [("training.beta1", t.beta1), ("training.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(bad(key, "must be in [0, 1)"));
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return Err(bad("training.eps", "must be a positive number"));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(bad("training.weight_decay", "must be a finite number >= 0"));
        }
        if let Some(c) = t.grad_clip
            && !(c.is_finite() && c > 0.0)
        {
            return Err(bad("training.grad_clip", "must be a positive number"));
        }
        if !t.global_batch.is_multiple_of(t.micro_batch) {
            return Err(bad(
                "training.global_batch",
                format!(
                    "{} is not a multiple of training.micro_batch = {}",
                    t.global_batch, t.micro_batch
                ),
            ));
        }
        Ok(())
    }

    /// The `[parallel]` layout against the model and the sequence: every split divides.
    fn validate_parallel(&self) -> Result<()> {
        let m = &self.model;
        let kv = m.kv_heads.unwrap_or(m.heads);
        let p = &self.parallel;
        if !m.heads.is_multiple_of(p.tp) || !kv.is_multiple_of(p.tp) {
            return Err(bad(
                "parallel.tp",
                format!(
                    "{} does not divide the {} heads and {kv} key/value heads",
                    p.tp, m.heads
                ),
            ));
        }
        if !m.vocab.is_multiple_of(p.tp) {
            return Err(bad(
                "parallel.tp",
                format!("{} does not divide vocab = {}", p.tp, m.vocab),
            ));
        }
        if p.tp > 1 && !self.data.seq_len.is_multiple_of(p.tp) {
            return Err(bad(
                "parallel.tp",
                format!(
                    "sequence parallelism needs seq_len = {} divisible by tp",
                    self.data.seq_len
                ),
            ));
        }
        if !m.experts.is_multiple_of(p.ep) {
            return Err(bad(
                "parallel.ep",
                format!("{} does not divide the {} experts", p.ep, m.experts),
            ));
        }
        let expert_ffn = m.expert_ffn_hidden.unwrap_or(m.ffn_hidden);
        if !expert_ffn.is_multiple_of(p.etp) {
            return Err(bad(
                "parallel.etp",
                format!("{} does not divide expert_ffn_hidden = {expert_ffn}", p.etp),
            ));
        }
        if !m.ffn_hidden.is_multiple_of(p.tp) {
            return Err(bad(
                "parallel.tp",
                format!("{} does not divide ffn_hidden = {}", p.tp, m.ffn_hidden),
            ));
        }
        if m.qk_norm == QkNormName::Whole && p.tp > 1 {
            return Err(bad(
                "model.qk_norm",
                "\"whole\" normalises the whole query and key projections on one process; it \
                 needs parallel.tp = 1 (\"per_head\" splits over TP)",
            ));
        }
        if p.virtual_pp == Some(0) {
            return Err(bad("parallel.virtual_pp", "must be at least 1"));
        }
        self.layer_split()?;
        let seq = self.data.seq_len;
        if p.cp > 1 && (!seq.is_multiple_of(2 * p.cp) || !(seq / p.cp).is_multiple_of(p.tp)) {
            return Err(bad(
                "data.seq_len",
                format!(
                    "context parallelism splits the sequence into 2 × cp = {} equal chunks and \
                     each rank's {} tokens over tp = {}; {seq} does not allow it",
                    2 * p.cp,
                    seq / p.cp,
                    p.tp
                ),
            ));
        }
        if p.microbatches == Some(0) {
            return Err(bad("parallel.microbatches", "must be at least 1"));
        }
        if let Some(g) = p.gpus {
            self.check_world(g).map_err(|e| match e {
                RecipeError::Invalid { reason, .. } => bad("parallel.gpus", reason),
                other => other,
            })?;
        }
        Ok(())
    }

    /// The `[model.router]` table (each key given once, flat or in the table) and the MoE
    /// layer's own checks, named by their recipe key.
    fn validate_router(&self) -> Result<()> {
        let m = &self.model;
        if let Some(r) = &self.model.router {
            for (key, flat, table) in [
                (
                    "aux_loss_coeff",
                    m.aux_loss_coeff != 0.0,
                    r.aux_loss_coeff.is_some(),
                ),
                (
                    "z_loss_coeff",
                    m.z_loss_coeff.is_some(),
                    r.z_loss_coeff.is_some(),
                ),
                (
                    "capacity_factor",
                    m.capacity_factor.is_some(),
                    r.capacity_factor.is_some(),
                ),
            ] {
                if flat && table {
                    return Err(bad(
                        &format!("model.router.{key}"),
                        format!("is also given as model.{key}; keep one"),
                    ));
                }
            }
        }
        if m.shared_expert_gate && m.shared_expert_ffn_hidden.is_none() {
            return Err(bad(
                "model.shared_expert_gate",
                "needs a shared expert (model.shared_expert_ffn_hidden)",
            ));
        }
        self.model
            .lm_config()
            .validate()
            .map_err(|e| self.model.key_of(e))?;
        Ok(())
    }

    /// Checks the layout against a world of `world` ranks; returns (dp, edp).
    pub fn check_world(&self, world: usize) -> Result<(usize, usize)> {
        let p = &self.parallel;
        let attention = p.tp * p.cp * p.pp;
        if world == 0 || !world.is_multiple_of(attention) {
            return Err(bad(
                "parallel.tp",
                format!("tp × cp × pp = {attention} does not divide the world of {world} ranks"),
            ));
        }
        let moe = p.etp * p.ep * p.pp;
        if !world.is_multiple_of(moe) {
            return Err(bad(
                "parallel.ep",
                format!("etp × ep × pp = {moe} does not divide the world of {world} ranks"),
            ));
        }
        let dp = world / attention;
        let t = &self.training;
        if !t.global_batch.is_multiple_of(t.micro_batch * dp) {
            return Err(bad(
                "training.global_batch",
                format!(
                    "{} is not a multiple of micro_batch × dp = {} × {dp}",
                    t.global_batch, t.micro_batch
                ),
            ));
        }
        if let Some(m) = p.microbatches
            && m != t.global_batch / (t.micro_batch * dp)
        {
            return Err(bad(
                "parallel.microbatches",
                format!(
                    "{m} differs from global_batch / (micro_batch × dp) = {} / ({} × {dp})",
                    t.global_batch, t.micro_batch
                ),
            ));
        }
        Ok((dp, world / moe))
    }
}

/// Sets `section.key = value` (the value parsed as TOML, or as a string when it is not TOML);
/// `section.table.key` reaches nested tables (`model.router.score_function`), created when
/// absent.
pub(crate) fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| bad("--set", format!("`{assignment}` is not section.key=value")))?;
    let path = path.trim();
    let (section, rest) = path
        .split_once('.')
        .ok_or_else(|| bad("--set", format!("`{path}` is not section.key")))?;
    let value: toml::Value = match format!("v = {}", raw.trim()).parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.trim().into())),
        Err(_) => toml::Value::String(raw.trim().to_string()),
    };
    // `name[i].key` sets a key of the i-th table of an array of tables (`[[name]]`).
    let mut target =
        if let Some((name, index)) = section.strip_suffix(']').and_then(|s| s.split_once('[')) {
            let i: usize = index
                .parse()
                .map_err(|_| bad("--set", format!("`{section}`: `{index}` is not an index")))?;
            let Some(toml::Value::Array(items)) = table.get_mut(name) else {
                return Err(bad(section, format!("the recipe has no [[{name}]] tables")));
            };
            let len = items.len();
            let Some(toml::Value::Table(item)) = items.get_mut(i) else {
                return Err(bad(section, format!("[[{name}]] has {len} tables")));
            };
            item
        } else {
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(t) = entry else {
                return Err(bad(section, "is not a table"));
            };
            t
        };
    let mut keys: Vec<&str> = rest.split('.').collect();
    let key = keys.pop().unwrap_or(rest);
    let mut walked = section.to_string();
    for name in keys {
        walked = format!("{walked}.{name}");
        let entry = target
            .entry(name.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(t) = entry else {
            return Err(bad(&walked, "is not a table"));
        };
        target = t;
    }
    target.insert(key.to_string(), value);
    Ok(())
}

/// What kind of run a run folder holds, from its `recipe.toml`: `"a MoE LM"`, `"a video VAE"`
/// or `"a DiT"`; an error naming `--run` when it has none.
pub fn run_kind(run: &Path) -> Result<&'static str> {
    let path = run.join("recipe.toml");
    if !path.exists() {
        return Err(bad(
            "--run",
            format!("{} holds no run (no recipe.toml)", run.display()),
        ));
    }
    let text = read_recipe_text(&path)?;
    Ok(if is_vae_recipe(&text) {
        "a video VAE"
    } else if is_dit_recipe(&text) {
        "a DiT"
    } else {
        "a MoE LM"
    })
}

/// An error naming `--run` unless `run` is a run of `kind` (see [`run_kind`]).
pub fn expect_run_kind(run: &Path, kind: &'static str) -> Result<()> {
    let found = run_kind(run)?;
    if found != kind {
        return Err(bad(
            "--run",
            format!("{} is {found} run, not {kind} run", run.display()),
        ));
    }
    Ok(())
}

/// The largest recipe file read (a recipe is a few kilobytes; `/dev/zero` is not one).
pub const MAX_RECIPE_BYTES: u64 = 1 << 20;

/// The text of a recipe file, refused beyond [`MAX_RECIPE_BYTES`] or when not UTF-8.
pub fn read_recipe_text(path: &Path) -> Result<String> {
    use std::io::Read;
    let io = |e: std::io::Error| RecipeError::io(path, e);
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_RECIPE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_RECIPE_BYTES {
        return Err(RecipeError::io(
            path,
            format!("is larger than {MAX_RECIPE_BYTES} bytes; not a recipe"),
        ));
    }
    String::from_utf8(bytes).map_err(|_| RecipeError::io(path, "is not UTF-8 text"))
}

/// Reads a recipe file of any kind, applies `--set` overrides and deserialises it (errors name
/// the key).
pub(crate) fn load_file<T: serde::de::DeserializeOwned>(
    path: &Path,
    overrides: &[String],
) -> Result<T> {
    parse_text(&read_recipe_text(path)?, overrides)
}

/// [`load_file`] on recipe text.
pub(crate) fn parse_text<T: serde::de::DeserializeOwned>(
    text: &str,
    overrides: &[String],
) -> Result<T> {
    let value = parse_table(text, overrides)?;
    T::deserialize(toml::Value::Table(value)).map_err(|e| from_serde(&e.to_string()))
}

/// Recipe text as a TOML table with `overrides` applied; syntax errors give their line and
/// column.
fn parse_table(text: &str, overrides: &[String]) -> Result<toml::Table> {
    let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" (line {line}, column {column})")
        });
        RecipeError::Syntax(format!(
            "{}{}",
            e.message().replace('\n', " "),
            at.unwrap_or_default()
        ))
    })?;
    for o in overrides {
        apply_override(&mut value, o)?;
    }
    Ok(value)
}

/// The field a serde message names after `marker`, with the table it is in (toml says ``in
/// `model.router` ``): `model.router.bogus`.
fn field_in_table(message: &str, marker: &str) -> Option<String> {
    let field = message.split(marker).nth(1)?.split('`').next()?;
    let table = message
        .rsplit(" in `")
        .next()
        .filter(|_| message.contains(" in `"))
        .and_then(|s| s.split('`').next());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{field}"),
        _ => field.to_string(),
    })
}

/// Turns serde's message into an error naming the key.
pub(crate) fn from_serde(message: &str) -> RecipeError {
    let message = message.replace('\n', " ");
    // toml reports `unknown field `x`, expected ...` or `invalid type: ..., expected ... for key `section.key``.
    let key = message
        .split("for key `")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .map(str::to_string)
        .or_else(|| field_in_table(&message, "unknown field `"))
        .or_else(|| field_in_table(&message, "missing field `"))
        .unwrap_or_else(|| "recipe".to_string());
    RecipeError::Invalid {
        key,
        reason: message.trim().to_string(),
    }
}

/// Whether recipe text is a video VAE recipe (it has a `[vae]` table).
pub fn is_vae_recipe(text: &str) -> bool {
    text.parse::<toml::Table>()
        .is_ok_and(|t| t.contains_key("vae"))
}

/// Whether recipe text is a DiT recipe (it has a `[dit]` table).
pub fn is_dit_recipe(text: &str) -> bool {
    text.parse::<toml::Table>()
        .is_ok_and(|t| t.contains_key("dit"))
}
