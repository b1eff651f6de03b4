//! Multi-rank check (run under `mpirun -np N`): pipeline parallelism equals one rank.
//!
//! An 8-layer transformer LM (embedding, blocks of RMSNorm + attention + RMSNorm + MLP, final
//! norm, head, cross-entropy) is trained for 3 AdamW steps on 4 micro-batches per data-parallel
//! rank, split over PP stages (the rest of the ranks are data-parallel replicas) with GPipe,
//! 1F1B and interleaved 1F1B (2 virtual stages): every micro-batch's loss, every gradient of the
//! first step and every parameter after the last step must match the same model trained on one
//! rank within 1e-5 (norm-wise per tensor). On one rank the interleaved schedule still runs
//! (two chunks, messages through the local mailbox).
//!
//! With `PIPELINE_P2P_IN_ORDER=1` the pipeline group's messages are matched by their order per
//! peer, as NCCL matches them ([`InOrder`]): a schedule that relied on MPI's tag matching fails.

use std::process::ExitCode;
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_parallel::comm::mpi::MpiWorld;
use burn_parallel::comm::{InOrder, ReduceOp};
use burn_parallel::launch::{check_program, rel_error};
use burn_parallel::pipeline::{StageOutput, run_stage};
use burn_parallel::prelude::*;
use burn_parallel::schedule::{Schedule, ScheduleKind};

const VOCAB: usize = 32;
const HIDDEN: usize = 16;
const HEADS: usize = 4;
const FFN: usize = 32;
const LAYERS: usize = 8;
const SEQ: usize = 8;
const MICRO: usize = 2;
const MICROBATCHES: usize = 4;
const STEPS: usize = 3;
const TOL: f64 = 1e-5;
/// See the module docs.
const IN_ORDER_ENV: &str = "PIPELINE_P2P_IN_ORDER";

type Res<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
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

/// Weights of the whole model: embedding, 8 per block, final norm, head.
#[derive(Clone)]
struct Weights(Vec<TensorData>);

const PER_BLOCK: usize = 8;

impl Weights {
    fn initial() -> Self {
        let w = |seed, shape: Vec<usize>| seeded_data(seed, shape, 0.3, 0.0);
        let norm = |seed| seeded_data(seed, vec![HIDDEN], 0.1, 1.0);
        let mut all = vec![w(1, vec![VOCAB, HIDDEN])];
        for l in 0..LAYERS as u64 {
            let s = 10 + 10 * l;
            all.extend([
                norm(s),
                w(s + 1, vec![HIDDEN, 3 * HIDDEN]),
                w(s + 2, vec![HIDDEN, HIDDEN]),
                norm(s + 3),
                w(s + 4, vec![HIDDEN, FFN]),
                seeded_data(s + 5, vec![FFN], 0.05, 0.0),
                w(s + 6, vec![FFN, HIDDEN]),
                seeded_data(s + 7, vec![HIDDEN], 0.05, 0.0),
            ]);
        }
        all.push(norm(5));
        all.push(w(6, vec![HIDDEN, VOCAB]));
        Self(all)
    }

    fn t1(&self, i: usize, d: &Device) -> Tensor<1> {
        Tensor::from_data(self.0[i].clone(), d)
    }

    fn t2(&self, i: usize, d: &Device) -> Tensor<2> {
        Tensor::from_data(self.0[i].clone(), d)
    }
}

#[derive(Module, Debug)]
struct Block {
    norm1: RmsNorm,
    attn: ParallelAttention,
    norm2: RmsNorm,
    mlp: ParallelMlp,
}

impl Block {
    fn new(w: &Weights, layer: usize, tp: &Group, d: &Device) -> burn_parallel::Result<Self> {
        let i = 1 + layer * PER_BLOCK;
        Ok(Self {
            norm1: RmsNorm::from_full(w.t1(i, d), 1e-6, false),
            attn: ParallelAttention::from_full(
                w.t2(i + 1, d),
                w.t2(i + 2, d),
                HEADS,
                tp.clone(),
                false,
            )?,
            norm2: RmsNorm::from_full(w.t1(i + 3, d), 1e-6, false),
            mlp: ParallelMlp::from_full(
                (w.t2(i + 4, d), w.t1(i + 5, d)),
                (w.t2(i + 6, d), w.t1(i + 7, d)),
                tp.clone(),
                false,
            )?,
        })
    }

