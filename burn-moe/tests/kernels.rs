//! The dispatch and grouped-GEMM operations of `burn_moe::kernels` on every runtime this build
//! has: outputs against plain host loops, gradients against Burn's own autodiff of the
//! reference implementation (plain tensor ops) on Flex, bit-identical repeats, and argument
//! errors.
//!
//! Flex always runs (native loops and per-group `gemm`); with `--features wgpu` the CubeCL kernels run on the
//! default wgpu adapter (Mesa's lavapipe on a machine without a GPU); `BURN_TEST_DEVICE=cuda`
//! with `--features cuda` adds the first CUDA device.

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use burn_moe::MoeError;
use burn_moe::host::{read_f32, read_i64};
use burn_moe::kernels::{self, reference};

/// (name, device) of every backend to test.
fn devices() -> Vec<(&'static str, Device)> {
    #[allow(unused_mut)]
    let mut out = vec![("flex", Device::flex())];
    #[cfg(feature = "wgpu")]
    out.push((
        "wgpu",
        Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
    ));
    #[cfg(feature = "cuda")]
    if std::env::var("BURN_TEST_DEVICE").as_deref() == Ok("cuda") {
        out.push((
            "cuda",
            burn_moe::backend::device(burn_moe::backend::BackendKind::Cuda)
                .unwrap_or_else(|e| panic!("BURN_TEST_DEVICE=cuda: {e}")),
        ));
    }
    out
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    burn_parallel::rng::uniform_values(n, seed, 1.0)
}

fn float<const D: usize>(v: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
}

/// A top-k routing mask `[T, E]` with uneven loads; experts in `empty` get no token.
fn routing(t: usize, e: usize, k: usize, empty: &[usize], seed: u64) -> Vec<bool> {
    let scores = values(t * e, seed);
    let mut mask = vec![false; t * e];
    for tok in 0..t {
        let mut order: Vec<usize> = (0..e).filter(|x| !empty.contains(x)).collect();
        // Skew: low-numbered experts are preferred, so loads are uneven.
        order.sort_by(|&a, &b| {
            let sa = scores[tok * e + a] + 0.3 / (a + 1) as f32;
            let sb = scores[tok * e + b] + 0.3 / (b + 1) as f32;
            sb.total_cmp(&sa)
        });
        for &x in order.iter().take(k) {
            mask[tok * e + x] = true;
        }
    }
    mask
}

fn mask_tensor(mask: &[bool], t: usize, e: usize, device: &Device) -> Tensor<2, Bool> {
    Tensor::from_data(TensorData::new(mask.to_vec(), [t, e]), device)
}

