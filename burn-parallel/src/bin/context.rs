//! Multi-rank check (run under `mpirun -np N`): context-parallel causal attention equals
//! attention over the whole sequence on one rank.
//!
//! For every CP size dividing the world (2, 4, 8; the rest of the ranks are data-parallel
//! replicas), a 256-token causal attention with load-balanced chunks, both ring attention and
//! the all-gather-KV variant: the output on this rank's positions, the summed loss and the
//! gradients of this rank's queries, keys and values match the one-rank reference
//! (`layers::causal_attention` over the whole sequence, computed on every rank) within 1e-5
//! norm-wise. On a 1024-token sequence it measures, with a counting allocator, the largest
//! single buffer (the attention scores: at most 1/CP of the one-rank scores) and the peak heap
//! of ring attention's forward + backward (which must at least about halve when CP doubles).

use std::process::ExitCode;

use burn::tensor::{Device, Tensor, TensorData};
use burn_parallel::comm::ReduceOp;
use burn_parallel::comm::mpi::MpiWorld;
use burn_parallel::context::{ContextLayout, CpAttention, context_attention};
use burn_parallel::launch::{check_program, rel_error};
use burn_parallel::layers::causal_attention;
use burn_parallel::memory::{self, Counting};
use burn_parallel::prelude::*;

#[global_allocator]
static GLOBAL: Counting<std::alloc::System> = Counting(std::alloc::System);

const TOL: f64 = 1e-5;
const SEQ: usize = 256;
/// Sequence of the memory measurement (long enough for the scores to dominate at CP 8).
const SEQ_MEM: usize = 1024;
const HEADS: usize = 2;
const DIM: usize = 16;

type Res<T> = std::result::Result<T, String>;

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + seed * 13) as f32 * 0.37).sin() * 0.8)
        .collect()
}

fn full(seed: usize, device: &Device) -> Tensor<4> {
    full_len(seed, SEQ, device)
}

fn full_len(seed: usize, seq: usize, device: &Device) -> Tensor<4> {
    let shape = [1, HEADS, seq, DIM];
    Tensor::from_data(
        TensorData::new(values(shape.iter().product(), seed), shape),
        device,
    )
}

fn scalar(t: Tensor<1>) -> f32 {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .ok()
        .and_then(|v| v.first().copied())
        .unwrap_or(f32::NAN)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap_or_default()
}

/// Output, loss and (dq, dk, dv) of the whole sequence on one rank.
struct Reference {
    out: Tensor<4>,
    loss: f32,
    grads: [Tensor<4>; 3],
}

fn reference(device: &Device) -> Res<Reference> {
    let [q, k, v] = [0, 1, 2].map(|s| full(s, device).require_grad());
    let w = full(3, device);
    // [S, B, H·D] back to [B, H, S, D].
    let out = causal_attention(q.clone(), k.clone(), v.clone())
        .reshape([SEQ, 1, HEADS, DIM])
        .permute([1, 2, 0, 3]);
    let loss = (out.clone() * w).sum();
    let value = scalar(loss.clone());
    let g = loss.backward();
    let grad = |t: &Tensor<4>| t.grad(&g).ok_or("no reference gradient".to_string());
    Ok(Reference {
        out: out.detach(),
        loss: value,
        grads: [grad(&q)?, grad(&k)?, grad(&v)?],
    })
}

