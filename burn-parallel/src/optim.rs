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
//! Every step is tensor operations on the parameters' device (the collectives of
//! [`crate::mappings`]); the host reads the squared gradient norm, one number per step.
//!
//! With [`DistributedAdamW::with_expert_group`], expert parameters form a second class sharded
//! over the expert-data-parallel group; the global norm and clipping span both classes.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};

use crate::comm::ReduceOp;
use crate::error::{ParallelError, Result};
use crate::group::Group;
use crate::layers::ParamRole;
use crate::mappings;
use crate::ops::GatherGrad;

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
    /// Master weights, first and second moments of this rank's shard, f32 tensors on the
    /// parameters' device, once the class has stepped.
    state: Option<[Tensor<1>; 3]>,
    /// A state restored from a checkpoint, uploaded at the next step (to the parameters'
    /// device, unknown until then).
    loaded: Option<[Vec<f32>; 3]>,
    /// Per value of the shard: weight decay on (1) or off (0), and counted in the gradient
    /// norm (1) or not (0). Made on the device with the layout.
    masks: Option<(Tensor<1>, Tensor<1>)>,
}

impl Shard {
    fn new(group: Group) -> Self {
        Self {
            group,
            layout: None,
            state: None,
            loaded: None,
            masks: None,
        }
    }

    fn len(&self) -> usize {
        match (&self.state, &self.loaded) {
            (Some(state), _) => state[0].dims()[0],
            (None, Some(loaded)) => loaded[0].len(),
            (None, None) => 0,
        }
    }
}

/// AdamW whose state is sharded over the data-parallel group (ZeRO-1); expert parameters can
/// be sharded over the expert-data-parallel group instead.
///
/// Everything runs as tensor operations on the parameters' device: gradients are summed in
/// f32 tensors ([`GradientBuffer`]), flattened into one buffer per class, reduced with the
/// tensor collectives of [`crate::mappings`], and the AdamW update runs on this rank's shard
/// of f32 master weights; the host reads one number per step, the gradient norm (for
/// clipping and the log).
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

/// A trained parameter: its id, its values flattened (f32, without autodiff), its summed
/// gradient when it has one.
struct Flat {
    id: ParamId,
    values: Tensor<1>,
    grad: Option<Tensor<1>>,
}

impl Flat {
    fn numel(&self) -> usize {
        self.values.dims()[0]
    }
}

fn f32_flat<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.shape().num_elements();
    let t = t.inner().reshape([n]);
    if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    }
}

/// Reads a state tensor to the host (checkpoints only: never during a step).
fn read_state(t: Tensor<1>) -> Result<Vec<f32>> {
    crate::transfers::read(
        "optimizer: a state shard to the host for a checkpoint",
        (t.shape().num_elements() * t.dtype().size()) as u64,
    );
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| ParallelError::Backend {
            context: "reading the optimizer state",
            reason: format!("{e:?}"),
        })
}

/// Gradients of several micro-batches summed as they arrive, like Megatron's f32 `main_grad`
/// buffers: [`add`](Self::add) adds a micro-batch's gradients (flattened f32 tensors on their
/// device; nothing is read to the host) and they can be dropped, so gradient accumulation holds
/// one f32 copy of the gradients however many micro-batches run.
#[derive(Debug, Clone, Default)]
pub struct GradientBuffer {
    sums: HashMap<ParamId, Tensor<1>>,
    micro_batches: usize,
}

struct Accumulate<'a> {
    grads: &'a Gradients,
    sums: &'a mut HashMap<ParamId, Tensor<1>>,
}

impl ModuleVisitor for Accumulate<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let Some(g) = value.grad(self.grads) else {
            return;
        };
        let g = f32_flat(g);
        let sum = match self.sums.remove(&param.id) {
            Some(acc) => acc + g,
            None => g,
        };
        self.sums.insert(param.id, sum);
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
        };
        module.visit(&mut visit);
        self.micro_batches += 1;
        Ok(())
    }

    /// Backward passes added so far.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The summed gradient of a parameter, flattened (f32, on the parameter's device), when it
    /// received one.
    pub fn get(&self, id: ParamId) -> Option<Tensor<1>> {
        self.sums.get(&id).cloned()
    }

    /// Adds flattened `values` to a parameter's gradient (which starts at zero when it has
    /// none).
    pub fn accumulate(&mut self, id: ParamId, values: Tensor<1>) {
        let values = f32_flat(values);
        let sum = match self.sums.remove(&id) {
            Some(acc) => acc + values,
            None => values,
        };
        self.sums.insert(id, sum);
    }
}

