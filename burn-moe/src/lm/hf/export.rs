//! Hugging Face checkpoints out: a whole one-rank [`MoeLm`] written as the hub's files
//! (`config.json`, `model.safetensors`) of the architecture that holds it — the inverse of
//! [`MoeLm::from_hf`], so an imported checkpoint exported again gives the same tensors.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};

use super::{Arch, HubTensor, bad, transpose};
use crate::error::Result;
use crate::experts::Activation;
use crate::lm::config::{MoeLmConfig, QkNorm};
use crate::lm::model::MoeLm;
use crate::router::{RoutingType, ScoreFunction};

/// The element type of exported weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubDtype {
    /// bfloat16 (round to nearest even), as the hub's checkpoints are usually stored.
    Bf16,
    /// float32.
    F32,
}

/// The architecture that holds a model of `cfg`, or why none does.
fn arch_for(cfg: &MoeLmConfig) -> Result<Arch> {
    let moe = cfg
        .moe
        .as_ref()
        .ok_or_else(|| bad("model", "a dense model has no MoE architecture on the hub"))?;
    let r = &moe.router;
    let plain_router = r.score_function == ScoreFunction::Softmax
        && r.routing == RoutingType::TopK
        && r.num_groups.is_none()
        && r.scaling_factor.is_none()
        && !r.expert_bias;
    // Training-only router settings (capacity and token dropping, the auxiliary losses, input
    // jitter) do not change which experts a token meets at inference: the hub's models are
    // dropless.
    if !plain_router {
        return Err(bad(
            "model",
            "the hub's MoE architectures route by softmax top-k only (no sigmoid scores, \
             Sinkhorn, groups, scaling factor or expert bias)",
        ));
    }
    if moe.experts.activation != Activation::SwiGlu {
        return Err(bad(
            "model",
            "the hub's MoE architectures use SwiGLU experts",
        ));
    }
    let dense = (0..cfg.layers).any(|l| !cfg.is_moe(l));
    let arch = match (cfg.qk_norm, cfg.qkv_bias, &moe.shared) {
        (QkNorm::PerHead, false, None) => Arch::Qwen3Moe,
        (QkNorm::Whole, false, None) if !dense => Arch::Olmoe,
        (QkNorm::Off, _, Some(s)) if s.gate && s.activation == Activation::SwiGlu => Arch::Qwen2Moe,
        (QkNorm::Off, false, None) if !dense && !r.pre_softmax => Arch::Mixtral,
        _ => {
            return Err(bad(
                "model",
                "no hub architecture holds this combination (Mixtral: every layer MoE, \
                 renormalised top-k, no QK norm, bias or shared expert; Qwen3-MoE: per-head QK \
                 norms; OLMoE: whole-projection QK norms, every layer MoE; Qwen2-MoE: a gated \
                 SwiGLU shared expert, no QK norm)",
            ));
        }
    };
    Ok(arch)
}

/// Which layers are dense, as `decoder_sparse_step` and `mlp_only_layers` say it.
fn sparse_layout(cfg: &MoeLmConfig) -> Result<(usize, Vec<usize>)> {
    let step = cfg.moe_every.max(1);
    let only: Vec<usize> = (0..cfg.layers)
        .filter(|&l| (l + 1).is_multiple_of(step) && !cfg.is_moe(l))
        .collect();
    Ok((step, only))
}

/// `config.json` of a model of `cfg` as architecture `arch`.
fn hub_config(cfg: &MoeLmConfig, arch: Arch) -> Result<Value> {
    let moe = cfg
        .moe
        .as_ref()
        .ok_or_else(|| bad("model", "an MoE model"))?;
    let r = &moe.router;
    let mut c = json!({
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv(),
        "head_dim": cfg.head_dim(),
        "num_experts_per_tok": r.topk,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings,
        "router_aux_loss_coef": r.aux_loss_coeff,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "dtype": "bfloat16",
    });
    let (name, model_type) = match arch {
        Arch::Mixtral => ("MixtralForCausalLM", "mixtral"),
        Arch::Qwen3Moe => ("Qwen3MoeForCausalLM", "qwen3_moe"),
        Arch::Olmoe => ("OlmoeForCausalLM", "olmoe"),
        Arch::Qwen2Moe => ("Qwen2MoeForCausalLM", "qwen2_moe"),
    };
    c["architectures"] = json!([name]);
    c["model_type"] = json!(model_type);
    let e = r.num_experts;
    match arch {
        Arch::Mixtral => {
            c["num_local_experts"] = json!(e);
            c["intermediate_size"] = json!(moe.experts.ffn_hidden);
        }
        Arch::Olmoe => {
            c["num_experts"] = json!(e);
            c["intermediate_size"] = json!(moe.experts.ffn_hidden);
            c["norm_topk_prob"] = json!(!r.pre_softmax);
            c["attention_bias"] = json!(false);
        }
        Arch::Qwen3Moe | Arch::Qwen2Moe => {
            let (step, only) = sparse_layout(cfg)?;
            c["num_experts"] = json!(e);
            c["intermediate_size"] = json!(cfg.ffn_hidden);
            c["moe_intermediate_size"] = json!(moe.experts.ffn_hidden);
            c["norm_topk_prob"] = json!(!r.pre_softmax);
            c["decoder_sparse_step"] = json!(step);
            c["mlp_only_layers"] = json!(only);
            if arch == Arch::Qwen2Moe {
                let fs = moe.shared.as_ref().map_or(0, |s| s.ffn_hidden);
                c["shared_expert_intermediate_size"] = json!(fs);
                c["qkv_bias"] = json!(cfg.qkv_bias);
            } else {
                c["attention_bias"] = json!(false);
            }
        }
    }
    Ok(c)
}

