//! [`MoeKernelOps`] on Flex (Burn's CPU backend): native loops over host slices for the
//! dispatch operations (row copies, per-token sums in expert order) and one `gemm` call per
//! group writing straight into a single output buffer for the grouped GEMM (no slicing, no
//! concatenation; the same `gemm` crate and threading Flex's own matmul uses).

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{DType, Flex, TensorMetadata};
use burn::tensor::TensorData;
use burn_flex::FlexTensor;

use super::ext::MoeKernelOps;
use super::group_ranges;

/// Runs `f` on `x`'s values as f32 (row-major): borrowed when `x` is a contiguous f32 tensor,
/// converted otherwise.
fn with_floats<R>(x: &FlexTensor, f: impl FnOnce(&[f32]) -> R) -> R {
    if x.dtype() == DType::F32
        && let Some(values) = x.as_slice::<f32>()
    {
        return f(values);
    }
    let values = x
        .clone()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("an f32 view of a float tensor");
    f(&values)
}

/// Runs `f` on `x`'s values as i64 (row-major), borrowed when possible.
fn with_ints<R>(x: &FlexTensor, f: impl FnOnce(&[i64]) -> R) -> R {
    if x.dtype() == DType::I64
        && let Some(values) = x.as_slice::<i64>()
    {
        return f(values);
    }
    let values = x
        .clone()
        .into_data()
        .convert_dtype(DType::I64)
        .try_into_vec::<i64>()
        .expect("an i64 view of an int tensor");
    f(&values)
}

fn float_out(values: Vec<f32>, shape: Vec<usize>, dtype: DType) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape).convert_dtype(dtype))
}

fn int_out(values: Vec<i64>, shape: Vec<usize>, dtype: DType) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape).convert_dtype(dtype))
}

fn dims(x: &FlexTensor) -> Vec<usize> {
    x.shape().to_vec()
}

/// `out[r] = x[rows[r]]` for rows of width `h`.
fn gather(x: &[f32], rows: &[i64], h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * h);
    for &r in rows {
        let r = r as usize;
        out.extend_from_slice(&x[r * h..(r + 1) * h]);
    }
    out
}

/// Which product a grouped GEMM computes per group.
#[derive(Clone, Copy)]
enum Gemm {
    Nn,
    Nt,
    Tn,
}

