//! Multi-rank check (run under `mpirun --enable-recovery -np N`): the last rank kills itself in
//! the middle of a run of all-reduces; every other rank must fail within the timeout with an
//! error naming it. Exit codes: 3 = the expected `PeerLost` error, 1 = anything else.

use std::process::ExitCode;

use burn_parallel::comm::ReduceOp;
use burn_parallel::comm::mpi::{MpiConfig, MpiWorld};
use burn_parallel::error::ParallelError;

fn main() -> ExitCode {
    let config = match MpiConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let world = match MpiWorld::init(config) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let comm = world.communicator();
    let victim = comm.size() - 1;
    for step in 0..10 {
        if step == 3 && comm.rank() == victim {
            // SIGKILL: no clean-up, no MPI_Finalize, exactly like a crashed node.
            let pid = std::process::id().to_string();
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid])
                .status();
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        let mut buf = vec![1.0f32; 1024];
        match comm.all_reduce(&mut buf, ReduceOp::Sum) {
            Ok(()) => {}
            Err(err @ ParallelError::PeerLost { .. }) => {
                eprintln!("rank {}: error: {err}", comm.rank());
                // Stay alive briefly so the other survivors do not count this rank as lost.
                std::thread::sleep(std::time::Duration::from_millis(500));
                drop(world);
                return ExitCode::from(3);
            }
            Err(err) => {
                eprintln!("rank {}: unexpected error: {err}", comm.rank());
                drop(world);
                return ExitCode::from(1);
            }
        }
    }
    eprintln!(
        "rank {}: the run finished although rank {victim} died",
        comm.rank()
    );
    ExitCode::from(1)
}
