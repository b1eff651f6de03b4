//! Mixed precision of the language model (Megatron-Core's `--bf16` with
//! `--moe-router-dtype fp32`): the matrices — embedding, attention and FFN projections, routed
//! and shared experts, the head — and so the activations between them in bf16; the router's
//! weight, its expert bias, the norms' scales and the biases stay f32, and the router (logits,
//! softmax or sigmoid, top-k, every auxiliary loss), the norms, the attention softmax and the
//! cross-entropy compute in f32 whatever their input's precision. Gradients are summed and the
//! optimizer keeps its master weights and moments in f32
//! ([`DistributedAdamW`](burn_parallel::optim::DistributedAdamW)), writing each parameter
//! back in its own precision.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{FloatDType, Tensor};

use super::model::MoeLm;

/// Precision of a model's parameters and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bf16 matrices and activations, f32 router, norms, softmax and losses.
    Bf16,
}

impl Precision {
    /// The dtype of the model's matrices and activations.
    pub fn dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::Bf16 => FloatDType::BF16,
        }
    }

    /// Bytes of one value in this precision.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// Casts the float parameters of at least two dimensions outside any module named `router`
/// to `dtype`; keeps ids and gradient tracking.
struct Cast {
    dtype: FloatDType,
    path: Vec<String>,
}

impl ModuleMapper for Cast {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_owned());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D < 2 || self.path.iter().any(|p| p == "router") {
            return param;
        }
        let dtype = self.dtype;
        param.map(|t| {
            // A new leaf: the cast is not part of any step's graph.
            let track = t.is_require_grad();
            let cast = t.cast(dtype).detach();
            if track { cast.require_grad() } else { cast }
        })
    }
}

/// `module` with the parameters that a mixed precision puts in `dtype` cast to it: every
/// float parameter of at least two dimensions outside a `router` (the matrices); 1-D
/// parameters (norm scales, biases, the expert bias) and router weights keep their precision.
/// `Precision::Bf16.dtype()` is what [`MoeLm::with_precision`] uses; f16 works the same way
/// where a device has no bf16.
pub fn cast_module<M: Module>(module: M, dtype: FloatDType) -> M {
    module.map(&mut Cast {
        dtype,
        path: Vec::new(),
    })
}

impl MoeLm {
    /// This model in `precision`: its matrices cast ([`cast_module`]), its activations in
    /// that dtype from the embedding (or a received stage input) on. Casting back to
    /// [`Precision::F32`] restores f32 matrices (of the rounded values).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        cast_module(self, precision.dtype())
    }

    /// The precision of the model's matrices and activations.
    pub fn precision(&self) -> Precision {
        self.precision
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device, Int, Tensor};

    use super::*;
    use crate::layer::MoeLayerConfig;
    use crate::lm::MoeLmConfig;

    #[test]
    fn bf16_casts_the_matrices_and_keeps_router_norms_and_biases_f32() {
        let config = MoeLmConfig::new(32, 16, 2, 2, 32)
            .with_qkv_bias(true)
            .with_moe(Some(MoeLayerConfig::swiglu(16, 16, 4, 2)));
        let device = Device::flex();
        let model = config
            .init(3, &device)
            .unwrap()
            .with_precision(Precision::Bf16);
        assert_eq!(model.precision(), Precision::Bf16);
        let embed = model.embed.as_ref().unwrap();
        assert_eq!(embed.weight.val().dtype(), DType::BF16);
        let block = &model.blocks[0];
        assert_eq!(block.attn.qkv.weight.val().dtype(), DType::BF16);
        assert_eq!(
            block.attn.qkv.bias.as_ref().unwrap().val().dtype(),
            DType::F32
        );
        assert_eq!(block.norm1.weight.val().dtype(), DType::F32);
        let moe = block.moe.as_ref().unwrap();
        assert_eq!(moe.router.weight.val().dtype(), DType::F32);
        assert_eq!(moe.experts.w1.val().dtype(), DType::BF16);
        assert_eq!(moe.experts.w2.val().dtype(), DType::BF16);
        // The logits of a bf16 model come out in bf16, close to the f32 model's.
        let ids = Tensor::<2, Int>::from_data([[1, 2], [3, 4], [5, 6]], &device);
        let f32_model = config.init(3, &device).unwrap();
        let want = crate::host::read_f32(f32_model.forward(ids.clone()).unwrap(), "").unwrap();
        let logits = model.forward(ids).unwrap();
        assert_eq!(logits.dtype(), DType::BF16);
        let got = crate::host::read_f32(logits, "").unwrap();
        let norm = want.iter().map(|w| w * w).sum::<f32>().sqrt();
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w) * (g - w))
            .sum::<f32>()
            .sqrt();
        assert!(err / norm < 0.05, "relative error {}", err / norm);
        // Back to f32: every parameter f32 again.
        let back = model.with_precision(Precision::F32);
        assert_eq!(
            back.embed.as_ref().unwrap().weight.val().dtype(),
            DType::F32
        );
    }
}
