//! Shared experts: a dense MLP every token goes through, optionally gated.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::activation;
use burn::tensor::{Device, Distribution, Tensor};

use super::Activation;
use crate::error::{MoeError, Result, invalid};
use crate::router::check_dims;

/// Configuration of the shared experts (Megatron's `moe_shared_expert_intermediate_size`).
#[derive(Config, Debug)]
pub struct SharedExpertsConfig {
    /// Hidden size `H`.
    pub hidden: usize,
    /// Total FFN width `Fs` of the shared experts.
    pub ffn_hidden: usize,
    /// Activation.
    #[config(default = "Activation::SwiGlu")]
    pub activation: Activation,
    /// Multiply the output by `sigmoid(x @ gate^T)` with a learned gate `[1, H]`.
    #[config(default = false)]
    pub gate: bool,
    /// Standard deviation of the normal initialisation.
    #[config(default = 0.02)]
    pub init_std: f64,
}

impl SharedExpertsConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 {
            return Err(invalid("shared.hidden", "must be > 0"));
        }
        if self.ffn_hidden == 0 {
            return Err(invalid("shared.ffn_hidden", "must be > 0"));
        }
        Ok(())
    }

    /// Builds shared experts with normal(0, `init_std`) weights.
    pub fn init(&self, device: &Device) -> Result<SharedExperts> {
        self.validate()?;
        let dist = Distribution::Normal(0.0, self.init_std);
        let f1 = self.activation.fc1_width(self.ffn_hidden);
        let w1 = Tensor::<2>::random([self.hidden, f1], dist, device);
        let w2 = Tensor::<2>::random([self.ffn_hidden, self.hidden], dist, device);
        let gate = self
            .gate
            .then(|| Tensor::<2>::random([1, self.hidden], dist, device));
        SharedExperts::from_weights(self.clone(), w1, w2, gate)
    }
}

/// A dense MLP applied to every token, added to the routed experts' output.
#[derive(Module, Debug)]
pub struct SharedExperts {
    /// First projection `[H, F1s]`.
    pub w1: Param<Tensor<2>>,
    /// Second projection `[Fs, H]`.
    pub w2: Param<Tensor<2>>,
    /// Optional gate `[1, H]`.
    pub gate: Option<Param<Tensor<2>>>,
    #[module(skip)]
    config: SharedExpertsConfig,
}

impl SharedExperts {
    /// Builds shared experts from given weights.
    pub fn from_weights(
        config: SharedExpertsConfig,
        w1: Tensor<2>,
        w2: Tensor<2>,
        gate: Option<Tensor<2>>,
    ) -> Result<Self> {
        config.validate()?;
        let f1 = config.activation.fc1_width(config.ffn_hidden);
        check_dims(
            "shared_w1",
            &w1.dims(),
            &[config.hidden, f1],
            "[hidden, fc1_width]",
        )?;
        check_dims(
            "shared_w2",
            &w2.dims(),
            &[config.ffn_hidden, config.hidden],
            "[ffn_hidden, hidden]",
        )?;
        if let Some(g) = &gate {
            check_dims("shared_gate", &g.dims(), &[1, config.hidden], "[1, hidden]")?;
        }
        if gate.is_some() != config.gate {
            return Err(invalid(
                "shared.gate",
                "the gate weight must be given exactly when gate = true",
            ));
        }
        Ok(Self {
            w1: Param::from_tensor(w1),
            w2: Param::from_tensor(w2),
            gate: gate.map(Param::from_tensor),
            config,
        })
    }

    /// # Shapes
    /// - x: `[T, H]` → `[T, H]`
    pub fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        let [t, h] = x.dims();
        if h != self.config.hidden {
            return Err(MoeError::ShapeMismatch {
                name: "shared expert input",
                expected: format!("[tokens, hidden = {}]", self.config.hidden),
                got: vec![t, h],
            });
        }
        // In the weights' precision; returned in `x`'s.
        let given = x.dtype();
        let x = x.cast(self.w1.val().dtype());
        let out = self
            .config
            .activation
            .apply(x.clone().matmul(self.w1.val()))
            .matmul(self.w2.val());
        let out = match &self.gate {
            Some(g) => {
                let gate = x.matmul(g.val().cast(out.dtype()).transpose());
                out * activation::sigmoid(gate)
            }
            None => out,
        };
        Ok(out.cast(given))
    }
}
