//! GPU check (run by `scripts/gpu-check run`): every collective of the NCCL engine on a
//! one-rank communicator against its definition, f32 and bf16: on host slices, and (built with
//! `cuda`) every tensor collective of `ParallelBackend` on a CUDA tensor's device memory, with
//! no host transfer counted. One GPU cannot hold an NCCL
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
    // Point to point on one rank: a posted send to itself goes out in the receive's group.
    let r = comm
        .post_send(x.clone(), 0, 7)
        .and_then(|()| comm.recv(x.len(), 0, 7));
    check("post_send + recv (tag 7)", r, &x);
    let r = comm
        .post_send(x.clone(), 0, 1)
        .and_then(|()| comm.recv(x.len(), 0, 2));
    let tag_error = matches!(&r, Err(e) if e.to_string().contains("tag 1"));
    check(
        "a receive of the wrong tag is an error naming the tag sent",
        Ok(vec![f32::from(u8::from(tag_error))]),
        &[1.0],
    );
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
    #[cfg(feature = "cuda")]
    tensor_checks(comm, device, &mut failures, &mut passed);
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

/// The tensor collectives on CUDA tensors of a one-rank NCCL group: each equals its input (one
/// rank), keeps the dtype, and moves nothing through the host (`transfers::measure`).
#[cfg(feature = "cuda")]
fn tensor_checks(comm: NcclComm, device: usize, failures: &mut Vec<String>, passed: &mut usize) {
    use burn::backend::Dispatch;
    use burn::tensor::{DType, Device, Tensor, TensorData};
    use burn_parallel::group::Group;
    use burn_parallel::ops::{GatherGrad, ParallelBackend};

    let group = match Group::new(Arc::new(comm)) {
        Ok(g) => g,
        Err(e) => {
            failures.push(format!("group: {e}"));
            return;
        }
    };
    let id = group.id();
    let gpu = Device::cuda(device);
    let values: Vec<f32> = (0..48).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
    type Op = Box<dyn Fn(Tensor<2>) -> Tensor<2>>;
    let on = |f: fn(
        <Dispatch as burn::backend::BackendTypes>::FloatTensorPrimitive,
        burn_parallel::group::GroupId,
    ) -> <Dispatch as burn::backend::BackendTypes>::FloatTensorPrimitive|
     -> Op {
        Box::new(move |x: Tensor<2>| Tensor::from_dispatch(f(x.into_dispatch(), id)))
    };
    let ops: Vec<(&str, Op)> = vec![
        (
            "all_reduce sum",
            on(|x, g| Dispatch::coll_all_reduce(x, g, ReduceOp::Sum)),
        ),
        (
            "all_reduce max",
            on(|x, g| Dispatch::coll_all_reduce(x, g, ReduceOp::Max)),
        ),
        ("reduce_from_region", on(Dispatch::coll_reduce_from_region)),
        (
            "gather dim 0",
            on(|x, g| Dispatch::coll_gather(x, g, 0, GatherGrad::Split)),
        ),
        (
            "gather dim 1",
            on(|x, g| Dispatch::coll_gather(x, g, 1, GatherGrad::Split)),
        ),
        (
            "reduce_scatter dim 0",
            on(|x, g| Dispatch::coll_reduce_scatter(x, g, 0)),
        ),
        (
            "reduce_scatter dim 1",
            on(|x, g| Dispatch::coll_reduce_scatter(x, g, 1)),
        ),
        (
            "gather_v",
            on(|x, g| Dispatch::coll_gather_v(x, g, vec![8])),
        ),
        (
            "reduce_scatter_v",
            on(|x, g| Dispatch::coll_reduce_scatter_v(x, g, vec![8])),
        ),
        (
            "all_to_all_v",
            on(|x, g| Dispatch::coll_all_to_all_v(x, g, vec![8], vec![8])),
        ),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (name, op) in &ops {
            let what = format!("tensor {name} {dtype:?} on device memory");
            let x =
                Tensor::<2>::from_data(TensorData::new(values.clone(), [8, 6]), &gpu).cast(dtype);
            // Finish the upload before counting.
            let _ = x.clone().sum().into_scalar::<f32>();
            // The device path returns once NCCL's stream is drained: nothing left to wait for.
            let (y, log) = burn_parallel::transfers::measure(|| op(x));
            if let Err(e) = burn_parallel::group::check_group(&group) {
                failures.push(format!("{what}: {e}"));
                continue;
            }
            if !log.is_empty() {
                failures.push(format!("{what}: host transfers {log:?}"));
                continue;
            }
            if y.dtype() != dtype {
                failures.push(format!("{what}: dtype {:?}", y.dtype()));
                continue;
            }
            let got: Vec<f32> = match y.cast(DType::F32).into_data().try_to_vec::<f32>() {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("{what}: {e:?}"));
                    continue;
                }
            };
            if got == values {
                *passed += 1;
                println!("{what}: ok, no host transfer");
            } else {
                failures.push(format!(
                    "{what}: first {:?}, want {:?}",
                    got.first(),
                    values.first()
                ));
            }
        }
    }
}
