//! Starting a run: the same binary runs alone or under `mpirun -np N`.

use std::sync::Arc;

use crate::comm::{Communicator, SingleRank};
use crate::error::{ParallelError, Result};

/// Environment variables by which launchers announce a multi-process world.
const LAUNCHER_ENV: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// Environment variable choosing the engine of a world's collectives: `mpi` or `nccl`
/// (default: NCCL when the run's tensors are on a CUDA device and several processes were
/// launched, MPI for several processes otherwise).
pub const ENGINE_ENV: &str = "BURN_PARALLEL_ENGINE";

/// The engine that carries a world's collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// One process: nothing to exchange.
    Single,
    /// MPI on host memory (feature `mpi`).
    Mpi,
    /// NCCL on CUDA device `gpu` (feature `cuda`), bootstrapped over MPI (or alone for one
    /// process); the tensor collectives run on the tensors' device memory.
    Nccl {
        /// The CUDA device of this process's tensors.
        gpu: usize,
    },
}

/// The engine for a process started by a launcher or not (`launched`), whose tensors are on
/// CUDA device `gpu` (`None`: not on a CUDA device), with `requested` the value of
/// [`ENGINE_ENV`] if set.
pub fn choose_engine(
    launched: bool,
    gpu: Option<usize>,
    requested: Option<&str>,
) -> Result<Engine> {
    match (requested, gpu) {
        (Some("mpi"), _) | (None, None) => Ok(if launched {
            Engine::Mpi
        } else {
            Engine::Single
        }),
        (Some("nccl"), Some(gpu)) => Ok(Engine::Nccl { gpu }),
        (None, Some(gpu)) => Ok(if launched {
            Engine::Nccl { gpu }
        } else {
            Engine::Single
        }),
        (Some("nccl"), None) => Err(ParallelError::InvalidArgument {
            name: ENGINE_ENV,
            reason: "`nccl` exchanges CUDA tensors: run on a CUDA device (`--device cuda`)".into(),
        }),
        (Some(other), _) => Err(ParallelError::InvalidArgument {
            name: ENGINE_ENV,
            reason: format!("`{other}` is not an engine (`mpi` or `nccl`)"),
        }),
    }
}

fn launched() -> bool {
    LAUNCHER_ENV.iter().any(|v| std::env::var_os(v).is_some())
}

/// The world of this process: MPI when launched by `mpirun` (feature `mpi`), a single rank
/// otherwise; NCCL over MPI for CUDA runs ([`World::from_env_on`]). Keep it alive for the whole
/// run; dropping it finalises MPI.
#[derive(Debug)]
pub struct World {
    comm: Arc<dyn Communicator>,
    engine: Engine,
    #[cfg(feature = "mpi")]
    _mpi: Option<crate::comm::mpi::MpiWorld>,
}

impl World {
    /// Detects the launcher: under `mpirun` initialises MPI with the timeout from
    /// `BURN_PARALLEL_TIMEOUT_S`; alone, a single rank. A build without the `mpi` feature
    /// started by `mpirun` with more than one process is an error, not N independent runs.
    pub fn from_env() -> Result<Self> {
        Self::from_env_on(None)
    }

    /// [`from_env`](Self::from_env) for a run whose tensors are on CUDA device `gpu` (`None`:
    /// not on a CUDA device): the engine is [`choose_engine`]'s, from the launcher and
    /// [`ENGINE_ENV`]. Under a launcher with CUDA tensors that is NCCL, whose unique ids
    /// travel over MPI.
    pub fn from_env_on(gpu: Option<usize>) -> Result<Self> {
        let requested = std::env::var(ENGINE_ENV).ok();
        Self::with_engine(choose_engine(launched(), gpu, requested.as_deref())?)
    }

    /// The world of `engine`: [`Engine::Mpi`] initialises MPI (this process must have been
    /// started by `mpirun`), [`Engine::Nccl`] builds an NCCL communicator over the MPI world
    /// when launched, alone otherwise.
    pub fn with_engine(engine: Engine) -> Result<Self> {
        match engine {
            Engine::Single => Ok(Self::single()),
            Engine::Mpi => Self::mpi(),
            Engine::Nccl { gpu } => Self::nccl(gpu),
        }
    }

