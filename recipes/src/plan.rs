//! `burn-recipes plan`: memory per GPU, step time and MFU of a model on a cluster under a
//! parallel layout, with a breakdown; `--search` ranks every valid layout.
//!
//! The model is analytical. Compute: FLOPs of each GEMM (attention projections with GQA, the
//! causal attention core, router, routed and shared experts, LM head; backward = 2 × forward)
//! at `gemm_efficiency × d / (d + 128)` of peak, `d` the GEMM's smallest dimension on one GPU.
//! Communication, bf16 activations: sequence-parallel all-gather / reduce-scatter over TP on
//! NVLink; the EP all-to-all (dispatch and combine, forward and backward) at
//! `alltoall_efficiency` of NVLink within a node and of InfiniBand for the share of peers on
//! other nodes (EP groups span `etp × ep` consecutive ranks); the ETP all-gather /
//! reduce-scatter of dispatched rows on NVLink; pipeline send/recv and the distributed
//! optimizer's reduce-scatter + all-gather over DP (dense) and expert-DP (experts) on
//! InfiniBand, of which `overlap` is hidden behind compute. A fixed `layer_overhead_s` per
//! layer and micro-batch (kernel launches, routing, permutation) and the pipeline bubble of
//! 1F1B (`(pp − 1) / v` extra micro-batch slots, `v` virtual stages) complete the step.
//! MFU = model FLOPs / (step time × GPUs × peak).
//!
//! The four efficiency numbers are data ([`Calibration`]); `calibrate` fits them to measured
//! MFUs (the defaults were fitted to the seed paper's Table 1 only).

use serde::Serialize;

pub use crate::cluster::{Calibration, ClusterConfig, Kernels};
use crate::error::{RecipeError, Result, bad};
use crate::model::parameter_count;
use crate::recipe::{ModelConfig, Precision, Recipe};
use burn_parallel::rng::mix;

/// A parallel layout to estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Tensor parallel (sequence parallel on).
    pub tp: usize,
    /// Context parallel.
    pub cp: usize,
    /// Pipeline parallel.
    pub pp: usize,
    /// Virtual pipeline stages per rank.
    pub vpp: usize,
    /// Expert parallel.
    pub ep: usize,
    /// Expert tensor parallel.
    pub etp: usize,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
}

/// Time per step, seconds, by part.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct TimeBreakdown {
    /// GEMMs and attention.
    pub compute_s: f64,
    /// TP all-gather / reduce-scatter.
    pub tp_comm_s: f64,
    /// EP all-to-all.
    pub ep_comm_s: f64,
    /// ETP all-gather / reduce-scatter of dispatched rows.
    pub etp_comm_s: f64,
    /// Pipeline send/recv (exposed part).
    pub pp_comm_s: f64,
    /// Distributed-optimizer reduce-scatter + all-gather (exposed part).
    pub dp_comm_s: f64,
    /// Fixed per-layer overhead.
    pub overhead_s: f64,
    /// Pipeline bubble.
    pub bubble_s: f64,
}

/// Bytes per GPU (the first pipeline stage, which holds the most activations), by part.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct MemoryBreakdown {
    /// BF16 weights.
    pub weights: u64,
    /// FP32 gradients.
    pub gradients: u64,
    /// FP32 master weights and two moments, sharded over DP (dense) and EDP (experts).
    pub optimizer: u64,
    /// Activations of the micro-batches in flight.
    pub activations: u64,
    /// Dispatcher buffers (dispatched rows and expert intermediates).
    pub dispatcher: u64,
}

/// One estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// The layout.
    pub layout: Layout,
    /// Model FLOPs utilisation.
    pub mfu: f64,
    /// Seconds per optimizer step.
    pub step_time_s: f64,
    /// Peak bytes per GPU.
    pub memory_per_gpu_bytes: u64,
    /// Whether that fits the GPU memory.
    pub fits: bool,
    /// Model FLOPs of one step.
    pub model_flops_per_step: f64,
    /// Micro-batches per step per pipeline.
    pub micro_batches: usize,
    /// Time by part.
    pub time: TimeBreakdown,
    /// Memory by part.
    pub memory: MemoryBreakdown,
}

