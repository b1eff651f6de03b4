//! The dense SwiGLU FFN of the layers without MoE.

use burn::module::{Module, ParamId};
use burn::tensor::{Tensor, activation};
use burn_parallel::prelude::{
    ColumnParallelLinear, Group, ParallelParams, ParamRole, RowParallelLinear,
};

use crate::error::{MoeError, Result};
use crate::lm::attention::column_blocks;

/// Dense SwiGLU FFN: fused gate/up projection, column-parallel; down projection, row-parallel.
#[derive(Module, Debug)]
pub struct DenseFfn {
    /// `[H, 2F / tp]`: this rank's gate columns, then up columns.
    pub fc1: ColumnParallelLinear,
    /// `[F / tp, H]`.
    pub fc2: RowParallelLinear,
}

impl DenseFfn {
    /// This rank's part of the FFN from the full weights `fc1` `[H, 2F]` (gate columns, then up
    /// columns) and `fc2` `[F, H]`, split over `tp`.
    pub fn from_full(
        fc1: Tensor<2>,
        fc2: Tensor<2>,
        tp: &Group,
        sequence_parallel: bool,
    ) -> Result<Self> {
        let [h, two_f] = fc1.dims();
        let f = two_f / 2;
        if two_f % 2 != 0 || fc2.dims() != [f, h] {
            return Err(MoeError::ShapeMismatch {
                name: "fc2",
                expected: format!("[F = {f}, H = {h}] for fc1 [H, 2F] = [{h}, {two_f}]"),
                got: fc2.dims().to_vec(),
            });
        }
        if !f.is_multiple_of(tp.size()) {
            return Err(crate::error::invalid(
                "ffn_hidden",
                format!("{f} does not split over TP {}", tp.size()),
            ));
        }
        let (k, r) = (f / tp.size(), tp.rank());
        let local = column_blocks(fc1, &[(r * k, k), (f + r * k, k)]);
        Ok(Self {
            fc1: ColumnParallelLinear::from_local(
                local,
                None,
                tp.clone(),
                false,
                sequence_parallel,
            ),
            fc2: RowParallelLinear::from_full(fc2, None, tp.clone(), sequence_parallel)?,
        })
    }

    /// `down(silu(gate(x)) · up(x))` on `x` `[S, B, H]`.
    pub fn forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let h = self.fc1.forward(x)?;
        let [s, b, w] = h.dims();
        let gate = h.clone().slice([0..s, 0..b, 0..w / 2]);
        let up = h.slice([0..s, 0..b, w / 2..w]);
        Ok(self.fc2.forward(activation::silu(gate) * up)?)
    }
}

impl ParallelParams for DenseFfn {
    fn param_roles(&self, out: &mut Vec<(ParamId, ParamRole)>) {
        self.fc1.param_roles(out);
        self.fc2.param_roles(out);
    }
}
