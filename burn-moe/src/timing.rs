//! Wall-clock timing of an MoE layer's forward + backward step, shared by the command line
//! and the benchmark binaries (benchmarks, not tests, are where speed is measured).

use std::time::Instant;

use burn::tensor::Tensor;

use crate::error::{MoeError, Result};
use crate::layer::{MoeLayer, MoeOutput};

/// Timings of repeated forward + backward steps.
#[derive(Debug, Clone)]
pub struct StepTiming {
    /// Seconds per timed step, sorted ascending.
    pub seconds: Vec<f64>,
    /// Output of the last step.
    pub last: MoeOutput,
}

impl StepTiming {
    /// The median step time in seconds.
    pub fn median(&self) -> f64 {
        self.seconds[self.seconds.len() / 2]
    }
}

/// Runs one warm-up and `iters` timed steps of `loss = mean(y²) + aux losses`, backward
/// included. Each step ends with a device-to-host read of a gradient sum, so asynchronous
/// backends are timed to completion. `x` must live on an autodiff device.
pub fn time_forward_backward(layer: &MoeLayer, x: Tensor<3>, iters: usize) -> Result<StepTiming> {
    if iters == 0 {
        return Err(MoeError::InvalidArgument {
            name: "iters",
            reason: "must be > 0".into(),
        });
    }
    let mut seconds = Vec::with_capacity(iters);
    let mut last = None;
    for i in 0..=iters {
        let start = Instant::now();
        let out = layer.forward(x.clone())?;
        let mut loss = out.output.clone().square().mean();
        if let Some(aux) = out.total_aux_loss() {
            loss = loss + aux;
        }
        let grads = loss.backward();
        let grad = layer
            .experts
            .w1
            .val()
            .grad(&grads)
            .ok_or(MoeError::InvalidArgument {
                name: "x",
                reason: "no gradient reached the experts: is the device an autodiff device?".into(),
            })?;
        crate::host::read_f32(grad.sum(), "waiting for the backward pass")?;
        if i > 0 {
            seconds.push(start.elapsed().as_secs_f64());
        }
        last = Some(out);
    }
    seconds.sort_by(f64::total_cmp);
    Ok(StepTiming {
        seconds,
        last: last.expect("at least one step ran"),
    })
}
