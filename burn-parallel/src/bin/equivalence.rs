//! Multi-rank check (run under `mpirun -np N`): a small transformer LM (vocab-parallel
//! embedding, sequence-parallel RMSNorms, TP attention and MLP, column-parallel LM head,
//! vocab-parallel cross-entropy) trained for 3 AdamW steps with TP (with and without sequence
//! parallelism) and DP with the ZeRO-1 optimizer must match the same model on one rank: the loss
//! at every step, every gradient of the first step and every parameter after the last step,
//! within 1e-5 relative (norm-wise per tensor). Every rank also runs the single-rank reference.

use std::process::ExitCode;
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Gradients, Int, Tensor, TensorData};
use burn_parallel::comm::mpi::MpiWorld;
use burn_parallel::comm::{Communicator, ReduceOp};
use burn_parallel::launch::{check_program, rel_error};
use burn_parallel::prelude::*;

const VOCAB: usize = 64;
const HIDDEN: usize = 32;
const HEADS: usize = 8;
const FFN: usize = 64;
const SEQ: usize = 8;
const BATCH: usize = 8;
const STEPS: usize = 3;
const TOL: f64 = 1e-5;

type Res<T> = Result<T, String>;

#[derive(Module, Debug)]
struct TinyLm {
    embed: VocabParallelEmbedding,
    norm1: RmsNorm,
    attn: ParallelAttention,
    norm2: RmsNorm,
    mlp: ParallelMlp,
    norm_f: RmsNorm,
    head: ColumnParallelLinear,
    #[module(skip)]
    tp: Group,
}

/// The full weights, in the order of the single-rank model's parameters.
struct Full(Vec<TensorData>);

impl Full {
    fn t1(&self, i: usize, d: &Device) -> Tensor<1> {
        Tensor::from_data(self.0[i].clone(), d)
    }
    fn t2(&self, i: usize, d: &Device) -> Tensor<2> {
        Tensor::from_data(self.0[i].clone(), d)
    }
}

/// `offset` plus values uniform in `[-scale, scale)` from `seed`.
fn seeded_data(seed: u64, shape: Vec<usize>, scale: f32, offset: f32) -> TensorData {
    let n: usize = shape.iter().product();
    let values = burn_parallel::rng::uniform_values(n, seed, scale);
    TensorData::new(
        values.into_iter().map(|v| offset + v).collect::<Vec<_>>(),
        shape,
    )
}

fn initial_weights() -> Full {
    let w = |seed, shape: Vec<usize>| seeded_data(seed, shape, 0.2, 0.0);
    let norm = |seed| seeded_data(seed, vec![HIDDEN], 0.1, 1.0);
    Full(vec![
        w(1, vec![VOCAB, HIDDEN]),
        norm(2),
        w(3, vec![HIDDEN, 3 * HIDDEN]),
        w(4, vec![HIDDEN, HIDDEN]),
        norm(5),
        w(6, vec![HIDDEN, FFN]),
        seeded_data(7, vec![FFN], 0.05, 0.0),
        w(8, vec![FFN, HIDDEN]),
        seeded_data(9, vec![HIDDEN], 0.05, 0.0),
        norm(10),
        w(11, vec![HIDDEN, VOCAB]),
    ])
}

impl TinyLm {
    fn from_full(full: &Full, tp: Group, sp: bool, d: &Device) -> burn_parallel::Result<Self> {
        Ok(Self {
            embed: VocabParallelEmbedding::from_full(full.t2(0, d), tp.clone(), sp)?,
            norm1: RmsNorm::from_full(full.t1(1, d), 1e-6, sp),
            attn: ParallelAttention::from_full(
                full.t2(2, d),
                full.t2(3, d),
                HEADS,
                tp.clone(),
                sp,
            )?,
            norm2: RmsNorm::from_full(full.t1(4, d), 1e-6, sp),
            mlp: ParallelMlp::from_full(
                (full.t2(5, d), full.t1(6, d)),
                (full.t2(7, d), full.t1(8, d)),
                tp.clone(),
                sp,
            )?,
            norm_f: RmsNorm::from_full(full.t1(9, d), 1e-6, sp),
            head: ColumnParallelLinear::from_full(full.t2(10, d), None, tp.clone(), false, sp)?,
            tp,
        })
    }

