//! Hugging Face checkpoints in: a folder as `transformers` writes it (`config.json` and
//! `model.safetensors`, or shards listed by `model.safetensors.index.json`) read into an
//! [`MoeLm`]: the configuration from `config.json`, every tensor renamed and laid out as the
//! model's full tensors ([`MoeLm::full_tensors`]).
//!
//! Architectures: `MixtralForCausalLM`, `Qwen3MoeForCausalLM` (per-head query/key norms, an
//! explicit `head_dim`, `norm_topk_prob`, `decoder_sparse_step`, `mlp_only_layers`),
//! `OlmoeForCausalLM` (norms over the whole query and key projections) and
//! `Qwen2MoeForCausalLM` (query/key/value biases, a shared expert behind a sigmoid gate).
//! Others are refused, naming the ones read.
//!
//! Layouts: the hub stores linear weights `[out, in]`, the model `[in, out]`; the hub's rotary
//! embedding rotates the two halves of a head (`rotate_half`), the model rotates adjacent pairs
//! `(2i, 2i+1)`, so the query and key rows of each head are interleaved on the way in (row `i`
//! and row `i + d/2` become rows `2i` and `2i + 1`), which leaves every attention score
//! unchanged.

mod export;

pub use export::HubDtype;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, TensorData};
use burn_parallel::prelude::ProcessGroups;
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use serde_json::Value;

use super::config::{MoeLmConfig, QkNorm};
use super::model::{FullTensors, MoeLm};
use super::split::StageLayout;
use crate::error::{MoeError, Result};
use crate::experts::SharedExpertsConfig;
use crate::layer::MoeLayerConfig;

fn bad(name: &'static str, reason: impl Into<String>) -> MoeError {
    MoeError::InvalidArgument {
        name,
        reason: reason.into(),
    }
}

/// A tensor read from a checkpoint: its shape and values as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HubTensor {
    /// Shape, as stored.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub values: Vec<f32>,
}

/// Every tensor of the checkpoint folder `dir`: `model.safetensors`, or the files that
/// `model.safetensors.index.json` lists; bf16, f16 and f32 are read as f32.
pub fn read_tensors(dir: &Path) -> Result<HashMap<String, HubTensor>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| bad("dir", format!("{}: {e}", index.display())))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| bad("dir", format!("{}: {e}", index.display())))?;
        let map = json["weight_map"].as_object().ok_or_else(|| {
            bad(
                "dir",
                format!("{}: no `weight_map` object", index.display()),
            )
        })?;
        let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut out = HashMap::new();
    for file in files {
        let bytes =
            std::fs::read(&file).map_err(|e| bad("dir", format!("{}: {e}", file.display())))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad("dir", format!("{}: {e}", file.display())))?;
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                other => {
                    return Err(bad(
                        "dir",
                        format!(
                            "{}: `{name}` is {other:?}; bf16, f16 or f32 are read",
                            file.display()
                        ),
                    ));
                }
            };
            out.insert(
                name,
                HubTensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            );
        }
    }
    Ok(out)
}

/// `config.json` of `dir`.
pub fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| bad("dir", format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| bad("dir", format!("{}: {e}", path.display())))
}

fn usize_of(c: &Value, key: &str) -> Result<usize> {
    c[key]
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| bad("config", format!("config.json has no integer `{key}`")))
}

fn f64_of(c: &Value, key: &str) -> Option<f64> {
    c[key].as_f64()
}

/// The hub architectures read, with where their tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    /// `MixtralForCausalLM`: `block_sparse_moe`, experts `w1` (gate), `w3` (up), `w2` (down).
    Mixtral,
    /// `Qwen3MoeForCausalLM`: `mlp`, experts `gate_proj`, `up_proj`, `down_proj`, per-head
    /// query/key norms.
    Qwen3Moe,
    /// `OlmoeForCausalLM`: as Qwen3-MoE, with norms over the whole query and key projections.
    Olmoe,
    /// `Qwen2MoeForCausalLM`: as Qwen3-MoE without query/key norms, with query/key/value
    /// biases and a shared expert behind a sigmoid gate.
    Qwen2Moe,
}

