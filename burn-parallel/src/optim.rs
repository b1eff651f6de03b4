//! Data parallelism with a distributed optimizer (ZeRO-1), as Megatron-Core's
//! `DistributedOptimizer`:
//!
//! 1. gradients of sequence-parallel parameters are all-reduced over TP (they are partial);
//! 2. all gradients are flattened in parameter order and reduce-scattered (mean) over the
//!    data-parallel group: each DP rank receives the gradient of its 1/dp shard (expert
//!    parameters: summed over the expert-data-parallel group and divided by the DP size);
//! 3. the global gradient norm is the square root of the sum, over every rank, of the squares of
//!    its shard, counting TP-replicated parameters on TP rank 0 only; gradients are scaled by
//!    `max_norm / (norm + 1e-6)` when that is below one;
//! 4. each DP rank runs AdamW on its shard with f32 master weights and moments (1/dp of the
//!    optimizer state per rank);
//! 5. the updated shards are all-gathered over DP and written back into the module.
//!
//! With [`DistributedAdamW::with_expert_group`], expert parameters form a second class sharded
//! over the expert-data-parallel group; the global norm and clipping span both classes.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Gradients, Tensor, TensorData};

use crate::comm::ReduceOp;
use crate::error::{ParallelError, Result};
use crate::group::Group;
use crate::layers::ParamRole;

/// The role of every trained float parameter of `module` for a model without tensor
/// parallelism: replicated over TP, not an expert, weight decay on (every parameter, as the
/// optimizer's callers without roles had it). Parameters that do not require gradients are
/// left out (the optimizer does not train them).
pub fn replicated_roles<M: Module>(module: &M) -> Vec<(ParamId, ParamRole)> {
    struct Roles(Vec<(ParamId, ParamRole)>);
    impl ModuleVisitor for Roles {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.val().is_require_grad() {
                self.0.push((param.id, ParamRole::replicated(true)));
            }
        }
    }
    let mut roles = Roles(Vec::new());
    module.visit(&mut roles);
    roles.0
}

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

/// A rank's optimizer state: the step count and, per parameter class (dense, then expert),
/// `[master weights, first moments, second moments]` of its shard.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// Steps taken.
    pub step: u64,
    /// Per class: master weights, first and second moments.
    pub shards: Vec<[Vec<f32>; 3]>,
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
    /// Index in the module's parameter order.
    index: usize,
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

/// One class of parameters (dense or expert) sharded over its data-parallel group.
#[derive(Debug, Clone)]
struct Shard {
    group: Group,
    layout: Option<Layout>,
    master: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Shard {
    fn new(group: Group) -> Self {
        Self {
            group,
            layout: None,
            master: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
        }
    }
}

/// AdamW whose state is sharded over the data-parallel group (ZeRO-1); expert parameters can
/// be sharded over the expert-data-parallel group instead.
#[derive(Debug, Clone)]
pub struct DistributedAdamW {
    config: AdamWConfig,
    tp: Group,
    norm_group: Group,
    /// Number of data shards the loss is averaged over (the attention DP size).
    data_shards: usize,
    dense: Shard,
    expert: Option<Shard>,
    step: u64,
}

/// A parameter's id, values and gradient (when it has one), flattened.
type Flat = (ParamId, Vec<f32>, Option<Vec<f32>>);

fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    crate::transfers::read(
        "optimizer: a parameter or gradient to the host",
        (t.shape().num_elements() * t.dtype().size()) as u64,
    );
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| ParallelError::Backend {
            context: "reading a parameter",
            reason: format!("{e:?}"),
        })
}

/// Gradients of several micro-batches summed on the host as they arrive, like Megatron's f32
/// `main_grad` buffers: [`add`](Self::add) reads a micro-batch's gradients and drops them, so
/// gradient accumulation holds one f32 copy of the gradients however many micro-batches run.
#[derive(Debug, Clone, Default)]
pub struct GradientBuffer {
    sums: HashMap<ParamId, Vec<f32>>,
    micro_batches: usize,
}

struct Accumulate<'a> {
    grads: &'a Gradients,
    sums: &'a mut HashMap<ParamId, Vec<f32>>,
    error: Option<ParallelError>,
}