    /// Mean cross-entropy of next-token prediction over `ids [S, B]`.
    fn loss(
        &self,
        ids: Tensor<2, Int>,
        targets: Tensor<2, Int>,
    ) -> burn_parallel::Result<Tensor<1>> {
        let x = self.embed.forward(ids)?;
        let x = x.clone() + self.attn.forward(self.norm1.forward(x))?;
        let x = x.clone() + self.mlp.forward(self.norm2.forward(x))?;
        lm_loss(
            &self.norm_f,
            LmHead::Linear(&self.head),
            x,
            targets,
            &self.tp,
        )
    }

    fn roles(&self) -> Vec<(ParamId, ParamRole)> {
        let mut out = Vec::new();
        self.embed.param_roles(&mut out);
        self.norm1.param_roles(&mut out);
        self.attn.param_roles(&mut out);
        self.norm2.param_roles(&mut out);
        self.mlp.param_roles(&mut out);
        self.norm_f.param_roles(&mut out);
        self.head.param_roles(&mut out);
        out
    }
}

/// Parameter values (or gradients) in module order.
struct Values<'a> {
    grads: Option<&'a Gradients>,
    out: Vec<TensorData>,
}

impl ModuleVisitor for Values<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        let t = match self.grads {
            Some(g) => value.grad(g).unwrap_or_else(|| value.zeros_like()),
            None => value,
        };
        self.out.push(t.into_data());
    }
}

fn values<M: Module>(m: &M, grads: Option<&Gradients>) -> Vec<TensorData> {
    let mut v = Values {
        grads,
        out: Vec::new(),
    };
    m.visit(&mut v);
    v.out
}

fn f32s(d: &TensorData) -> Vec<f32> {
    d.clone().try_into_vec::<f32>().unwrap_or_default()
}

/// Whether an error is above the tolerance (NaN counts as above).
fn exceeds(err: f64) -> bool {
    err.is_nan() || err > TOL
}

const NAMES: [&str; 11] = [
    "embed.weight",
    "norm1.weight",
    "attn.qkv.weight",
    "attn.out.weight",
    "norm2.weight",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "norm_f.weight",
    "head.weight",
];

fn tokens(device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    // A deterministic sequence [SEQ + 1, BATCH]; inputs are rows 0..SEQ, targets rows 1..=SEQ.
    let all: Vec<i64> = (0..(SEQ + 1) * BATCH)
        .map(|i| ((i * 37 + (i / BATCH) * 11 + 5) % VOCAB) as i64)
        .collect();
    let t = Tensor::<2, Int>::from_data(TensorData::new(all, [SEQ + 1, BATCH]), device);
    (
        t.clone().slice([0..SEQ, 0..BATCH]),
        t.slice([1..SEQ + 1, 0..BATCH]),
    )
}

fn adamw() -> AdamWConfig {
    AdamWConfig {
        lr: 1e-2,
        max_grad_norm: Some(0.5),
        ..AdamWConfig::default()
    }
}

struct Trace {
    losses: Vec<f32>,
    first_grads: Vec<TensorData>,
    params: Vec<TensorData>,
}

