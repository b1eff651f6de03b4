//! The `#[cube]` kernels and the [`MoeKernelOps`] implementation for Burn's CubeCL backend
//! (CUDA, wgpu/Vulkan, …).
//!
//! No kernel uses floating-point atomics: every output element is written by one unit that
//! sums its inputs in a fixed order, so results are bit-identical from run to run.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{DType, TensorData, TensorMetadata, cubecl::dtype_to_storage_type};
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::{empty_device_dtype, zeros_client};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use super::ext::MoeKernelOps;
use super::{group_ranges, tiles};

/// Units per cube of the per-expert scan kernels.
const SCAN_UNITS: usize = 256;
/// Grouped GEMM tile: 64 × 64 outputs per cube of 16 × 16 units (4 × 4 each), 16-deep steps.
const TILE: usize = 64;
const UNITS: usize = 16;
const DEPTH: usize = 16;

// ---------------------------------------------------------------------------------------------
// Kernels.

/// One cube per expert: a strided sum over the tokens per unit, then unit 0 adds the partial
/// sums (integers: the order does not matter).
#[cube(launch)]
fn counts_kernel<I: Int>(
    map: &Tensor<I>,
    counts: &mut Tensor<I>,
    tokens: usize,
    experts: usize,
    #[comptime] units: usize,
    #[define(I)] _dtype: ElemType,
) {
    let e = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let mut partial = Shared::<[u32]>::new_slice(units);
    let mut sum = 0u32;
    let mut t = unit;
    while t < tokens {
        sum += u32::cast_from(map[t * experts + e]);
        t += units;
    }
    partial[unit] = sum;
    sync_cube();
    if unit == 0 {
        let mut total = 0u32;
        let mut i = 0usize;
        while i < units {
            total += partial[i];
            i += 1;
        }
        counts[e] = I::cast_from(total);
    }
}

/// One cube per expert: each unit counts a contiguous chunk of tokens, an exclusive scan of the
/// unit counts gives each chunk's first row, then every unit writes its rows in token order.
#[cube(launch)]
fn routing_index_kernel<I: Int>(
    map: &Tensor<I>,
    offsets: &Tensor<I>,
    token_of_row: &mut Tensor<I>,
    expert_of_row: &mut Tensor<I>,
    row_map: &mut Tensor<I>,
    tokens: usize,
    experts: usize,
    #[comptime] units: usize,
    #[define(I)] _dtype: ElemType,
) {
    let e = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let chunk = tokens.div_ceil(units);
    let start = unit * chunk;
    let mut end = start + chunk;
    if end > tokens {
        end = tokens;
    }
    let mut partial = Shared::<[u32]>::new_slice(units);
    let mut count = 0u32;
    let mut t = start;
    while t < end {
        count += u32::cast_from(map[t * experts + e]);
        t += 1;
    }
    partial[unit] = count;
    sync_cube();
    if unit == 0 {
        let mut acc = 0u32;
        let mut i = 0usize;
        while i < units {
            let c = partial[i];
            partial[i] = acc;
            acc += c;
            i += 1;
        }
    }
    sync_cube();
    let mut row = usize::cast_from(offsets[e]) + partial[unit] as usize;
    let mut t = start;
    while t < end {
        let pair = t * experts + e;
        if u32::cast_from(map[pair]) != 0 {
            row_map[pair] = I::cast_from(row);
            token_of_row[row] = I::cast_from(t);
            expert_of_row[row] = I::cast_from(e);
            row += 1;
        } else {
            row_map[pair] = I::cast_from(-1i32);
        }
        t += 1;
    }
}

/// `row_map[t, e] = -1` everywhere (one unit per pair).
#[cube(launch)]
fn fill_unrouted_kernel<I: Int>(row_map: &mut Tensor<I>, #[define(I)] _dtype: ElemType) {
    if ABSOLUTE_POS >= row_map.len() {
        terminate!();
    }
    row_map[ABSOLUTE_POS] = I::cast_from(-1i32);
}