/// Host oracle of the dispatch order: (token of row, expert of row, counts, row map).
fn oracle_index(mask: &[bool], t: usize, e: usize) -> (Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>) {
    let (mut tokens, mut experts, mut counts) = (vec![], vec![], vec![0i64; e]);
    let mut row_map = vec![-1i64; t * e];
    for x in 0..e {
        for tok in 0..t {
            if mask[tok * e + x] {
                row_map[tok * e + x] = tokens.len() as i64;
                tokens.push(tok as i64);
                experts.push(x as i64);
                counts[x] += 1;
            }
        }
    }
    (tokens, experts, counts, row_map)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// Routing cases: (tokens, experts, top-k, experts with no token).
const ROUTING_CASES: &[(usize, usize, usize, &[usize])] = &[
    (1, 4, 1, &[]),
    (1, 8, 2, &[]),
    (37, 8, 2, &[3]),
    (32, 8, 2, &[]),
    (32, 16, 4, &[0, 15]),
    (24, 4, 1, &[]),
    (300, 16, 4, &[5]),
    (700, 5, 1, &[2, 4]),
];

#[test]
fn routing_index_and_counts_match_host_loops() {
    for (name, device) in devices() {
        assert!(
            kernels::kernels_available(&device),
            "{name}: the extension should be available"
        );
        assert!(kernels::kernels_available(&device.clone().autodiff()));
        for (case, &(t, e, k, empty)) in ROUTING_CASES.iter().enumerate() {
            let mask = routing(t, e, k, empty, case as u64);
            let (tokens, experts, counts, map) = oracle_index(&mask, t, e);
            let what = format!("{name} T={t} E={e} k={k}");
            let got_counts = read_i64(
                kernels::expert_counts(mask_tensor(&mask, t, e, &device)),
                "counts",
            )
            .unwrap();
            assert_eq!(got_counts, counts, "{what}: expert_counts");
            let index = kernels::routing_index(mask_tensor(&mask, t, e, &device)).unwrap();
            assert_eq!(
                index.counts,
                counts.iter().map(|&c| c as usize).collect::<Vec<_>>(),
                "{what}: counts"
            );
            assert_eq!(
                read_i64(index.token_of_row.clone(), "").unwrap(),
                tokens,
                "{what}"
            );
            assert_eq!(
                read_i64(index.expert_of_row.clone(), "").unwrap(),
                experts,
                "{what}"
            );
            assert_eq!(read_i64(index.row_map, "").unwrap(), map, "{what}: row map");
            let rebuilt = kernels::row_map(index.token_of_row, index.expert_of_row, t, e);
            assert_eq!(read_i64(rebuilt, "").unwrap(), map, "{what}: row_map()");
        }
    }
}

/// Which implementation a round trip uses.
#[derive(Clone, Copy)]
enum Impl {
    /// `burn_moe::kernels::*`: the backend extension where the device has it.
    Extension,
    /// `burn_moe::kernels::reference::*`: plain tensor operations (Burn's own autodiff).
    Reference,
}

/// permute → scale by probs → unpermute, on `device`: outputs and the gradients of
/// `Σ y·g + Σ p·c` with respect to x and probs.
fn dispatch_round_trip(
    device: &Device,
    mask: &[bool],
    t: usize,
    e: usize,
    h: usize,
    imp: Impl,
) -> [Vec<f32>; 5] {
    let device = device.clone().autodiff();
    let x = float(&values(t * h, 11), [t, h], &device).require_grad();
    let probs = float(&values(t * e, 12), [t, e], &device).require_grad();
    let map = mask_tensor(mask, t, e, &device);
    let index = match imp {
        Impl::Extension => kernels::routing_index(map).unwrap(),
        Impl::Reference => reference::routing_index(map).unwrap(),
    };
    let n = index.counts.iter().sum::<usize>();
    let (tok, exp, rows) = (index.token_of_row, index.expert_of_row, index.row_map);
    let (xp, pp) = match imp {
        Impl::Extension => (
            kernels::permute_tokens(x.clone(), tok.clone(), rows.clone()),
            kernels::permute_probs(probs.clone(), tok.clone(), exp, rows.clone()),
        ),
        Impl::Reference => (
            reference::permute_tokens(x.clone(), tok.clone()),
            reference::permute_probs(probs.clone(), tok.clone(), exp),
        ),
    };
    let scaled = xp.clone() * pp.clone().reshape([n, 1]);
    let y = match imp {
        Impl::Extension => kernels::unpermute_tokens(scaled, tok, rows),
        Impl::Reference => reference::unpermute_tokens(scaled, tok, t),
    };
    let g = float(&values(t * h, 13), [t, h], &device);
    let c = float(&values(n, 14), [n], &device);
    let loss = (y.clone() * g).sum() + (pp.clone() * c).sum();
    let grads = loss.backward();
    [
        read_f32(xp, "xp").unwrap(),
        read_f32(pp, "pp").unwrap(),
        read_f32(y, "y").unwrap(),
        read_f32(x.grad(&grads).expect("x grad"), "dx").unwrap(),
        read_f32(probs.grad(&grads).expect("probs grad"), "dprobs").unwrap(),
    ]
}

#[test]
fn permute_and_unpermute_outputs_and_gradients() {
    let h = 24;
    for (case, &(t, e, k, empty)) in ROUTING_CASES.iter().enumerate() {
        let mask = routing(t, e, k, empty, 100 + case as u64);
        let (tokens, experts, _, _) = oracle_index(&mask, t, e);
        let x = values(t * h, 11);
        let probs = values(t * e, 12);
        // Host oracle of the forward values.
        let xp: Vec<f32> = tokens
            .iter()
            .flat_map(|&tok| x[tok as usize * h..(tok as usize + 1) * h].to_vec())
            .collect();
        let pp: Vec<f32> = tokens
            .iter()
            .zip(&experts)
            .map(|(&tok, &ex)| probs[tok as usize * e + ex as usize])
            .collect();
        let mut y = vec![0f32; t * h];
        for (r, &tok) in tokens.iter().enumerate() {
            for j in 0..h {
                y[tok as usize * h + j] += xp[r * h + j] * pp[r];
            }
        }
        let flex = dispatch_round_trip(&Device::flex(), &mask, t, e, h, Impl::Reference);
        for (name, device) in devices() {
            let got = dispatch_round_trip(&device, &mask, t, e, h, Impl::Extension);
            let what = format!("{name} T={t} E={e} k={k}");
            assert_close(&format!("{what} permuted tokens"), &got[0], &xp, 0.0);
            assert_close(&format!("{what} permuted probs"), &got[1], &pp, 0.0);
            assert_close(&format!("{what} unpermuted"), &got[2], &y, 1e-6);
            assert_close(&format!("{what} dx"), &got[3], &flex[3], 1e-5);
            assert_close(&format!("{what} dprobs"), &got[4], &flex[4], 1e-5);
        }
    }
}

#[test]
fn sort_chunks_output_and_gradient() {
    let h = 5;
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 0, 3, 1], &[2, 0, 3, 1]),
        (&[1], &[0]),
        (&[4, 4, 0, 7, 1, 2], &[0, 3, 1, 4, 2, 5]),
    ];
    for (name, device) in devices() {
        for &(sizes, order) in cases {
            let n: usize = sizes.iter().sum();
            let data = values(n * h, 21);
            let mut starts = vec![0];
            for s in sizes {
                starts.push(starts.last().unwrap() + s);
            }
            let want: Vec<f32> = order
                .iter()
                .flat_map(|&c| data[starts[c] * h..starts[c + 1] * h].to_vec())
                .collect();
            let ad = device.clone().autodiff();
            let x = float(&data, [n, h], &ad).require_grad();
            let sorted = kernels::sort_chunks(x.clone(), sizes, order).unwrap();
            let g = values(n * h, 22);
            let loss = (sorted.clone() * float(&g, [n, h], &ad)).sum();
            let grads = loss.backward();
            assert_close(
                &format!("{name} sort_chunks {sizes:?} {order:?}"),
                &read_f32(sorted, "").unwrap(),
                &want,
                0.0,
            );
            // The gradient is g moved back: row i of the output came from input row src(i).
            let src: Vec<usize> = order
                .iter()
                .flat_map(|&c| starts[c]..starts[c + 1])
                .collect();
            let mut dx = vec![0f32; n * h];
            for (i, &s) in src.iter().enumerate() {
                dx[s * h..(s + 1) * h].copy_from_slice(&g[i * h..(i + 1) * h]);
            }
            assert_close(
                &format!("{name} sort_chunks grad"),
                &read_f32(x.grad(&grads).unwrap(), "").unwrap(),
                &dx,
                0.0,
            );
        }
    }
}

