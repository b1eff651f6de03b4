//! Starting a run: the same binary runs alone or under `mpirun -np N`.

use std::sync::Arc;

use crate::comm::{Communicator, SingleRank};
#[cfg(not(feature = "mpi"))]
use crate::error::ParallelError;
use crate::error::Result;

/// Environment variables by which launchers announce a multi-process world.
const LAUNCHER_ENV: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// The world of this process: MPI when launched by `mpirun` (feature `mpi`), a single rank
/// otherwise. Keep it alive for the whole run; dropping it finalises MPI.
#[derive(Debug)]
pub struct World {
    comm: Arc<dyn Communicator>,
    #[cfg(feature = "mpi")]
    _mpi: Option<crate::comm::mpi::MpiWorld>,
}

impl World {
    /// Detects the launcher: under `mpirun` initialises MPI with the timeout from
    /// `BURN_PARALLEL_TIMEOUT_S`; alone, a single rank. A build without the `mpi` feature
    /// started by `mpirun` with more than one process is an error, not N independent runs.
    pub fn from_env() -> Result<Self> {
        let launched = LAUNCHER_ENV.iter().any(|v| std::env::var_os(v).is_some());
        if !launched {
            return Ok(Self::single());
        }
        #[cfg(feature = "mpi")]
        {
            let config = crate::comm::mpi::MpiConfig::from_env()?;
            let mpi = crate::comm::mpi::MpiWorld::init(config)?;
            Ok(Self {
                comm: mpi.communicator(),
                _mpi: Some(mpi),
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
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
    }

    /// A single-rank world.
    pub fn single() -> Self {
        Self {
            comm: Arc::new(SingleRank::new()),
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