/// `row_map[token_of_row[r], expert_of_row[r]] = r` (one unit per row; pairs are distinct).
#[cube(launch)]
fn scatter_rows_kernel<I: Int>(
    token_of_row: &Tensor<I>,
    expert_of_row: &Tensor<I>,
    row_map: &mut Tensor<I>,
    experts: usize,
    #[define(I)] _dtype: ElemType,
) {
    let r = ABSOLUTE_POS;
    if r >= token_of_row.len() {
        terminate!();
    }
    let pair = usize::cast_from(token_of_row[r]) * experts + usize::cast_from(expert_of_row[r]);
    row_map[pair] = I::cast_from(r);
}

/// `out[r, h] = x[rows[r], h]` (one unit per output element).
#[cube(launch)]
fn gather_rows_kernel<F: Float, I: Int>(
    x: &Tensor<F>,
    rows: &Tensor<I>,
    out: &mut Tensor<F>,
    hidden: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let r = pos / hidden;
    let h = pos % hidden;
    out[pos] = x[usize::cast_from(rows[r]) * hidden + h];
}

/// `out[t, h] = Σ_e y[row_map[t, e], h]` over routed pairs, ascending `e`, summed in f32 and
/// rounded to `F` once.
#[cube(launch)]
fn unpermute_kernel<F: Float, I: Int>(
    y: &Tensor<F>,
    row_map: &Tensor<I>,
    out: &mut Tensor<F>,
    hidden: usize,
    experts: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= out.len() {
        terminate!();
    }
    let t = pos / hidden;
    let h = pos % hidden;
    let mut acc = f32::new(0.0);
    for e in 0..experts {
        let r = i32::cast_from(row_map[t * experts + e]);
        if r >= 0 {
            acc += f32::cast_from(y[r as usize * hidden + h]);
        }
    }
    out[pos] = F::cast_from(acc);
}

/// `out[r] = probs[token_of_row[r], expert_of_row[r]]`.
#[cube(launch)]
fn permute_probs_kernel<F: Float, I: Int>(
    probs: &Tensor<F>,
    token_of_row: &Tensor<I>,
    expert_of_row: &Tensor<I>,
    out: &mut Tensor<F>,
    experts: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let r = ABSOLUTE_POS;
    if r >= out.len() {
        terminate!();
    }
    out[r] =
        probs[usize::cast_from(token_of_row[r]) * experts + usize::cast_from(expert_of_row[r])];
}

/// `out[t, e] = g[row_map[t, e]]` for routed pairs, `0` elsewhere.
#[cube(launch)]
fn unpermute_probs_kernel<F: Float, I: Int>(
    g: &Tensor<F>,
    row_map: &Tensor<I>,
    out: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let pair = ABSOLUTE_POS;
    if pair >= out.len() {
        terminate!();
    }
    let r = i32::cast_from(row_map[pair]);
    let mut v = F::new(0.0);
    if r >= 0 {
        v = g[r as usize];
    }
    out[pair] = v;
}