impl Arch {
    fn of(c: &Value) -> Result<Self> {
        match c["architectures"][0].as_str().unwrap_or_default() {
            "MixtralForCausalLM" => Ok(Self::Mixtral),
            "Qwen3MoeForCausalLM" => Ok(Self::Qwen3Moe),
            "OlmoeForCausalLM" => Ok(Self::Olmoe),
            "Qwen2MoeForCausalLM" => Ok(Self::Qwen2Moe),
            other => Err(bad(
                "config",
                format!(
                    "architecture `{other}` is not read (MixtralForCausalLM, \
                     Qwen3MoeForCausalLM, OlmoeForCausalLM and Qwen2MoeForCausalLM are)"
                ),
            )),
        }
    }

    /// The MoE block's name in a layer, and its experts' gate, up and down projections.
    fn moe_names(self) -> (&'static str, [&'static str; 3]) {
        match self {
            Self::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
            _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        }
    }

    /// The number of routed experts: Mixtral's `num_local_experts`, the others'
    /// `num_experts` (Qwen3-MoE's under either name).
    fn experts(self, c: &Value) -> Result<usize> {
        match self {
            Self::Mixtral => usize_of(c, "num_local_experts"),
            Self::Qwen3Moe => {
                usize_of(c, "num_experts").or_else(|_| usize_of(c, "num_local_experts"))
            }
            Self::Olmoe | Self::Qwen2Moe => usize_of(c, "num_experts"),
        }
    }
}

/// Refuses the `config.json` options the model does not implement, naming the key: another
/// activation, sliding-window attention, a RoPE other than the default, biases on the
/// attention output, clipped query/key/value projections.
fn check_supported(c: &Value) -> Result<()> {
    let refuse = |key: &str, value: &Value, why: &str| {
        Err(bad(
            "config",
            format!("config.json `{key}` = {value}: {why}"),
        ))
    };
    match &c["hidden_act"] {
        Value::Null => {}
        Value::String(a) if a == "silu" => {}
        other => {
            return refuse(
                "hidden_act",
                other,
                "only silu (SwiGLU experts) is implemented",
            );
        }
    }
    if c["use_sliding_window"].as_bool() == Some(true) {
        return refuse(
            "use_sliding_window",
            &c["use_sliding_window"],
            "sliding-window attention is not implemented",
        );
    }
    // Mixtral attends within `sliding_window` whenever it is set (a window no shorter than the
    // longest position changes nothing).
    let window = c["sliding_window"].as_u64();
    let longest = c["max_position_embeddings"].as_u64();
    let binds = match (window, longest) {
        (Some(w), Some(p)) => w < p,
        _ => true,
    };
    if c["use_sliding_window"].is_null() && !c["sliding_window"].is_null() && binds {
        return refuse(
            "sliding_window",
            &c["sliding_window"],
            "sliding-window attention is not implemented",
        );
    }
    for key in ["rope_parameters", "rope_scaling"] {
        let kind = &c[key]["rope_type"];
        let kind = if kind.is_null() {
            &c[key]["type"]
        } else {
            kind
        };
        match kind {
            Value::Null => {}
            Value::String(k) if k == "default" => {}
            other => {
                return refuse(
                    &format!("{key}.rope_type"),
                    other,
                    "only the default RoPE is implemented",
                );
            }
        }
    }
    if c["attention_bias"].as_bool() == Some(true) {
        return refuse(
            "attention_bias",
            &c["attention_bias"],
            "biases on every attention projection are not implemented (qkv_bias is)",
        );
    }
    if !c["clip_qkv"].is_null() {
        return refuse("clip_qkv", &c["clip_qkv"], "clipping is not implemented");
    }
    Ok(())
}

