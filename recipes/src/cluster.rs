//! The `[cluster]` and `[calibration]` tables of a recipe: the hardware `plan` estimates on
//! (H100 defaults) and the planner's four fitted efficiency numbers.

use serde::{Deserialize, Serialize};

use crate::error::{Result, bad};

/// Hardware of the cluster (`[cluster]`, H100 defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// GPUs in the job.
    #[serde(default = "gpus")]
    pub gpus: usize,
    /// GPUs per node (NVLink domain).
    #[serde(default = "gpus_per_node")]
    pub gpus_per_node: usize,
    /// Dense BF16 peak per GPU.
    #[serde(default = "peak")]
    pub peak_tflops: f64,
    /// NVLink bandwidth per GPU, GB/s.
    #[serde(default = "nvlink")]
    pub nvlink_gbytes_per_s: f64,
    /// InfiniBand bandwidth per GPU, Gbit/s.
    #[serde(default = "ib")]
    pub ib_gbits_per_s: f64,
    /// Memory per GPU, GiB.
    #[serde(default = "hbm")]
    pub memory_gib: f64,
    /// The training stack's kernels, for the activation memory.
    #[serde(default)]
    pub kernels: Kernels,
}

/// How the training stack computes a layer, which decides the activations it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// Megatron-Core on GPUs: flash attention (no s² scores kept), fused kernels, gradients
    /// accumulated in place into the f32 `main_grad` buffer.
    #[default]
    Fused,
    /// Eager autodiff (this project's CPU trainer): attention scores and probabilities kept,
    /// key/value heads expanded to every query head, each op's inputs kept separately, and a
    /// micro-batch's gradients materialised before they are added to the f32 buffer.
    Eager,
}

fn gpus() -> usize {
    8
}
fn gpus_per_node() -> usize {
    8
}
fn peak() -> f64 {
    989.5
}
fn nvlink() -> f64 {
    450.0
}
fn ib() -> f64 {
    400.0
}
fn hbm() -> f64 {
    80.0
}

impl ClusterConfig {
    /// Checks every number; errors name the `cluster.*` key.
    pub fn validate(&self) -> Result<()> {
        if self.gpus == 0 {
            return Err(bad("cluster.gpus", "must be at least 1"));
        }
        if self.gpus_per_node == 0
            || !(self.gpus.is_multiple_of(self.gpus_per_node)
                || self.gpus < self.gpus_per_node && self.gpus_per_node.is_multiple_of(self.gpus))
        {
            return Err(bad(
                "cluster.gpus_per_node",
                format!(
                    "is {}; it must be at least 1 and the {} GPUs must fill whole nodes",
                    self.gpus_per_node, self.gpus
                ),
            ));
        }
        for (key, v) in [
            ("cluster.peak_tflops", self.peak_tflops),
            ("cluster.nvlink_gbytes_per_s", self.nvlink_gbytes_per_s),
            ("cluster.ib_gbits_per_s", self.ib_gbits_per_s),
            ("cluster.memory_gib", self.memory_gib),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(key, format!("is {v}; it must be a positive number")));
            }
        }
        Ok(())
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            gpus: gpus(),
            gpus_per_node: gpus_per_node(),
            peak_tflops: peak(),
            nvlink_gbytes_per_s: nvlink(),
            ib_gbits_per_s: ib(),
            memory_gib: hbm(),
            kernels: Kernels::default(),
        }
    }
}

/// The four fitted numbers (`[calibration]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Fraction of peak reached by large GEMMs.
    pub gemm_efficiency: f64,
    /// Fraction of link bandwidth reached by the EP all-to-all.
    pub alltoall_efficiency: f64,
    /// Fraction of pipeline and data-parallel communication hidden behind compute.
    pub overlap: f64,
    /// Fixed time per layer and micro-batch (forward + backward), seconds.
    pub layer_overhead_s: f64,
}

impl Default for Calibration {
    /// Fitted by `burn-recipes plan --calibrate` on ../shared/anchors/moe_parallel_folding_table1.json.
    fn default() -> Self {
        Self {
            gemm_efficiency: 0.7080,
            alltoall_efficiency: 0.5816,
            overlap: 0.0,
            layer_overhead_s: 9.5395e-4,
        }
    }
}
