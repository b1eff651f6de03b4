//! Golden conformance: every JSON case of kinds `router` and `moe_layer` in `MOE_GOLDEN_DIR`
//! (default `shared/golden/moe` beside the repository) is run and compared field by field.
//! The references were computed by Megatron-Core's own code (see the folder's README).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use burn_moe::dispatch::permute::routing_permutation;
use burn_moe::lm::precision::cast_module;
use burn_moe::prelude::*;
use serde_json::Value;

fn golden_dir() -> PathBuf {
    match std::env::var_os("MOE_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden/moe"),
    }
}

/// The backend the cases run on: Flex by default; `BURN_TEST_DEVICE=wgpu` (with `--features
/// wgpu`) runs them on the default wgpu adapter with the MoE kernels, `BURN_TEST_DEVICE=cuda`
/// (with `--features cuda`) on the first CUDA device.
fn device() -> Device {
    let base = match std::env::var("BURN_TEST_DEVICE").as_deref() {
        Ok("cuda") => cuda_device(),
        Ok("wgpu") => wgpu_device(),
        Ok("flex") | Err(_) => Device::flex(),
        Ok(other) => panic!("BURN_TEST_DEVICE={other}: use flex, wgpu or cuda"),
    };
    base.autodiff()
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Device {
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    assert!(
        burn_moe::kernels::kernels_available(&device),
        "the wgpu device should run the MoE kernels"
    );
    device
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Device {
    panic!("BURN_TEST_DEVICE=wgpu needs `--features wgpu`")
}

fn cuda_device() -> Device {
    burn_moe::backend::device(BackendKind::Cuda)
        .unwrap_or_else(|e| panic!("BURN_TEST_DEVICE=cuda: {e}"))
}

struct Case {
    name: String,
    kind: String,
    json: Value,
}

fn load_cases(dir: &Path) -> Vec<Case> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read golden folder {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable case");
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", p.display()));
            let name = json["name"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| p.file_stem().unwrap().to_string_lossy().into_owned());
            let kind = json["kind"].as_str().unwrap_or("").to_owned();
            Case { name, kind, json }
        })
        .collect()
}

/// `{"shape": [...], "data": [...]}` → (shape, values).
fn tensor_json(v: &Value, what: &str) -> Result<(Vec<usize>, Vec<f64>), String> {
    let shape = v["shape"]
        .as_array()
        .ok_or(format!("`{what}` has no shape"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .ok_or(format!("`{what}`: bad shape"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data = flat_numbers(&v["data"]).ok_or(format!("`{what}`: bad data"))?;
    if shape.iter().product::<usize>() != data.len() {
        return Err(format!(
            "`{what}`: shape {shape:?} does not match {} values",
            data.len()
        ));
    }
    Ok((shape, data))
}

fn flat_numbers(v: &Value) -> Option<Vec<f64>> {
    match v {
        Value::Number(n) => Some(vec![n.as_f64()?]),
        Value::Bool(b) => Some(vec![if *b { 1.0 } else { 0.0 }]),
        Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                out.extend(flat_numbers(item)?);
            }
            Some(out)
        }
        _ => None,
    }
}

/// Numbers of an expected value: a tensor object, a list or a scalar.
fn expected_numbers(v: &Value) -> Option<Vec<f64>> {
    if v.get("data").is_some() {
        flat_numbers(&v["data"])
    } else {
        flat_numbers(v)
    }
}

fn float_tensor<const D: usize>(
    v: &Value,
    what: &str,
    device: &Device,
) -> Result<Tensor<D>, String> {
    let (shape, data) = tensor_json(v, what)?;
    if shape.len() != D {
        return Err(format!("`{what}`: expected rank {D}, got shape {shape:?}"));
    }
    let values: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_data(TensorData::new(values, shape), device))
}

fn read(t: Tensor<2>) -> Vec<f64> {
    t.into_data().iter::<f32>().map(f64::from).collect()
}
fn read_any<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().iter::<f32>().map(f64::from).collect()
}
fn read_int(t: Tensor<1, Int>) -> Vec<f64> {
    t.into_data().iter::<i64>().map(|v| v as f64).collect()
}

