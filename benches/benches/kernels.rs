//! Criterion benches of each MoE kernel (forward), on Flex (reference implementations) and on
//! the kernel backends of this build (`--features wgpu` / `--features cuda`), at a small
//! MoE shape: T = 512 tokens, H = 256, E = 8, top-2, expert FFN 512.

use benches::kernel_devices;
use burn::tensor::{Bool, Device, Distribution, IndexingUpdateOp, Tensor};
use burn_moe::kernels;
use criterion::{Criterion, criterion_group, criterion_main};

const T: usize = 512;
const H: usize = 256;
const E: usize = 8;
const K: usize = 2;
const F: usize = 512;

fn bench_device(c: &mut Criterion, name: &str, device: &Device) {
    let sync = || device.sync().expect("device sync");
    let logits = Tensor::<2>::random([T, E], Distribution::Normal(0.0, 1.0), device);
    let map: Tensor<2, Bool> = Tensor::<2>::zeros([T, E], device)
        .scatter(
            1,
            logits.clone().argtopk(K, 1),
            Tensor::ones([T, K], device),
            IndexingUpdateOp::Add,
        )
        .greater_elem(0.5);
    let x = Tensor::<2>::random([T, H], Distribution::Normal(0.0, 1.0), device);
    let index = kernels::routing_index(map.clone()).expect("routing index");
    let n: usize = index.counts.iter().sum();
    let xp = kernels::permute_tokens(x.clone(), index.token_of_row.clone(), index.row_map.clone());
    let w = Tensor::<3>::random([E, H, F], Distribution::Normal(0.0, 0.02), device);
    let mut group = c.benchmark_group(format!("moe_kernels_{name}"));
    group.sample_size(10);
    group.bench_function("expert_counts", |b| {
        b.iter(|| {
            let _ = kernels::expert_counts(map.clone());
            sync()
        })
    });
    group.bench_function("routing_index", |b| {
        b.iter(|| kernels::routing_index(map.clone()).expect("routing index"))
    });
    group.bench_function("permute_tokens", |b| {
        b.iter(|| {
            let _ = kernels::permute_tokens(
                x.clone(),
                index.token_of_row.clone(),
                index.row_map.clone(),
            );
            sync()
        })
    });
    group.bench_function("unpermute_tokens", |b| {
        b.iter(|| {
            let _ = kernels::unpermute_tokens(
                xp.clone(),
                index.token_of_row.clone(),
                index.row_map.clone(),
            );
            sync()
        })
    });
    let sizes: Vec<usize> = index.counts.clone();
    let order: Vec<usize> = (0..E).rev().collect();
    group.bench_function("sort_chunks", |b| {
        b.iter(|| {
            let _ = kernels::sort_chunks(xp.clone(), &sizes, &order).expect("sort chunks");
            sync()
        })
    });
    group.bench_function(format!("grouped_matmul_{n}x{H}x{F}"), |b| {
        b.iter(|| {
            let _ = kernels::grouped_matmul(xp.clone(), w.clone(), &index.counts).expect("gemm");
            sync()
        })
    });
    let y = Tensor::<2>::random([n, F], Distribution::Normal(0.0, 1.0), device);
    group.bench_function("grouped_matmul_nt", |b| {
        b.iter(|| {
            let _ = kernels::grouped_matmul_nt(y.clone(), w.clone(), &index.counts).expect("nt");
            sync()
        })
    });
    group.bench_function("grouped_matmul_tn", |b| {
        b.iter(|| {
            let _ = kernels::grouped_matmul_tn(xp.clone(), y.clone(), &index.counts).expect("tn");
            sync()
        })
    });
    group.finish();
}

fn bench_kernels(c: &mut Criterion) {
    bench_device(c, "flex", &Device::flex());
    for (name, device) in kernel_devices().expect("kernel devices") {
        bench_device(c, name, &device);
    }
}

criterion_group!(benches, bench_kernels);
criterion_main!(benches);