impl ModuleVisitor for Accumulate<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() || self.error.is_some() {
            return;
        }
        let Some(g) = value.grad(self.grads) else {
            return;
        };
        match read(g) {
            Ok(g) => match self.sums.get_mut(&param.id) {
                Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
                None => {
                    self.sums.insert(param.id, g);
                }
            },
            Err(e) => self.error = Some(e),
        }
    }
}

impl GradientBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradients of `module`'s trained parameters from one backward pass (drop
    /// `grads` afterwards: the buffer holds the sum).
    pub fn add<M: Module>(&mut self, module: &M, grads: &Gradients) -> Result<()> {
        let mut visit = Accumulate {
            grads,
            sums: &mut self.sums,
            error: None,
        };
        module.visit(&mut visit);
        if let Some(e) = visit.error {
            return Err(e);
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Backward passes added so far.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The summed gradient of a parameter, flattened, when it received one.
    pub fn get(&self, id: ParamId) -> Option<&[f32]> {
        self.sums.get(&id).map(Vec::as_slice)
    }

    /// Adds `values` to a parameter's gradient (which starts at zero when it has none).
    pub fn accumulate(&mut self, id: ParamId, values: &[f32]) {
        match self.sums.get_mut(&id) {
            Some(acc) => acc.iter_mut().zip(values).for_each(|(a, b)| *a += b),
            None => {
                self.sums.insert(id, values.to_vec());
            }
        }
    }
}

/// Collects every trained float parameter's values and summed gradient, in module order.
struct Collect {
    sums: HashMap<ParamId, Vec<f32>>,
    params: Vec<Flat>,
    error: Option<ParallelError>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            // Not trained by the optimizer (buffers such as an expert bias).
            return;
        }
        let sum = self.sums.remove(&param.id);
        match read(value) {
            Ok(v) => self.params.push((param.id, v, sum)),
            Err(e) => {
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
            crate::transfers::upload(
                "optimizer: an updated parameter to the device",
                (values.len() * 4) as u64,
            );
            let fresh = Tensor::<D>::from_data(TensorData::new(values, t.shape()), &device);
            if track { fresh.require_grad() } else { fresh }
        })
    }
}

impl DistributedAdamW {
    /// `config` on one rank (every group a single rank): what a trainer without data or
    /// tensor parallelism steps with.
    pub fn single_rank(config: AdamWConfig) -> Result<Self> {
        let single = Group::single();
        Self::new(config, single.clone(), single.clone(), single)
    }

