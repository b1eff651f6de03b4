//! The MoE transformer LM from burn-moe alone: build it from a config, train a few steps on a
//! seeded Markov source (its entropy rate is the loss floor), and run it for logits.
//!
//! `cargo run --release -p burn-moe --example lm`

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_moe::lm::{MoeLmConfig, TokenSource};
use burn_moe::prelude::MoeLayerConfig;
use burn_parallel::prelude::{AdamWConfig, DistributedAdamW, GradientBuffer, Group};

fn batch(
    source: &TokenSource,
    step: usize,
    (seq, b): (usize, usize),
    d: &Device,
) -> [Tensor<2, Int>; 2] {
    // Sequence-first [S, B] ids and their next tokens.
    let seqs: Vec<Vec<i64>> = (0..b)
        .map(|i| source.sequence((step * b + i) as u64, seq))
        .collect();
    let take = |offset: usize| {
        let v: Vec<i64> = (0..seq)
            .flat_map(|t| seqs.iter().map(move |s| s[t + offset]))
            .collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [seq, b]), d)
    };
    [take(0), take(1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::flex().autodiff();
    let (vocab, hidden) = (64, 64);
    // 2 layers of 4 SwiGLU experts, top-2, aux and z losses; grouped-query attention.
    let mut moe = MoeLayerConfig::swiglu(hidden, 64, 4, 2);
    moe.router = moe
        .router
        .with_aux_loss_coeff(1e-2)
        .with_z_loss_coeff(Some(1e-3));
    let config = MoeLmConfig::new(vocab, hidden, 2, 4, 128)
        .with_kv_heads(Some(2))
        .with_moe(Some(moe));
    let mut model = config.init(42, &device)?;
    let (total, active) = config.parameter_count();
    println!("MoeLm: {total} parameters, {active} active per token");

    let source = TokenSource::markov(vocab, 4, 42)?;
    let one = Group::single();
    let mut opt = DistributedAdamW::new(
        AdamWConfig {
            lr: 5e-3,
            ..AdamWConfig::default()
        },
        one.clone(),
        one.clone(),
        one,
    )?;
    let roles = model.roles();
    let steps = 60;
    let mut loss = f64::NAN;
    for step in 0..steps {
        let [ids, targets] = batch(&source, step, (32, 8), &device);
        let out = model.forward_loss(ids, targets)?;
        let total = out.total_loss().ok_or("the whole model returns a loss")?;
        loss = f64::from(
            out.ce
                .clone()
                .ok_or("no cross-entropy")?
                .into_scalar::<f32>(),
        );
        let mut grads = GradientBuffer::new();
        grads.add(&model, &total.backward())?;
        model = opt.step_buffered(model, grads, &roles)?.0;
        if step % 20 == 0 {
            println!("step {step:3}: loss {loss:.4}");
        }
    }
    let floor = source.entropy_rate().unwrap_or(f64::NAN);
    println!("after {steps} steps: loss {loss:.4} nats/token (entropy floor {floor:.4})");

    let [ids, _] = batch(&source, 10_000, (16, 2), &device);
    let logits = model.forward(ids)?;
    println!("logits: {:?} ([seq, batch, vocab])", logits.dims());
    Ok(())
}