/// The model configuration of a hub `config.json`.
pub fn config_from_hub(c: &Value) -> Result<MoeLmConfig> {
    let arch = Arch::of(c)?;
    check_supported(c)?;
    let (h, heads) = (
        usize_of(c, "hidden_size")?,
        usize_of(c, "num_attention_heads")?,
    );
    let rope_theta = f64_of(&c["rope_parameters"], "rope_theta")
        .or_else(|| f64_of(c, "rope_theta"))
        .unwrap_or(10_000.0);
    let (e, k) = (arch.experts(c)?, usize_of(c, "num_experts_per_tok")?);
    let dense_ffn = usize_of(c, "intermediate_size")?;
    let renormalise = c["norm_topk_prob"].as_bool().unwrap_or(false);
    let (expert_ffn, renormalise, moe_every, dense_layers) = match arch {
        Arch::Mixtral => (dense_ffn, true, 1, Vec::new()),
        Arch::Olmoe => (dense_ffn, renormalise, 1, Vec::new()),
        Arch::Qwen3Moe | Arch::Qwen2Moe => (
            usize_of(c, "moe_intermediate_size")?,
            renormalise,
            usize_of(c, "decoder_sparse_step").unwrap_or(1),
            c["mlp_only_layers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|l| l as usize)
                        .collect()
                })
                .unwrap_or_default(),
        ),
    };
    let mut moe = MoeLayerConfig::swiglu(h, expert_ffn, e, k);
    if arch == Arch::Qwen2Moe {
        let shared = usize_of(c, "shared_expert_intermediate_size")?;
        moe = moe.with_shared(Some(SharedExpertsConfig::new(h, shared).with_gate(true)));
    }
    // Softmax over the k selected logits = softmax over all, renormalised over the k.
    moe.router = moe
        .router
        .with_pre_softmax(!renormalise)
        .with_aux_loss_coeff(f64_of(c, "router_aux_loss_coef").unwrap_or(0.0));
    let config = MoeLmConfig::new(
        usize_of(c, "vocab_size")?,
        h,
        usize_of(c, "num_hidden_layers")?,
        heads,
        dense_ffn,
    )
    .with_kv_heads(Some(usize_of(c, "num_key_value_heads")?))
    .with_head_dim(c["head_dim"].as_u64().map(|d| d as usize))
    .with_qk_norm(match arch {
        Arch::Qwen3Moe => QkNorm::PerHead,
        Arch::Olmoe => QkNorm::Whole,
        _ => QkNorm::Off,
    })
    .with_qkv_bias(arch == Arch::Qwen2Moe && c["qkv_bias"].as_bool().unwrap_or(true))
    .with_moe_every(moe_every)
    .with_dense_layers(dense_layers)
    .with_moe(Some(moe))
    .with_rope_theta(rope_theta)
    .with_norm_eps(f64_of(c, "rms_norm_eps").unwrap_or(1e-6))
    .with_tie_embeddings(c["tie_word_embeddings"].as_bool().unwrap_or(false));
    config.validate()?;
    Ok(config)
}

/// Takes tensor `name` of `shape` out of `tensors`.
fn take(tensors: &mut HashMap<String, HubTensor>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = tensors
        .remove(name)
        .ok_or_else(|| bad("dir", format!("the checkpoint has no tensor `{name}`")))?;
    if t.shape != shape {
        return Err(bad(
            "dir",
            format!(
                "`{name}` has shape {:?}, the configuration needs {shape:?}",
                t.shape
            ),
        ));
    }
    Ok(t.values)
}

/// `[rows, cols]` row-major → `[cols, rows]`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// The rows of a `[heads·d, in]` projection with each head's halves interleaved (row `i` and
/// `i + d/2` of a head become `2i` and `2i + 1`).
fn interleave_heads(v: &[f32], heads: usize, d: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    for head in 0..heads {
        for i in 0..d / 2 {
            for half in [0, d / 2] {
                let row = head * d + i + half;
                out.extend_from_slice(&v[row * cols..(row + 1) * cols]);
            }
        }
    }
    out
}