/// Runs one CP size and attention kind; returns the failures.
fn run_case(
    groups: &ProcessGroups,
    kind: CpAttention,
    want: &Reference,
    device: &Device,
) -> Res<Vec<String>> {
    let cp = groups.group(GroupKind::Cp).clone();
    let dp = groups.group(GroupKind::Dp).clone();
    let layout = ContextLayout::new(SEQ, cp.size()).map_err(|e| e.to_string())?;
    let rank = cp.rank();
    let label = format!("cp{} {kind:?}", cp.size());
    let shard = |t: Tensor<4>| layout.shard(t, 2, rank);
    let [q, k, v] = [0, 1, 2].map(|s| shard(full(s, device)).require_grad());
    let w = shard(full(3, device));
    let out = context_attention(q.clone(), k.clone(), v.clone(), &layout, &cp, kind)
        .map_err(|e| format!("{label}: {e}"))?;
    let loss = (out.clone() * w).sum();
    let local = scalar(loss.clone());
    let g = loss.backward();
    burn_parallel::group::check().map_err(|e| format!("{label}: {e}"))?;
    let mut total = [local];
    cp.communicator()
        .map_err(|e| e.to_string())?
        .all_reduce(&mut total, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    let mut failures = Vec::new();
    let mut check = |what: &str, got: Vec<f32>, want: Vec<f32>| {
        let err = rel_error(&got, &want);
        if err.is_nan() || err > TOL {
            failures.push(format!(
                "{label} (cp rank {rank}, dp rank {}): {what} rel err {err:.2e}",
                dp.rank()
            ));
        }
    };
    check("output", host(out), host(shard(want.out.clone())));
    check("loss", total.to_vec(), vec![want.loss]);
    for (name, (t, w)) in ["dq", "dk", "dv"]
        .into_iter()
        .zip([q, k, v].iter().zip(&want.grads))
    {
        let got = t.grad(&g).map(host).unwrap_or_default();
        check(name, got, host(shard(w.clone())));
    }
    Ok(failures)
}

/// Peak heap above the start and largest single buffer of ring attention's forward + backward
/// on a `SEQ_MEM` sequence (one rank's view; the caller takes the maximum over ranks).
fn measure(groups: &ProcessGroups, device: &Device) -> Res<(usize, usize)> {
    let cp = groups.group(GroupKind::Cp).clone();
    let layout = ContextLayout::new(SEQ_MEM, cp.size()).map_err(|e| e.to_string())?;
    let [q, k, v] = [0, 1, 2].map(|s| {
        layout
            .shard(full_len(s, SEQ_MEM, device), 2, cp.rank())
            .require_grad()
    });
    let before = memory::live().unwrap_or(0);
    memory::reset_peak();
    let out =
        context_attention(q, k, v, &layout, &cp, CpAttention::Ring).map_err(|e| e.to_string())?;
    let grads = out.sum().backward();
    burn_parallel::group::check().map_err(|e| e.to_string())?;
    let peak = memory::peak().unwrap_or(0).saturating_sub(before);
    let largest = memory::largest().unwrap_or(0);
    drop(grads);
    Ok((peak, largest))
}

fn run(world: &MpiWorld) -> Res<(Vec<String>, String)> {
    let device = Device::flex().autodiff();
    let comm = world.communicator();
    let n = comm.size();
    let want = reference(&device)?;
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let mut peaks: Vec<(usize, usize, usize)> = Vec::new();
    for cp in [1, 2, 4, 8].into_iter().filter(|c| n.is_multiple_of(*c)) {
        let mesh = Mesh::new(
            n,
            ParallelDims::new(1, cp, n / cp, 1),
            MoeDims::new(1, 1, n),
        )
        .map_err(|e| e.to_string())?;
        let groups = ProcessGroups::new(mesh, comm.clone()).map_err(|e| e.to_string())?;
        for kind in [CpAttention::Ring, CpAttention::AllGather] {
            failures.extend(run_case(&groups, kind, &want, &device)?);
        }
        let (peak, largest) = measure(&groups, &device)?;
        let mut m = [peak as f32, largest as f32];
        comm.all_reduce(&mut m, ReduceOp::Max)
            .map_err(|e| e.to_string())?;
        peaks.push((cp, m[0] as usize, m[1] as usize));
    }
    // The one-rank scores: heads × S² f32.
    let scores = HEADS * SEQ_MEM * SEQ_MEM * 4;
    for (i, &(cp, peak, largest)) in peaks.iter().enumerate() {
        report.push(format!(
            "cp{cp}: peak {} KiB, largest buffer {} KiB",
            peak / 1024,
            largest / 1024
        ));
        if largest > scores / cp {
            failures.push(format!(
                "cp{cp}: a {largest} B buffer exceeds 1/CP of the one-rank scores ({} B)",
                scores / cp
            ));
        }
        if let Some(&(c0, p0, _)) = i.checked_sub(1).and_then(|j| peaks.get(j))
            && (peak as f64) > 0.6 * p0 as f64
        {
            failures.push(format!(
                "ring attention peak heap does not fall as 1/CP: cp{c0} {p0} B, cp{cp} {peak} B"
            ));
        }
    }
    Ok((failures, report.join("; ")))
}

fn main() -> ExitCode {
    check_program(|world| {
        let (failures, peaks) = run(world)?;
        let line = format!(
            "context ({} ranks): ring and all-gather attention match one rank \
             (output, loss, dq/dk/dv); ring attention on {SEQ_MEM} tokens: {peaks}",
            world.size()
        );
        Ok((line, failures))
    })
}
