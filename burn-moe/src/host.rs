//! Device-to-host reads. Every call here is a synchronisation point with the device; the
//! callers document why they need one.

use burn::tensor::{Bool, Int, Tensor};

use crate::error::{MoeError, Result};

fn backend_error(context: &'static str, e: impl std::fmt::Debug) -> MoeError {
    MoeError::Backend {
        context,
        message: format!("{e:?}"),
    }
}

/// Reads a float tensor as `f32` values (row-major).
pub fn read_f32<const D: usize>(t: Tensor<D>, context: &'static str) -> Result<Vec<f32>> {
    t.try_into_vec_as::<f32>()
        .map_err(|e| backend_error(context, e))
}

/// Reads an integer tensor as `i64` values (row-major).
pub fn read_i64<const D: usize>(t: Tensor<D, Int>, context: &'static str) -> Result<Vec<i64>> {
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
