//! Picking a backend device with a clear error instead of a panic when it is unavailable.

use burn::tensor::Device;

use crate::error::{MoeError, Result};

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Burn's Flex CPU backend (always available).
    Flex,
    /// Burn's CUDA backend (feature `cuda`, an NVIDIA driver and GPU at run time).
    Cuda,
}

/// The device of `kind`, or an error saying why it cannot be used. A CUDA device is the GPU of
/// this process's local rank under a launcher ([`burn_parallel::launch::local_device_index`]),
/// GPU 0 otherwise.
///
/// Burn's CUDA backend panics in a worker thread when the CUDA driver library is missing; this
/// checks for the driver library (`libcuda.so.1`) and an NVIDIA device node first.
pub fn device(kind: BackendKind) -> Result<Device> {
    match kind {
        BackendKind::Flex => Ok(Device::flex()),
        BackendKind::Cuda => cuda_device(),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    cuda_available()?;
    let index = burn_parallel::launch::local_device_index()
        .map_err(|e| MoeError::BackendUnavailable(e.to_string()))?;
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    Err(MoeError::BackendUnavailable(
        "this build has no CUDA backend: rebuild with `--features cuda`".into(),
    ))
}

/// Checks that an NVIDIA driver library and device are present.
pub fn cuda_available() -> Result<()> {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/nvidia/lib64",
        "/usr/local/nvidia/lib",
        "/usr/local/cuda/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(d.into());
    }
    let has_lib = dirs
        .iter()
        .any(|d| d.join("libcuda.so.1").exists() || d.join("libcuda.so").exists());
    if !has_lib {
        return Err(MoeError::BackendUnavailable(
            "CUDA driver library libcuda.so.1 not found (no NVIDIA driver installed?)".into(),
        ));
    }
    let has_device = std::fs::read_dir("/dev")
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.strip_prefix("nvidia").is_some_and(|rest| {
                    !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit())
                })
            })
        })
        .unwrap_or(false);
    if !has_device {
        return Err(MoeError::BackendUnavailable(
            "no NVIDIA GPU device node (/dev/nvidiaN) found".into(),
        ));
    }
    Ok(())
}
