//! GPU check (run by `scripts/gpu-check run`): every collective of the NCCL engine on a
//! one-rank communicator against its definition, f32 and bf16. One GPU cannot hold an NCCL
//! communicator of several ranks (NCCL refuses two ranks on one device), so the multi-rank
//! logic is checked on MPI ranks; this checks the engine itself. Prints one line per
//! collective and `nccl: N checks passed`; exit 1 on a mismatch, 2 when NCCL cannot start
//! (no GPU, no `libnccl.so`).

use std::process::ExitCode;
use std::sync::Arc;

use burn_parallel::comm::nccl::NcclComm;
use burn_parallel::comm::{Communicator, ReduceOp, SingleRank};
use half::bf16;

fn main() -> ExitCode {
    let device = match burn_parallel::launch::local_device_index() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let comm = match NcclComm::new(Arc::new(SingleRank::new()), device) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let x: Vec<f32> = (0..1000).map(|i| (i % 23) as f32 * 0.25 - 2.0).collect();
    let mut failures = Vec::new();
    let mut passed = 0;
    let mut check =
        |what: &str, got: Result<Vec<f32>, burn_parallel::ParallelError>, want: &[f32]| match got {
            Ok(got) if got == want => {
                passed += 1;
                println!("{what}: ok");
            }
            Ok(got) => failures.push(format!(
                "{what}: {} values, first {:?}, want {} values, first {:?}",
                got.len(),
                got.first(),
                want.len(),
                want.first()
            )),
            Err(e) => failures.push(format!("{what}: {e}")),
        };
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
        let mut buf = x.clone();
        let r = comm.all_reduce(&mut buf, op).map(|()| buf);
        check(&format!("all_reduce {op:?}"), r, &x);
    }
    check("all_gather", comm.all_gather(&x), &x);
    check("all_gather_v", comm.all_gather_v(&x, &[x.len()]), &x);
    check("reduce_scatter", comm.reduce_scatter(&x, ReduceOp::Sum), &x);
    check(
        "all_to_all_v",
        comm.all_to_all_v(&x, &[x.len()], &[x.len()]),
        &x,
    );
    let mut buf = x.clone();
    let r = comm.broadcast(&mut buf, 0).map(|()| buf);
    check("broadcast", r, &x);
    check("barrier", comm.barrier().map(|()| Vec::new()), &[]);
    let xb: Vec<bf16> = x.iter().copied().map(bf16::from_f32).collect();
    let mut buf = xb.clone();
    let r = comm
        .all_reduce_bf16(&mut buf, ReduceOp::Sum)
        .map(|()| buf.iter().map(|v| v.to_f32()).collect());
    check("all_reduce bf16", r, &x);
    let r = comm
        .all_gather_bf16(&xb)
        .map(|v| v.iter().map(|v| v.to_f32()).collect());
    check("all_gather bf16", r, &x);
    if failures.is_empty() {
        println!("nccl: {passed} checks passed on GPU {device}");
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            eprintln!("FAIL {f}");
        }
        ExitCode::FAILURE
    }
}