/// Collects every trained float parameter's values and summed gradient, in module order.
struct Collect {
    sums: HashMap<ParamId, Tensor<1>>,
    params: Vec<Flat>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            // Not trained by the optimizer (buffers such as an expert bias).
            return;
        }
        let grad = self.sums.remove(&param.id);
        self.params.push(Flat {
            id: param.id,
            values: f32_flat(value),
            grad,
        });
    }
}

/// Writes new values into the parameters, keeping their shapes, dtypes, devices and gradient
/// tracking.
struct Write {
    values: HashMap<ParamId, Tensor<1>>,
}

impl ModuleMapper for Write {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(values) = self.values.remove(&param.id) else {
            return param;
        };
        param.map(|t| {
            let (track, dtype) = (t.is_require_grad(), t.dtype());
            let mut fresh: Tensor<D> = values.reshape(t.shape());
            if dtype != DType::F32 {
                fresh = fresh.cast(dtype);
            }
            // Back under autodiff with the parameter's own checkpointing strategy (operands
            // of one operation must share it).
            if let Some(strategy) = t.gradient_checkpointing_strategy() {
                fresh = fresh
                    .autodiff()
                    .with_gradient_checkpointing_strategy(strategy);
            }
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

    fn shards(&self) -> impl Iterator<Item = &Shard> {
        std::iter::once(&self.dense).chain(self.expert.as_ref())
    }

    /// Number of optimizer-state values (master weights, two moments) this rank holds.
    pub fn state_len(&self) -> usize {
        self.shards().map(|s| 3 * s.len()).sum()
    }

    /// The optimizer state of this rank (step count; master weights and moments of each class's
    /// shard), for checkpoints: read from the device.
    pub fn state(&self) -> Result<OptimizerState> {
        let shards = self
            .shards()
            .map(|s| match (&s.state, &s.loaded) {
                (Some([p, m, v]), _) => Ok([
                    read_state(p.clone())?,
                    read_state(m.clone())?,
                    read_state(v.clone())?,
                ]),
                (None, Some(loaded)) => Ok(loaded.clone()),
                (None, None) => Ok([Vec::new(), Vec::new(), Vec::new()]),
            })
            .collect::<Result<_>>()?;
        Ok(OptimizerState {
            step: self.step,
            shards,
        })
    }

    /// Restores a state saved by [`state`](Self::state) on the same rank and layout (uploaded
    /// to the parameters' device at the next step).
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
        for [master, m, v] in &state.shards {
            if master.len() != m.len() || m.len() != v.len() {
                return Err(ParallelError::InvalidArgument {
                    name: "state",
                    reason: "master weights and moments differ in length".into(),
                });
            }
        }
        for (shard, loaded) in shards.iter_mut().zip(state.shards) {
            shard.loaded = (!loaded[0].is_empty()).then_some(loaded);
            shard.state = None;
            shard.layout = None;
            shard.masks = None;
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
        };
        module.visit(&mut collect);
        let params = collect.params;
        let roles = role_map(&params, roles)?;
        let device = params
            .first()
            .map_or_else(Device::default, |p| p.values.device());
        // Per class (dense, then expert when there is an expert group): reduce, shard and
        // count towards the norm.
        let mut classes = Vec::new();
        let mut sq = Tensor::<1>::zeros([1], &device);
        for is_expert in [false, true] {
            if is_expert && self.expert.is_none() {
                continue;
            }
            if let Some((class, class_sq)) = self.reduce_class(is_expert, &params, &roles)? {
                sq = sq + class_sq;
                classes.push((is_expert, class));
            }
        }
        let sq = mappings::all_reduce(sq, &self.norm_group, ReduceOp::Sum)?;
        crate::transfers::read("optimizer: the squared gradient norm", 4);
        let sq = sq
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ParallelError::Backend {
                context: "reading the gradient norm",
                reason: format!("{e:?}"),
            })?;
        let grad_norm = f64::from(sq.first().copied().unwrap_or(0.0)).sqrt();
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
            let state = shard.state.take().ok_or(ParallelError::InvalidArgument {
                name: "state",
                reason: "the class has no optimizer state".into(),
            })?;
            let state = adamw(config, step, state, class.grads, class.decay, coef);
            let master = state[0].clone();
            shard.state = Some(state);
            let updated =
                mappings::gather_from_sequence_region(master, &shard.group, GatherGrad::Split)?;
            for e in &class.layout.entries {
                values.insert(e.id, updated.clone().narrow(0, e.offset, e.numel));
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
    /// gradient norm (TP-replicated parameters counted once). `None` for a class without
    /// parameters on this rank (then on every rank of its group, which hold the same layers).
    fn reduce_class(
        &mut self,
        is_expert: bool,
        params: &[Flat],
        roles: &HashMap<ParamId, ParamRole>,
    ) -> Result<Option<(ClassShard, Tensor<1>)>> {
        let has_expert_group = self.expert.is_some();
        let (tp, data_shards) = (self.tp.clone(), self.data_shards as f64);
        let shard = self.shard_mut(is_expert)?;
        let members: Vec<(usize, ParamRole)> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (i, roles[&p.id]))
            .filter(|(_, r)| {
                has_expert_group && r.expert == is_expert || !has_expert_group && !is_expert
            })
            .collect();
        if members.is_empty() {
            return Ok(None);
        }
        let layout = layout_for(shard, params, &members)?;
        let device = params[members[0].0].values.device();
        let padding = layout.padded - layout.entries.last().map_or(0, |e| e.offset + e.numel);
        let mut pieces: Vec<Tensor<1>> = layout
            .entries
            .iter()
            .map(|e| {
                params[e.index]
                    .grad
                    .clone()
                    .unwrap_or_else(|| Tensor::zeros([e.numel], &device))
            })
            .collect();
        // 1. Partial gradients of sequence-parallel parameters: sum over TP.
        if tp.size() > 1 {
            let sp: Vec<usize> = (0..layout.entries.len())
                .filter(|&i| layout.entries[i].role.sequence_parallel_grad)
                .collect();
            if !sp.is_empty() {
                let packed = Tensor::cat(sp.iter().map(|&i| pieces[i].clone()).collect(), 0);
                let summed = mappings::all_reduce(packed, &tp, ReduceOp::Sum)?;
                let mut at = 0;
                for &i in &sp {
                    let n = layout.entries[i].numel;
                    pieces[i] = summed.clone().narrow(0, at, n);
                    at += n;
                }
            }
        }
        if padding > 0 {
            pieces.push(Tensor::zeros([padding], &device));
        }
        // 2. Sum over the class's data-parallel group, divided by the number of data shards
        //    (the mean over DP for dense parameters), scattered: this rank's shard.
        let flat = Tensor::cat(pieces, 0);
        let grads = mappings::reduce_scatter_to_sequence_region(flat, &shard.group)?;
        let grads = if data_shards == 1.0 {
            grads
        } else {
            grads / data_shards
        };
        let (start, len) = (layout.shard_start, layout.shard_len);
        if shard.state.is_none() {
            shard.state = Some(match shard.loaded.take() {
                Some([master, m, v]) => {
                    if master.len() != len {
                        return Err(ParallelError::InvalidArgument {
                            name: "state",
                            reason: format!(
                                "the loaded shard has {} values, this layout {len}",
                                master.len()
                            ),
                        });
                    }
                    let upload = |values: Vec<f32>| {
                        crate::transfers::upload(
                            "optimizer: a restored state shard to the device",
                            (values.len() * 4) as u64,
                        );
                        Tensor::<1>::from_data(TensorData::new(values, [len]), &device)
                    };
                    [upload(master), upload(m), upload(v)]
                }
                None => {
                    let mut values: Vec<Tensor<1>> = layout
                        .entries
                        .iter()
                        .map(|e| params[e.index].values.clone())
                        .collect();
                    if padding > 0 {
                        values.push(Tensor::zeros([padding], &device));
                    }
                    [
                        Tensor::cat(values, 0).narrow(0, start, len),
                        Tensor::zeros([len], &device),
                        Tensor::zeros([len], &device),
                    ]
                }
            });
        }
        // 3. Norm contributions, TP-replicated parameters counted once.
        let (decay, once) = shard
            .masks
            .get_or_insert_with(|| masks(&layout, tp.rank(), &device))
            .clone();
        let sq = (grads.clone() * grads.clone() * once).sum();
        Ok(Some((
            ClassShard {
                layout,
                grads,
                decay,
            },
            sq,
        )))
    }
}

/// The weight-decay and norm masks of a class's shard (1 where the value takes weight decay,
/// resp. counts in the gradient norm), built from constant pieces on the device.
fn masks(layout: &Layout, tp_rank: usize, device: &Device) -> (Tensor<1>, Tensor<1>) {
    let (start, len) = (layout.shard_start, layout.shard_len);
    let (mut decay, mut once) = (Vec::new(), Vec::new());
    let mut at = start;
    let piece = |n: usize, on: bool| {
        if on {
            Tensor::<1>::ones([n], device)
        } else {
            Tensor::<1>::zeros([n], device)
        }
    };
    for e in &layout.entries {
        let (lo, hi) = (e.offset.max(start), (e.offset + e.numel).min(start + len));
        if lo >= hi {
            continue;
        }
        let counted = (e.role.tp_split || tp_rank == 0) && !e.role.tied_copy;
        decay.push(piece(hi - lo, e.role.weight_decay));
        once.push(piece(hi - lo, counted));
        at = hi;
    }
    if at < start + len {
        decay.push(piece(start + len - at, false));
        once.push(piece(start + len - at, false));
    }
    (Tensor::cat(decay, 0), Tensor::cat(once, 0))
}

/// A class's reduced gradients on this rank: its layout, its shard of the gradients and
/// which of the shard's values take weight decay.
struct ClassShard {
    layout: Layout,
    grads: Tensor<1>,
    decay: Tensor<1>,
}

/// Every trained parameter's role, or an error naming the first parameter without one (a
/// parameter without a role would be reduced and counted in the norm as a guess), before any
/// collective runs.
fn role_map(
    params: &[Flat],
    roles: &[(ParamId, ParamRole)],
) -> Result<HashMap<ParamId, ParamRole>> {
    let roles: HashMap<ParamId, ParamRole> = roles.iter().copied().collect();
    if let Some((index, p)) = params
        .iter()
        .enumerate()
        .find(|(_, p)| !roles.contains_key(&p.id))
    {
        return Err(ParallelError::InvalidArgument {
            name: "roles",
            reason: format!(
                "trained parameter #{index} ({}, {} values) has no role; list every \
                 parameter (`ParallelParams::param_roles`, or `replicated_roles` for a model \
                 without tensor parallelism)",
                p.id,
                p.numel()
            ),
        });
    }
    Ok(roles)
}

/// AdamW step `step` (1-based, for the bias corrections) on a shard's master weights and
/// moments `[p, m, v]`, as f32 tensor operations, with the gradients scaled by the clipping
/// coefficient `clip` and weight decay where `decay` is 1.
fn adamw(
    c: AdamWConfig,
    step: u64,
    [p, m, v]: [Tensor<1>; 3],
    grads: Tensor<1>,
    decay: Tensor<1>,
    clip: Option<f64>,
) -> [Tensor<1>; 3] {
    let t = step as i32;
    let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
    let g = match clip {
        Some(clip) => grads * clip,
        None => grads,
    };
    let p = if c.weight_decay > 0.0 {
        p.clone() - p * decay * (c.lr * c.weight_decay)
    } else {
        p
    };
    let m = m * c.beta1 + g.clone() * (1.0 - c.beta1);
    let v = v * c.beta2 + g.clone() * g * (1.0 - c.beta2);
    let update = m.clone() / ((v.clone() / bc2).sqrt() + c.eps);
    [p - update * (c.lr / bc1), m, v]
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
                .all(|(e, (i, _))| e.id == params[*i].id && e.numel == params[*i].numel());
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
        let numel = params[index].numel();
        entries.push(Entry {
            index,
            id: params[index].id,
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
