//! Multi-process tests: the check binaries under `mpirun` on 1, 2, 4 and 8 ranks
//! (oversubscribed), and a rank killed in the middle of a collective. Needs OpenMPI
//! (`scripts/setup-mpi`); built only with `--features mpi`.
#![cfg(feature = "mpi")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One `mpirun` at a time: concurrent jobs oversubscribe two cores and distort the timing test.
static SERIAL: Mutex<()> = Mutex::new(());

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// `mpirun -np N PROGRAM ARGS…` with the settings CI needs, killed after `limit`.
fn mpirun(
    np: usize,
    extra: &[&str],
    program: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Run {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &np.to_string()])
        .args(extra)
        .args(program)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,vader")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .expect("mpirun must be installed for the MPI tests: run scripts/setup-mpi");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for mpirun") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mpirun -np {np} {program:?} did not finish within {limit:?}; stderr:\n{}",
                err_reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        success: status.success(),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

fn check_binary(bin: &str, expect: &str) {
    for np in [1, 2, 4, 8] {
        let run = mpirun(
            np,
            &[],
            &[bin],
            &[("BURN_PARALLEL_TIMEOUT_S", "60")],
            Duration::from_secs(120),
        );
        assert!(
            run.success,
            "{bin} failed on {np} ranks:\n{}\n{}",
            run.stdout, run.stderr
        );
        let line = format!("{expect} ({np} ranks)");
        assert!(
            run.stdout.contains(&line),
            "no `{line}` in:\n{}",
            run.stdout
        );
        print!("{}", run.stdout);
    }
}

#[test]
fn collectives_match_their_definitions_on_1_2_4_8_ranks() {
    check_binary(
        env!("CARGO_BIN_EXE_burn-parallel-collectives"),
        "collectives",
    );
}

#[test]
fn tp_sp_dp_zero1_match_one_rank_on_1_2_4_8_ranks() {
    check_binary(
        env!("CARGO_BIN_EXE_burn-parallel-equivalence"),
        "equivalence",
    );
}

#[test]
fn a_killed_rank_is_named_by_every_survivor_within_the_timeout() {
    let bin = env!("CARGO_BIN_EXE_burn-parallel-dead-peer");
    let timeout_s = 3;
    // The shell reports each rank's exit status (mpirun does not, once recovery is enabled).
    let script = format!("\"{bin}\"; echo \"rank $OMPI_COMM_WORLD_RANK exit $?\" >&2");
    let run = mpirun(
        4,
        &["--enable-recovery"],
        &["sh", "-c", &script],
        &[("BURN_PARALLEL_TIMEOUT_S", &timeout_s.to_string())],
        Duration::from_secs(60),
    );
    for rank in 0..3 {
        assert!(
            run.stderr.contains(&format!("rank {rank} exit 3")),
            "rank {rank} did not exit with the lost-peer code:\n{}",
            run.stderr
        );
        let named = run.stderr.lines().any(|l| {
            l.starts_with(&format!("rank {rank}: error:"))
                && l.contains("lost peer rank(s) [")
                && l.contains("rank 3 (pid")
        });
        assert!(named, "rank {rank} did not name rank 3:\n{}", run.stderr);
    }
    assert!(
        !run.stderr.contains("rank 3 exit 0"),
        "the killed rank exited cleanly:\n{}",
        run.stderr
    );
    // Timeout plus start-up and the grace period, far from a hang.
    assert!(
        run.elapsed < Duration::from_secs(timeout_s + 15),
        "took {:?}",
        run.elapsed
    );
    let _ = run.success;
}