    /// An optimizer over data-parallel group `dp`, tensor-parallel group `tp` (for
    /// sequence-parallel gradients and norm de-duplication) and `norm_group`, the group over
    /// which gradient-norm contributions are summed (the world, or the pipeline's model).
    pub fn new(config: AdamWConfig, dp: Group, tp: Group, norm_group: Group) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            tp,
            norm_group,
            data_shards: dp.size(),
            dense: Shard::new(dp),
            expert: None,
            step: 0,
        })
    }

    /// Shards expert parameters (role `expert`) over the expert-data-parallel group `edp`
    /// instead of the data-parallel group. Their gradients are summed over `edp` and divided by
    /// the data-parallel size, as Megatron-Core scales them: every token reaches each expert
    /// shard through exactly one rank of its expert-data-parallel group.
    pub fn with_expert_group(mut self, edp: Group) -> Self {
        self.expert = Some(Shard::new(edp));
        self
    }

    /// Number of optimizer-state values (master weights, two moments) this rank holds.
    pub fn state_len(&self) -> usize {
        [Some(&self.dense), self.expert.as_ref()]
            .into_iter()
            .flatten()
            .map(|s| s.master.len() + s.m.len() + s.v.len())
            .sum()
    }

    /// The optimizer state of this rank (step count; master weights and moments of each class's
    /// shard), for checkpoints.
    pub fn state(&self) -> OptimizerState {
        OptimizerState {
            step: self.step,
            shards: [Some(&self.dense), self.expert.as_ref()]
                .into_iter()
                .flatten()
                .map(|s| [s.master.clone(), s.m.clone(), s.v.clone()])
                .collect(),
        }
    }

    /// Restores a state saved by [`state`](Self::state) on the same rank and layout.
    pub fn load_state(&mut self, state: OptimizerState) -> Result<()> {
        let mut shards: Vec<&mut Shard> = std::iter::once(&mut self.dense)
            .chain(self.expert.as_mut())
            .collect();
        if shards.len() != state.shards.len() {
            return Err(ParallelError::InvalidArgument {
                name: "state",
                reason: format!(
                    "has {} parameter classes, this optimizer {}",
                    state.shards.len(),
                    shards.len()
                ),
            });
        }
        for (shard, [master, m, v]) in shards.iter_mut().zip(state.shards) {
            if master.len() != m.len() || m.len() != v.len() {
                return Err(ParallelError::InvalidArgument {
                    name: "state",
                    reason: "master weights and moments differ in length".into(),
                });
            }
            shard.master = master;
            shard.m = m;
            shard.v = v;
            shard.layout = None;
        }
        self.step = state.step;
        Ok(())
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
    /// `roles` gives each trained parameter's role; a trained parameter missing from it is an
    /// error (see [`replicated_roles`] for models without tensor parallelism).
    /// Collective over the data-parallel, tensor-parallel and norm groups.
    pub fn step<M: Module>(
        &mut self,
        module: M,
        grads: &Gradients,
        roles: &[(ParamId, ParamRole)],
    ) -> Result<(M, StepStats)> {
        self.step_accumulated(module, std::slice::from_ref(grads), roles)
    }

    /// [`step`](Self::step) with the gradients of several micro-batches, summed (gradient
    /// accumulation; scale each micro-batch's loss by 1 / micro-batches).
    pub fn step_accumulated<M: Module>(
        &mut self,
        module: M,
        grads: &[Gradients],
        roles: &[(ParamId, ParamRole)],
    ) -> Result<(M, StepStats)> {
        let mut buffer = GradientBuffer::new();
        for g in grads {
            buffer.add(&module, g)?;
        }
        self.step_buffered(module, buffer, roles)
    }

    /// [`step`](Self::step) with gradients summed in a [`GradientBuffer`] (gradient
    /// accumulation that keeps one copy of the gradients).
    pub fn step_buffered<M: Module>(
        &mut self,
        module: M,
        buffer: GradientBuffer,
        roles: &[(ParamId, ParamRole)],
    ) -> Result<(M, StepStats)> {
        crate::group::check()?;
        let mut collect = Collect {
            sums: buffer.sums,
            params: Vec::new(),
            error: None,
        };
        module.visit(&mut collect);
        if let Some(e) = collect.error {
            return Err(e);
        }
        let roles = role_map(&collect.params, roles)?;
        // Per class (dense, then expert when there is an expert group): reduce, shard and
        // count towards the norm.
        let mut classes = Vec::new();
        let mut sq = 0f64;
        for is_expert in [false, true] {
            if is_expert && self.expert.is_none() {
                continue;
            }
            let (class, class_sq) = self.reduce_class(is_expert, &collect.params, &roles)?;
            sq += class_sq;
            classes.push((is_expert, class));
        }
        let mut sq = [sq as f32];
        self.norm_group
            .communicator()?
            .all_reduce(&mut sq, ReduceOp::Sum)?;
        let grad_norm = f64::from(sq[0]).sqrt();
        let coef = match self.config.max_grad_norm {
            Some(max) if max / (grad_norm + 1e-6) < 1.0 => Some(max / (grad_norm + 1e-6)),
            _ => None,
        };
        // 4. AdamW on each shard; 5. every rank gets every shard back.
        self.step += 1;
        let mut values = HashMap::new();
        for (is_expert, class) in classes {
            let (config, step) = (self.config, self.step);
            let shard = self.shard_mut(is_expert)?;
            adamw(config, step, shard, &class, coef.unwrap_or(1.0));
            let updated = shard.group.communicator()?.all_gather(&shard.master)?;
            for e in &class.layout.entries {
                values.insert(e.id, updated[e.offset..e.offset + e.numel].to_vec());
            }
        }
        let module = module.map(&mut Write { values });
        Ok((
            module,
            StepStats {
                grad_norm,
                clipped: coef.is_some(),
            },
        ))
    }

    fn shard_mut(&mut self, is_expert: bool) -> Result<&mut Shard> {
        if is_expert {
            self.expert.as_mut().ok_or(ParallelError::InvalidArgument {
                name: "expert",
                reason: "no expert group".into(),
            })
        } else {
            Ok(&mut self.dense)
        }
    }

    /// Steps 1–3 for the dense or the expert class of `params`: partial gradients of
    /// sequence-parallel parameters summed over TP, the sum over the class's data-parallel
    /// group divided by the data shards and scattered (this rank's shard; the shard's master
    /// weights start from the parameters), and the class's contribution to the squared
    /// gradient norm (TP-replicated parameters counted once).
    fn reduce_class(
        &mut self,
        is_expert: bool,
        params: &[Flat],
        roles: &HashMap<ParamId, ParamRole>,
    ) -> Result<(ClassShard, f64)> {
        let has_expert_group = self.expert.is_some();
        let (tp, data_shards) = (self.tp.clone(), self.data_shards as f32);
        let shard = self.shard_mut(is_expert)?;
        let members: Vec<(usize, ParamRole)> = params
            .iter()
            .enumerate()
            .map(|(i, (id, _, _))| (i, roles[id]))
            .filter(|(_, r)| {
                has_expert_group && r.expert == is_expert || !has_expert_group && !is_expert
            })
            .collect();
        let layout = layout_for(shard, params, &members)?;
        let mut flat_grads = vec![0f32; layout.padded];
        let mut flat_params = vec![0f32; layout.padded];
        for e in &layout.entries {
            let (_, value, grad) = &params[e.index];
            flat_params[e.offset..e.offset + e.numel].copy_from_slice(value);
            if let Some(g) = grad {
                flat_grads[e.offset..e.offset + e.numel].copy_from_slice(g);
            }
        }
        // 1. Partial gradients of sequence-parallel parameters: sum over TP.
        if tp.size() > 1 {
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
                tp.communicator()?.all_reduce(&mut packed, ReduceOp::Sum)?;
                let mut at = 0;
                for e in sp {
                    flat_grads[e.offset..e.offset + e.numel]
                        .copy_from_slice(&packed[at..at + e.numel]);
                    at += e.numel;
                }
            }
        }
        // 2. Sum over the class's data-parallel group, divided by the number of data shards
        //    (the mean over DP for dense parameters), scattered: this rank's shard.
        let mut grads = shard
            .group
            .communicator()?
            .reduce_scatter(&flat_grads, ReduceOp::Sum)?;
        grads.iter_mut().for_each(|g| *g /= data_shards);
        let (start, len) = (layout.shard_start, layout.shard_len);
        if shard.master.is_empty() {
            shard.master = flat_params[start..start + len].to_vec();
            shard.m = vec![0.0; len];
            shard.v = vec![0.0; len];
        } else if shard.master.len() != len {
            return Err(ParallelError::InvalidArgument {
                name: "state",
                reason: format!(
                    "the loaded shard has {} values, this layout {len}",
                    shard.master.len()
                ),
            });
        }
        // 3. Norm contributions, TP-replicated parameters counted once.
        let mut sq = 0f64;
        let mut decay = vec![0f32; len];
        for e in &layout.entries {
            let (lo, hi) = (e.offset.max(start), (e.offset + e.numel).min(start + len));
            if lo >= hi {
                continue;
            }
            let once = (e.role.tp_split || tp.rank() == 0) && !e.role.tied_copy;
            if once {
                sq += grads[lo - start..hi - start]
                    .iter()
                    .map(|g| f64::from(*g) * f64::from(*g))
                    .sum::<f64>();
            }
            decay[lo - start..hi - start].fill(if e.role.weight_decay { 1.0 } else { 0.0 });
        }
        Ok((
            ClassShard {
                layout,
                grads,
                decay,
            },
            sq,
        ))
    }
}

