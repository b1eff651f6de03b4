//! Host ↔ device transfers of the MoE code, each counted in [`burn_parallel::transfers`].
//! Every read is a synchronisation point with the device; every upload sends host-made values
//! (index tables) to it. The callers document why they need one.

use std::ops::Range;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use burn_parallel::transfers;

use crate::error::{MoeError, Result};

fn backend_error(context: &'static str, e: impl std::fmt::Debug) -> MoeError {
    MoeError::Backend {
        context,
        message: format!("{e:?}"),
    }
}

fn bytes(numel: usize, element: usize) -> u64 {
    (numel * element) as u64
}

/// Reads a float tensor as `f32` values (row-major).
pub fn read_f32<const D: usize>(t: Tensor<D>, context: &'static str) -> Result<Vec<f32>> {
    transfers::read(context, bytes(t.shape().num_elements(), t.dtype().size()));
    t.try_into_vec_as::<f32>()
        .map_err(|e| backend_error(context, e))
}

/// Reads an integer tensor as `i64` values (row-major).
pub fn read_i64<const D: usize>(t: Tensor<D, Int>, context: &'static str) -> Result<Vec<i64>> {
    transfers::read(context, bytes(t.shape().num_elements(), t.dtype().size()));
    t.try_into_vec_as::<i64>()
        .map_err(|e| backend_error(context, e))
}

/// Reads a boolean tensor (row-major).
pub fn read_bool<const D: usize>(t: Tensor<D, Bool>, context: &'static str) -> Result<Vec<bool>> {
    Ok(read_i64(t.int(), context)?
        .into_iter()
        .map(|v| v != 0)
        .collect())
}

/// Uploads integer values as a `[values.len()]` tensor.
pub fn upload_i64(values: &[i64], device: &Device, context: &'static str) -> Tensor<1, Int> {
    transfers::upload(context, bytes(values.len(), 8));
    Tensor::<1, Int>::from_data(values, device)
}

/// Uploads float values of `shape`.
pub fn upload_f32<const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &Device,
    context: &'static str,
) -> Tensor<D> {
    transfers::upload(context, bytes(values.len(), 4));
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Uploads host data as a float tensor.
pub fn upload<const D: usize>(
    data: TensorData,
    device: &Device,
    context: &'static str,
) -> Tensor<D> {
    transfers::upload(context, data.as_bytes().len() as u64);
    Tensor::from_data(data, device)
}

/// `Tensor::arange(range)`: Burn builds it on the host and uploads it (CubeCL devices), so it
/// is counted as an upload.
pub fn arange(range: Range<i64>, device: &Device, context: &'static str) -> Tensor<1, Int> {
    transfers::upload(context, bytes(range.clone().count(), 8));
    Tensor::<1, Int>::arange(range, device)
}