struct Tolerance {
    rtol: f64,
    atol: f64,
}

fn tolerance(case: &Value) -> Tolerance {
    let tol = &case["tolerance"];
    Tolerance {
        rtol: tol["rtol"].as_f64().unwrap_or(1e-4),
        atol: tol["atol"].as_f64().unwrap_or(1e-5),
    }
}

/// The expected values of `field`, as many as `got` has.
fn expected_like(field: &str, got: &[f64], want: &Value) -> Result<Vec<f64>, String> {
    let want =
        expected_numbers(want).ok_or(format!("field `{field}`: expected value is not numeric"))?;
    if got.len() != want.len() {
        return Err(format!(
            "field `{field}`: got {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    Ok(want)
}

/// Compares `got` with the expected value of `field`; `exact` for integer and boolean results.
fn check(
    field: &str,
    got: &[f64],
    want: &Value,
    tol: &Tolerance,
    exact: bool,
) -> Result<(), String> {
    let want = expected_like(field, got, want)?;
    let mut bad = 0;
    let mut first = None;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let ok = if exact {
            g == w
        } else {
            (g - w).abs() <= tol.atol + tol.rtol * w.abs()
        };
        if !ok {
            bad += 1;
            first.get_or_insert((i, g, w));
        }
    }
    match first {
        None => Ok(()),
        Some((i, g, w)) => Err(format!(
            "field `{field}`: {bad} of {} values differ; first at index {i}: got {g}, expected {w}",
            got.len()
        )),
    }
}

fn opt_f64(v: &Value) -> Option<f64> {
    v.as_f64()
}
fn opt_usize(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize)
}

fn router_config(cfg: &Value, hidden: usize) -> Result<RouterConfig, String> {
    let num_experts = opt_usize(&cfg["num_experts"]).ok_or("config.num_experts missing")?;
    let topk = opt_usize(&cfg["topk"]).ok_or("config.topk missing")?;
    let score = match cfg["score_function"].as_str().unwrap_or("softmax") {
        "softmax" => ScoreFunction::Softmax,
        "sigmoid" => ScoreFunction::Sigmoid,
        other => return Err(format!("unknown score_function {other}")),
    };
    let policy = match cfg["drop_policy"].as_str().unwrap_or("probs") {
        "probs" => DropPolicy::Probs,
        "position" => DropPolicy::Position,
        other => return Err(format!("unknown drop_policy {other}")),
    };
    let coeff = opt_f64(&cfg["aux_loss_coeff"]).unwrap_or(0.0);
    let mut config = RouterConfig::new(hidden, num_experts, topk)
        .with_score_function(score)
        .with_pre_softmax(cfg["pre_softmax"].as_bool().unwrap_or(false))
        .with_num_groups(opt_usize(&cfg["num_groups"]))
        .with_group_topk(opt_usize(&cfg["group_topk"]))
        .with_scaling_factor(opt_f64(&cfg["scaling_factor"]))
        .with_expert_bias(cfg["expert_bias"].is_array())
        .with_capacity_factor(opt_f64(&cfg["capacity_factor"]))
        .with_drop_policy(policy)
        .with_pad_to_capacity(cfg["pad_to_capacity"].as_bool().unwrap_or(false))
        .with_z_loss_coeff(opt_f64(&cfg["z_loss_coeff"]));
    if let Some(rate) = opt_f64(&cfg["bias_update_rate"]) {
        config = config.with_bias_update_rate(rate);
    }
    config = match cfg["aux_loss_type"].as_str().unwrap_or("none") {
        "aux_loss" => config.with_aux_loss_coeff(coeff),
        "seq_aux_loss" => config.with_seq_aux_loss_coeff(coeff),
        "global_aux_loss" => config.with_global_aux_loss_coeff(coeff),
        "none" => config,
        other => return Err(format!("unknown aux_loss_type {other}")),
    };
    Ok(config)
}

fn with_bias(router: Router, cfg: &Value, device: &Device) -> Result<Router, String> {
    match cfg["expert_bias"].as_array() {
        None => Ok(router),
        Some(_) => {
            let values: Vec<f32> = flat_numbers(&cfg["expert_bias"])
                .unwrap()
                .iter()
                .map(|&v| v as f32)
                .collect();
            router
                .with_expert_bias(Tensor::from_data(values.as_slice(), device))
                .map_err(|e| e.to_string())
        }
    }
}

fn compare_list(case: &Value) -> Vec<String> {
    case["compare"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Fields checked in every case that has them, beyond the `compare` list.
const ALWAYS: [&str; 5] = [
    "aux_loss",
    "z_loss",
    "capacity",
    "expert_bias_after_update",
    "tokens_per_expert",
];

fn fields_to_check(case: &Value) -> Vec<String> {
    let mut fields = compare_list(case);
    for f in ALWAYS {
        if case["expected"].get(f).is_some() && !fields.iter().any(|x| x == f) {
            fields.push(f.to_owned());
        }
    }
    fields
}

fn run_router_case(case: &Value) -> Result<(), String> {
    let device = device();
    let cfg = &case["config"];
    let tol = tolerance(case);
    let logits: Tensor<2> =
        float_tensor(&case["inputs"]["logits"], "logits", &device)?.require_grad();
    let upstream: Tensor<2> = float_tensor(&case["inputs"]["upstream"], "upstream", &device)?;
    let [_, e] = logits.dims();
    let config = router_config(cfg, 1)?;
    let router =
        Router::from_weight(config, Tensor::zeros([e, 1], &device)).map_err(|e| e.to_string())?;
    let router = with_bias(router, cfg, &device)?;
    let seq_len = opt_usize(&cfg["seq_len"]).ok_or("config.seq_len missing")?;
    let batch = opt_usize(&cfg["batch"]).ok_or("config.batch missing")?;
    let out = router
        .route(logits.clone(), seq_len, batch, RouteOptions::default())
        .map_err(|e| e.to_string())?;
    let mut loss = (out.probs.clone() * upstream).sum();
    if let Some(l) = out.total_loss() {
        loss = loss + l;
    }
    let grads = loss.backward();
    let expected = &case["expected"];
    for field in fields_to_check(case) {
        let want = &expected[field.as_str()];
        match field.as_str() {
            "probs" => check(&field, &read(out.probs.clone()), want, &tol, false)?,
            "routing_map" => check(
                &field,
                &read(out.routing_map.clone().float()),
                want,
                &tol,
                true,
            )?,
            "tokens_per_expert" => check(
                &field,
                &read_int(out.tokens_per_expert.clone()),
                want,
                &tol,
                true,
            )?,
            "permutation" => {
                let (perm, _) =
                    routing_permutation(out.routing_map.clone()).map_err(|e| e.to_string())?;
                let got: Vec<f64> = perm.iter().map(|&v| v as f64).collect();
                check(&field, &got, want, &tol, true)?
            }
            "grad_logits" => {
                let g = logits
                    .grad(&grads)
                    .ok_or("no gradient reached the logits")?;
                check(&field, &read(g), want, &tol, false)?
            }
            "aux_loss" => {
                let got = out
                    .load_balancing_loss()
                    .ok_or("field `aux_loss`: no aux loss computed")?;
                check(&field, &read_any(got), want, &tol, false)?
            }
            "z_loss" => {
                let got = out
                    .z_loss
                    .clone()
                    .ok_or("field `z_loss`: no z-loss computed")?;
                check(&field, &read_any(got), want, &tol, false)?
            }
            "capacity" => {
                let got = out
                    .capacity
                    .ok_or("field `capacity`: routing was dropless")?;
                check(&field, &[got as f64], want, &tol, true)?
            }
            "expert_bias_after_update" => {
                let counts = out.tokens_per_expert.clone().float();
                let got = router
                    .updated_expert_bias(counts)
                    .map_err(|e| e.to_string())?;
                check(&field, &read_any(got), want, &tol, false)?
            }
            other => return Err(format!("field `{other}`: not known to this test")),
        }
    }
    Ok(())
}

fn activation(name: &str) -> Result<Activation, String> {
    Ok(match name {
        "swiglu" => Activation::SwiGlu,
        "gelu" => Activation::Gelu,
        "silu" => Activation::Silu,
        "relu" => Activation::Relu,
        other => return Err(format!("unknown activation {other}")),
    })
}

/// The unit roundoff of a half-precision type: bf16 has 8 significant bits, so rounding to
/// nearest is off by at most 2⁻⁸ of the value; f16 has 11 (2⁻¹¹).
fn unit_roundoff(dtype: FloatDType) -> f64 {
    match dtype {
        FloatDType::BF16 => 2f64.powi(-8),
        FloatDType::F16 => 2f64.powi(-11),
        other => panic!("not a half-precision type: {other:?}"),
    }
}

/// Roundings to the half type on the longest chain from the layer's input to a gradient, at
/// most 16: forward 10 — the rows and the expert weight (2), the first product (1), the
/// activation's elementwise steps (up to 3), the routing probability and its product (2), the
/// second weight and product (2); backward up to 6 more — the output gradient (1), its
/// product with the second weight (1), the product with the probability (1), the
/// activation's derivative (up to 2), the product with the rows (1). Each perturbs its tensor
/// by at most `u` in norm.
const HALF_ROUNDINGS: f64 = 16.0;

/// The half-precision check of a field: its norm-wise relative error `‖got − want‖ / ‖want‖`
/// within `HALF_ROUNDINGS · u` (2⁻⁴ in bf16, 2⁻⁷ in f16). Norm-wise, not element by element: a
/// value that is a sum with cancellation, or whose pre-activation sits within a rounding of a
/// ReLU's kink (the rounding then flips its derivative), can be off by far more than `u` of
/// itself while the tensor is as close as its roundings allow.
fn half_check(field: &str, got: &[f64], want: &Value, dtype: FloatDType) -> Result<(), String> {
    let expected = expected_like(field, got, want)?;
    let norm = expected.iter().map(|w| w * w).sum::<f64>().sqrt();
    let err = got
        .iter()
        .zip(&expected)
        .map(|(g, w)| (g - w) * (g - w))
        .sum::<f64>()
        .sqrt();
    let u = unit_roundoff(dtype);
    let bound = HALF_ROUNDINGS * u;
    if err <= bound * norm {
        Ok(())
    } else {
        Err(format!(
            "field `{field}`: norm-wise relative error {:.4} ({:.1} roundings of {dtype:?}) \
             exceeds {bound}",
            err / norm,
            err / norm / u
        ))
    }
}

/// The fields a bf16 layer computes in f32 (the router and its losses): compared with the case's
/// own tolerance, routing decisions exactly.
const ROUTER_FIELDS: [&str; 4] = ["aux_loss", "z_loss", "capacity", "tokens_per_expert"];

/// A layer case with the layer's matrices in `dtype` ([`cast_module`]: experts and shared
/// experts in `dtype`, the router in f32) on the case's f32 input: the router sees the case's
/// own values, so its decisions and losses must equal the f32 ones; the rest is held to
/// [`half_check`] when `dtype` is a half-precision type.
fn run_layer_case_in(
    case: &Value,
    compute: ExpertsCompute,
    dtype: FloatDType,
) -> Result<(), String> {
    let device = device();
    let cfg = &case["config"];
    let inputs = &case["inputs"];
    let tol = tolerance(case);
    let hidden = opt_usize(&cfg["hidden"]).ok_or("config.hidden missing")?;
    let ffn = opt_usize(&cfg["ffn_hidden"]).ok_or("config.ffn_hidden missing")?;
    let act = activation(cfg["activation"].as_str().unwrap_or("swiglu"))?;
    let seq_len = opt_usize(&cfg["seq_len"]).ok_or("config.seq_len missing")?;
    let batch = opt_usize(&cfg["batch"]).ok_or("config.batch missing")?;

    let x: Tensor<2> = float_tensor(&inputs["x"], "x", &device)?.require_grad();
    let upstream: Tensor<2> = float_tensor(&inputs["upstream"], "upstream", &device)?;
    let router_config = router_config(cfg, hidden)?;
    let e = router_config.num_experts;
    let router = Router::from_weight(
        router_config,
        float_tensor(&inputs["router_weight"], "router_weight", &device)?,
    )
    .map_err(|e| e.to_string())?;
    let router = with_bias(router, cfg, &device)?;
    let experts_config = ExpertsConfig::new(e, hidden, ffn)
        .with_activation(act)
        .with_compute(compute);
    let experts = Experts::from_weights(
        experts_config,
        float_tensor(&inputs["w1"], "w1", &device)?,
        float_tensor(&inputs["w2"], "w2", &device)?,
    )
    .map_err(|e| e.to_string())?;
    let shared = match opt_usize(&cfg["shared_ffn_hidden"]) {
        None => None,
        Some(fs) => {
            let gate = match inputs.get("shared_gate") {
                Some(g) => Some(float_tensor(g, "shared_gate", &device)?),
                None => None,
            };
            let config = SharedExpertsConfig::new(hidden, fs)
                .with_activation(act)
                .with_gate(gate.is_some());
            Some(
                SharedExperts::from_weights(
                    config,
                    float_tensor(&inputs["shared_w1"], "shared_w1", &device)?,
                    float_tensor(&inputs["shared_w2"], "shared_w2", &device)?,
                    gate,
                )
                .map_err(|e| e.to_string())?,
            )
        }
    };
    let layer = MoeLayer::new(router, experts, shared).map_err(|e| e.to_string())?;
    let layer = cast_module(layer, dtype);
    let out = layer
        .forward(x.clone().reshape([seq_len, batch, hidden]))
        .map_err(|e| e.to_string())?;
    let y: Tensor<2> = out.output.clone().reshape([seq_len * batch, hidden]);
    let mut loss = (y.clone() * upstream).sum();
    if let Some(l) = out.total_aux_loss() {
        loss = loss + l;
    }
    let grads = loss.backward();
    let expected = &case["expected"];
    let grad3 = |p: &burn::module::Param<Tensor<3>>, field: &str| -> Result<Vec<f64>, String> {
        Ok(read_any(
            p.val()
                .grad(&grads)
                .ok_or(format!("field `{field}`: no gradient"))?,
        ))
    };
    let grad2 = |t: Tensor<2>, field: &str| -> Result<Vec<f64>, String> {
        Ok(read(
            t.grad(&grads)
                .ok_or(format!("field `{field}`: no gradient"))?,
        ))
    };
    for field in fields_to_check(case) {
        let want = &expected[field.as_str()];
        let got = match field.as_str() {
            "output" => read(y.clone()),
            "grad_x" => grad2(x.clone(), &field)?,
            "grad_router_weight" => grad2(layer.router.weight.val(), &field)?,
            "grad_w1" => grad3(&layer.experts.w1, &field)?,
            "grad_w2" => grad3(&layer.experts.w2, &field)?,
            "grad_shared_w1" | "grad_shared_w2" | "grad_shared_gate" => {
                let shared = layer
                    .shared
                    .as_ref()
                    .ok_or(format!("field `{field}`: no shared expert"))?;
                let p = match field.as_str() {
                    "grad_shared_w1" => shared.w1.val(),
                    "grad_shared_w2" => shared.w2.val(),
                    _ => shared.gate.as_ref().ok_or("no shared gate")?.val(),
                };
                grad2(p, &field)?
            }
            "tokens_per_expert" => {
                check(
                    &field,
                    &read_int(out.tokens_per_expert.clone()),
                    want,
                    &tol,
                    true,
                )?;
                continue;
            }
            "aux_loss" => read_any(
                out.aux_loss
                    .clone()
                    .ok_or("field `aux_loss`: no aux loss computed")?,
            ),
            "z_loss" => read_any(
                out.z_loss
                    .clone()
                    .ok_or("field `z_loss`: no z-loss computed")?,
            ),
            "capacity" => {
                let got = out
                    .router
                    .capacity
                    .ok_or("field `capacity`: routing was dropless")?;
                check(&field, &[got as f64], want, &tol, true)?;
                continue;
            }
            other => return Err(format!("field `{other}`: not known to this test")),
        };
        if dtype == FloatDType::F32 || ROUTER_FIELDS.contains(&field.as_str()) {
            check(&field, &got, want, &tol, false)?;
        } else {
            half_check(&field, &got, want, dtype)?;
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

/// Runs `run` on every case of `kinds`, prints one line per case and the closing summary
/// (`label`), and fails when any case failed or none was found.
fn run_cases(label: &str, kinds: &[&str], run: impl Fn(&Case) -> Result<(), String>) {
    let dir = golden_dir();
    let cases = load_cases(&dir);
    let (mut passed, mut failed) = (0usize, 0usize);
    for case in cases.iter().filter(|c| kinds.contains(&c.kind.as_str())) {
        match run(case) {
            Ok(()) => {
                passed += 1;
                println!("ok   {} ({})", case.name, case.kind);
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {} ({}): {e}", case.name, case.kind);
            }
        }
    }
    summary(format!(
        "{label} ({}): {passed} passed, {failed} failed",
        dir.display()
    ));
    assert!(
        passed + failed > 0,
        "no {kinds:?} case found in {}",
        dir.display()
    );
    assert_eq!(failed, 0, "{failed} golden case(s) failed: {label}");
}

/// A layer case with each of `computes`, the matrices in `dtype`.
fn layer_case_all(
    case: &Value,
    computes: &[ExpertsCompute],
    dtype: FloatDType,
) -> Result<(), String> {
    computes.iter().try_for_each(|&compute| {
        run_layer_case_in(case, compute, dtype)
            .map_err(|e| format!("[{compute:?} experts, {dtype:?}] {e}"))
    })
}

#[test]
fn golden_router_and_moe_layer_cases() {
    run_cases("golden moe", &["router", "moe_layer"], |case| {
        if case.kind == "router" {
            run_router_case(&case.json)
        } else {
            let all = [
                ExpertsCompute::Sequential,
                ExpertsCompute::Batched,
                ExpertsCompute::Auto,
                ExpertsCompute::Grouped,
            ];
            layer_case_all(&case.json, &all, FloatDType::F32)
        }
    });
}

/// The layer cases with the experts and shared experts in bf16 — f16 on a device without bf16
/// (Mesa's lavapipe) — and the router in f32 (Megatron's `--bf16 --moe-router-dtype fp32`),
/// with every expert computation: routing decisions, tokens per expert and the router's losses
/// as in f32 (the case's tolerance), the output and every gradient within [`half_check`]'s
/// norm-wise bound. The router cases need no half-precision run: the router computes in f32
/// in either precision (its input cast to f32), so they are the f32 cases above.
#[test]
fn golden_moe_layer_cases_in_bf16_or_f16() {
    let device = device();
    let Some(dtype) = [FloatDType::BF16, FloatDType::F16]
        .into_iter()
        .find(|&d| device.supports_dtype(d))
    else {
        summary(
            "golden moe in half precision: skipped, the device has neither bf16 nor f16".into(),
        );
        return;
    };
    let computes = [
        ExpertsCompute::Sequential,
        ExpertsCompute::Batched,
        ExpertsCompute::Grouped,
    ];
    run_cases(
        &format!("golden moe in {dtype:?}"),
        &["moe_layer"],
        |case| layer_case_all(&case.json, &computes, dtype),
    );
}