/// The sizes of a model on a layout, as the planner's formulas use them.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    h: f64,
    heads: f64,
    layers: f64,
    e: f64,
    k: f64,
    v: f64,
    kv: f64,
    dh: f64,
    fe: f64,
    fs: f64,
    fd: f64,
    s: f64,
    tp: f64,
    cp: f64,
    pp: f64,
    ep: f64,
    etp: f64,
    vpp: f64,
    g: f64,
    mb: f64,
    moe_layers: f64,
    dense_layers: f64,
    t: f64,
    tg: f64,
    rows: f64,
    dense_params: f64,
    expert_params: f64,
    layers_stage: f64,
    dp: usize,
    edp: usize,
    micro_batches: usize,
}

/// Everything that does not change with the layout.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The model.
    pub model: ModelConfig,
    /// Sequence length.
    pub seq_len: usize,
    /// Sequences per step.
    pub global_batch: usize,
    /// Hardware.
    pub cluster: ClusterConfig,
    /// Efficiencies.
    pub calibration: Calibration,
    /// Full activation recomputation (only layer inputs are kept; forward runs twice).
    pub recompute: bool,
    /// Precision of the weights and activations (`training.precision`).
    pub precision: Precision,
}

impl Problem {
    /// The problem and layout of a recipe (its `[cluster]`, `[calibration]`, `[parallel]`).
    pub fn from_recipe(recipe: &Recipe) -> Result<(Self, Layout)> {
        let cluster = recipe.cluster.clone().unwrap_or_else(|| ClusterConfig {
            gpus: recipe.parallel.gpus.unwrap_or(8),
            ..ClusterConfig::default()
        });
        cluster.validate()?;
        let p = &recipe.parallel;
        Ok((
            Self {
                model: recipe.model.clone(),
                seq_len: recipe.data.seq_len,
                global_batch: recipe.training.global_batch,
                cluster,
                calibration: recipe.calibration.unwrap_or_default(),
                recompute: recipe.training.recompute,
                precision: recipe.training.precision,
            },
            Layout {
                tp: p.tp,
                cp: p.cp,
                pp: p.pp,
                vpp: p.virtual_pp.unwrap_or(1),
                ep: p.ep,
                etp: p.etp,
                micro_batch: recipe.training.micro_batch,
            },
        ))
    }

    /// Why `layout` cannot run this problem, if it cannot.
    pub fn check(&self, l: &Layout) -> Result<()> {
        let m = &self.model;
        let g = self.cluster.gpus;
        let kv = m.kv_heads.unwrap_or(m.heads);
        let attention = l.tp * l.cp * l.pp;
        if g == 0 || !g.is_multiple_of(attention) {
            return Err(bad(
                "parallel.tp",
                format!("tp × cp × pp = {attention} does not divide {g} GPUs"),
            ));
        }
        if !g.is_multiple_of(l.etp * l.ep * l.pp) {
            return Err(bad(
                "parallel.ep",
                format!(
                    "etp × ep × pp = {} does not divide {g} GPUs",
                    l.etp * l.ep * l.pp
                ),
            ));
        }
        if !m.heads.is_multiple_of(l.tp) || !kv.is_multiple_of(l.tp) {
            return Err(bad(
                "parallel.tp",
                "must divide the heads and key/value heads",
            ));
        }
        if !m.experts.is_multiple_of(l.ep) {
            return Err(bad("parallel.ep", "must divide the experts"));
        }
        if !m.layers.is_multiple_of(l.pp * l.vpp) {
            return Err(bad("parallel.pp", "pp × virtual_pp must divide the layers"));
        }
        let dp = g / attention;
        if !self.global_batch.is_multiple_of(dp * l.micro_batch) {
            return Err(bad(
                "training.global_batch",
                format!(
                    "must be a multiple of dp × micro_batch = {}",
                    dp * l.micro_batch
                ),
            ));
        }
        if !self.seq_len.is_multiple_of(l.cp * l.tp) {
            return Err(bad("data.seq_len", "must be divisible by cp × tp"));
        }
        Ok(())
    }

