//! Multi-rank check (run under `mpirun --enable-recovery -np N`): the last rank kills itself in
//! the middle of a run of all-reduces; every other rank must fail within the timeout with an
//! error naming it. Exit codes: 3 = the expected `PeerLost` error, 1 = anything else.

use std::io::Write;
use std::process::ExitCode;

/// One `write` per line: ranks share one pipe, and writes up to PIPE_BUF bytes do not
/// interleave (`eprintln!` may split a line into several writes).
fn say(line: String) {
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("{line}\n").as_bytes());
}

/// Also writes the line to `$BURN_PARALLEL_REPORT_DIR/rank-R.txt` when that is set (the test
/// reads each rank's verdict there, whatever mpirun does to interleaved output).
fn report(rank: usize, line: String) {
    if let Some(dir) = std::env::var_os("BURN_PARALLEL_REPORT_DIR") {
        let _ = std::fs::write(
            std::path::Path::new(&dir).join(format!("rank-{rank}.txt")),
            &line,
        );
    }
    say(line);
}

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
                report(comm.rank(), format!("rank {}: error: {err}", comm.rank()));
                // Stay alive briefly so the other survivors do not count this rank as lost.
                std::thread::sleep(std::time::Duration::from_millis(500));
                drop(world);
                return ExitCode::from(3);
            }
            Err(err) => {
                report(
                    comm.rank(),
                    format!("rank {}: unexpected error: {err}", comm.rank()),
                );
                drop(world);
                return ExitCode::from(1);
            }
        }
    }
    report(
        comm.rank(),
        format!(
            "rank {}: the run finished although rank {victim} died",
            comm.rank()
        ),
    );
    ExitCode::from(1)
}