fn data(values: Vec<f32>, shape: &[usize]) -> TensorData {
    TensorData::new(values, shape.to_vec())
}

/// The full tensors ([`MoeLm::full_tensors`] names) of a hub checkpoint with `config`
/// (`config.json`) for the model configuration `cfg`; every tensor of the checkpoint must be
/// used.
pub fn full_tensors_from_hub(
    config: &Value,
    cfg: &MoeLmConfig,
    mut t: HashMap<String, HubTensor>,
) -> Result<FullTensors> {
    let arch = Arch::of(config)?;
    let (v, h) = (cfg.vocab, cfg.hidden);
    let mut out = FullTensors::new();
    out.insert(
        "embed".into(),
        data(take(&mut t, "model.embed_tokens.weight", &[v, h])?, &[v, h]),
    );
    for l in 0..cfg.layers {
        layer_tensors(arch, cfg, l, &mut t, &mut out)?;
    }
    out.insert(
        "norm_f".into(),
        data(take(&mut t, "model.norm.weight", &[h])?, &[h]),
    );
    if !cfg.tie_embeddings {
        let head = take(&mut t, "lm_head.weight", &[v, h])?;
        out.insert("head".into(), data(transpose(&head, v, h), &[h, v]));
    }
    if let Some(name) = t.keys().min() {
        return Err(bad(
            "dir",
            format!(
                "{} tensor(s) of the checkpoint have no place in the model (first: `{name}`)",
                t.len()
            ),
        ));
    }
    Ok(out)
}

/// `[h, 2f]` (gate columns, then up columns) from the hub's gate and up `[f, h]`.
fn gate_up(gate: &[f32], up: &[f32], f: usize, h: usize) -> Vec<f32> {
    let (gate, up) = (transpose(gate, f, h), transpose(up, f, h));
    let mut w = Vec::with_capacity(2 * f * h);
    for r in 0..h {
        w.extend_from_slice(&gate[r * f..(r + 1) * f]);
        w.extend_from_slice(&up[r * f..(r + 1) * f]);
    }
    w
}