/// Per group, `gemm` on strided views of `a` and `b` into `out` (zeros first, so empty groups
/// give zeros). Strides are in elements: `(column, row)` as the `gemm` crate takes them.
fn grouped(a: &[f32], b: &[f32], counts: &[usize], kind: Gemm, out: &mut [f32], kk: [usize; 3]) {
    let [k_dim, m_dim, _] = kk;
    let mut start = 0;
    for (g, &rows) in counts.iter().enumerate() {
        let (m, n, k, dst, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs);
        match kind {
            Gemm::Nn => {
                // out[start.., :M] = a[start.., :K] · w[g] (K × M)
                (m, n, k) = (rows, m_dim, k_dim);
                dst = start * m_dim;
                (dst_cs, dst_rs) = (1, m_dim);
                lhs = start * k_dim;
                (lhs_cs, lhs_rs) = (1, k_dim);
                rhs = g * k_dim * m_dim;
                (rhs_cs, rhs_rs) = (1, m_dim);
            }
            Gemm::Nt => {
                // out[start.., :K] = a[start.., :M] · w[g]ᵀ (w[g] is K × M)
                (m, n, k) = (rows, k_dim, m_dim);
                dst = start * k_dim;
                (dst_cs, dst_rs) = (1, k_dim);
                lhs = start * m_dim;
                (lhs_cs, lhs_rs) = (1, m_dim);
                rhs = g * k_dim * m_dim;
                (rhs_cs, rhs_rs) = (m_dim, 1);
            }
            Gemm::Tn => {
                // out[g] (K × M) = a[start.., :K]ᵀ · b[start.., :M]
                (m, n, k) = (k_dim, m_dim, rows);
                dst = g * k_dim * m_dim;
                (dst_cs, dst_rs) = (1, m_dim);
                lhs = start * k_dim;
                (lhs_cs, lhs_rs) = (k_dim, 1);
                rhs = start * m_dim;
                (rhs_cs, rhs_rs) = (1, m_dim);
            }
        }
        start += rows;
        if m == 0 || n == 0 || k == 0 {
            continue;
        }
        gemm_into(
            &mut out[dst..],
            [dst_cs, dst_rs],
            &a[lhs..],
            [lhs_cs, lhs_rs],
            &b[rhs..],
            [rhs_cs, rhs_rs],
            [m, n, k],
        );
    }
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)` on strided views, bounds checked up front.
#[allow(unsafe_code)]
fn gemm_into(
    dst: &mut [f32],
    dst_s: [usize; 2],
    lhs: &[f32],
    lhs_s: [usize; 2],
    rhs: &[f32],
    rhs_s: [usize; 2],
    [m, n, k]: [usize; 3],
) {
    let last = |s: [usize; 2], rows: usize, cols: usize| (cols - 1) * s[0] + (rows - 1) * s[1];
    assert!(
        last(dst_s, m, n) < dst.len(),
        "grouped GEMM output view out of bounds"
    );
    assert!(
        last(lhs_s, m, k) < lhs.len(),
        "grouped GEMM lhs view out of bounds"
    );
    assert!(
        last(rhs_s, k, n) < rhs.len(),
        "grouped GEMM rhs view out of bounds"
    );
    let parallelism = if m * n * k >= 192 * 192 * 192 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three views were checked to lie inside their slices (the largest offset each
    // view reaches is below the slice length), `dst` is borrowed mutably and does not alias
    // `lhs` or `rhs` (distinct allocations), and `read_dst = false` means `dst` is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_s[0] as isize,
            dst_s[1] as isize,
            false,
            lhs.as_ptr(),
            lhs_s[0] as isize,
            lhs_s[1] as isize,
            rhs.as_ptr(),
            rhs_s[0] as isize,
            rhs_s[1] as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

impl MoeKernelOps for Flex {
    fn moe_counts(routing_map: IntTensor<Self>) -> IntTensor<Self> {
        let e = dims(&routing_map)[1];
        let counts = with_ints(&routing_map, |map| {
            let mut counts = vec![0i64; e];
            for (i, &v) in map.iter().enumerate() {
                counts[i % e] += i64::from(v != 0);
            }
            counts
        });
        int_out(counts, vec![e], routing_map.dtype())
    }

    fn moe_routing_index(
        routing_map: IntTensor<Self>,
        offsets: Vec<usize>,
        rows: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>, IntTensor<Self>) {
        let [t, e] = [dims(&routing_map)[0], dims(&routing_map)[1]];
        let dtype = routing_map.dtype();
        let mut tokens = vec![0i64; rows];
        let mut experts = vec![0i64; rows];
        let mut row_map = vec![-1i64; t * e];
        let mut next = offsets;
        with_ints(&routing_map, |map| {
            for tok in 0..t {
                for x in 0..e {
                    if map[tok * e + x] != 0 {
                        let r = next[x];
                        next[x] += 1;
                        tokens[r] = tok as i64;
                        experts[r] = x as i64;
                        row_map[tok * e + x] = r as i64;
                    }
                }
            }
        });
        (
            int_out(tokens, vec![rows], dtype),
            int_out(experts, vec![rows], dtype),
            int_out(row_map, vec![t, e], dtype),
        )
    }

    fn moe_row_map(
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        tokens: usize,
        experts: usize,
    ) -> IntTensor<Self> {
        let mut map = vec![-1i64; tokens * experts];
        with_ints(&token_of_row, |tok| {
            with_ints(&expert_of_row, |exp| {
                for (r, (&t, &x)) in tok.iter().zip(exp).enumerate() {
                    map[t as usize * experts + x as usize] = r as i64;
                }
            })
        });
        int_out(map, vec![tokens, experts], token_of_row.dtype())
    }

    fn moe_permute(
        x: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        _row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let h = dims(&x)[1];
        let n = dims(&token_of_row)[0];
        let out = with_floats(&x, |x| with_ints(&token_of_row, |rows| gather(x, rows, h)));
        float_out(out, vec![n, h], x.dtype())
    }

    fn moe_unpermute(
        y: FloatTensor<Self>,
        _token_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let h = dims(&y)[1];
        let [t, e] = [dims(&row_map)[0], dims(&row_map)[1]];
        let mut out = vec![0f32; t * h];
        with_floats(&y, |y| {
            with_ints(&row_map, |map| {
                for (tok, acc) in out.chunks_mut(h.max(1)).enumerate().take(t) {
                    for &r in &map[tok * e..(tok + 1) * e] {
                        if r >= 0 {
                            let r = r as usize;
                            for (a, v) in acc.iter_mut().zip(&y[r * h..(r + 1) * h]) {
                                *a += v;
                            }
                        }
                    }
                }
            })
        });
        float_out(out, vec![t, h], y.dtype())
    }

    fn moe_permute_probs(
        probs: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        _row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let e = dims(&probs)[1];
        let n = dims(&token_of_row)[0];
        let out = with_floats(&probs, |p| {
            with_ints(&token_of_row, |tok| {
                with_ints(&expert_of_row, |exp| {
                    tok.iter()
                        .zip(exp)
                        .map(|(&t, &x)| p[t as usize * e + x as usize])
                        .collect::<Vec<f32>>()
                })
            })
        });
        float_out(out, vec![n], probs.dtype())
    }

    fn moe_unpermute_probs(
        g: FloatTensor<Self>,
        _token_of_row: IntTensor<Self>,
        _expert_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let shape = dims(&row_map);
        let out = with_floats(&g, |g| {
            with_ints(&row_map, |map| {
                map.iter()
                    .map(|&r| if r >= 0 { g[r as usize] } else { 0.0 })
                    .collect::<Vec<f32>>()
            })
        });
        float_out(out, shape, g.dtype())
    }

    fn moe_sort_chunks(
        x: FloatTensor<Self>,
        split_sizes: Vec<usize>,
        order: Vec<usize>,
    ) -> FloatTensor<Self> {
        let [n, h] = [dims(&x)[0], dims(&x)[1]];
        let ranges = group_ranges(&split_sizes);
        let out = with_floats(&x, |x| {
            let mut out = Vec::with_capacity(n * h);
            for &c in &order {
                out.extend_from_slice(&x[ranges[c].start * h..ranges[c].end * h]);
            }
            out
        });
        float_out(out, vec![n, h], x.dtype())
    }

    fn moe_grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        let [n, k] = [dims(&x)[0], dims(&x)[1]];
        let m = dims(&w)[2];
        let mut out = vec![0f32; n * m];
        with_floats(&x, |a| {
            with_floats(&w, |b| {
                grouped(a, b, &counts, Gemm::Nn, &mut out, [k, m, n])
            })
        });
        float_out(out, vec![n, m], x.dtype())
    }

    fn moe_grouped_matmul_nt(
        y: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        let n = dims(&y)[0];
        let [k, m] = [dims(&w)[1], dims(&w)[2]];
        let mut out = vec![0f32; n * k];
        with_floats(&y, |a| {
            with_floats(&w, |b| {
                grouped(a, b, &counts, Gemm::Nt, &mut out, [k, m, n])
            })
        });
        float_out(out, vec![n, k], y.dtype())
    }

    fn moe_grouped_matmul_tn(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        let [n, k] = [dims(&x)[0], dims(&x)[1]];
        let m = dims(&y)[1];
        let g = counts.len();
        let mut out = vec![0f32; g * k * m];
        with_floats(&x, |a| {
            with_floats(&y, |b| {
                grouped(a, b, &counts, Gemm::Tn, &mut out, [k, m, n])
            })
        });
        float_out(out, vec![g, k, m], x.dtype())
    }
}