/// Grouped GEMM over a tile table: cube `(x, y)` computes rows `i0..i1` (at most one tile) of
/// tile `x` and columns `64·y ..` of `C = A · B`, reducing over `r0..r1`, where
/// `A(i, r) = a[g·a_gs + i·a_si + r·a_sr]`, `B(r, j) = b[g·b_gs + r·b_sr + j·b_sj]` and
/// `C(i, j) = c[g·c_gs + i·c_si + j·c_sj]` for the tile's group `g`. Each table row is
/// `[i0, i1, r0, r1, g]`: row numbers and a group index, never element offsets, so the table
/// fits 32-bit integers whatever the operands' sizes; the offsets are computed in the kernel's
/// address type (64-bit when an operand has more than 2³² elements). Products accumulate in
/// f32 whatever `F` is (f32, f16, bf16), and each output is rounded to `F` once. An empty
/// reduction range writes zeros.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn grouped_gemm_kernel<F: Float, I: Int>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    c: &mut Tensor<F>,
    table: &Tensor<I>,
    a_gs: usize,
    b_gs: usize,
    c_gs: usize,
    a_si: usize,
    a_sr: usize,
    b_sr: usize,
    b_sj: usize,
    c_si: usize,
    c_sj: usize,
    cols: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[comptime] depth: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let row = CUBE_POS_X as usize * 5;
    let i0 = usize::cast_from(table[row]);
    let i1 = usize::cast_from(table[row + 1]);
    let r0 = usize::cast_from(table[row + 2]);
    let r1 = usize::cast_from(table[row + 3]);
    let g = usize::cast_from(table[row + 4]);
    let a_off = g * a_gs;
    let b_off = g * b_gs;
    let c_off = g * c_gs;
    let j0 = CUBE_POS_Y as usize * tile;
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let unit = ty * units + tx;
    let per = tile / units;

    let mut a_s = Shared::<[F]>::new_slice(depth * tile);
    let mut b_s = Shared::<[F]>::new_slice(depth * tile);
    let mut acc = Array::<f32>::new(per * per);
    #[unroll]
    for q in 0..per * per {
        acc[q] = f32::new(0.0);
    }
    let mut a_reg = Array::<F>::new(per);
    let mut b_reg = Array::<F>::new(per);

    let mut r = r0;
    while r < r1 {
        // Stage A (tile × depth) and B (depth × tile); out-of-range entries are zeros.
        #[unroll]
        for q in 0..(tile * depth) / (units * units) {
            let idx = unit + q * units * units;
            let ii = idx / depth;
            let kk = idx % depth;
            let gi = i0 + ii;
            let gr = r + kk;
            let mut v = F::new(0.0);
            if gi < i1 && gr < r1 {
                v = a[a_off + gi * a_si + gr * a_sr];
            }
            a_s[kk * tile + ii] = v;
            let kb = idx / tile;
            let jj = idx % tile;
            let gj = j0 + jj;
            let grb = r + kb;
            let mut w = F::new(0.0);
            if gj < cols && grb < r1 {
                w = b[b_off + grb * b_sr + gj * b_sj];
            }
            b_s[kb * tile + jj] = w;
        }
        sync_cube();
        #[unroll]
        for kk in 0..depth {
            #[unroll]
            for p in 0..per {
                a_reg[p] = a_s[kk * tile + ty + p * units];
                b_reg[p] = b_s[kk * tile + tx + p * units];
            }
            #[unroll]
            for p in 0..per {
                #[unroll]
                for q in 0..per {
                    acc[p * per + q] += f32::cast_from(a_reg[p]) * f32::cast_from(b_reg[q]);
                }
            }
        }
        sync_cube();
        r += depth;
    }

    #[unroll]
    for p in 0..per {
        #[unroll]
        for q in 0..per {
            let gi = i0 + ty + p * units;
            let gj = j0 + tx + q * units;
            if gi < i1 && gj < cols {
                c[c_off + gi * c_si + gj * c_sj] = F::cast_from(acc[p * per + q]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

fn contiguous(t: CubeTensor) -> CubeTensor {
    into_contiguous(t)
}

fn dims(t: &CubeTensor) -> Vec<usize> {
    t.shape().to_vec()
}

fn elementwise(t: &CubeTensor, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&t.client, n.max(1));
    (calculate_cube_count_elemwise(&t.client, n.max(1), dim), dim)
}

fn empty_like(reference: &CubeTensor, shape: Vec<usize>, dtype: DType) -> CubeTensor {
    empty_device_dtype(
        reference.client.clone(),
        reference.device.clone(),
        Shape::from(shape),
        dtype,
    )
}

fn zeros_like(reference: &CubeTensor, shape: Vec<usize>, dtype: DType) -> CubeTensor {
    zeros_client(
        reference.client.clone(),
        reference.device.clone(),
        Shape::from(shape),
        dtype,
    )
}

/// An integer tensor of `values` on `reference`'s device, in the dtype `dtype` (an upload,
/// counted as `what`).
fn int_tensor(
    reference: &CubeTensor,
    values: &[usize],
    dtype: DType,
    what: &'static str,
) -> CubeTensor {
    burn_parallel::transfers::upload(what, (values.len() * dtype.size()) as u64);
    let data = TensorData::new(
        values.iter().map(|&v| v as i64).collect::<Vec<_>>(),
        [values.len()],
    )
    .convert_dtype(dtype);
    <CubeBackend as burn::backend::ops::IntTensorOps<CubeBackend>>::int_from_data(
        data,
        &reference.device,
    )
}

/// Rows in expert order from per-chunk sizes and an order of the chunks.
fn chunk_rows(split_sizes: &[usize], order: &[usize]) -> Vec<usize> {
    let ranges = group_ranges(split_sizes);
    order.iter().flat_map(|&c| ranges[c].clone()).collect()
}

/// Which operand layout a grouped GEMM launch uses.
#[derive(Clone, Copy)]
enum Gemm {
    /// `x [N, K] · w[g] [K, M] → [N, M]`.
    Nn,
    /// `y [N, M] · w[g]ᵀ → [N, K]` with `w [G, K, M]`.
    Nt,
    /// `x_gᵀ [K, N_g] · y_g [N_g, M] → [G, K, M]`.
    Tn,
}

fn grouped_gemm(a: CubeTensor, b: CubeTensor, counts: &[usize], kind: Gemm) -> CubeTensor {
    let a = contiguous(a);
    let b = contiguous(b);
    let ad = dims(&a);
    let bd = dims(&b);
    let groups = counts.len();
    // Per group: the stride of each operand between groups (`a`, `b`, `c`), the tiles, the
    // strides within a group and the output columns.
    let (out_shape, group_strides, table, strides, cols) = match kind {
        Gemm::Nn => {
            let (n, k, m) = (ad[0], ad[1], bd[2]);
            let table = tiles::row_tiles(counts, TILE, |_| (0, k));
            (vec![n, m], [0, k * m, 0], table, [k, 1, m, 1, m, 1], m)
        }
        Gemm::Nt => {
            let (n, m, k) = (ad[0], ad[1], bd[1]);
            let table = tiles::row_tiles(counts, TILE, |_| (0, m));
            (vec![n, k], [0, k * m, 0], table, [m, 1, 1, m, k, 1], k)
        }
        Gemm::Tn => {
            let (k, m) = (ad[1], bd[1]);
            let table = tiles::weight_tiles(counts, k, TILE);
            (
                vec![groups, k, m],
                [0, 0, k * m],
                table,
                [1, k, m, 1, m, 1],
                m,
            )
        }
    };
    let out = empty_like(&a, out_shape, a.dtype);
    let tiles_n = table.len() / tiles::ENTRIES;
    if tiles_n == 0 || cols == 0 {
        return match kind {
            Gemm::Tn => zeros_like(&a, dims(&out), a.dtype),
            _ => out,
        };
    }
    let elements = |t: &CubeTensor| t.shape().num_elements();
    let address = if tiles::wide_addresses(&[elements(&a), elements(&b), elements(&out)]) {
        AddressType::U64
    } else {
        AddressType::U32
    };
    let table = int_tensor(
        &a,
        &table,
        tiles::table_dtype(&table),
        "uploading a grouped-GEMM tile table",
    );
    let col_tiles = cols.div_ceil(TILE);
    let [a_gs, b_gs, c_gs] = group_strides;
    let [a_si, a_sr, b_sr, b_sj, c_si, c_sj] = strides;
    let (f, i) = (a.dtype, table.dtype);
    grouped_gemm_kernel::launch(
        &a.client.clone(),
        CubeCount::Static(tiles_n as u32, col_tiles as u32, 1),
        CubeDim::new_2d(UNITS as u32, UNITS as u32),
        address,
        a.into_tensor_arg(),
        b.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        table.into_tensor_arg(),
        a_gs,
        b_gs,
        c_gs,
        a_si,
        a_sr,
        b_sr,
        b_sj,
        c_si,
        c_sj,
        cols,
        TILE,
        UNITS,
        DEPTH,
        [dtype_to_storage_type(f), dtype_to_storage_type(i)],
    );
    out
}

fn gather_rows(x: CubeTensor, rows: CubeTensor) -> CubeTensor {
    let x = contiguous(x);
    let rows = contiguous(rows);
    let hidden = dims(&x)[1];
    let n = dims(&rows)[0];
    let out = empty_like(&x, vec![n, hidden], x.dtype);
    if n * hidden == 0 {
        return out;
    }
    let (count, dim) = elementwise(&out, n * hidden);
    let (f, i) = (x.dtype, rows.dtype);
    gather_rows_kernel::launch(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        rows.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        hidden,
        [dtype_to_storage_type(f), dtype_to_storage_type(i)],
    );
    out
}

impl MoeKernelOps for CubeBackend {
    fn moe_counts(routing_map: IntTensor<Self>) -> IntTensor<Self> {
        let map = contiguous(routing_map);
        let [tokens, experts] = [dims(&map)[0], dims(&map)[1]];
        let out = empty_like(&map, vec![experts], map.dtype);
        if experts == 0 {
            return out;
        }
        let dtype = map.dtype;
        counts_kernel::launch(
            &map.client.clone(),
            CubeCount::Static(experts as u32, 1, 1),
            CubeDim::new_1d(SCAN_UNITS as u32),
            map.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            tokens,
            experts,
            SCAN_UNITS,
            dtype_to_storage_type(dtype),
        );
        out
    }

    fn moe_routing_index(
        routing_map: IntTensor<Self>,
        offsets: Vec<usize>,
        rows: usize,
    ) -> (IntTensor<Self>, IntTensor<Self>, IntTensor<Self>) {
        let map = contiguous(routing_map);
        let [tokens, experts] = [dims(&map)[0], dims(&map)[1]];
        let dtype = map.dtype;
        let token_of_row = empty_like(&map, vec![rows], dtype);
        let expert_of_row = empty_like(&map, vec![rows], dtype);
        let row_map = empty_like(&map, vec![tokens, experts], dtype);
        if tokens * experts == 0 {
            return (token_of_row, expert_of_row, row_map);
        }
        let offsets = int_tensor(&map, &offsets, dtype, "uploading expert offsets");
        routing_index_kernel::launch(
            &map.client.clone(),
            CubeCount::Static(experts as u32, 1, 1),
            CubeDim::new_1d(SCAN_UNITS as u32),
            map.into_tensor_arg(),
            offsets.into_tensor_arg(),
            token_of_row.clone().into_tensor_arg(),
            expert_of_row.clone().into_tensor_arg(),
            row_map.clone().into_tensor_arg(),
            tokens,
            experts,
            SCAN_UNITS,
            dtype_to_storage_type(dtype),
        );
        (token_of_row, expert_of_row, row_map)
    }

    fn moe_row_map(
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        tokens: usize,
        experts: usize,
    ) -> IntTensor<Self> {
        let token_of_row = contiguous(token_of_row);
        let expert_of_row = contiguous(expert_of_row);
        let dtype = token_of_row.dtype;
        let row_map = empty_like(&token_of_row, vec![tokens, experts], dtype);
        if tokens * experts == 0 {
            return row_map;
        }
        let (count, dim) = elementwise(&row_map, tokens * experts);
        fill_unrouted_kernel::launch(
            &row_map.client.clone(),
            count,
            dim,
            row_map.clone().into_tensor_arg(),
            dtype_to_storage_type(dtype),
        );
        let n = dims(&token_of_row)[0];
        if n > 0 {
            let (count, dim) = elementwise(&token_of_row, n);
            scatter_rows_kernel::launch(
                &row_map.client.clone(),
                count,
                dim,
                token_of_row.into_tensor_arg(),
                expert_of_row.into_tensor_arg(),
                row_map.clone().into_tensor_arg(),
                experts,
                dtype_to_storage_type(dtype),
            );
        }
        row_map
    }

    fn moe_permute(
        x: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        _row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        gather_rows(x, token_of_row)
    }

    fn moe_unpermute(
        y: FloatTensor<Self>,
        _token_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let y = contiguous(y);
        let row_map = contiguous(row_map);
        let hidden = dims(&y)[1];
        let [tokens, experts] = [dims(&row_map)[0], dims(&row_map)[1]];
        let out = empty_like(&y, vec![tokens, hidden], y.dtype);
        if tokens * hidden == 0 {
            return out;
        }
        let (count, dim) = elementwise(&out, tokens * hidden);
        let (f, i) = (y.dtype, row_map.dtype);
        unpermute_kernel::launch(
            &y.client.clone(),
            count,
            dim,
            y.into_tensor_arg(),
            row_map.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            hidden,
            experts,
            [dtype_to_storage_type(f), dtype_to_storage_type(i)],
        );
        out
    }

    fn moe_permute_probs(
        probs: FloatTensor<Self>,
        token_of_row: IntTensor<Self>,
        expert_of_row: IntTensor<Self>,
        _row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let probs = contiguous(probs);
        let token_of_row = contiguous(token_of_row);
        let expert_of_row = contiguous(expert_of_row);
        let experts = dims(&probs)[1];
        let n = dims(&token_of_row)[0];
        let out = empty_like(&probs, vec![n], probs.dtype);
        if n == 0 {
            return out;
        }
        let (count, dim) = elementwise(&out, n);
        let (f, i) = (probs.dtype, token_of_row.dtype);
        permute_probs_kernel::launch(
            &probs.client.clone(),
            count,
            dim,
            probs.into_tensor_arg(),
            token_of_row.into_tensor_arg(),
            expert_of_row.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            experts,
            [dtype_to_storage_type(f), dtype_to_storage_type(i)],
        );
        out
    }

    fn moe_unpermute_probs(
        g: FloatTensor<Self>,
        _token_of_row: IntTensor<Self>,
        _expert_of_row: IntTensor<Self>,
        row_map: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let g = contiguous(g);
        let row_map = contiguous(row_map);
        let shape = dims(&row_map);
        let out = empty_like(&g, shape.clone(), g.dtype);
        let n = shape.iter().product::<usize>();
        if n == 0 {
            return out;
        }
        let (count, dim) = elementwise(&out, n);
        let (f, i) = (g.dtype, row_map.dtype);
        unpermute_probs_kernel::launch(
            &g.client.clone(),
            count,
            dim,
            g.into_tensor_arg(),
            row_map.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            [dtype_to_storage_type(f), dtype_to_storage_type(i)],
        );
        out
    }

    fn moe_sort_chunks(
        x: FloatTensor<Self>,
        split_sizes: Vec<usize>,
        order: Vec<usize>,
    ) -> FloatTensor<Self> {
        let rows = chunk_rows(&split_sizes, &order);
        let rows = int_tensor(&x, &rows, DType::I32, "uploading the chunk-sort row order");
        gather_rows(x, rows)
    }

    fn moe_grouped_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        grouped_gemm(x, w, &counts, Gemm::Nn)
    }

    fn moe_grouped_matmul_nt(
        y: FloatTensor<Self>,
        w: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        grouped_gemm(y, w, &counts, Gemm::Nt)
    }

    fn moe_grouped_matmul_tn(
        x: FloatTensor<Self>,
        y: FloatTensor<Self>,
        counts: Vec<usize>,
    ) -> FloatTensor<Self> {
        grouped_gemm(x, y, &counts, Gemm::Tn)
    }
}