/// Layer `l`'s norms, attention and FFN (dense or MoE) into `out`.
fn layer_tensors(
    arch: Arch,
    cfg: &MoeLmConfig,
    l: usize,
    t: &mut HashMap<String, HubTensor>,
    out: &mut FullTensors,
) -> Result<()> {
    let (h, heads, kv, d) = (cfg.hidden, cfg.heads, cfg.kv(), cfg.head_dim());
    let p = format!("model.layers.{l}");
    let mut put = |name: &str, values: Vec<f32>, shape: &[usize]| {
        out.insert(format!("layers.{l}.{name}"), data(values, shape));
    };
    put(
        "norm1",
        take(t, &format!("{p}.input_layernorm.weight"), &[h])?,
        &[h],
    );
    put(
        "norm2",
        take(t, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
        &[h],
    );
    let a = format!("{p}.self_attn");
    let q = take(t, &format!("{a}.q_proj.weight"), &[heads * d, h])?;
    let k = take(t, &format!("{a}.k_proj.weight"), &[kv * d, h])?;
    let vv = take(t, &format!("{a}.v_proj.weight"), &[kv * d, h])?;
    // Rows [q; k; v] of the fused `[out, in]` projection, then `[in, out]`.
    let mut rows = interleave_heads(&q, heads, d, h);
    rows.extend(interleave_heads(&k, kv, d, h));
    rows.extend(vv);
    let cols = (heads + 2 * kv) * d;
    put("attn.qkv", transpose(&rows, cols, h), &[h, cols]);
    let o = take(t, &format!("{a}.o_proj.weight"), &[h, heads * d])?;
    put("attn.out", transpose(&o, h, heads * d), &[heads * d, h]);
    if cfg.qkv_bias {
        // The same interleaving as the rows they are added to.
        let mut b = interleave_heads(
            &take(t, &format!("{a}.q_proj.bias"), &[heads * d])?,
            heads,
            d,
            1,
        );
        b.extend(interleave_heads(
            &take(t, &format!("{a}.k_proj.bias"), &[kv * d])?,
            kv,
            d,
            1,
        ));
        b.extend(take(t, &format!("{a}.v_proj.bias"), &[kv * d])?);
        put("attn.qkv_bias", b, &[cols]);
    }
    if let Some((nq, nk)) = cfg.qk_norm.heads(heads, kv) {
        // The same interleaving as the rows they scale.
        for (name, n) in [("q_norm", nq), ("k_norm", nk)] {
            let w = take(t, &format!("{a}.{name}.weight"), &[n * d])?;
            put(
                &format!("attn.{name}"),
                interleave_heads(&w, n, d, 1),
                &[n * d],
            );
        }
    }
    let (block, [gate, up, down]) = arch.moe_names();
    let m = format!("{p}.{block}");
    match &cfg.moe {
        Some(moe) if cfg.is_moe(l) => {
            let (e, f) = (moe.router.num_experts, moe.experts.ffn_hidden);
            put(
                "moe.router",
                take(t, &format!("{m}.gate.weight"), &[e, h])?,
                &[e, h],
            );
            let (mut w1, mut w2) = (
                Vec::with_capacity(e * h * 2 * f),
                Vec::with_capacity(e * f * h),
            );
            for x in 0..e {
                let ex = format!("{m}.experts.{x}");
                let g = take(t, &format!("{ex}.{gate}.weight"), &[f, h])?;
                let u = take(t, &format!("{ex}.{up}.weight"), &[f, h])?;
                w1.extend(gate_up(&g, &u, f, h));
                w2.extend(transpose(
                    &take(t, &format!("{ex}.{down}.weight"), &[h, f])?,
                    h,
                    f,
                ));
            }
            put("moe.w1", w1, &[e, h, 2 * f]);
            put("moe.w2", w2, &[e, f, h]);
            if let Some(s) = &moe.shared {
                let (fs, sh) = (s.ffn_hidden, format!("{m}.shared_expert"));
                let g = take(t, &format!("{sh}.gate_proj.weight"), &[fs, h])?;
                let u = take(t, &format!("{sh}.up_proj.weight"), &[fs, h])?;
                put("moe.shared.w1", gate_up(&g, &u, fs, h), &[h, 2 * fs]);
                let dn = take(t, &format!("{sh}.down_proj.weight"), &[h, fs])?;
                put("moe.shared.w2", transpose(&dn, h, fs), &[fs, h]);
                if s.gate {
                    let gw = take(t, &format!("{m}.shared_expert_gate.weight"), &[1, h])?;
                    put("moe.shared.gate", gw, &[1, h]);
                }
            }
        }
        _ => {
            let f = cfg.ffn_hidden;
            let g = take(t, &format!("{m}.gate_proj.weight"), &[f, h])?;
            let u = take(t, &format!("{m}.up_proj.weight"), &[f, h])?;
            put("ffn.fc1", gate_up(&g, &u, f, h), &[h, 2 * f]);
            let dn = take(t, &format!("{m}.down_proj.weight"), &[h, f])?;
            put("ffn.fc2", transpose(&dn, h, f), &[f, h]);
        }
    }
    Ok(())
}

impl MoeLm {
    /// The model of the Hugging Face checkpoint folder `dir` on `device`, whole on one rank.
    pub fn from_hf(dir: &Path, device: &Device) -> Result<Self> {
        let json = read_config(dir)?;
        let config = config_from_hub(&json)?;
        let tensors = full_tensors_from_hub(&json, &config, read_tensors(dir)?)?;
        let layout = StageLayout::single(config.layers);
        Self::from_tensors(
            &config,
            &tensors,
            &ProcessGroups::single()?,
            &layout,
            device,
        )
    }
}

/// What `transformers` computed for a checkpoint (`reference.json`): its logits on
/// `input_ids`, their mean next-token loss, and a greedy continuation of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct HubReference {
    /// Rows of token ids (`[batch][seq]`).
    pub input_ids: Vec<Vec<i64>>,
    /// Logits `[batch, seq, vocab]`, row-major.
    pub logits: Vec<f64>,
    /// Mean next-token cross-entropy over every row (positions `0..seq−1` predict `1..seq`).
    pub loss: f64,
    /// The prompt of the greedy continuation.
    pub greedy_prompt: Vec<i64>,
    /// The tokens greedy decoding appends to it.
    pub greedy_continuation: Vec<i64>,
    /// A logit passes when `|got − want| ≤ atol + rtol·|want|`.
    pub rtol: f64,
    /// See `rtol`.
    pub atol: f64,
}

