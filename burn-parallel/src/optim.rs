//! Data parallelism with a distributed optimizer (ZeRO-1), as Megatron-Core's
//! `DistributedOptimizer`:
//!
//! 1. gradients of sequence-parallel parameters are all-reduced over TP (they are partial);
//! 2. all gradients are flattened in parameter order and reduce-scattered (mean) over the
//!    data-parallel group: each DP rank receives the gradient of its 1/dp shard;
//! 3. the global gradient norm is the square root of the sum, over every rank, of the squares of
//!    its shard, counting TP-replicated parameters on TP rank 0 only; gradients are scaled by
//!    `max_norm / (norm + 1e-6)` when that is below one;
//! 4. each DP rank runs AdamW on its shard with f32 master weights and moments (1/dp of the
//!    optimizer state per rank);
//! 5. the updated shards are all-gathered over DP and written back into the module.
//!
//! For expert parameters the same steps run over the expert-data-parallel group instead (the
//! expert-parallel issue adds them as a second parameter group).

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Gradients, Tensor, TensorData};

use crate::comm::ReduceOp;
use crate::error::{ParallelError, Result};
use crate::group::Group;
use crate::layers::ParamRole;

/// AdamW hyper-parameters (PyTorch's and Megatron's definition: decoupled weight decay, bias
/// correction, `eps` added to the corrected second-moment root).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (for parameters whose role allows it).
    pub weight_decay: f64,
    /// Clip gradients to this global norm.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            max_grad_norm: Some(1.0),
        }
    }
}

impl AdamWConfig {
    fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, reason: &str| {
            Err(ParallelError::InvalidArgument {
                name,
                reason: reason.into(),
            })
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", "must be a finite non-negative number");
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(name, "must be in [0, 1)");
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad("eps", "must be positive");
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad("weight_decay", "must be non-negative");
        }
        if let Some(n) = self.max_grad_norm
            && (n.is_nan() || n <= 0.0)
        {
            return bad("max_grad_norm", "must be positive");
        }
        Ok(())
    }
}

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the gradients were scaled down.
    pub clipped: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    id: ParamId,
    offset: usize,
    numel: usize,
    role: ParamRole,
}

#[derive(Debug, Clone)]
struct Layout {
    entries: Vec<Entry>,
    padded: usize,
    shard_start: usize,
    shard_len: usize,
}

/// AdamW whose state is sharded over the data-parallel group (ZeRO-1).
#[derive(Debug, Clone)]
pub struct DistributedAdamW {
    config: AdamWConfig,
    dp: Group,
    tp: Group,
    norm_group: Group,
    layout: Option<Layout>,
    master: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    step: u64,
}

/// Collects every float parameter's values and gradient, flattened, in module order.
/// A parameter's id, values and gradient (when it has one), flattened.
type Flat = (ParamId, Vec<f32>, Option<Vec<f32>>);

struct Collect<'a> {
    grads: &'a Gradients,
    params: Vec<Flat>,
    error: Option<ParallelError>,
}

fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| ParallelError::Backend {
            context: "reading a parameter",
            reason: format!("{e:?}"),
        })
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let grad = value.grad(self.grads);
        match (read(value), grad.map(read).transpose()) {
            (Ok(v), Ok(g)) => self.params.push((param.id, v, g)),
            (Err(e), _) | (_, Err(e)) => {
                self.error.get_or_insert(e);
            }
        }
    }
}

/// Writes new values into the parameters, keeping their devices and gradient tracking.
struct Write {
    values: HashMap<ParamId, Vec<f32>>,
}

impl ModuleMapper for Write {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(values) = self.values.remove(&param.id) else {
            return param;
        };
        param.map(|t| {
            let device = t.device();
            let track = t.is_require_grad();
            let fresh = Tensor::<D>::from_data(TensorData::new(values, t.shape()), &device);
            if track { fresh.require_grad() } else { fresh }
        })
    }
}