    /// The sizes of the model and of layout `l` the estimates use, as f64 (counts as usize).
    fn sizes(&self, l: &Layout) -> Sizes {
        let m = &self.model;
        let c = &self.cluster;
        let f = |v: usize| v as f64;
        let (h, heads, layers, e, k, v) = (
            f(m.hidden),
            f(m.heads),
            f(m.layers),
            f(m.experts),
            f(m.topk),
            f(m.vocab),
        );
        let kv = f(m.kv_heads.unwrap_or(m.heads));
        let dh = m.head_dim.map_or(h / heads, f);
        let fe = f(m.expert_ffn_hidden.unwrap_or(m.ffn_hidden));
        let fs = f(m.shared_expert_ffn_hidden.unwrap_or(0));
        let fd = f(m.ffn_hidden);
        let s = f(self.seq_len);
        let (tp, cp, pp, ep, etp, vpp) = (f(l.tp), f(l.cp), f(l.pp), f(l.ep), f(l.etp), f(l.vpp));
        let g = f(c.gpus);
        let dp = c.gpus / (l.tp * l.cp * l.pp);
        let micro_batches = self.global_batch / (dp * l.micro_batch);
        let mb = f(micro_batches);
        let lm = m.lm_config();
        let moe_layers = (0..m.layers).filter(|&i| lm.is_moe(i)).count() as f64;
        let dense_layers = layers - moe_layers;

        let t = f(l.micro_batch) * s; // tokens of one data-parallel replica's micro-batch
        let tg = t / (tp * cp); // tokens per GPU after sequence parallelism
        let rows = ep * etp * t * k / (tp * cp * e); // rows per local expert on one GPU
        let (total, _) = parameter_count(m);
        let expert_params = moe_layers * e * 3.0 * h * fe;
        Sizes {
            h,
            heads,
            layers,
            e,
            k,
            v,
            kv,
            dh,
            fe,
            fs,
            fd,
            s,
            tp,
            cp,
            pp,
            ep,
            etp,
            vpp,
            g,
            mb,
            moe_layers,
            dense_layers,
            t,
            tg,
            rows,
            expert_params,
            dense_params: total as f64 - expert_params,
            layers_stage: layers / pp,
            dp,
            edp: c.gpus / (l.etp * l.ep * l.pp),
            micro_batches,
        }
    }