    fn forward(&self, x: Tensor<3>) -> burn_parallel::Result<Tensor<3>> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x))?;
        Ok(x.clone() + self.mlp.forward(self.norm2.forward(x))?)
    }
}

/// The part of the model one pipeline stage holds: the blocks of each of its chunks, the
/// embedding on the first virtual stage, the final norm and head on the last.
#[derive(Module, Debug)]
struct Stage {
    embed: Option<VocabParallelEmbedding>,
    chunks: Vec<Vec<Block>>,
    norm_f: Option<RmsNorm>,
    head: Option<ColumnParallelLinear>,
    #[module(skip)]
    tp: Group,
}

impl Stage {
    /// Stage `stage` of `stages` with `chunks` virtual stages each (one stage, one chunk: the
    /// whole model).
    fn new(
        w: &Weights,
        stage: usize,
        stages: usize,
        chunks: usize,
        tp: &Group,
        d: &Device,
    ) -> burn_parallel::Result<Self> {
        let per = LAYERS / (stages * chunks);
        let last_vs = stages * chunks - 1;
        let blocks = (0..chunks)
            .map(|c| {
                let vs = c * stages + stage;
                (vs * per..(vs + 1) * per)
                    .map(|l| Block::new(w, l, tp, d))
                    .collect::<burn_parallel::Result<Vec<_>>>()
            })
            .collect::<burn_parallel::Result<Vec<_>>>()?;
        let holds_last = (chunks - 1) * stages + stage == last_vs;
        let n = w.0.len();
        Ok(Self {
            embed: if stage == 0 {
                Some(VocabParallelEmbedding::from_full(
                    w.t2(0, d),
                    tp.clone(),
                    false,
                )?)
            } else {
                None
            },
            chunks: blocks,
            norm_f: holds_last.then(|| RmsNorm::from_full(w.t1(n - 2, d), 1e-6, false)),
            head: if holds_last {
                Some(ColumnParallelLinear::from_full(
                    w.t2(n - 1, d),
                    None,
                    tp.clone(),
                    false,
                    false,
                )?)
            } else {
                None
            },
            tp: tp.clone(),
        })
    }

    fn chunk(
        &self,
        chunk: usize,
        input: Option<Tensor<3>>,
        ids: &Tensor<2, Int>,
        targets: &Tensor<2, Int>,
        scale: f64,
    ) -> burn_parallel::Result<StageOutput> {
        let mut x = match (input, &self.embed) {
            (Some(x), _) => x,
            (None, Some(embed)) => embed.forward(ids.clone())?,
            (None, None) => {
                return Err(ParallelError::InvalidArgument {
                    name: "input",
                    reason: "no input and no embedding".into(),
                });
            }
        };
        for block in &self.chunks[chunk] {
            x = block.forward(x)?;
        }
        match (&self.norm_f, &self.head) {
            (Some(norm), Some(head)) if chunk + 1 == self.chunks.len() => Ok(StageOutput::loss(
                lm_loss(norm, LmHead::Linear(head), x, targets.clone(), &self.tp)? * scale,
            )),
            _ => Ok(StageOutput::activation(x, None)),
        }
    }
}

/// Float values (or gradients) of a module, in module order.
struct Values<'a> {
    grads: Option<&'a GradientBuffer>,
    out: Vec<Vec<f32>>,
}

impl ModuleVisitor for Values<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let v = match self.grads {
            Some(g) => g
                .get(param.id)
                .map(|t| {
                    t.into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .unwrap_or_default()
                })
                .unwrap_or_default(),
            None => param
                .val()
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default(),
        };
        self.out.push(v);
    }
}

fn values<M: Module>(m: &M, grads: Option<&GradientBuffer>) -> Vec<Vec<f32>> {
    let mut v = Values {
        grads,
        out: Vec::new(),
    };
    m.visit(&mut v);
    v.out
}