/// Grouped-GEMM cases: (counts, K, M).
const GEMM_CASES: &[(&[usize], usize, usize)] = &[
    (&[1], 16, 24),
    (&[0, 5, 130, 1, 0, 64], 24, 40),
    (&[3, 0, 0], 70, 9),
    (&[7, 9, 4, 12, 0, 2, 6, 8], 16, 48),
    (&[65, 63], 33, 130),
    (&[0, 0], 8, 8),
];

/// x·w grouped, then y = out, loss = Σ out·g: output, dx, dw.
fn gemm_round_trip(
    device: &Device,
    counts: &[usize],
    k: usize,
    m: usize,
    imp: Impl,
) -> [Vec<f32>; 3] {
    let device = device.clone().autodiff();
    let n: usize = counts.iter().sum();
    let gn = counts.len();
    let x = float(&values(n * k, 31), [n, k], &device).require_grad();
    let w = float(&values(gn * k * m, 32), [gn, k, m], &device).require_grad();
    let out = match imp {
        Impl::Extension => kernels::grouped_matmul(x.clone(), w.clone(), counts).unwrap(),
        Impl::Reference => reference::grouped_matmul(x.clone(), w.clone(), counts),
    };
    let g = float(&values(n * m, 33), [n, m], &device);
    let grads = (out.clone() * g).sum().backward();
    let dx = x.grad(&grads).map(|t| read_f32(t, "").unwrap());
    [
        read_f32(out, "").unwrap(),
        dx.unwrap_or_else(|| vec![0.0; n * k]),
        read_f32(w.grad(&grads).expect("w grad"), "").unwrap(),
    ]
}