    /// Model FLOPs of a step, the step time and its breakdown for layout `l`.
    fn time(&self, l: &Layout, z: &Sizes) -> (f64, f64, TimeBreakdown) {
        let c = &self.cluster;
        let cal = &self.calibration;
        let f = |v: usize| v as f64;
        let peak = c.peak_tflops * 1e12;
        let nvlink = c.nvlink_gbytes_per_s * 1e9;
        let ibw = c.ib_gbits_per_s / 8.0 * 1e9;
        let Sizes {
            h,
            heads,
            layers,
            e,
            k,
            v,
            kv,
            dh,
            fe,
            fs,
            fd,
            s,
            tp,
            cp,
            pp,
            ep,
            etp,
            vpp,
            mb,
            moe_layers,
            dense_layers,
            t,
            tg,
            rows,
            dense_params,
            expert_params,
            layers_stage,
            dp,
            edp,
            ..
        } = *z;
        // Model FLOPs (forward, per token), ×3 for training.
        let attn_tok =
            2.0 * h * (heads + 2.0 * kv) * dh + 2.0 * heads * dh * h + 2.0 * s * heads * dh;
        let moe_tok = 2.0 * h * e + k * 6.0 * h * fe + 6.0 * h * fs;
        let dense_tok = 6.0 * h * fd;
        let head_tok = 2.0 * h * v;
        let flops_tok =
            layers * attn_tok + moe_layers * moe_tok + dense_layers * dense_tok + head_tok;
        let model_flops = 3.0 * flops_tok * f(self.global_batch) * s;

        // One GPU, one micro-batch, one layer (forward + backward).
        let eff = |d: f64| cal.gemm_efficiency * d / (d + 128.0);
        let attn_proj = 3.0 * (2.0 * tg * h * (heads + 2.0 * kv) * dh + 2.0 * tg * heads * dh * h)
            / (eff(h.min((heads + 2.0 * kv) * dh / tp).min(t / cp)) * peak);
        let attn_core = 3.0 * 2.0 * t * s * heads * dh / (tp * cp) / (eff(s.min(4.0 * dh)) * peak);
        let experts = 3.0 * (k * 6.0 * tg * h * fe + 6.0 * tg * h * fs)
            / (eff(rows.min(h).min(fe / etp)) * peak)
            + 3.0 * 2.0 * tg * h * e / (cal.gemm_efficiency * peak);
        let dense_mlp = 3.0 * 6.0 * tg * h * fd / (eff(h.min(fd / tp)) * peak);
        let head = 3.0 * 2.0 * tg * h * v / (eff(h.min(v / tp)) * peak);
        let act_bytes = t / cp * h * 2.0;
        let tp_comm = if l.tp > 1 {
            8.0 * act_bytes * (tp - 1.0) / tp / nvlink
        } else {
            0.0
        };
        let dense_tp_comm = if l.tp > 1 {
            8.0 * act_bytes * (tp - 1.0) / tp / nvlink
        } else {
            0.0
        };
        let sent = tg * k * h * 2.0 * (ep - 1.0) / ep;
        let span = l.ep * l.etp;
        let a2a = if l.ep == 1 {
            0.0
        } else if span <= c.gpus_per_node {
            4.0 * sent / (nvlink * cal.alltoall_efficiency)
        } else {
            let inner = (c.gpus_per_node / l.etp).saturating_sub(1) as f64;
            let inter = ((ep - 1.0 - inner) / (ep - 1.0)).clamp(0.0, 1.0);
            4.0 * (sent * (1.0 - inter) / (nvlink * cal.alltoall_efficiency))
                .max(sent * inter / (ibw * cal.alltoall_efficiency))
        };
        let etp_comm = if l.etp > 1 {
            4.0 * rows * e / ep * h * 2.0 * (etp - 1.0) / etp / nvlink
        } else {
            0.0
        };
        // Full recomputation runs each layer's forward again in the backward pass: 4/3 compute.
        let rc = if self.recompute { 4.0 / 3.0 } else { 1.0 };
        let per_moe_layer = rc * (attn_proj + attn_core + experts)
            + tp_comm
            + a2a
            + etp_comm
            + cal.layer_overhead_s;
        let per_dense_layer = rc * (attn_proj + attn_core + dense_mlp)
            + tp_comm
            + dense_tp_comm
            + cal.layer_overhead_s;
        let stage = (moe_layers * per_moe_layer + dense_layers * per_dense_layer) / pp + head;
        let pp_comm = if l.pp > 1 {
            2.0 * (tg * h * 2.0) / ibw * (1.0 - cal.overlap)
        } else {
            0.0
        };
        let micro = stage + pp_comm;
        let bubble = (pp - 1.0) / vpp * micro;
        // Distributed optimizer: reduce-scatter grads + all-gather params (bf16) per step.
        let ring = |n: usize| (n as f64 - 1.0) / n as f64;
        let dp_comm = (2.0 * 2.0 * dense_params / (tp * pp) * ring(dp)
            + 2.0 * 2.0 * expert_params / (etp * ep * pp) * ring(edp))
            / ibw
            * (1.0 - cal.overlap);
        let step_time = mb * micro + bubble + dp_comm;
        let scale = mb + (pp - 1.0) / vpp;
        let time = TimeBreakdown {
            compute_s: scale
                * (rc
                    * (moe_layers * (attn_proj + attn_core + experts)
                        + dense_layers * (attn_proj + attn_core + dense_mlp))
                    / pp
                    + head),
            tp_comm_s: scale * (moe_layers * tp_comm + dense_layers * (tp_comm + dense_tp_comm))
                / pp,
            ep_comm_s: scale * moe_layers * a2a / pp,
            etp_comm_s: scale * moe_layers * etp_comm / pp,
            pp_comm_s: scale * pp_comm,
            dp_comm_s: dp_comm,
            overhead_s: scale * layers_stage * cal.layer_overhead_s,
            bubble_s: bubble,
        };

        (model_flops, step_time, time)
    }

