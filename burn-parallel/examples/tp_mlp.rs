//! A tensor-parallel MLP on every rank of the world: the first projection split by columns,
//! the second by rows, trained a few AdamW steps; each rank checks its output against the
//! full MLP computed on one process.
//!
//! ```sh
//! cargo build -p burn-parallel --features mpi --example tp_mlp
//! mpirun -np 2 target/debug/examples/tp_mlp        # (as root on one host, see the README)
//! ```
//! Without a launcher (or without `--features mpi`) it runs on one rank.

use burn::tensor::{Device, Tensor, TensorData};
use burn_parallel::prelude::*;

/// Deterministic weights, the same on every rank.
fn weights<const D: usize>(shape: [usize; D], seed: u64, d: &Device) -> Tensor<D> {
    let data = burn_parallel::rng::normal(seed, 0, shape.to_vec(), 0.2);
    Tensor::from_data(data, d)
}

fn main() -> Result<(), ParallelError> {
    let world = World::from_env()?;
    let n = world.size();
    // Every rank in one tensor-parallel group.
    let mesh = Mesh::new(n, ParallelDims::new(n, 1, 1, 1), MoeDims::new(1, 1, n))?;
    let groups = ProcessGroups::new(mesh, world.communicator())?;
    let tp = groups.group(GroupKind::Tp).clone();
    let d = Device::flex().autodiff();
    let (h, f) = (16, 64);
    let full = |d: &Device| {
        (
            (weights([h, f], 1, d), Tensor::zeros([f], d)),
            (weights([f, h], 2, d), Tensor::zeros([h], d)),
        )
    };
    let (fc1, fc2) = full(&d);
    let mut mlp = ParallelMlp::from_full(fc1, fc2, tp.clone(), false)?;
    let (one_fc1, one_fc2) = full(&d);
    let reference = ParallelMlp::from_full(one_fc1, one_fc2, Group::single(), false)?;
    let x = weights([8, 2, h], 3, &d); // [S, B, H]

    let y = mlp
        .forward(x.clone())?
        .into_data()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    let want = reference
        .forward(x.clone())?
        .into_data()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    let diff = y
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);

    let mut roles = Vec::new();
    mlp.param_roles(&mut roles);
    let dp = groups.group(GroupKind::Dp).clone();
    let mut opt = DistributedAdamW::new(
        AdamWConfig::default(),
        dp,
        tp.clone(),
        groups.world().clone(),
    )?;
    let target = Tensor::<3>::from_data(TensorData::new(vec![0.5f32; 8 * 2 * h], [8, 2, h]), &d);
    let mut loss = f32::NAN;
    for _ in 0..20 {
        let l = (mlp.forward(x.clone())? - target.clone()).square().mean();
        loss = l.clone().into_scalar::<f32>();
        let grads = l.backward();
        mlp = opt.step(mlp, &grads, &roles)?.0;
    }
    if world.is_main() {
        println!(
            "tp_mlp on {n} rank(s): this rank holds {}×{} of the {h}×{f} first projection; \
             output vs one process: max |diff| {diff:.2e}; loss after 20 AdamW steps {loss:.4}",
            h,
            f / n
        );
    }
    if diff > 1e-5 {
        return Err(ParallelError::CheckFailed {
            program: "tp_mlp".into(),
            np: n,
            reason: format!("the output differs from one process by {diff}"),
        });
    }
    Ok(())
}