/// The columns `[start, start + len)` of a row-major `[rows, cols]` matrix.
fn columns(v: &[f32], cols: usize, start: usize, len: usize) -> Vec<f32> {
    v.chunks(cols)
        .flat_map(|row| row[start..start + len].iter().copied())
        .collect()
}

/// The hub's gate and up `[f, h]` from the model's `[h, 2f]`.
fn split_gate_up(w: &[f32], h: usize, f: usize) -> (Vec<f32>, Vec<f32>) {
    (
        transpose(&columns(w, 2 * f, 0, f), h, f),
        transpose(&columns(w, 2 * f, f, f), h, f),
    )
}

/// The inverse of the import's interleaving: rows `2i` and `2i + 1` of each head back to `i`
/// and `i + d/2`.
fn deinterleave_heads(v: &[f32], heads: usize, d: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for head in 0..heads {
        for i in 0..d / 2 {
            for (j, half) in [0, d / 2].into_iter().enumerate() {
                let from = head * d + 2 * i + j;
                let to = head * d + i + half;
                out[to * cols..(to + 1) * cols].copy_from_slice(&v[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// The hub's tensors (names, shapes, f32 values) of a whole one-rank model.
fn hub_tensors(model: &MoeLm, arch: Arch) -> Result<BTreeMap<String, HubTensor>> {
    let cfg = model.config();
    let full = model.full_tensors(None)?;
    let get = |name: &str| -> Result<Vec<f32>> {
        full.get(name)
            .ok_or_else(|| bad("model", format!("no tensor `{name}`")))?
            .try_to_vec::<f32>()
            .map_err(|e| bad("model", format!("`{name}`: {e:?}")))
    };
    let (v, h, heads, kv, d) = (cfg.vocab, cfg.hidden, cfg.heads, cfg.kv(), cfg.head_dim());
    let mut out = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, values: Vec<f32>| {
        out.insert(name, HubTensor { shape, values });
    };
    put(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        get("embed")?,
    );
    put("model.norm.weight".into(), vec![h], get("norm_f")?);
    if !cfg.tie_embeddings {
        put(
            "lm_head.weight".into(),
            vec![v, h],
            transpose(&get("head")?, h, v),
        );
    }
    let (block, [gate, up, down]) = arch.moe_names();
    for l in 0..cfg.layers {
        let (p, m) = (format!("model.layers.{l}"), format!("layers.{l}"));
        let a = format!("{p}.self_attn");
        put(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            get(&format!("{m}.norm1"))?,
        );
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            get(&format!("{m}.norm2"))?,
        );
        let cols = (heads + 2 * kv) * d;
        let rows = transpose(&get(&format!("{m}.attn.qkv"))?, h, cols);
        let (q, rest) = rows.split_at(heads * d * h);
        let (k, vv) = rest.split_at(kv * d * h);
        put(
            format!("{a}.q_proj.weight"),
            vec![heads * d, h],
            deinterleave_heads(q, heads, d, h),
        );
        put(
            format!("{a}.k_proj.weight"),
            vec![kv * d, h],
            deinterleave_heads(k, kv, d, h),
        );
        put(format!("{a}.v_proj.weight"), vec![kv * d, h], vv.to_vec());
        let o = get(&format!("{m}.attn.out"))?;
        put(
            format!("{a}.o_proj.weight"),
            vec![h, heads * d],
            transpose(&o, heads * d, h),
        );
        if cfg.qkv_bias {
            let b = get(&format!("{m}.attn.qkv_bias"))?;
            let (qb, rest) = b.split_at(heads * d);
            let (kb, vb) = rest.split_at(kv * d);
            put(
                format!("{a}.q_proj.bias"),
                vec![heads * d],
                deinterleave_heads(qb, heads, d, 1),
            );
            put(
                format!("{a}.k_proj.bias"),
                vec![kv * d],
                deinterleave_heads(kb, kv, d, 1),
            );
            put(format!("{a}.v_proj.bias"), vec![kv * d], vb.to_vec());
        }
        if let Some((nq, nk)) = cfg.qk_norm.heads(heads, kv) {
            for (name, n) in [("q_norm", nq), ("k_norm", nk)] {
                let w = get(&format!("{m}.attn.{name}"))?;
                put(
                    format!("{a}.{name}.weight"),
                    vec![n * d],
                    deinterleave_heads(&w, n, d, 1),
                );
            }
        }
        let b = format!("{p}.{block}");
        match &cfg.moe {
            Some(moe) if cfg.is_moe(l) => {
                let (e, f) = (moe.router.num_experts, moe.experts.ffn_hidden);
                put(
                    format!("{b}.gate.weight"),
                    vec![e, h],
                    get(&format!("{m}.moe.router"))?,
                );
                let (w1, w2) = (get(&format!("{m}.moe.w1"))?, get(&format!("{m}.moe.w2"))?);
                for x in 0..e {
                    let ex = format!("{b}.experts.{x}");
                    let (g, u) = split_gate_up(&w1[x * h * 2 * f..(x + 1) * h * 2 * f], h, f);
                    put(format!("{ex}.{gate}.weight"), vec![f, h], g);
                    put(format!("{ex}.{up}.weight"), vec![f, h], u);
                    let dn = transpose(&w2[x * f * h..(x + 1) * f * h], f, h);
                    put(format!("{ex}.{down}.weight"), vec![h, f], dn);
                }
                if let Some(s) = &moe.shared {
                    let (fs, sh) = (s.ffn_hidden, format!("{b}.shared_expert"));
                    let (g, u) = split_gate_up(&get(&format!("{m}.moe.shared.w1"))?, h, fs);
                    put(format!("{sh}.gate_proj.weight"), vec![fs, h], g);
                    put(format!("{sh}.up_proj.weight"), vec![fs, h], u);
                    let dn = transpose(&get(&format!("{m}.moe.shared.w2"))?, fs, h);
                    put(format!("{sh}.down_proj.weight"), vec![h, fs], dn);
                    if s.gate {
                        let gw = get(&format!("{m}.moe.shared.gate"))?;
                        put(format!("{b}.shared_expert_gate.weight"), vec![1, h], gw);
                    }
                }
            }
            _ => {
                let f = cfg.ffn_hidden;
                let (g, u) = split_gate_up(&get(&format!("{m}.ffn.fc1"))?, h, f);
                put(format!("{b}.gate_proj.weight"), vec![f, h], g);
                put(format!("{b}.up_proj.weight"), vec![f, h], u);
                let dn = transpose(&get(&format!("{m}.ffn.fc2"))?, f, h);
                put(format!("{b}.down_proj.weight"), vec![h, f], dn);
            }
        }
    }
    Ok(out)
}

impl MoeLm {
    /// Writes this whole one-rank model as a Hugging Face checkpoint folder `dir` (created;
    /// it must not exist): `config.json` of the architecture that holds the model (Mixtral,
    /// Qwen3-MoE, OLMoE or Qwen2-MoE; anything else is refused saying why) and
    /// `model.safetensors` in `dtype`. Written to a temporary folder first, then renamed.
    pub fn save_hf(&self, dir: &Path, dtype: HubDtype) -> Result<()> {
        if dir.exists() {
            return Err(bad("dir", format!("{} already exists", dir.display())));
        }
        let arch = arch_for(self.config())?;
        let config = hub_config(self.config(), arch)?;
        let tensors = hub_tensors(self, arch)?;
        let bytes: BTreeMap<&String, (Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(name, HubTensor { shape, values })| {
                let raw: Vec<u8> = match dtype {
                    HubDtype::Bf16 => values
                        .iter()
                        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                        .collect(),
                    HubDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                };
                (name, (shape.clone(), raw))
            })
            .collect();
        let dt = match dtype {
            HubDtype::Bf16 => Dtype::BF16,
            HubDtype::F32 => Dtype::F32,
        };
        let views = bytes
            .iter()
            .map(|(name, (shape, raw))| {
                TensorView::new(dt, shape.clone(), raw)
                    .map(|v| ((*name).clone(), v))
                    .map_err(|e| bad("model", format!("`{name}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let tmp = dir.with_extension("tmp");
        let io = |e: std::io::Error| bad("dir", format!("{}: {e}", tmp.display()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io)?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(views, Some(meta), &tmp.join("model.safetensors"))
            .map_err(|e| bad("dir", format!("{}: {e}", tmp.display())))?;
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| bad("model", format!("config.json: {e}")))?;
        std::fs::write(tmp.join("config.json"), text).map_err(io)?;
        std::fs::rename(&tmp, dir).map_err(|e| bad("dir", format!("{}: {e}", dir.display())))
    }
}