/// The weights of a whole-model stage, read back (values or gradients) into `Weights` order.
fn as_weights(whole: &Stage, grads: Option<&GradientBuffer>) -> Weights {
    let shapes = Weights::initial();
    Weights(
        values(whole, grads)
            .into_iter()
            .zip(&shapes.0)
            .map(|(v, s)| TensorData::new(v, s.shape().clone()))
            .collect(),
    )
}

/// Token ids and next-token targets of micro-batch `mb` of data-parallel rank `dp_rank`.
fn batch(dp_rank: usize, mb: usize, d: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let seq = |i: usize, t: usize| ((i * 7 + t * t * 3 + i * t) % VOCAB) as i64;
    let first = (dp_rank * MICROBATCHES + mb) * MICRO;
    let ids = |off: usize| {
        let v: Vec<i64> = (0..SEQ)
            .flat_map(|t| (0..MICRO).map(move |b| seq(first + b, t + off)))
            .collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [SEQ, MICRO]), d)
    };
    (ids(0), ids(1))
}

fn adamw() -> AdamWConfig {
    AdamWConfig {
        lr: 0.02,
        max_grad_norm: Some(1.0),
        ..AdamWConfig::default()
    }
}

/// What training produced: losses per step and micro-batch (flattened over DP ranks in order),
/// first-step gradients and final weights of the whole model.
struct Trace {
    losses: Vec<Vec<f64>>,
    first_grads: Weights,
    last: Weights,
}

fn reference(dp: usize, d: &Device) -> Res<Trace> {
    let single = Group::single();
    let mut model = Stage::new(&Weights::initial(), 0, 1, 1, &single, d).map_err(err)?;
    let mut opt = DistributedAdamW::new(adamw(), single.clone(), single.clone(), single.clone())
        .map_err(err)?;
    let (mut losses, mut first_grads) = (Vec::new(), None);
    for _ in 0..STEPS {
        let mut grads = GradientBuffer::new();
        let mut step_losses = Vec::new();
        for r in 0..dp {
            for mb in 0..MICROBATCHES {
                let (ids, targets) = batch(r, mb, d);
                let scale = 1.0 / (dp * MICROBATCHES) as f64;
                let loss = model
                    .chunk(0, None, &ids, &targets, scale)
                    .map_err(err)?
                    .loss
                    .ok_or("the whole model returned no loss")?;
                let v = loss
                    .clone()
                    .into_data()
                    .convert::<f64>()
                    .try_into_vec::<f64>()
                    .map_err(|e| format!("{e:?}"))?;
                step_losses.push(v[0] / scale);
                grads.add(&model, &loss.backward()).map_err(err)?;
            }
        }
        if first_grads.is_none() {
            first_grads = Some(as_weights(&model, Some(&grads)));
        }
        losses.push(step_losses);
        let roles = replicated_roles(&model); // TP 1: every parameter replicated
        model = opt.step_buffered(model, grads, &roles).map_err(err)?.0;
    }
    Ok(Trace {
        losses,
        first_grads: first_grads.ok_or("no steps")?,
        last: as_weights(&model, None),
    })
}

