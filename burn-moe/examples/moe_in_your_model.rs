//! An MoE layer inside a model of your own: a small classifier whose hidden layer is a
//! burn-moe `MoeLayer` (top-2 of 4 SwiGLU experts, aux and z losses), trained with an
//! optimizer on a task of four clusters; prints the loss, the accuracy and how many tokens
//! each expert takes.
//!
//! `cargo run --release -p burn-moe --example moe_in_your_model`

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use burn_moe::prelude::*;
use burn_parallel::prelude::{
    AdamWConfig, DistributedAdamW, GradientBuffer, Group, replicated_roles,
};

/// Your model: a projection in, the MoE layer, a projection out.
#[derive(Module, Debug)]
struct Classifier {
    input: Param<Tensor<2>>,
    moe: MoeLayer,
    output: Param<Tensor<2>>,
}

impl Classifier {
    fn new(features: usize, hidden: usize, classes: usize, d: &Device) -> Result<Self, MoeError> {
        let mut config = MoeLayerConfig::swiglu(hidden, 2 * hidden, 4, 2);
        config.router = config
            .router
            .with_aux_loss_coeff(1e-2)
            .with_z_loss_coeff(Some(1e-3));
        let normal = |shape: [usize; 2], seed| {
            Tensor::<2>::from_data(burn_parallel::rng::normal(seed, 0, shape.to_vec(), 0.3), d)
        };
        Ok(Self {
            input: Param::from_tensor(normal([features, hidden], 1)),
            moe: config.init(d)?,
            output: Param::from_tensor(normal([hidden, classes], 2)),
        })
    }

    /// Logits `[N, classes]` of `x` `[N, features]` and the MoE layer's output (losses, load).
    fn forward(&self, x: Tensor<2>) -> Result<(Tensor<2>, MoeOutput), MoeError> {
        let [n, _] = x.dims();
        let h = activation::silu(x.matmul(self.input.val()));
        let hidden = h.dims()[1];
        // The MoE layer takes `[seq, batch, hidden]`: here one sequence of n tokens.
        let out = self.moe.forward(h.clone().reshape([n, 1, hidden]))?;
        let h = h + out.output.clone().reshape([n, hidden]);
        Ok((h.matmul(self.output.val()), out))
    }
}

/// `n` points around four centres, labelled by their centre.
fn data(n: usize, seed: u64, d: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let noise = burn_parallel::rng::normal(seed, 7, vec![n * 2], 0.3)
        .try_to_vec::<f32>()
        .unwrap_or_default();
    let centres = [(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)];
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 0..n {
        let c = i % 4;
        x.push(centres[c].0 + noise[2 * i]);
        x.push(centres[c].1 + noise[2 * i + 1]);
        y.push(c as i64);
    }
    (
        Tensor::from_data(TensorData::new(x, [n, 2]), d),
        Tensor::from_data(TensorData::new(y, [n]), d),
    )
}

fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [n, _] = logits.dims();
    let log_probs = activation::log_softmax(logits, 1);
    log_probs.gather(1, targets.reshape([n, 1])).mean().neg()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let d = Device::flex().autodiff();
    let mut model = Classifier::new(2, 16, 4, &d)?;
    let one = Group::single();
    let mut opt = DistributedAdamW::new(
        AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        one.clone(),
        one.clone(),
        one,
    )?;
    let roles = replicated_roles(&model);
    for step in 0..100 {
        let (x, y) = data(64, step, &d);
        let (logits, out) = model.forward(x)?;
        // Add the router's load-balancing and z losses to yours.
        let loss = cross_entropy(logits, y) + out.total_aux_loss().ok_or("no aux loss")?;
        let mut grads = GradientBuffer::new();
        grads.add(&model, &loss.backward())?;
        model = opt.step_buffered(model, grads, &roles)?.0;
        if step % 25 == 0 {
            println!("step {step:3}: loss {:.4}", loss.into_scalar::<f32>());
        }
    }
    let (x, y) = data(400, 1000, &Device::flex());
    let model = model.valid();
    let (logits, out) = model.forward(x)?;
    let predicted: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
    let labels: Vec<i64> = y.into_data().iter::<i64>().collect();
    let right = predicted
        .iter()
        .zip(&labels)
        .filter(|(a, b)| a == b)
        .count();
    let load: Vec<i64> = out.tokens_per_expert.into_data().iter::<i64>().collect();
    println!(
        "held-out accuracy {:.1}% over 4 classes; tokens per expert (top-2 of 400): {load:?}",
        100.0 * right as f64 / labels.len() as f64
    );
    Ok(())
}