fn host_gemm(counts: &[usize], k: usize, m: usize) -> Vec<f32> {
    let n: usize = counts.iter().sum();
    let x = values(n * k, 31);
    let w = values(counts.len() * k * m, 32);
    let mut out = vec![0f32; n * m];
    let mut row = 0;
    for (g, &c) in counts.iter().enumerate() {
        for r in row..row + c {
            for j in 0..m {
                out[r * m + j] = (0..k)
                    .map(|q| x[r * k + q] * w[g * k * m + q * m + j])
                    .sum();
            }
        }
        row += c;
    }
    out
}

#[test]
fn grouped_matmul_outputs_and_gradients() {
    for &(counts, k, m) in GEMM_CASES {
        let want = host_gemm(counts, k, m);
        let flex = gemm_round_trip(&Device::flex(), counts, k, m, Impl::Reference);
        for (name, device) in devices() {
            let got = gemm_round_trip(&device, counts, k, m, Impl::Extension);
            let what = format!("{name} counts={counts:?} K={k} M={m}");
            assert_close(&format!("{what} output"), &got[0], &want, 1e-5);
            assert_close(&format!("{what} dx"), &got[1], &flex[1], 1e-5);
            assert_close(&format!("{what} dw"), &got[2], &flex[2], 1e-5);
        }
    }
}

#[test]
fn grouped_matmul_transposed_layouts_match_the_reference() {
    for &(counts, k, m) in GEMM_CASES {
        let n: usize = counts.iter().sum();
        let gn = counts.len();
        let (yv, wv, xv) = (values(n * m, 41), values(gn * k * m, 42), values(n * k, 43));
        let flex = Device::flex();
        let nt_want = read_f32(
            reference::grouped_matmul_nt(
                float(&yv, [n, m], &flex),
                float(&wv, [gn, k, m], &flex),
                counts,
            ),
            "",
        )
        .unwrap();
        let tn_want = read_f32(
            reference::grouped_matmul_tn(
                float(&xv, [n, k], &flex),
                float(&yv, [n, m], &flex),
                counts,
            ),
            "",
        )
        .unwrap();
        for (name, device) in devices() {
            let nt = kernels::grouped_matmul_nt(
                float(&yv, [n, m], &device),
                float(&wv, [gn, k, m], &device),
                counts,
            )
            .unwrap();
            let tn = kernels::grouped_matmul_tn(
                float(&xv, [n, k], &device),
                float(&yv, [n, m], &device),
                counts,
            )
            .unwrap();
            let what = format!("{name} counts={counts:?} K={k} M={m}");
            assert_close(
                &format!("{what} NT"),
                &read_f32(nt, "").unwrap(),
                &nt_want,
                1e-5,
            );
            assert_close(
                &format!("{what} TN"),
                &read_f32(tn, "").unwrap(),
                &tn_want,
                1e-5,
            );
        }
    }
}

