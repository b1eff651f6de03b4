//! Multi-process tests: the check binaries under `mpirun` on 1, 2, 4 and 8 ranks
//! (oversubscribed), and a rank killed in the middle of a collective. Needs OpenMPI
//! (`scripts/setup-mpi`); built only with `--features mpi`.
#![cfg(feature = "mpi")]

use std::time::Duration;

use burn_parallel::launch::{MpiRun, run_check_program};

/// Runs a check program on 1, 2, 4 and 8 ranks and prints what it reported.
fn check_binary(bin: &str, name: &str) {
    let out = run_check_program(bin, name, &[1, 2, 4, 8], 60, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    print!("{out}");
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
fn context_parallel_attention_matches_one_rank_on_1_2_4_8_ranks() {
    check_binary(env!("CARGO_BIN_EXE_burn-parallel-context"), "context");
}

#[test]
fn pipeline_schedules_train_like_one_rank_on_1_2_4_8_ranks() {
    check_binary(env!("CARGO_BIN_EXE_burn-parallel-pipeline"), "pipeline");
}

#[test]
fn a_killed_rank_is_named_by_every_survivor_within_the_timeout() {
    let bin = env!("CARGO_BIN_EXE_burn-parallel-dead-peer");
    let timeout_s = 3;
    // Each rank's exit status (mpirun does not report it once recovery is enabled) and its
    // verdict go to files: mpirun may interleave the ranks' output lines.
    let reports =
        std::env::temp_dir().join(format!("burn-parallel-dead-peer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&reports);
    std::fs::create_dir_all(&reports).expect("report folder");
    let script = format!(
        "\"{bin}\"; echo $? > \"{}/exit-$OMPI_COMM_WORLD_RANK.txt\"",
        reports.display()
    );
    let out = MpiRun::new(4, ["sh", "-c", script.as_str()])
        .mpirun_arg("--enable-recovery")
        .env("BURN_PARALLEL_TIMEOUT_S", timeout_s.to_string())
        .env("BURN_PARALLEL_REPORT_DIR", reports.display().to_string())
        .limit(Duration::from_secs(60))
        .run_exclusive()
        .unwrap_or_else(|e| panic!("{e}"));
    let read = |name: String| std::fs::read_to_string(reports.join(name)).unwrap_or_default();
    for rank in 0..3 {
        let code = read(format!("exit-{rank}.txt"));
        assert_eq!(
            code.trim(),
            "3",
            "rank {rank} exit status; stderr:\n{}",
            out.stderr
        );
        let verdict = read(format!("rank-{rank}.txt"));
        assert!(
            verdict.starts_with(&format!("rank {rank}: error:"))
                && verdict.contains("lost peer rank(s) [")
                && verdict.contains("rank 3 (pid"),
            "rank {rank} did not name rank 3: {verdict}\nstderr:\n{}",
            out.stderr
        );
    }
    let killed = read("exit-3.txt".to_string());
    assert_ne!(killed.trim(), "0", "the killed rank exited cleanly");
    let _ = std::fs::remove_dir_all(&reports);
    // Timeout plus start-up and the grace period, far from a hang.
    assert!(
        out.elapsed < Duration::from_secs(timeout_s + 15),
        "took {:?}",
        out.elapsed
    );
}