fn ints(v: &Value, what: &str) -> Result<Vec<i64>> {
    v.as_array()
        .and_then(|a| a.iter().map(Value::as_i64).collect())
        .ok_or_else(|| {
            bad(
                "reference",
                format!("reference.json: `{what}` is not a list of integers"),
            )
        })
}

/// `reference.json` of `dir`, if the folder has one.
pub fn read_reference(dir: &Path) -> Result<Option<HubReference>> {
    let path = dir.join("reference.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| bad("reference", format!("{}: {e}", path.display())))?;
    let r: Value = serde_json::from_str(&text)
        .map_err(|e| bad("reference", format!("{}: {e}", path.display())))?;
    let shape = ints(&r["input_ids"]["shape"], "input_ids.shape")?;
    let ids = ints(&r["input_ids"]["data"], "input_ids.data")?;
    let [b, s] = shape[..] else {
        return Err(bad(
            "reference",
            "reference.json: `input_ids.shape` is not [batch, seq]",
        ));
    };
    let (b, s) = (b as usize, s as usize);
    if ids.len() != b * s || s < 2 {
        return Err(bad(
            "reference",
            "reference.json: `input_ids` does not hold batch × seq ≥ 2 ids",
        ));
    }
    let logits: Vec<f64> = r["logits"]["data"]
        .as_array()
        .and_then(|a| a.iter().map(Value::as_f64).collect())
        .ok_or_else(|| {
            bad(
                "reference",
                "reference.json: `logits.data` is not a list of numbers",
            )
        })?;
    let number = |v: &Value, what: &str| {
        v.as_f64()
            .ok_or_else(|| bad("reference", format!("reference.json: no number `{what}`")))
    };
    Ok(Some(HubReference {
        input_ids: ids.chunks(s).map(<[i64]>::to_vec).collect(),
        logits,
        loss: number(&r["loss"], "loss")?,
        greedy_prompt: ints(&r["greedy_prompt"], "greedy_prompt")?,
        greedy_continuation: ints(&r["greedy_continuation"], "greedy_continuation")?,
        rtol: number(&r["tolerance"]["rtol"], "tolerance.rtol")?,
        atol: number(&r["tolerance"]["atol"], "tolerance.atol")?,
    }))
}

/// The logits `[batch, seq, vocab]` (row-major) of `rows` of equal length, and their mean
/// next-token cross-entropy.
pub fn logits_and_loss(model: &MoeLm, rows: &[Vec<i64>]) -> Result<(Vec<f32>, f64)> {
    let (b, s, v) = (
        rows.len(),
        rows.first().map_or(0, Vec::len),
        model.config().vocab,
    );
    if b == 0 || s < 2 || rows.iter().any(|r| r.len() != s) {
        return Err(bad("ids", "rows of at least 2 ids, all of one length"));
    }
    if let Some(&id) = rows
        .iter()
        .flatten()
        .find(|&&id| id < 0 || id as usize >= v)
    {
        return Err(bad(
            "ids",
            format!("id {id} is outside the vocabulary of {v}"),
        ));
    }
    let device = model.device()?;
    // Sequence-first `[S, B]`.
    let ids: Vec<i64> = (0..s)
        .flat_map(|t| rows.iter().map(move |r| r[t]))
        .collect();
    let input = crate::host::upload_i64(&ids, &device, "uploading token ids").reshape([s, b]);
    let logits = model
        .forward(input)?
        .permute([1, 0, 2])
        .reshape([b * s * v]);
    let got: Vec<f32> = crate::host::read_f32(logits, "reading logits")?;
    let mut loss = 0.0;
    for (r, row) in rows.iter().enumerate() {
        for t in 0..s - 1 {
            let l = &got[(r * s + t) * v..(r * s + t + 1) * v];
            let max = l.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
            let lse = f64::from(max)
                + l.iter()
                    .map(|&x| f64::from(x - max).exp())
                    .sum::<f64>()
                    .ln();
            loss += lse - f64::from(l[row[t + 1] as usize]);
        }
    }
    Ok((got, loss / (b * (s - 1)) as f64))
}

/// `n` tokens appended to `prompt` by greedy decoding (the whole sequence run again for each).
pub fn greedy(model: &MoeLm, prompt: &[i64], n: usize) -> Result<Vec<i64>> {
    let v = model.config().vocab;
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let last = seq.len();
        let mut row = seq.clone();
        // One more id so the rows hold at least two; its logits are not used.
        row.push(0);
        let (logits, _) = logits_and_loss(model, &[row])?;
        let l = &logits[(last - 1) * v..last * v];
        let best = (0..v).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap_or(0);
        seq.push(best as i64);
    }
    Ok(seq[prompt.len()..].to_vec())
}

