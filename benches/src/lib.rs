//! Shared set-up of the benchmarks: the MoE layer shape of the comparison with PyTorch
//! (`shared/bench/moe_torch_ref.py`): top-k softmax router, SwiGLU experts, dropless.

use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use burn_moe::lm::precision::cast_module;
use burn_moe::prelude::*;

/// One benchmark shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    /// Tokens.
    pub tokens: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Expert FFN width.
    pub ffn: usize,
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub topk: usize,
}

/// The operand type of a benchmark run: `MOE_BENCH_DTYPE` = `f32` (default), `bf16` or `f16`.
pub fn bench_dtype() -> Result<FloatDType, MoeError> {
    match std::env::var("MOE_BENCH_DTYPE").as_deref() {
        Err(_) | Ok("f32") => Ok(FloatDType::F32),
        Ok("bf16") => Ok(FloatDType::BF16),
        Ok("f16") => Ok(FloatDType::F16),
        Ok(other) => Err(MoeError::InvalidArgument {
            name: "MOE_BENCH_DTYPE",
            reason: format!("`{other}` is not f32, bf16 or f16"),
        }),
    }
}

/// The layer (aux loss 1e-2, as the PyTorch reference) and its input `[T, 1, H]` on `device`,
/// with its matrices and input in `dtype` (the router in f32:
/// [`cast_module`]).
pub fn layer_and_input_in(
    shape: LayerShape,
    device: &Device,
    dtype: FloatDType,
) -> Result<(MoeLayer, Tensor<3>), MoeError> {
    let (layer, x) = layer_and_input(shape, device)?;
    Ok((cast_module(layer, dtype), x.cast(dtype)))
}

/// The layer (aux loss 1e-2, as the PyTorch reference) and its input `[T, 1, H]` on `device`.
pub fn layer_and_input(
    shape: LayerShape,
    device: &Device,
) -> Result<(MoeLayer, Tensor<3>), MoeError> {
    let mut config = MoeLayerConfig::swiglu(shape.hidden, shape.ffn, shape.experts, shape.topk);
    config.router = config
        .router
        .with_aux_loss_coeff(1e-2)
        .with_pre_softmax(shape.topk == 1);
    let layer = config.init(device)?;
    let x = Tensor::<3>::random(
        [shape.tokens, 1, shape.hidden],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    Ok((layer, x))
}

/// The devices whose backend runs the MoE kernels in this build: the default wgpu adapter
/// (feature `wgpu`) and the first CUDA device (feature `cuda`, when a GPU is present).
#[allow(clippy::vec_init_then_push)]
pub fn kernel_devices() -> Result<Vec<(&'static str, Device)>, MoeError> {
    #[allow(unused_mut)]
    let mut out = Vec::new();
    #[cfg(feature = "wgpu")]
    out.push((
        "wgpu",
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    ));
    #[cfg(feature = "cuda")]
    if burn_moe::backend::cuda_available().is_ok() {
        out.push((
            "cuda",
            burn_moe::backend::device(burn_moe::backend::BackendKind::Cuda)?,
        ));
    }
    Ok(out)
}

/// Flex and the kernel devices of this build, filtered by the comma-separated backend names in
/// `MOE_BENCH_BACKENDS` when it is set (for example `cuda` to skip the CPU at large shapes).
pub fn bench_devices() -> Result<Vec<(&'static str, Device)>, MoeError> {
    let mut all = vec![("flex", Device::flex())];
    all.extend(kernel_devices()?);
    let Ok(filter) = std::env::var("MOE_BENCH_BACKENDS") else {
        return Ok(all);
    };
    let wanted: Vec<&str> = filter.split(',').map(str::trim).collect();
    let kept: Vec<_> = all
        .into_iter()
        .filter(|(name, _)| wanted.contains(name))
        .collect();
    if kept.is_empty() {
        return Err(MoeError::InvalidArgument {
            name: "MOE_BENCH_BACKENDS",
            reason: format!("`{filter}` names no backend of this build (flex, wgpu, cuda)"),
        });
    }
    Ok(kept)
}

/// Parses `T H F E K ITERS` (each a positive integer, trailing ones optional; defaults
/// 2048 512 1408 8 2 5) for the benchmark binary `program`.
pub fn parse_shape_args(program: &str, args: &[String]) -> Result<(LayerShape, usize), String> {
    const NAMES: [&str; 6] = ["T", "H", "F", "E", "K", "ITERS"];
    const DEFAULTS: [usize; 6] = [2048, 512, 1408, 8, 2, 5];
    let mut v = DEFAULTS;
    if args.len() > NAMES.len() {
        return Err(format!("usage: {program} {}", NAMES.join(" ")));
    }
    for (i, a) in args.iter().enumerate() {
        v[i] = a.parse().ok().filter(|x| *x > 0).ok_or(format!(
            "argument {} must be a positive integer, got `{a}`",
            NAMES[i]
        ))?;
    }
    if v[4] > v[3] {
        return Err(format!("K = {} exceeds E = {}", v[4], v[3]));
    }
    let shape = LayerShape {
        tokens: v[0],
        hidden: v[1],
        ffn: v[2],
        experts: v[3],
        topk: v[4],
    };
    Ok((shape, v[5]))
}
