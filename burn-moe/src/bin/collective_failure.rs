//! Multi-rank check (run under `mpirun --enable-recovery -np 2`): a collective that fails in
//! the backward pass never hands back silent data, and its error reaches the user before a
//! second training step runs, with an optimizer of the user's own.
//!
//! Both ranks build an expert-parallel MoE layer (EP 2, all-to-all dispatcher) and run a
//! forward pass; then the last rank kills itself (SIGKILL) before its backward pass. The
//! survivor's backward all-to-all loses its peer: the input gradient must be NaN (not zeros),
//! and then, before any second step, the layer's next forward, `group::check` and a
//! `DistributedAdamW` step must each return the typed error naming the operation, the group and
//! the dead rank. Exit codes: 3 = every check held, 1 = anything else. Each rank's verdict goes
//! to `$BURN_PARALLEL_REPORT_DIR/rank-R.txt` when that is set.

use std::io::Write;
use std::process::ExitCode;

use burn::tensor::{Device, Tensor, TensorData};
use burn_moe::prelude::*;
use burn_parallel::comm::mpi::{MpiConfig, MpiWorld};
use burn_parallel::error::ParallelError;
use burn_parallel::prelude::{
    AdamWConfig, DistributedAdamW, GroupKind, Mesh, MoeDims, ParallelDims, ParallelParams,
    ProcessGroups,
};

const H: usize = 8;
const F: usize = 8;
const E: usize = 4;

fn tensor<const D: usize>(seed: usize, shape: [usize; D], d: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| 0.5 * ((seed as f32 * 12.9898 + i as f32 * 78.233).sin() * 43758.547).fract())
        .collect();
    Tensor::from_data(TensorData::new(v, shape), d)
}

fn report(rank: usize, line: &str) {
    if let Some(dir) = std::env::var_os("BURN_PARALLEL_REPORT_DIR") {
        let _ = std::fs::write(
            std::path::Path::new(&dir).join(format!("rank-{rank}.txt")),
            line,
        );
    }
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{line}\n").as_bytes());
}

/// The error must be a failed collective of the EP group whose cause names the dead rank.
fn names_the_failure(err: &ParallelError, victim: usize) -> Result<(), String> {
    match err {
        ParallelError::CollectiveFailed { op, group, cause } => {
            let lost =
                matches!(&**cause, ParallelError::PeerLost { lost, .. } if lost.contains(&victim));
            if *op == "all_to_all_v" && group.contains("ep group") && lost {
                Ok(())
            } else {
                Err(format!("the wrong failure: {err}"))
            }
        }
        other => Err(format!("not a collective failure: {other}")),
    }
}

fn survivor(
    layer: &MoeLayer,
    x: &Tensor<3>,
    out: MoeOutput,
    groups: &ProcessGroups,
    victim: usize,
) -> Result<String, String> {
    let loss = out.total_aux_loss().ok_or("no aux loss")? + out.output.sum();
    let grads = loss.backward();
    // 1. The gradient of a failed backward collective is NaN, never plausible values.
    let gx: Vec<f32> = x
        .grad(&grads)
        .ok_or("no input gradient")?
        .into_data()
        .iter::<f32>()
        .collect();
    if !gx.iter().any(|g| g.is_nan()) {
        return Err(format!(
            "the failed backward handed back finite gradients (first values {:?})",
            &gx[..4.min(gx.len())]
        ));
    }
    // 2. A user's own optimizer would now step on those gradients; the second step's forward
    //    must refuse with the failure before doing any work.
    let err = match layer.forward(x.clone().detach()) {
        Ok(_) => return Err("the second step's forward ran on a failed group".into()),
        Err(MoeError::Communication(e)) => e,
        Err(other) => return Err(format!("the second forward failed otherwise: {other}")),
    };
    names_the_failure(&err, victim)?;
    // 3. The process-wide check and the distributed optimizer say the same.
    names_the_failure(
        &burn_parallel::group::check()
            .err()
            .ok_or("group::check saw nothing")?,
        victim,
    )?;
    let dp = groups.group(GroupKind::Dp).clone();
    let tp = groups.group(GroupKind::Tp).clone();
    let mut roles = Vec::new();
    layer.param_roles(&mut roles);
    let mut opt = DistributedAdamW::new(AdamWConfig::default(), dp, tp, groups.world().clone())
        .map_err(|e| e.to_string())?
        .with_expert_group(groups.group(GroupKind::ExpertDp).clone());
    match opt.step(layer.clone(), &grads, &roles) {
        Ok(_) => return Err("DistributedAdamW stepped after a failed collective".into()),
        Err(e) => names_the_failure(&e, victim)?,
    }
    Ok(err.to_string())
}

fn main() -> ExitCode {
    let world = match MpiConfig::from_env().and_then(MpiWorld::init) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let comm = world.communicator();
    let (rank, n) = (comm.rank(), comm.size());
    let victim = n - 1;
    let setup = || -> Result<(MoeLayer, ProcessGroups), String> {
        let mesh = Mesh::new(n, ParallelDims::new(1, 1, n, 1), MoeDims::new(1, n, 1))
            .map_err(|e| e.to_string())?;
        let groups = ProcessGroups::new(mesh, comm.clone()).map_err(|e| e.to_string())?;
        let d = Device::flex().autodiff();
        let router = Router::from_weight(
            RouterConfig::new(H, E, 2).with_aux_loss_coeff(1e-2),
            tensor(1, [E, H], &d),
        )
        .map_err(|e| e.to_string())?;
        let experts = Experts::from_weights(
            ExpertsConfig::new(E, H, F),
            tensor(2, [E, H, 2 * F], &d),
            tensor(3, [E, F, H], &d),
        )
        .map_err(|e| e.to_string())?;
        let layer = MoeLayer::new(router, experts, None)
            .and_then(|l| l.parallelize(&groups, DispatcherKind::AllToAll))
            .map_err(|e| e.to_string())?;
        Ok((layer, groups))
    };
    let verdict = setup().and_then(|(layer, groups)| {
        let x = tensor(10 + rank, [4, 2, H], &Device::flex().autodiff()).require_grad();
        let out = layer.forward(x.clone()).map_err(|e| e.to_string())?;
        if rank == victim {
            // SIGKILL after the forward pass: no clean-up, like a crashed node.
            let pid = std::process::id().to_string();
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid])
                .status();
            std::thread::sleep(std::time::Duration::from_secs(60));
            return Err("the victim outlived SIGKILL".into());
        }
        survivor(&layer, &x, out, &groups, victim)
    });
    let code = match verdict {
        Ok(err) => {
            report(rank, &format!("rank {rank}: error before step 2: {err}"));
            3
        }
        Err(e) => {
            report(rank, &format!("rank {rank}: check failed: {e}"));
            1
        }
    };
    // Stay alive briefly so the other survivors do not count this rank as lost.
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(world);
    ExitCode::from(code)
}