fn run_case(
    world: &MpiWorld,
    pp: usize,
    kind: ScheduleKind,
    want: &Trace,
    d: &Device,
) -> Res<Vec<String>> {
    let comm = world.communicator();
    let n = comm.size();
    let dp_size = n / pp;
    let mesh = Mesh::new(
        n,
        ParallelDims::new(1, 1, dp_size, pp),
        MoeDims::new(1, 1, dp_size),
    )
    .map_err(err)?;
    let groups = ProcessGroups::new(mesh, comm.clone()).map_err(err)?;
    let (mut pp_group, dp) = (
        groups.group(GroupKind::Pp).clone(),
        groups.group(GroupKind::Dp).clone(),
    );
    if std::env::var(IN_ORDER_ENV).is_ok_and(|v| v == "1") {
        // Messages matched by their order per peer, as NCCL matches them.
        let inner = pp_group.communicator().map_err(err)?;
        pp_group = Group::new(Arc::new(InOrder::new(inner))).map_err(err)?;
    }
    let tp = groups.group(GroupKind::Tp).clone();
    let schedule = Schedule::new(kind, pp, MICROBATCHES).map_err(err)?;
    let (stage, chunks) = (pp_group.rank(), schedule.chunks());
    let mut model = Stage::new(&Weights::initial(), stage, pp, chunks, &tp, d).map_err(err)?;
    let mut opt = DistributedAdamW::new(adamw(), dp.clone(), tp.clone(), groups.world().clone())
        .map_err(err)?;
    let label = format!(
        "pp{pp} dp{dp_size} {kind:?} (stage {stage}, dp rank {})",
        dp.rank()
    );
    let mut failures = Vec::new();
    let mut check = |what: String, got: &[f32], want: &[f32]| {
        let e = rel_error(got, want);
        if e.is_nan() || e > TOL {
            failures.push(format!("{label}: {what} rel err {e:.2e}"));
        }
    };
    for step in 0..STEPS {
        let run = run_stage(
            &schedule,
            &pp_group,
            &model,
            ([SEQ, MICRO, HIDDEN], burn::tensor::FloatDType::F32),
            d,
            |c, mb, input| {
                let (ids, targets) = batch(dp.rank(), mb, d);
                model.chunk(c, input, &ids, &targets, 1.0 / MICROBATCHES as f64)
            },
        )
        .map_err(err)?;
        // Losses live on the last stage: share them over the pipeline, then gather over DP.
        let mut mine = vec![0f32; MICROBATCHES];
        for (slot, l) in mine.iter_mut().zip(&run.losses) {
            *slot = (*l * MICROBATCHES as f64) as f32;
        }
        pp_group
            .communicator()
            .map_err(err)?
            .all_reduce(&mut mine, ReduceOp::Sum)
            .map_err(err)?;
        let all = dp
            .communicator()
            .map_err(err)?
            .all_gather(&mine)
            .map_err(err)?;
        let want_l: Vec<f32> = want.losses[step].iter().map(|&v| v as f32).collect();
        check(format!("step {step} losses"), &all, &want_l);
        if step == 0 {
            // This stage's gradients against the same stage cut from the reference's.
            let reference =
                Stage::new(&want.first_grads, stage, pp, chunks, &tp, d).map_err(err)?;
            // Gradients are summed over DP inside the optimizer; compare the DP mean.
            let got = values(&model, Some(&run.grads));
            let mut flat: Vec<f32> = got.iter().flatten().copied().collect();
            dp.communicator()
                .map_err(err)?
                .all_reduce(&mut flat, ReduceOp::Avg)
                .map_err(err)?;
            // The reference's gradient is the mean over every DP rank's micro-batches.
            let mut at = 0;
            for (i, w) in values(&reference, None).iter().enumerate() {
                check(
                    format!("first-step gradient {i}"),
                    &flat[at..at + w.len()],
                    w,
                );
                at += w.len();
            }
        }
        let roles = replicated_roles(&model); // TP 1: every parameter replicated
        model = opt.step_buffered(model, run.grads, &roles).map_err(err)?.0;
    }
    let reference = Stage::new(&want.last, stage, pp, chunks, &tp, d).map_err(err)?;
    for (i, (got, w)) in values(&model, None)
        .iter()
        .zip(values(&reference, None))
        .enumerate()
    {
        check(format!("parameter {i} after {STEPS} steps"), got, &w);
    }
    Ok(failures)
}

fn run(world: &MpiWorld) -> Res<(Vec<String>, usize)> {
    let d = Device::flex().autodiff();
    let n = world.size();
    let mut failures = Vec::new();
    let mut cases = 0;
    for pp in [1, 2, 4]
        .into_iter()
        .filter(|p| n.is_multiple_of(*p) && (*p > 1 || n == 1))
    {
        let want = reference(n / pp, &d)?;
        for kind in [
            ScheduleKind::GPipe,
            ScheduleKind::OneFOneB,
            ScheduleKind::Interleaved {
                virtual_stages: 2,
                group: None,
            },
        ] {
            failures.extend(run_case(world, pp, kind, &want, &d)?);
            cases += 1;
        }
    }
    Ok((failures, cases))
}

fn main() -> ExitCode {
    check_program(|world| {
        let (failures, cases) = run(world)?;
        let line = format!(
            "pipeline ({} ranks): {cases} layouts × schedules match one rank (losses, \
             first-step gradients, parameters after {STEPS} AdamW steps)",
            world.size()
        );
        Ok((line, failures))
    })
}