/// How a model compares with `transformers` on a [`HubReference`].
#[derive(Debug, Clone, PartialEq)]
pub struct HubCheck {
    /// Every logit within the tolerance, the loss within it, the greedy continuation equal.
    pub pass: bool,
    /// The largest `|got − want|` over the logits.
    pub max_abs_err: f64,
    /// Logits beyond the tolerance.
    pub logits_failed: usize,
    /// The model's mean next-token loss on the reference ids.
    pub loss: f64,
    /// The model's greedy continuation of the reference prompt.
    pub greedy: Vec<i64>,
    /// Whether it equals the reference's.
    pub greedy_match: bool,
}

/// Compares `model` with `reference`: logits (the reference's tolerance), loss (the same
/// tolerance) and greedy continuation (equal).
pub fn check_reference(model: &MoeLm, reference: &HubReference) -> Result<HubCheck> {
    let (got, loss) = logits_and_loss(model, &reference.input_ids)?;
    if got.len() != reference.logits.len() {
        return Err(bad(
            "reference",
            format!(
                "reference.json holds {} logits, the model gives {}",
                reference.logits.len(),
                got.len()
            ),
        ));
    }
    let within =
        |got: f64, want: f64| (got - want).abs() <= reference.atol + reference.rtol * want.abs();
    let (mut max_abs_err, mut logits_failed) = (0f64, 0);
    for (&g, &w) in got.iter().zip(&reference.logits) {
        let g = f64::from(g);
        max_abs_err = max_abs_err.max((g - w).abs());
        logits_failed += usize::from(!within(g, w));
    }
    let greedy = greedy(
        model,
        &reference.greedy_prompt,
        reference.greedy_continuation.len(),
    )?;
    let greedy_match = greedy == reference.greedy_continuation;
    Ok(HubCheck {
        pass: logits_failed == 0 && within(loss, reference.loss) && greedy_match,
        max_abs_err,
        logits_failed,
        loss,
        greedy,
        greedy_match,
    })
}
