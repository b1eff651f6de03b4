//! Expert parallelism on 2, 4 and 8 MPI ranks (oversubscribed): the layout-equivalence suite of
//! `src/bin/ep_equivalence.rs` and the folded transformer LM of `src/bin/folding.rs`. Needs
//! OpenMPI (`scripts/setup-mpi`); `--features mpi`.
#![cfg(feature = "mpi")]

use std::time::Duration;

use burn_parallel::launch::MpiRun;

/// One `mpirun` at a time (two cores).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check(bin: &str, expect: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for np in [2, 4, 8] {
        let out = MpiRun::new(np, [bin])
            .env("BURN_PARALLEL_TIMEOUT_S", "60")
            .limit(Duration::from_secs(180))
            .run()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.success, "{np} ranks:\n{}\n{}", out.stdout, out.stderr);
        let line = format!("{expect} ({np} ranks):");
        assert!(
            out.stdout.contains(&line),
            "no `{line}` in:\n{}",
            out.stdout
        );
        print!("{}", out.stdout);
    }
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
