//! `moe_kernels T H F E K ITERS`: the MoE kernels against what they replace, on every backend of
//! this build (Flex runs the reference implementations; wgpu/CUDA the CubeCL kernels).
//!
//! Prints per backend, medians of `ITERS` timed runs after one warm-up, forward only:
//! - `gemm`: the grouped GEMM of the first expert projection (`[T·K, H] × [E, H, 2F]`, uneven
//!   groups from a top-k routing) against one dense matmul of equal FLOPs
//!   (`[T·K, H] × [H, 2F]`), in GFLOP/s, and their ratio;
//! - `dispatch`: routing index + permute (tokens and probs) + unpermute, against the expert
//!   computation (two grouped GEMMs and SwiGLU), in ms, and the dispatch share of expert time.
//!
//! `MOE_BENCH_DTYPE=bf16` (or `f16`) runs tokens, probabilities and weights, the grouped and
//! the dense products in that type (both accumulate in f32).

use std::process::ExitCode;
use std::time::Instant;

use benches::{bench_devices, bench_dtype, parse_shape_args};
use burn::tensor::{Bool, Device, Distribution, FloatDType, Tensor, activation};
use burn_moe::kernels;

/// Median seconds of `iters` runs of `f` after one warm-up; `f` ends with a device sync.
fn median(iters: usize, mut f: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    f()?;
    let mut s = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        f()?;
        s.push(t0.elapsed().as_secs_f64());
    }
    s.sort_by(f64::total_cmp);
    Ok(s[s.len() / 2])
}

fn sync(device: &Device) -> Result<(), String> {
    device.sync().map_err(|e| format!("{e:?}"))
}

fn run_backend(
    name: &str,
    device: &Device,
    dims: [usize; 5],
    iters: usize,
    dtype: FloatDType,
) -> Result<(), String> {
    let [t, h, f, e, k] = dims;
    let err = |e: burn_moe::MoeError| e.to_string();
    let logits = Tensor::<2>::random([t, e], Distribution::Normal(0.0, 1.0), device);
    let idx = logits.clone().argtopk(k, 1);
    let map: Tensor<2, Bool> = Tensor::<2>::zeros([t, e], device)
        .scatter(
            1,
            idx,
            Tensor::ones([t, k], device),
            burn::tensor::IndexingUpdateOp::Add,
        )
        .greater_elem(0.5);
    let probs = activation::softmax(logits, 1).cast(dtype);
    let x = Tensor::<2>::random([t, h], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let w1 =
        Tensor::<3>::random([e, h, 2 * f], Distribution::Normal(0.0, 0.02), device).cast(dtype);
    let w2 = Tensor::<3>::random([e, f, h], Distribution::Normal(0.0, 0.02), device).cast(dtype);
    let index = kernels::routing_index(map.clone()).map_err(err)?;
    let counts = index.counts.clone();
    let n: usize = counts.iter().sum();
    let permuted =
        kernels::permute_tokens(x.clone(), index.token_of_row.clone(), index.row_map.clone());

    // Grouped GEMM against a dense matmul of the same FLOPs.
    let dense_w =
        Tensor::<2>::random([h, 2 * f], Distribution::Normal(0.0, 0.02), device).cast(dtype);
    let gemm = median(iters, || {
        let y = kernels::grouped_matmul(permuted.clone(), w1.clone(), &counts).map_err(err)?;
        drop(y);
        sync(device)
    })?;
    let dense = median(iters, || {
        let y = permuted.clone().matmul(dense_w.clone());
        drop(y);
        sync(device)
    })?;
    let flops = 2.0 * n as f64 * h as f64 * 2.0 * f as f64;
    println!(
        "backend={name} dtype={dtype:?} gemm rows={n} grouped_gflops={:.1} dense_gflops={:.1} grouped_over_dense={:.3}",
        flops / gemm / 1e9,
        flops / dense / 1e9,
        dense / gemm
    );

    // Dispatch (index + permute + unpermute) against the experts.
    let dispatch = median(iters, || {
        let index = kernels::routing_index(map.clone()).map_err(err)?;
        let xp =
            kernels::permute_tokens(x.clone(), index.token_of_row.clone(), index.row_map.clone());
        let pp = kernels::permute_probs(
            probs.clone(),
            index.token_of_row.clone(),
            index.expert_of_row.clone(),
            index.row_map.clone(),
        );
        let y = kernels::unpermute_tokens(xp, index.token_of_row, index.row_map);
        drop((y, pp));
        sync(device)
    })?;
    let experts = median(iters, || {
        let hidden = kernels::grouped_matmul(permuted.clone(), w1.clone(), &counts).map_err(err)?;
        let gate = hidden.clone().slice([0..n, 0..f]);
        let up = hidden.slice([0..n, f..2 * f]);
        let act = activation::silu(gate) * up;
        let y = kernels::grouped_matmul(act, w2.clone(), &counts).map_err(err)?;
        drop(y);
        sync(device)
    })?;
    println!(
        "backend={name} dtype={dtype:?} dispatch_ms={:.2} experts_ms={:.2} dispatch_share={:.3}",
        dispatch * 1e3,
        experts * 1e3,
        dispatch / experts
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = || -> Result<(), String> {
        let (shape, iters) = parse_shape_args("moe_kernels", &args)?;
        let dims = [
            shape.tokens,
            shape.hidden,
            shape.ffn,
            shape.experts,
            shape.topk,
        ];
        let dtype = bench_dtype().map_err(|e| e.to_string())?;
        for (name, device) in bench_devices().map_err(|e| e.to_string())? {
            run_backend(name, &device, dims, iters, dtype)?;
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