/// A class's reduced gradients on this rank: its layout, its shard of the gradients and
/// which of the shard's values take weight decay.
struct ClassShard {
    layout: Layout,
    grads: Vec<f32>,
    decay: Vec<f32>,
}

/// Every trained parameter's role, or an error naming the first parameter without one (a
/// parameter without a role would be reduced and counted in the norm as a guess), before any
/// collective runs.
fn role_map(
    params: &[Flat],
    roles: &[(ParamId, ParamRole)],
) -> Result<HashMap<ParamId, ParamRole>> {
    let roles: HashMap<ParamId, ParamRole> = roles.iter().copied().collect();
    if let Some((index, (id, value, _))) = params
        .iter()
        .enumerate()
        .find(|(_, (id, _, _))| !roles.contains_key(id))
    {
        return Err(ParallelError::InvalidArgument {
            name: "roles",
            reason: format!(
                "trained parameter #{index} ({id}, {} values) has no role; list every \
                 parameter (`ParallelParams::param_roles`, or `replicated_roles` for a model \
                 without tensor parallelism)",
                value.len()
            ),
        });
    }
    Ok(roles)
}

/// AdamW step `step` (1-based, for the bias corrections) on a shard's master weights and
/// moments, in f64, with the gradients scaled by the clipping coefficient `clip`.
fn adamw(c: AdamWConfig, step: u64, shard: &mut Shard, class: &ClassShard, clip: f64) {
    let t = step as i32;
    let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
    for i in 0..class.layout.shard_len {
        let g = f64::from(class.grads[i]) * clip;
        let mut p = f64::from(shard.master[i]);
        p -= c.lr * c.weight_decay * f64::from(class.decay[i]) * p;
        let m = c.beta1 * f64::from(shard.m[i]) + (1.0 - c.beta1) * g;
        let v = c.beta2 * f64::from(shard.v[i]) + (1.0 - c.beta2) * g * g;
        p -= c.lr / bc1 * m / ((v / bc2).sqrt() + c.eps);
        shard.m[i] = m as f32;
        shard.v[i] = v as f32;
        shard.master[i] = p as f32;
    }
}