    /// The memory of the first pipeline stage on one GPU for layout `l`.
    fn memory(&self, l: &Layout, z: &Sizes) -> MemoryBreakdown {
        let m = &self.model;
        let c = &self.cluster;
        let f = |v: usize| v as f64;
        let Sizes {
            h,
            heads,
            e,
            v,
            fe,
            fs,
            fd,
            s,
            tp,
            cp,
            pp,
            ep,
            etp,
            moe_layers,
            dense_layers,
            t,
            tg,
            rows,
            dense_params,
            expert_params,
            layers_stage,
            dp,
            edp,
            micro_batches,
            ..
        } = *z;
        let elem = burn_moe::lm::Precision::from(self.precision).bytes() as f64;
        let eager = c.kernels == Kernels::Eager;
        let dense_gpu = dense_params / (tp * pp);
        let expert_gpu = expert_params / (etp * ep * pp);
        let weights = elem * (dense_gpu + expert_gpu);
        // The f32 accumulation buffer; eager autodiff also holds one micro-batch's gradients
        // in the weights' precision before adding them to it.
        let in_backward = if eager { elem } else { 0.0 };
        let gradients = (4.0 + in_backward) * (dense_gpu + expert_gpu);
        let optimizer = 12.0 * (dense_gpu / f(dp) + expert_gpu / f(edp));
        let b = f(l.micro_batch);
        let in_flight = f(l.pp.min(micro_batches.max(1)));
        let (moe_stage, dense_stage) = (moe_layers / pp, dense_layers / pp);
        // Dispatched rows on this GPU (balanced routing, bounded by the capacity factor).
        let rows_gpu = rows * e / ep * m.capacity_factor.unwrap_or(1.0);
        let (activations, dispatcher) = if self.recompute {
            // Only each layer's input is kept, and the dispatched rows in and out.
            (
                elem * tg * h * layers_stage * in_flight,
                elem * rows_gpu * 2.0 * h * moe_stage * in_flight,
            )
        } else if eager {
            // Per layer, in elements: both norms keep input, normalised input and output
            // (6·T·h); attention keeps rotated queries, keys and values expanded to every
            // head, and the context (4·T·h), plus scores and probabilities (2·a·s²·b); a
            // SwiGLU MLP keeps its fused gate|up output, the sigmoid, the SiLU and the product
            // (5·T·F) for dense layers and shared experts; routed experts keep each dispatched
            // row in and out (2·h) and 5·F/etp. The last stage adds the final norm (3·T·h) and
            // logits, exponentials and probabilities (3·T·V). In bf16 the norms compute in
            // f32 (their input and normalised input stay f32, 4·T·h), so do the attention
            // softmax (scores and probabilities f32, plus the probabilities in bf16 for the
            // product with the values, a·s²·b) and the cross-entropy (the final norm's two,
            // exponentials and probabilities f32, plus the bf16 logits).
            let scores = heads / tp * (s / cp) * s * b;
            let last = if l.pp == 1 { 1.0 } else { 0.0 };
            let (f32_layer, f32_head) = (
                4.0 * tg * h + 2.0 * scores,
                2.0 * tg * h + 2.0 * t / cp * v / tp,
            );
            let copies = if self.precision == Precision::F32 {
                0.0
            } else {
                1.0
            };
            let common = 6.0 * tg * h + copies * scores;
            let per_dense = common + 5.0 * tg * fd;
            let per_moe = common + 5.0 * tg * fs;
            let layers = (moe_stage + dense_stage) * in_flight;
            let in_elem = (moe_stage * per_moe + dense_stage * per_dense) * in_flight
                + last * (tg * h + (1.0 + copies) * t / cp * v / tp);
            (
                4.0 * (f32_layer * layers + last * f32_head) + elem * in_elem,
                elem * rows_gpu * (2.0 * h + 5.0 * fe / etp) * moe_stage * in_flight,
            )
        } else {
            // Megatron's per-layer activation bytes (16-bit) with sequence parallelism and
            // flash attention that keeps no s² scores: s·b·h·34/tp; the expert intermediates
            // (3 of F/etp per row) beside the dispatched rows in and out.
            let scale = elem / 2.0;
            (
                scale * s * b * h * 34.0 / (tp * cp) * layers_stage * in_flight,
                scale * rows_gpu * (2.0 * h * 2.0 + 3.0 * fe / etp * 2.0) * moe_stage * in_flight,
            )
        };
        MemoryBreakdown {
            weights: weights as u64,
            gradients: gradients as u64,
            optimizer: optimizer as u64,
            activations: activations as u64,
            dispatcher: dispatcher as u64,
        }
    }