/// Trains `model` for STEPS on batch columns `cols` with the optimizer; `loss_avg` averages
/// the loss over data-parallel ranks.
/// `expected_reads`: the optimizer step's host reads (the norm, and one per collective staged
/// through host memory).
fn train(
    mut model: TinyLm,
    mut opt: DistributedAdamW,
    cols: std::ops::Range<usize>,
    loss_avg: &dyn Fn(f32) -> Res<f32>,
    (device, expected_reads): (&Device, usize),
) -> Res<Trace> {
    let (ids, targets) = tokens(device);
    let ids = ids.slice([0..SEQ, cols.clone()]);
    let targets = targets.slice([0..SEQ, cols]);
    let mut losses = Vec::new();
    let mut first_grads = Vec::new();
    for step in 0..STEPS {
        let loss = model
            .loss(ids.clone(), targets.clone())
            .map_err(|e| e.to_string())?;
        let value = loss
            .clone()
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?[0];
        losses.push(loss_avg(value)?);
        let grads = loss.backward();
        burn_parallel::group::check().map_err(|e| e.to_string())?;
        if step == 0 {
            first_grads = values(&model, Some(&grads));
        }
        let roles = model.roles();
        let (stepped, log) = burn_parallel::transfers::measure(|| opt.step(model, &grads, &roles));
        let (next, _stats) = stepped.map_err(|e| e.to_string())?;
        model = next;
        // No parameter or gradient crosses to the host: the step's only reads are the norm and
        // the staging of each collective of a group larger than one rank.
        let staged: Vec<&str> = log.iter().map(|t| t.what).collect();
        let allowed = [
            "optimizer: the squared gradient norm",
            "all_reduce",
            "reduce_scatter",
            "all_gather",
        ];
        if let Some(bad) = staged.iter().find(|w| !allowed.contains(w)) {
            return Err(format!(
                "step {step}: the optimizer moved `{bad}`: {staged:?}"
            ));
        }
        let reads = log
            .iter()
            .filter(|t| t.direction == burn_parallel::transfers::Direction::Read)
            .count();
        if reads != expected_reads {
            return Err(format!(
                "step {step}: {reads} host reads in the optimizer step, expected \
                 {expected_reads}: {staged:?}"
            ));
        }
    }
    Ok(Trace {
        losses,
        first_grads,
        params: values(&model, None),
    })
}

fn run_config(
    world: &Arc<dyn Communicator>,
    tp: usize,
    dp: usize,
    sp: bool,
    reference: &Trace,
    device: &Device,
) -> Res<Vec<String>> {
    let n = world.size();
    let mesh = Mesh::new(n, ParallelDims::new(tp, 1, dp, 1), MoeDims::new(1, 1, n))
        .map_err(|e| e.to_string())?;
    let groups = ProcessGroups::new(mesh, world.clone()).map_err(|e| e.to_string())?;
    let tp_group = groups.group(GroupKind::Tp).clone();
    let dp_group = groups.group(GroupKind::Dp).clone();
    let full = initial_weights();
    let model =
        TinyLm::from_full(&full, tp_group.clone(), sp, device).map_err(|e| e.to_string())?;
    let opt = DistributedAdamW::new(
        adamw(),
        dp_group.clone(),
        tp_group.clone(),
        groups.world().clone(),
    )
    .map_err(|e| e.to_string())?;
    let b = BATCH / dp;
    let d = dp_group.rank();
    let dp_comm = dp_group.communicator().map_err(|e| e.to_string())?;
    let avg = move |v: f32| -> Res<f32> {
        let mut buf = [v];
        dp_comm
            .all_reduce(&mut buf, ReduceOp::Avg)
            .map_err(|e| e.to_string())?;
        Ok(buf[0])
    };
    // The norm; sequence-parallel gradients summed over TP; reduce-scatter and all-gather over
    // DP; the norm's sum over the world.
    let reads = 1 + usize::from(tp > 1 && sp) + 2 * usize::from(dp > 1) + usize::from(n > 1);
    let trace = train(model, opt, d * b..(d + 1) * b, &avg, (device, reads))?;

    let label = format!("tp{tp} dp{dp} sp={sp}");
    let mut failures = Vec::new();
    for (step, (got, want)) in trace.losses.iter().zip(&reference.losses).enumerate() {
        let err = f64::from((got - want).abs()) / f64::from(want.abs());
        if exceeds(err) {
            failures.push(format!(
                "{label}: loss at step {step}: {got} vs {want} (rel {err:.2e})"
            ));
        }
    }
    // Expected local shards: the parallel layout applied to the reference's full tensors.
    // Local gradients are per-DP-rank (and partial over TP for sequence-parallel parameters):
    // reduce them as the optimizer does before comparing.
    let expected_grads = values(
        &TinyLm::from_full(
            &Full(reference.first_grads.clone()),
            tp_group.clone(),
            sp,
            device,
        )
        .map_err(|e| e.to_string())?,
        None,
    );
    let model_for_roles =
        TinyLm::from_full(&full, tp_group.clone(), sp, device).map_err(|e| e.to_string())?;
    let roles = model_for_roles.roles();
    let tp_comm = tp_group.communicator().map_err(|e| e.to_string())?;
    let dp_comm = dp_group.communicator().map_err(|e| e.to_string())?;
    for (i, (got, want)) in trace.first_grads.iter().zip(&expected_grads).enumerate() {
        let mut g = f32s(got);
        if roles[i].1.sequence_parallel_grad {
            tp_comm
                .all_reduce(&mut g, ReduceOp::Sum)
                .map_err(|e| e.to_string())?;
        }
        dp_comm
            .all_reduce(&mut g, ReduceOp::Avg)
            .map_err(|e| e.to_string())?;
        let err = rel_error(&g, &f32s(want));
        if exceeds(err) {
            failures.push(format!("{label}: gradient of {} (rel {err:.2e})", NAMES[i]));
        }
    }
    let expected_params = values(
        &TinyLm::from_full(
            &Full(reference.params.clone()),
            tp_group.clone(),
            sp,
            device,
        )
        .map_err(|e| e.to_string())?,
        None,
    );
    for (i, (got, want)) in trace.params.iter().zip(&expected_params).enumerate() {
        let err = rel_error(&f32s(got), &f32s(want));
        if exceeds(err) {
            failures.push(format!(
                "{label}: {} after {STEPS} steps (rel {err:.2e})",
                NAMES[i]
            ));
        }
    }
    Ok(failures)
}