/// The part of a class's flat buffer (its trained parameters' values one after the other,
/// in module order, `total` in all) that rank `rank` of the class's data-parallel group of
/// `size` ranks holds in its [`OptimizerState`]: `rank · len .. (rank + 1) · len` with
/// `len = ⌈total / size⌉` (the last shards end in padding past `total`).
///
/// Classes: with an expert group ([`DistributedAdamW::with_expert_group`]) the first class
/// holds the parameters whose role is not `expert`, sharded over the data-parallel group, the
/// second the expert parameters, sharded over the expert-data-parallel group; without one, one
/// class holds every trained parameter. Parameters that do not require gradients are in none.
pub fn shard_range(total: usize, size: usize, rank: usize) -> std::ops::Range<usize> {
    let len = total.div_ceil(size.max(1));
    rank * len..(rank + 1) * len
}

/// The flat layout of a class's parameters (`members`: module index and role), fixed at the
/// first step.
fn layout_for(
    shard: &mut Shard,
    params: &[Flat],
    members: &[(usize, ParamRole)],
) -> Result<Layout> {
    if let Some(layout) = &shard.layout {
        let same = layout.entries.len() == members.len()
            && layout
                .entries
                .iter()
                .zip(members)
                .all(|(e, (i, _))| e.id == params[*i].0 && e.numel == params[*i].1.len());
        if !same {
            return Err(ParallelError::InvalidArgument {
                name: "module",
                reason: "its parameters changed since the first step".into(),
            });
        }
        return Ok(layout.clone());
    }
    let mut entries = Vec::with_capacity(members.len());
    let mut offset = 0;
    for &(index, role) in members {
        let numel = params[index].1.len();
        entries.push(Entry {
            index,
            id: params[index].0,
            offset,
            numel,
            role,
        });
        offset += numel;
    }
    let dp = shard.group.size();
    let range = shard_range(offset, dp, shard.group.rank());
    let layout = Layout {
        entries,
        padded: range.len() * dp,
        shard_start: range.start,
        shard_len: range.len(),
    };
    shard.layout = Some(layout.clone());
    Ok(layout)
}
