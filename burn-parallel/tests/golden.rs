//! Golden conformance: every `rank_groups` case in `MOE_GOLDEN_DIR` (default
//! `shared/golden/moe` beside the repository), computed by Megatron-Core's `RankGenerator`.

use std::path::{Path, PathBuf};

use burn_parallel::prelude::*;
use serde_json::Value;

fn golden_dir() -> PathBuf {
    match std::env::var_os("MOE_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden/moe"),
    }
}

fn size(v: &Value, key: &str) -> Result<usize, String> {
    v[key]
        .as_u64()
        .map(|x| x as usize)
        .ok_or(format!("config field `{key}` missing"))
}

fn run_case(case: &Value) -> Result<(), String> {
    let cfg = &case["config"];
    let world = size(cfg, "world_size")?;
    let order = cfg["order"].as_str().unwrap_or(Mesh::DEFAULT_ORDER);
    let a = &cfg["attention"];
    let m = &cfg["moe"];
    let attention = ParallelDims::new(
        size(a, "tp")?,
        size(a, "cp")?,
        size(a, "dp")?,
        size(a, "pp")?,
    );
    let moe = MoeDims::new(size(m, "etp")?, size(m, "ep")?, size(m, "edp")?);
    if let Some(pp) = m["pp"].as_u64()
        && pp as usize != attention.pp
    {
        return Err(format!(
            "moe.pp ({pp}) differs from attention.pp ({})",
            attention.pp
        ));
    }
    let mesh = Mesh::with_order(world, attention, moe, order).map_err(|e| e.to_string())?;
    let fields: Vec<String> = match case["compare"].as_array() {
        Some(list) => list
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        None => case["expected"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
    };
    for field in fields {
        let kind = GroupKind::from_name(&field).ok_or(format!("field `{field}`: unknown group"))?;
        let want: Vec<Vec<usize>> =
            serde_json::from_value(case["expected"][field.as_str()].clone())
                .map_err(|e| format!("field `{field}`: {e}"))?;
        let got = mesh.groups(kind);
        if got != want.as_slice() {
            return Err(format!("field `{field}`: got {got:?}, expected {want:?}"));
        }
    }
    Ok(())
}

/// The closing `N passed, M failed` line, written past the test harness's output capture so it
/// shows in a plain `cargo test` run.
fn summary(line: String) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

#[test]
fn golden_rank_groups_cases() {
    let dir = golden_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read golden folder {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let (mut passed, mut failed) = (0usize, 0usize);
    for path in paths {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("readable"))
            .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", path.display()));
        if case["kind"] != "rank_groups" {
            continue;
        }
        let name = case["name"].as_str().unwrap_or("?").to_owned();
        match run_case(&case) {
            Ok(()) => {
                passed += 1;
                println!("ok   {name}");
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    summary(format!(
        "golden rank_groups ({}): {passed} passed, {failed} failed",
        dir.display()
    ));
    assert!(
        passed + failed > 0,
        "no rank_groups case found in {}",
        dir.display()
    );
    assert_eq!(failed, 0, "{failed} golden case(s) failed");
}
