//! Multi-rank check (run under `mpirun -np N`): the recipes' MoE transformer trained with
//! context, pipeline, tensor and expert parallelism equals the same model on one rank.
//!
//! The model is moe-tiny with 8 layers (MoE on every other one) on 256-token sequences. For
//! each layout of the world size it runs 3 AdamW steps: on 2 ranks CP 2, PP 2 (1F1B) and PP 2
//! split 3 + 5 layers with the output layer tied to the embedding; on 4 ranks CP 4, all-gather
//! CP 2 × PP 2, PP 4 (1F1B), PP 2 × 2 virtual stages and PP 4 × 2 (interleaved, tied); on 8
//! ranks TP2·CP2·PP2 with the MoE layers at EP2 folded, with 1F1B and with interleaved + tied.
//! It checks, against one rank
//! (computed on every rank): the loss, aux and z losses of every step; every gradient of the
//! first step (this rank's shard, reduced over ranks as the optimizer reduces it); every
//! parameter after the last step; all within 1e-5 norm-wise.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor};
use burn_moe::lm::{FullTensors, MoeLm};
use burn_parallel::comm::ReduceOp;
use burn_parallel::comm::mpi::MpiWorld;
use burn_parallel::launch::{check_program, rel_error};
use burn_parallel::prelude::{
    GradientBuffer, GroupKind, Mesh, MoeDims, ParallelDims, ParamRole, ProcessGroups,
};
use burn_recipes::recipe::Recipe;
use burn_recipes::train::trainer;

const STEPS: usize = 3;
/// Losses and first-step gradients.
const TOL: f64 = 1e-5;
/// Parameters after 3 AdamW steps: Adam divides each gradient by its own running magnitude,
/// so an element whose gradient is near zero moves by up to the learning rate on rounding
/// noise (summation orders differ between layouts); a missing or doubled reduction moves
/// whole tensors by far more.
const PARAM_TOL: f64 = 1e-3;

type Res<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn recipe(layout: &[String]) -> Res<Recipe> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("moe-tiny.toml");
    let mut o: Vec<String> = [
        "model.layers=8",
        "model.moe_every=2",
        "data.seq_len=256",
        "training.micro_batch=1",
        "training.global_batch=4",
        "training.warmup_steps=1",
        "training.steps=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    o.extend(layout.iter().cloned());
    Recipe::load(&path, &o).map_err(err)
}

/// Float values of a module's parameters (or of their gradients in `grads`), module order.
struct Values<'a> {
    grads: Option<&'a GradientBuffer>,
    out: Vec<(ParamId, Vec<f32>)>,
}

impl ModuleVisitor for Values<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
        let value = p.val();
        let n = value.shape().num_elements();
        let v = match self.grads {
            Some(g) => g.get(p.id).map_or_else(
                || vec![0.0; n],
                |t| {
                    t.into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .unwrap_or_default()
                },
            ),
            None => value
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default(),
        };
        self.out.push((p.id, v));
    }
}

fn values<M: Module>(m: &M, grads: Option<&GradientBuffer>) -> Vec<(ParamId, Vec<f32>)> {
    let mut v = Values {
        grads,
        out: Vec::new(),
    };
    m.visit(&mut v);
    v.out
}

/// One rank's reference: losses of each step, first-step gradients and final weights.
struct Reference {
    reported: Vec<[f64; 3]>,
    grads: FullTensors,
    last: FullTensors,
}

fn reference(tied: bool, device: &Device) -> Res<Reference> {
    let r = recipe(&[format!("model.tie_embeddings={tied}")])?;
    let mut t = trainer(&r, ProcessGroups::single().map_err(err)?, device).map_err(err)?;
    let (mut reported, mut grads) = (Vec::new(), None);
    for step in 0..STEPS {
        let b = t.backward(step).map_err(err)?;
        let rep = t.report(&b).map_err(err)?;
        reported.push([rep.loss, rep.aux, rep.z]);
        if grads.is_none() {
            grads = Some(
                t.model()
                    .map_err(err)?
                    .full_tensors(Some(&b.grads))
                    .map_err(err)?,
            );
        }
        t.apply(b, step).map_err(err)?;
    }
    Ok(Reference {
        reported,
        grads: grads.ok_or("no step")?,
        last: t.model().map_err(err)?.full_tensors(None).map_err(err)?,
    })
}

/// This rank's gradients reduced over ranks the way the optimizer reduces them: partial
/// sequence-parallel gradients summed over TP; dense gradients averaged over DP × CP; expert
/// gradients summed over expert-DP and divided by DP × CP.
fn reduced(
    grads: &[(ParamId, Vec<f32>)],
    roles: &HashMap<ParamId, ParamRole>,
    groups: &ProcessGroups,
) -> Res<Vec<Vec<f32>>> {
    let comm = |k: GroupKind| groups.group(k).communicator().map_err(err);
    let shards = groups.group(GroupKind::DpCp).size() as f32;
    let mut out = Vec::with_capacity(grads.len());
    for (id, g) in grads {
        let role = roles.get(id).copied().unwrap_or(ParamRole {
            tp_split: false,
            sequence_parallel_grad: false,
            weight_decay: true,
            expert: false,
            tied_copy: false,
        });
        let mut g = g.clone();
        if role.sequence_parallel_grad {
            comm(GroupKind::Tp)?
                .all_reduce(&mut g, ReduceOp::Sum)
                .map_err(err)?;
        }
        if role.expert {
            comm(GroupKind::ExpertDp)?
                .all_reduce(&mut g, ReduceOp::Sum)
                .map_err(err)?;
            g.iter_mut().for_each(|v| *v /= shards);
        } else {
            comm(GroupKind::DpCp)?
                .all_reduce(&mut g, ReduceOp::Avg)
                .map_err(err)?;
        }
        out.push(g);
    }
    Ok(out)
}