#[test]
fn repeated_runs_are_bit_identical() {
    let (t, e, k, h) = (300, 16, 4, 24);
    let mask = routing(t, e, k, &[5], 7);
    for (name, device) in devices() {
        let a = dispatch_round_trip(&device, &mask, t, e, h, Impl::Extension);
        let b = dispatch_round_trip(&device, &mask, t, e, h, Impl::Extension);
        let bits =
            |v: &[Vec<f32>]| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
        assert_eq!(
            bits(&a),
            bits(&b),
            "{name}: dispatch round trip differs between runs"
        );
        let counts = [0, 5, 130, 1, 0, 64];
        let a = gemm_round_trip(&device, &counts, 24, 40, Impl::Extension);
        let b = gemm_round_trip(&device, &counts, 24, 40, Impl::Extension);
        assert_eq!(
            bits(&a),
            bits(&b),
            "{name}: grouped GEMM differs between runs"
        );
    }
}

/// A half-precision float type's unit roundoff (round to nearest: half a unit in the last
/// place of its significand).
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        other => panic!("not a half-precision type: {other:?}"),
    }
}

/// `values` rounded to `dtype` (through Flex's cast), as f32 (exact).
fn rounded(values: &[f32], dtype: DType) -> Vec<f32> {
    let t = float(values, [values.len()], &Device::flex()).cast(dtype);
    read_f32(t, "").unwrap()
}

/// `C = A · B` of one group in f64 with `Σ|a·b|` per output: `a(i, r)`, `b(r, j)`.
fn exact_product(
    (rows, reduce, cols): (usize, usize, usize),
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            let (mut sum, mut abs) = (0.0, 0.0);
            for r in 0..reduce {
                let p = a(i, r) * b(r, j);
                sum += p;
                abs += p.abs();
            }
            out.push((sum, abs));
        }
    }
    out
}

/// f32 accumulation of `K` products, rounded to the half type once: off from the exact
/// product of the rounded inputs by at most one rounding of the result plus the f32 sum's own
/// error (`K · ε_f32 · Σ|a·b|`). A half-precision accumulator rounds every partial sum and
/// misses this by far at `K` = 512.
fn assert_one_rounding(what: &str, got: &[f32], want: &[(f64, f64)], reduce: usize, u: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &(w, abs))) in got.iter().zip(want).enumerate() {
        let tol = u * w.abs() + reduce as f64 * f64::from(f32::EPSILON) * abs;
        assert!(
            (f64::from(g) - w).abs() <= tol,
            "{what}[{i}]: got {g}, exact {w} (tolerance {tol:e})"
        );
    }
}