fn configs(n: usize) -> Vec<(usize, usize, bool)> {
    match n {
        1 => vec![(1, 1, false)],
        2 => vec![(2, 1, false), (2, 1, true), (1, 2, false)],
        4 => vec![(4, 1, true), (2, 2, false), (2, 2, true), (1, 4, false)],
        8 => vec![(8, 1, true), (2, 4, true), (4, 2, false), (1, 8, false)],
        _ => vec![(1, n, false)],
    }
}

fn run(world: &MpiWorld) -> Res<(Vec<String>, usize)> {
    let device = Device::flex().autodiff();
    let comm = world.communicator();
    // The single-rank reference, on every rank.
    let single = Group::single();
    let model = TinyLm::from_full(&initial_weights(), single.clone(), false, &device)
        .map_err(|e| e.to_string())?;
    let opt = DistributedAdamW::new(adamw(), single.clone(), single.clone(), single)
        .map_err(|e| e.to_string())?;
    let reference = train(model, opt, 0..BATCH, &|v| Ok(v), (&device, 1))?;
    if std::env::var("EQ_DEBUG").is_ok() {
        eprintln!("reference losses {:?}", reference.losses);
        for (i, g) in reference.first_grads.iter().enumerate() {
            let v = f32s(g);
            eprintln!(
                "{} grad norm {}",
                NAMES[i],
                v.iter().map(|x| x * x).sum::<f32>().sqrt()
            );
        }
    }
    if reference.losses.iter().any(|l| !l.is_finite())
        || reference.losses.windows(2).any(|w| w[1] >= w[0])
    {
        return Err(format!(
            "the reference loss does not decrease: {:?}",
            reference.losses
        ));
    }
    let mut failures = Vec::new();
    let cases = configs(comm.size());
    for &(tp, dp, sp) in &cases {
        failures.extend(run_config(&comm, tp, dp, sp, &reference, &device)?);
    }
    Ok((failures, cases.len()))
}

fn main() -> ExitCode {
    check_program(|world| {
        let (failures, cases) = run(world)?;
        let line = format!(
            "equivalence ({} ranks): {cases} layouts match one rank \
             (loss, gradients, parameters after {STEPS} AdamW steps)",
            world.size()
        );
        Ok((line, failures))
    })
}
