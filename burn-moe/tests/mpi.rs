//! Expert parallelism on 2, 4 and 8 MPI ranks (oversubscribed): the layout-equivalence suite of
//! `src/bin/ep_equivalence.rs` and the folded transformer LM of `src/bin/folding.rs`. Needs
//! OpenMPI (`scripts/setup-mpi`); `--features mpi`.
#![cfg(feature = "mpi")]

use std::time::Duration;

use burn_parallel::launch::run_check_program;

/// Runs a check program on 2, 4 and 8 ranks and prints what it reported.
fn check(bin: &str, name: &str) {
    let out = run_check_program(bin, name, &[2, 4, 8], 60, Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}"));
    print!("{out}");
}

#[test]
fn expert_parallel_layouts_match_one_rank_on_2_4_8_ranks() {
    check(
        env!("CARGO_BIN_EXE_burn-moe-ep-equivalence"),
        "expert parallel",
    );
}

#[test]
fn folded_moe_transformer_trains_like_one_rank_on_2_4_8_ranks() {
    check(env!("CARGO_BIN_EXE_burn-moe-folding"), "folding");
}

/// A peer dies between the forward and the backward pass of an expert-parallel layer: the
/// survivor's backward all-to-all fails, its gradients are NaN, and the next forward,
/// `group::check` and a `DistributedAdamW` step each return the failure (naming the
/// operation, the EP group and the dead rank) before a second step runs.
#[test]
fn a_failed_backward_collective_stops_the_next_step_on_2_ranks() {
    let bin = env!("CARGO_BIN_EXE_burn-moe-collective-failure");
    let run = burn_parallel::launch::run_with_reports(2, bin, 3, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}"));
    let verdict = &run.reports[0];
    assert_eq!(
        run.exits[0], "3",
        "survivor: {verdict}\nstderr:\n{}",
        run.output.stderr
    );
    assert!(
        verdict.starts_with("rank 0: error before step 2: all_to_all_v on the ep group")
            && verdict.contains("lost peer rank(s) [1]"),
        "{verdict}"
    );
}
