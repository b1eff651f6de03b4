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
