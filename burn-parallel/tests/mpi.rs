//! Multi-process tests: the check binaries under `mpirun` on 1, 2, 4 and 8 ranks
//! (oversubscribed), and a rank killed in the middle of a collective. Needs OpenMPI
//! (`scripts/setup-mpi`); built only with `--features mpi`.
#![cfg(feature = "mpi")]

use std::time::Duration;

use burn_parallel::launch::{run_check_program, run_check_program_with, run_with_reports};

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

/// The tensor collectives as the NCCL device path runs them (flattened buffers, the reorders
/// around a gather or reduce-scatter along an inner dimension as tensor operations, the flat
/// counts), here through MPI: every definition holds, and so does training (TP, SP, DP and the
/// distributed optimizer against one rank).
#[test]
fn the_device_paths_flat_collectives_match_their_definitions_and_train_like_one_rank() {
    for (bin, name) in [
        (
            env!("CARGO_BIN_EXE_burn-parallel-collectives"),
            "collectives",
        ),
        (
            env!("CARGO_BIN_EXE_burn-parallel-equivalence"),
            "equivalence",
        ),
    ] {
        let out = run_check_program_with(
            bin,
            name,
            &[2, 4],
            60,
            Duration::from_secs(120),
            &[(burn_parallel::ops::FLAT_ENV, "1")],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        print!("{out}");
    }
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

/// NCCL matches point-to-point messages by their order per peer, not by tag, and the NCCL
/// engine issues a posted send only with the rank's next send, receive or flush: every
/// schedule's messages between two stages must be received in the order they were sent, and
/// no stage may wait for a message its peer still holds back. Run over `InOrder` (both
/// behaviours, on MPI), the schedules still train like one rank.
#[test]
fn pipeline_schedules_receive_in_the_order_nccl_delivers() {
    let out = run_check_program_with(
        env!("CARGO_BIN_EXE_burn-parallel-pipeline"),
        "pipeline",
        &[2, 4, 8],
        60,
        Duration::from_secs(120),
        &[("PIPELINE_P2P_IN_ORDER", "1")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    print!("{out}");
}

#[test]
fn a_killed_rank_is_named_by_every_survivor_within_the_timeout() {
    let bin = env!("CARGO_BIN_EXE_burn-parallel-dead-peer");
    let timeout_s = 3;
    let run = run_with_reports(4, bin, timeout_s, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = &run.output;
    for rank in 0..3 {
        assert_eq!(
            run.exits[rank], "3",
            "rank {rank} exit status; stderr:\n{}",
            out.stderr
        );
        let verdict = &run.reports[rank];
        assert!(
            verdict.starts_with(&format!("rank {rank}: error:"))
                && verdict.contains("lost peer rank(s) [")
                && verdict.contains("rank 3 (pid"),
            "rank {rank} did not name rank 3: {verdict}\nstderr:\n{}",
            out.stderr
        );
    }
    assert_ne!(run.exits[3], "0", "the killed rank exited cleanly");
    // Timeout plus start-up and the grace period, far from a hang.
    assert!(
        out.elapsed < Duration::from_secs(timeout_s + 15),
        "took {:?}",
        out.elapsed
    );
}