    #[cfg(feature = "mpi")]
    fn mpi() -> Result<Self> {
        let config = crate::comm::mpi::MpiConfig::from_env()?;
        let mpi = crate::comm::mpi::MpiWorld::init(config)?;
        Ok(Self {
            comm: mpi.communicator(),
            engine: Engine::Mpi,
            _mpi: Some(mpi),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi() -> Result<Self> {
        let size = std::env::var("OMPI_COMM_WORLD_SIZE")
            .or_else(|_| std::env::var("PMI_SIZE"))
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(1);
        if size > 1 {
            return Err(ParallelError::Unavailable {
                engine: "mpi",
                reason: format!(
                    "started by an MPI launcher with {size} processes, but this binary was \
                     built without the `mpi` feature"
                ),
            });
        }
        Ok(Self::single())
    }

    #[cfg(feature = "nccl")]
    fn nccl(gpu: usize) -> Result<Self> {
        let bootstrap = if launched() {
            Self::mpi()?
        } else {
            Self::single()
        };
        let comm = crate::comm::nccl::NcclComm::new(bootstrap.comm.clone(), gpu)?;
        Ok(Self {
            comm: Arc::new(comm),
            engine: Engine::Nccl { gpu },
            #[cfg(feature = "mpi")]
            _mpi: bootstrap._mpi,
        })
    }

    #[cfg(not(feature = "nccl"))]
    fn nccl(_gpu: usize) -> Result<Self> {
        Err(ParallelError::Unavailable {
            engine: "nccl",
            reason: "this binary was built without NCCL: rebuild with `--features cuda`".into(),
        })
    }

    /// The engine carrying this world's collectives.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// A single-rank world.
    pub fn single() -> Self {
        Self {
            comm: Arc::new(SingleRank::new()),
            engine: Engine::Single,
            #[cfg(feature = "mpi")]
            _mpi: None,
        }
    }

    /// The world communicator.
    pub fn communicator(&self) -> Arc<dyn Communicator> {
        self.comm.clone()
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// Whether this process prints (rank 0 alone does).
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Ends this process with `code` after a failure that the other ranks may not share,
    /// without finalising MPI. Finalising waits for every peer, and a peer still inside a
    /// collective with this rank would wait for it until its timeout: exiting at once lets the
    /// launcher see the failed rank and stop the whole job. Print the error first.
    pub fn exit_after_failure(self, code: u8) -> ! {
        std::process::exit(i32::from(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_follows_the_device_the_launch_and_the_request() {
        assert_eq!(choose_engine(false, None, None).unwrap(), Engine::Single);
        assert_eq!(choose_engine(false, Some(0), None).unwrap(), Engine::Single);
        assert_eq!(choose_engine(true, None, None).unwrap(), Engine::Mpi);
        assert_eq!(
            choose_engine(true, Some(3), None).unwrap(),
            Engine::Nccl { gpu: 3 }
        );
        assert_eq!(
            choose_engine(true, Some(3), Some("mpi")).unwrap(),
            Engine::Mpi
        );
        assert_eq!(
            choose_engine(false, Some(0), Some("nccl")).unwrap(),
            Engine::Nccl { gpu: 0 }
        );
        for (gpu, bad) in [(None, "nccl"), (Some(0), "gloo")] {
            let err = choose_engine(true, gpu, Some(bad)).unwrap_err();
            assert!(
                matches!(err, ParallelError::InvalidArgument { name, .. } if name == ENGINE_ENV),
                "{err}"
            );
        }
    }

    #[test]
    fn an_unavailable_engine_is_an_error_naming_it() {
        // No GPU or libnccl.so here (or no NCCL in this build): an error, not a panic.
        match World::with_engine(Engine::Nccl { gpu: 0 }) {
            Err(ParallelError::Unavailable { engine, .. }) => assert_eq!(engine, "nccl"),
            Err(other) => panic!("unexpected error: {other}"),
            Ok(w) if w.engine() == (Engine::Nccl { gpu: 0 }) => {
                // A machine with a GPU and NCCL: the one-rank NCCL world works.
                assert_eq!(w.size(), 1);
            }
            Ok(w) => panic!("asked for NCCL, got {:?}", w.engine()),
        }
    }
}