fn run_layout(
    world: &MpiWorld,
    (layout, tied): &(Vec<&str>, bool),
    want: &Reference,
    device: &Device,
) -> Res<(Vec<String>, Worst)> {
    let mut overrides: Vec<String> = layout.iter().map(|s| format!("parallel.{s}")).collect();
    overrides.push(format!("model.tie_embeddings={tied}"));
    let r = recipe(&overrides)?;
    let n = world.size();
    let (dp, edp) = r.check_world(n).map_err(err)?;
    let p = &r.parallel;
    let mesh = Mesh::new(
        n,
        ParallelDims::new(p.tp, p.cp, dp, p.pp),
        MoeDims::new(p.etp, p.ep, edp),
    )
    .map_err(err)?;
    let groups = ProcessGroups::new(mesh, world.communicator()).map_err(err)?;
    let mut trainer = trainer(&r, groups.clone(), device).map_err(err)?;
    let label = format!(
        "{}{} (rank {})",
        layout.join(" "),
        if *tied { " tied" } else { "" },
        world.rank()
    );
    let mut failures = Vec::new();
    let mut worst = Worst::default();
    let mut check = |what: String, got: &[f32], want: &[f32], tol: f64, slot: &mut f64| {
        let e = rel_error(got, want);
        *slot = slot.max(e);
        if e.is_nan() || e > tol {
            failures.push(format!("{label}: {what} rel err {e:.2e}"));
        }
    };
    let roles: HashMap<ParamId, ParamRole> = trainer.roles().iter().copied().collect();
    let stage = burn_recipes::model::stage_layout(&r).map_err(err)?;
    for step in 0..STEPS {
        let b = trainer.backward(step).map_err(err)?;
        let rep = trainer.report(&b).map_err(err)?;
        let got = [rep.loss, rep.aux, rep.z].map(|v| v as f32);
        for (i, what) in ["loss", "aux loss", "z loss"].into_iter().enumerate() {
            check(
                format!("step {step} {what}"),
                &got[i..=i],
                &[want.reported[step][i] as f32],
                TOL,
                &mut worst.loss,
            );
        }
        if step == 0 {
            let model = trainer.model().map_err(err)?;
            let mine = reduced(&values(model, Some(&b.grads)), &roles, &groups)?;
            let expected =
                MoeLm::from_tensors(&r.model.lm_config(), &want.grads, &groups, &stage, device)
                    .map_err(err)?;
            let expected = values(&expected, None);
            if expected.len() != mine.len() {
                check(
                    "gradient count".into(),
                    &[mine.len() as f32],
                    &[expected.len() as f32],
                    0.0,
                    &mut worst.grad,
                );
            }
            for (i, (g, (_, w))) in mine.iter().zip(&expected).enumerate() {
                check(
                    format!("first-step gradient {i}"),
                    g,
                    w,
                    TOL,
                    &mut worst.grad,
                );
            }
        }
        trainer.apply(b, step).map_err(err)?;
    }
    let expected = MoeLm::from_tensors(&r.model.lm_config(), &want.last, &groups, &stage, device)
        .map_err(err)?;
    let got = values(trainer.model().map_err(err)?, None);
    for (i, ((_, g), (_, w))) in got.iter().zip(&values(&expected, None)).enumerate() {
        check(
            format!("parameter {i} after {STEPS} steps"),
            g,
            w,
            PARAM_TOL,
            &mut worst.param,
        );
    }
    Ok((failures, worst))
}

/// The largest errors seen.
#[derive(Debug, Default, Clone, Copy)]
struct Worst {
    loss: f64,
    grad: f64,
    param: f64,
}

/// Parallel settings and whether the output layer is tied to the embedding.
fn layouts(n: usize) -> Vec<(Vec<&'static str>, bool)> {
    match n {
        2 => vec![
            (vec!["cp=2"], false),
            (vec!["pp=2"], false),
            (vec!["pp=2"], true),
        ],
        4 => vec![
            (vec!["cp=4"], false),
            (vec!["cp=2", "cp_comm=\"allgather\"", "pp=2"], false),
            (vec!["pp=4"], false),
            (vec!["pp=2", "virtual_pp=2"], false),
            (vec!["pp=4", "virtual_pp=2"], true),
        ],
        8 => vec![
            (vec!["tp=2", "cp=2", "pp=2", "ep=2"], false),
            (vec!["tp=2", "cp=2", "pp=2", "ep=2", "virtual_pp=2"], true),
        ],
        _ => Vec::new(),
    }
}

fn main() -> ExitCode {
    check_program(|world| {
        let device = Device::flex().autodiff();
        let want = [reference(false, &device)?, reference(true, &device)?];
        let mut failures = Vec::new();
        let cases = layouts(world.size());
        let mut all = Worst::default();
        for case in &cases {
            let (f, w) = run_layout(world, case, &want[usize::from(case.1)], &device)?;
            failures.extend(f);
            all.loss = all.loss.max(w.loss);
            all.grad = all.grad.max(w.grad);
            all.param = all.param.max(w.param);
        }
        // The largest errors over every rank.
        let mut m = [all.loss as f32, all.grad as f32, all.param as f32];
        world
            .communicator()
            .all_reduce(&mut m, ReduceOp::Max)
            .map_err(err)?;
        let line = format!(
            "recipes equivalence ({} ranks): {} layouts match one rank: losses of {STEPS} \
             steps (largest error {:.1e}), every first-step gradient ({:.1e}), every parameter \
             after {STEPS} AdamW steps ({:.1e})",
            world.size(),
            cases.len(),
            m[0],
            m[1],
            m[2]
        );
        Ok((line, failures))
    })
}