/// The grouped GEMM in its three layouts with f16 and bf16 operands, on every device that has
/// the type (Flex: both; lavapipe: f16): each output within one rounding of the exact product
/// of the rounded inputs (f32 accumulation), output in the operands' type, and bit-identical
/// from run to run.
#[test]
fn grouped_matmul_in_half_precision_accumulates_in_f32() {
    let counts = [0usize, 5, 130, 1, 0, 64];
    let (k, m) = (512, 40);
    let n: usize = counts.iter().sum();
    let gn = counts.len();
    let starts: Vec<usize> = counts
        .iter()
        .scan(0, |s, &c| {
            let start = *s;
            *s += c;
            Some(start)
        })
        .collect();
    let mut ran = 0;
    for (name, device) in devices() {
        for dtype in [DType::F16, DType::BF16] {
            if !device.supports_dtype(dtype) {
                println!("{name}: no {dtype:?}, skipped");
                continue;
            }
            ran += 1;
            let u = unit_roundoff(dtype);
            let (x, w, y) = (
                rounded(&values(n * k, 51), dtype),
                rounded(&values(gn * k * m, 52), dtype),
                rounded(&values(n * m, 53), dtype),
            );
            let x2 = float(&x, [n, k], &device).cast(dtype);
            let w3 = float(&w, [gn, k, m], &device).cast(dtype);
            let y2 = float(&y, [n, m], &device).cast(dtype);
            let what = format!("{name} {dtype:?}");
            let run = || {
                let nn = kernels::grouped_matmul(x2.clone(), w3.clone(), &counts).unwrap();
                let nt = kernels::grouped_matmul_nt(y2.clone(), w3.clone(), &counts).unwrap();
                let tn = kernels::grouped_matmul_tn(x2.clone(), y2.clone(), &counts).unwrap();
                for (layout, dt) in [("NN", nn.dtype()), ("NT", nt.dtype()), ("TN", tn.dtype())] {
                    assert_eq!(dt, dtype, "{what} {layout}: output type");
                }
                [
                    read_f32(nn, "").unwrap(),
                    read_f32(nt, "").unwrap(),
                    read_f32(tn, "").unwrap(),
                ]
            };
            let got = run();
            let again = run();
            let bits =
                |v: &[Vec<f32>]| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
            assert_eq!(bits(&got), bits(&again), "{what}: differs between runs");
            let (mut nn, mut nt, mut tn) = (Vec::new(), Vec::new(), Vec::new());
            for (g, (&c, &s0)) in counts.iter().zip(&starts).enumerate() {
                let wg = |r: usize, j: usize| f64::from(w[g * k * m + r * m + j]);
                nn.extend(exact_product(
                    (c, k, m),
                    |i, r| f64::from(x[(s0 + i) * k + r]),
                    wg,
                ));
                nt.extend(exact_product(
                    (c, m, k),
                    |i, r| f64::from(y[(s0 + i) * m + r]),
                    |r, j| wg(j, r),
                ));
                tn.extend(exact_product(
                    (k, c, m),
                    |i, r| f64::from(x[(s0 + r) * k + i]),
                    |r, j| f64::from(y[(s0 + r) * m + j]),
                ));
            }
            assert_one_rounding(&format!("{what} NN"), &got[0], &nn, k, u);
            assert_one_rounding(&format!("{what} NT"), &got[1], &nt, m, u);
            assert_one_rounding(
                &format!("{what} TN"),
                &got[2],
                &tn,
                *counts.iter().max().unwrap(),
                u,
            );
        }
    }
    assert!(ran >= 2, "Flex runs both half types");
}

#[test]
fn bad_arguments_name_the_argument() {
    let device = Device::flex();
    let x = float(&values(12, 1), [4, 3], &device);
    let w = float(&values(2 * 3 * 5, 2), [2, 3, 5], &device);
    let err = kernels::grouped_matmul(x.clone(), w.clone(), &[1, 2]).unwrap_err();
    assert!(
        matches!(err, MoeError::InvalidArgument { name: "counts", .. }),
        "{err}"
    );
    let err = kernels::grouped_matmul(x.clone(), w, &[1, 2, 1]).unwrap_err();
    assert!(
        matches!(err, MoeError::InvalidArgument { name: "counts", .. }),
        "{err}"
    );
    let w_bad = float(&values(2 * 4 * 5, 2), [2, 4, 5], &device);
    let err = kernels::grouped_matmul(x.clone(), w_bad, &[2, 2]).unwrap_err();
    assert!(
        matches!(err, MoeError::ShapeMismatch { name: "w", .. }),
        "{err}"
    );
    let err = kernels::sort_chunks(x.clone(), &[2, 2], &[0, 0]).unwrap_err();
    assert!(
        matches!(err, MoeError::InvalidArgument { name: "order", .. }),
        "{err}"
    );
    let err = kernels::sort_chunks(x, &[2, 1], &[1, 0]).unwrap_err();
    assert!(
        matches!(
            err,
            MoeError::InvalidArgument {
                name: "split_sizes",
                ..
            }
        ),
        "{err}"
    );
    let _: Tensor<1, Int> = kernels::expert_counts(mask_tensor(&[true, false], 1, 2, &device));
}