impl DistributedAdamW {
    /// An optimizer over data-parallel group `dp`, tensor-parallel group `tp` (for
    /// sequence-parallel gradients and norm de-duplication) and `norm_group`, the group over
    /// which gradient-norm contributions are summed (the world, or the pipeline's model).
    pub fn new(config: AdamWConfig, dp: Group, tp: Group, norm_group: Group) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            dp,
            tp,
            norm_group,
            layout: None,
            master: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            step: 0,
        })
    }

    /// Number of optimizer-state values (master weights, two moments) this rank holds.
    pub fn state_len(&self) -> usize {
        self.master.len() + self.m.len() + self.v.len()
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Sets the learning rate (schedules call this before each step).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// One optimizer step: reduces `grads` of `module`'s parameters as described in the module
    /// docs, updates this rank's shard, and returns the module with the new parameters.
    /// `roles` gives each parameter's role; parameters not listed are TP-replicated, decayed.
    /// Collective over the data-parallel, tensor-parallel and norm groups.
    pub fn step<M: Module>(
        &mut self,
        module: M,
        grads: &Gradients,
        roles: &[(ParamId, ParamRole)],
    ) -> Result<(M, StepStats)> {
        crate::group::check()?;
        let mut collect = Collect {
            grads,
            params: Vec::new(),
            error: None,
        };
        module.visit(&mut collect);
        if let Some(e) = collect.error {
            return Err(e);
        }
        let roles: HashMap<ParamId, ParamRole> = roles.iter().copied().collect();
        let layout = self.layout(&collect.params, &roles)?;
        let mut flat_grads = vec![0f32; layout.padded];
        let mut flat_params = vec![0f32; layout.padded];
        for (entry, (_, value, grad)) in layout.entries.iter().zip(&collect.params) {
            flat_params[entry.offset..entry.offset + entry.numel].copy_from_slice(value);
            if let Some(g) = grad {
                flat_grads[entry.offset..entry.offset + entry.numel].copy_from_slice(g);
            }
        }
        // 1. Partial gradients of sequence-parallel parameters: sum over TP.
        if self.tp.size() > 1 {
            let sp: Vec<&Entry> = layout
                .entries
                .iter()
                .filter(|e| e.role.sequence_parallel_grad)
                .collect();
            if !sp.is_empty() {
                let mut packed: Vec<f32> = sp
                    .iter()
                    .flat_map(|e| flat_grads[e.offset..e.offset + e.numel].to_vec())
                    .collect();
                self.tp
                    .communicator()?
                    .all_reduce(&mut packed, ReduceOp::Sum)?;
                let mut at = 0;
                for e in sp {
                    flat_grads[e.offset..e.offset + e.numel]
                        .copy_from_slice(&packed[at..at + e.numel]);
                    at += e.numel;
                }
            }
        }
        // 2. Mean over DP, scattered: this rank's shard.
        let mut shard = self
            .dp
            .communicator()?
            .reduce_scatter(&flat_grads, ReduceOp::Avg)?;
        let (start, len) = (layout.shard_start, layout.shard_len);
        if self.master.is_empty() {
            self.master = flat_params[start..start + len].to_vec();
            self.m = vec![0.0; len];
            self.v = vec![0.0; len];
        }
        // 3. Global norm, TP-replicated parameters counted once.
        let mut counted = vec![0f32; len];
        let mut decay = vec![0f32; len];
        for e in &layout.entries {
            let (lo, hi) = (e.offset.max(start), (e.offset + e.numel).min(start + len));
            if lo >= hi {
                continue;
            }
            let once = e.role.tp_split || self.tp.rank() == 0;
            counted[lo - start..hi - start].fill(if once { 1.0 } else { 0.0 });
            decay[lo - start..hi - start].fill(if e.role.weight_decay { 1.0 } else { 0.0 });
        }
        let mut sq = [shard
            .iter()
            .zip(&counted)
            .map(|(g, c)| f64::from(*g) * f64::from(*g) * f64::from(*c))
            .sum::<f64>() as f32];
        self.norm_group
            .communicator()?
            .all_reduce(&mut sq, ReduceOp::Sum)?;
        let grad_norm = f64::from(sq[0]).sqrt();
        let mut clipped = false;
        if let Some(max) = self.config.max_grad_norm {
            let coef = max / (grad_norm + 1e-6);
            if coef < 1.0 {
                clipped = true;
                shard
                    .iter_mut()
                    .for_each(|g| *g = (f64::from(*g) * coef) as f32);
            }
        }
        // 4. AdamW on the shard.
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for i in 0..len {
            let g = f64::from(shard[i]);
            let mut p = f64::from(self.master[i]);
            p -= c.lr * c.weight_decay * f64::from(decay[i]) * p;
            let m = c.beta1 * f64::from(self.m[i]) + (1.0 - c.beta1) * g;
            let v = c.beta2 * f64::from(self.v[i]) + (1.0 - c.beta2) * g * g;
            p -= c.lr / bc1 * m / ((v / bc2).sqrt() + c.eps);
            self.m[i] = m as f32;
            self.v[i] = v as f32;
            self.master[i] = p as f32;
        }
        // 5. Every rank gets every shard back.
        let updated = self.dp.communicator()?.all_gather(&self.master)?;
        let values = layout
            .entries
            .iter()
            .map(|e| (e.id, updated[e.offset..e.offset + e.numel].to_vec()))
            .collect();
        let module = module.map(&mut Write { values });
        Ok((module, StepStats { grad_norm, clipped }))
    }

    fn layout(&mut self, params: &[Flat], roles: &HashMap<ParamId, ParamRole>) -> Result<Layout> {
        if let Some(layout) = &self.layout {
            let same = layout.entries.len() == params.len()
                && layout
                    .entries
                    .iter()
                    .zip(params)
                    .all(|(e, (id, v, _))| e.id == *id && e.numel == v.len());
            if !same {
                return Err(ParallelError::InvalidArgument {
                    name: "module",
                    reason: "its parameters changed since the first step".into(),
                });
            }
            return Ok(layout.clone());
        }
        let mut entries = Vec::with_capacity(params.len());
        let mut offset = 0;
        for (id, value, _) in params {
            let role = roles.get(id).copied().unwrap_or(ParamRole {
                tp_split: false,
                sequence_parallel_grad: false,
                weight_decay: true,
            });
            entries.push(Entry {
                id: *id,
                offset,
                numel: value.len(),
                role,
            });
            offset += value.len();
        }
        let dp = self.dp.size();
        let shard_len = offset.div_ceil(dp);
        let layout = Layout {
            entries,
            padded: shard_len * dp,
            shard_start: self.dp.rank() * shard_len,
            shard_len,
        };
        self.layout = Some(layout.clone());
        Ok(layout)
    }
}
