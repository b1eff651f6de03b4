//! Criterion bench: MoE layer forward + backward on Flex at a small shape.

use benches::{LayerShape, layer_and_input};
use burn::tensor::Device;
use burn_moe::timing::time_forward_backward;
use criterion::{Criterion, criterion_group, criterion_main};

fn bench_layer(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let shape = LayerShape {
        tokens: 256,
        hidden: 128,
        ffn: 256,
        experts: 8,
        topk: 2,
    };
    let (layer, x) = layer_and_input(shape, &device).expect("valid shape");
    c.bench_function("moe_layer_fwd_bwd_T256_H128_F256_E8_k2", |b| {
        b.iter(|| time_forward_backward(&layer, x.clone(), 1).expect("step runs"))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_layer
}
criterion_main!(benches);
