//! Causal encode-time refinement of the latents (semi-amortised inference).

use super::*;

impl Vae {
    /// The posterior mean of `x`, refined at encode time against this decoder (semi-amortised
    /// inference, which closes part of the encoder's amortisation gap), causally: latent step
    /// by latent step, each with the earlier ones fixed, `steps` Adam steps (step size `lr`,
    /// β = (0.9, 0.999)) on that step alone lower the mean over its own frames (the first frame,
    /// then each group of `time_factor`) of ln(MSE + 10⁻⁶), the [`Reconstruction::LogMse`]
    /// objective. The decoder is causal, so a step's frames depend on it and the earlier steps
    /// only, and a step never sees a later frame. Costs about `steps` decodes of the clip,
    /// forward and back (the decoder's causal state is carried between steps as in
    /// [`Vae::decode_chunked`]). The VAE must live on an autodiff device; its weights get no
    /// gradient.
    pub fn encode_refined(&self, x: Tensor<5>, steps: usize, lr: f64) -> Result<Tensor<5>> {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(invalid("lr", format!("{lr} must be a finite number > 0")));
        }
        if !x.is_autodiff() {
            return Err(invalid(
                "device",
                "latent refinement needs the VAE on an autodiff device",
            ));
        }
        // The encoder runs off autodiff (no graph kept); the decoder on it, with frozen weights,
        // so that each step differentiates the latent alone.
        let mean = self.valid().encode(x.clone().without_autodiff()).mean;
        let frozen = self.clone().no_grad();
        let x = x.detach();
        let ft = self.factors.0;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        // The decoder's causal state after the steps refined so far.
        let mut state = Stream {
            keep: true,
            ..Stream::whole()
        };
        let mut refined = Vec::new();
        for k in 0..mean.dims()[2] {
            let frames = if k == 0 {
                x.clone().narrow(2, 0, 1)
            } else {
                x.clone().narrow(2, 1 + (k - 1) * ft, ft)
            };
            let mut z = mean.clone().narrow(2, k, 1);
            let (mut m, mut v) = (z.zeros_like(), z.zeros_like());
            for step in 1..=steps {
                let leaf = z.clone().autodiff().require_grad();
                let rec = frozen.decode_stream(leaf.clone(), &mut state.clone());
                let loss = log_mse(frame_mse(rec - frames.clone()));
                let grads = loss.backward();
                let g = leaf
                    .grad(&grads)
                    .ok_or_else(|| invalid("device", "no gradient reached the latent"))?;
                m = m * b1 + g.clone() * (1.0 - b1);
                v = v * b2 + g.powi_scalar(2) * (1.0 - b2);
                let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
                z = z - (m.clone() / c1) / ((v.clone() / c2).sqrt() + eps) * lr;
            }
            frozen.decode_stream(z.clone().autodiff(), &mut state);
            state.advance();
            refined.push(z);
        }
        Ok(Tensor::cat(refined, 2).autodiff())
    }
}