    /// The estimate of one layout: step time (compute per layer with a GEMM efficiency that
    /// falls for small dimensions, TP / EP / ETP / PP / DP communication, the pipeline
    /// bubble) and memory of the first stage.
    pub fn estimate(&self, l: &Layout) -> Result<Estimate> {
        self.check(l)?;
        let c = &self.cluster;
        let z = self.sizes(l);
        let (model_flops, step_time, time) = self.time(l, &z);
        let memory = self.memory(l, &z);
        let bytes = memory.weights
            + memory.gradients
            + memory.optimizer
            + memory.activations
            + memory.dispatcher;
        Ok(Estimate {
            layout: *l,
            mfu: model_flops / (step_time * z.g * c.peak_tflops * 1e12),
            step_time_s: step_time,
            memory_per_gpu_bytes: bytes,
            fits: (bytes as f64) <= c.memory_gib * (1u64 << 30) as f64,
            model_flops_per_step: model_flops,
            micro_batches: z.micro_batches,
            time,
            memory,
        })
    }

    /// Every layout that runs and fits, best MFU first.
    pub fn search(&self) -> Vec<Estimate> {
        let g = self.cluster.gpus;
        let divisors = |n: usize| (1..=n).filter(|d| n.is_multiple_of(*d)).collect::<Vec<_>>();
        let mut out = Vec::new();
        let tps: Vec<usize> = divisors(g)
            .into_iter()
            .filter(|t| *t <= self.cluster.gpus_per_node)
            .collect();
        for &tp in &tps {
            for pp in divisors(g / tp) {
                for vpp in [1, 2, 4] {
                    for ep in divisors(self.model.experts) {
                        for &etp in &tps {
                            if etp > tp {
                                continue;
                            }
                            for micro_batch in [1, 2] {
                                let l = Layout {
                                    tp,
                                    cp: 1,
                                    pp,
                                    vpp,
                                    ep,
                                    etp,
                                    micro_batch,
                                };
                                if let Ok(est) = self.estimate(&l)
                                    && est.fits
                                {
                                    out.push(est);
                                }
                            }
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| b.mfu.total_cmp(&a.mfu));
        out
    }
}

/// A measured row to calibrate on.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The problem.
    pub problem: Problem,
    /// Its layout.
    pub layout: Layout,
    /// Measured MFU.
    pub mfu: f64,
}

/// Largest relative MFU error over `rows` with calibration `cal`.
pub fn worst_error(rows: &[Measurement], cal: Calibration) -> f64 {
    rows.iter()
        .map(|r| {
            let mut p = r.problem.clone();
            p.calibration = cal;
            p.estimate(&r.layout)
                .map_or(f64::INFINITY, |e| (e.mfu / r.mfu - 1.0).abs())
        })
        .fold(0.0, f64::max)
}

/// Fits the four calibration numbers to `rows` (minimising the largest relative error): a
/// coarse grid, then a seeded random local search.
pub fn calibrate(rows: &[Measurement]) -> (Calibration, f64) {
    let mut best = (
        Calibration::default(),
        worst_error(rows, Calibration::default()),
    );
    for g in [0.5, 0.6, 0.7, 0.8, 0.9] {
        for a in [0.1, 0.2, 0.4, 0.6, 0.8, 1.0] {
            for o in [0.0, 0.5, 0.9] {
                for c in [0.0, 2e-4, 5e-4, 1e-3, 2e-3] {
                    let cal = Calibration {
                        gemm_efficiency: g,
                        alltoall_efficiency: a,
                        overlap: o,
                        layer_overhead_s: c,
                    };
                    let err = worst_error(rows, cal);
                    if err < best.1 {
                        best = (cal, err);
                    }
                }
            }
        }
    }
    let mut state = 0x5EEDu64;
    let mut normal = || {
        state = state.wrapping_add(1);
        let u1 = ((mix(state) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        state = state.wrapping_add(1);
        let u2 = (mix(state) >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    for _ in 0..20_000 {
        let p = best.0;
        let cal = Calibration {
            gemm_efficiency: (p.gemm_efficiency * (0.05 * normal()).exp()).clamp(0.05, 1.0),
            alltoall_efficiency: (p.alltoall_efficiency * (0.1 * normal()).exp()).clamp(0.02, 1.0),
            overlap: (p.overlap + 0.05 * normal()).clamp(0.0, 0.99),
            layer_overhead_s: (p.layer_overhead_s * (0.1 * normal()).exp() + 1e-5 * normal())
                .max(0.0),
        };
        let err = worst_error(rows, cal);
        if err < best.1 {
            best = (cal, err);
        }
    }
    best
}

/// The rows of an anchors file (the seed paper's Table 1 format).
pub fn load_anchors(path: &std::path::Path) -> Result<Vec<(String, String, Measurement)>> {
    let io = |e: String| RecipeError::Io {
        path: path.to_path_buf(),
        reason: e,
    };
    let text = std::fs::read_to_string(path).map_err(|e| io(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| io(e.to_string()))?;
    let hw = &v["hardware"];
    let num = |x: &serde_json::Value, key: &str| -> Result<f64> {
        x[key]
            .as_f64()
            .ok_or_else(|| io(format!("missing number `{key}`")))
    };
    let cluster = |gpus: usize| -> Result<ClusterConfig> {
        Ok(ClusterConfig {
            gpus,
            gpus_per_node: num(hw, "gpus_per_node")? as usize,
            peak_tflops: num(hw, "peak_bf16_tflops")?,
            nvlink_gbytes_per_s: num(hw, "nvlink_gbytes_per_s")?,
            ib_gbits_per_s: num(hw, "ib_gbits_per_s_per_gpu")?,
            memory_gib: ClusterConfig::default().memory_gib,
            kernels: Kernels::Fused,
        })
    };
    let mut out = Vec::new();
    for row in v["rows"].as_array().ok_or_else(|| io("no rows".into()))? {
        let name = row["model"]
            .as_str()
            .ok_or_else(|| io("row without model".into()))?;
        let m = &v["models"][name];
        let us = |key: &str| -> Result<usize> { Ok(num(m, key)? as usize) };
        let opt = |key: &str| m[key].as_f64().map(|x| x as usize);
        let ffn = opt("ffn_hidden")
            .or(opt("expert_ffn_hidden"))
            .ok_or_else(|| io(format!("{name}: no FFN size")))?;
        let model = ModelConfig {
            vocab: us("vocab")?,
            hidden: us("hidden")?,
            layers: us("layers")?,
            heads: us("heads")?,
            kv_heads: opt("kv_heads"),
            ffn_hidden: ffn,
            moe_every: 1,
            experts: us("experts")?,
            topk: us("topk")?,
            expert_ffn_hidden: opt("expert_ffn_hidden"),
            shared_expert_ffn_hidden: opt("shared_expert_ffn_hidden"),
            aux_loss_coeff: 0.0,
            z_loss_coeff: None,
            capacity_factor: Some(1.0),
            rope_theta: 1e6,
            init_std: 0.02,
            norm_eps: 1e-6,
            tie_embeddings: false,
            shared_expert_gate: false,
            expert_activation: Default::default(),
            router: None,
            head_dim: None,
            qk_norm: Default::default(),
            qkv_bias: false,
            dense_layers: Vec::new(),
        };
        let gpus = num(row, "gpus")? as usize;
        let problem = Problem {
            model,
            seq_len: 4096,
            global_batch: 256,
            cluster: cluster(gpus)?,
            calibration: Calibration::default(),
            recompute: false,
            precision: Precision::Bf16,
        };
        let layout = Layout {
            tp: num(row, "tp")? as usize,
            cp: 1,
            pp: num(row, "pp")? as usize,
            vpp: 1,
            ep: num(row, "ep")? as usize,
            etp: num(row, "etp")? as usize,
            micro_batch: 1,
        };
        let system = row["system"].as_str().unwrap_or("").to_string();
        out.push((
            name.to_string(),
            system,
            Measurement {
                problem,
                layout,
                mfu: num(row, "mfu")?,
            },
        ));
    }
    Ok(out)
}
