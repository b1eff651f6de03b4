//! Tile tables of the grouped GEMM (host side): one row `[i0, i1, r0, r1, g]` per output tile
//! — rows `i0..i1`, the reduction range `r0..r1` and the group `g` — so one launch covers every
//! group without padding. The kernel computes each operand's offset as `g ×` its group stride
//! in its own address type, so the table holds row numbers and group indices only: it fits
//! 32-bit integers whatever the operands' sizes (an operand of 64 experts of 6144 × 32768
//! elements starts its last expert past 2³¹), and the kernel addresses with 64 bits exactly
//! when an operand has more than 2³² elements.

use burn::tensor::DType;

/// Entries per table row.
pub(crate) const ENTRIES: usize = 5;

/// Tiles of at most `tile` rows over each group's rows (`counts[g]` consecutive rows): the
/// forward layouts, where output rows are input rows. `reduction(g)` gives group `g`'s
/// reduction range. Empty groups get no tile.
pub(crate) fn row_tiles(
    counts: &[usize],
    tile: usize,
    reduction: impl Fn(usize) -> (usize, usize),
) -> Vec<usize> {
    let mut table = Vec::new();
    let mut start = 0;
    for (g, &count) in counts.iter().enumerate() {
        let (r0, r1) = reduction(g);
        let end = start + count;
        let mut i0 = start;
        while i0 < end {
            let i1 = (i0 + tile).min(end);
            table.extend([i0, i1, r0, r1, g]);
            i0 = i1;
        }
        start = end;
    }
    table
}

/// Tiles of at most `tile` rows over `0..rows` for every group, reducing over that group's
/// rows: the weight-gradient layout (`[G, K, M]` output). Empty groups still get their tiles
/// (with an empty reduction, which writes zeros).
pub(crate) fn weight_tiles(counts: &[usize], rows: usize, tile: usize) -> Vec<usize> {
    let mut table = Vec::new();
    let mut start = 0;
    for (g, &count) in counts.iter().enumerate() {
        let mut i0 = 0;
        while i0 < rows {
            let i1 = (i0 + tile).min(rows);
            table.extend([i0, i1, start, start + count, g]);
            i0 = i1;
        }
        start += count;
    }
    table
}

/// The integer type of a table: i32 while every entry fits, i64 beyond (more than 2³¹ rows).
pub(crate) fn table_dtype(table: &[usize]) -> DType {
    if table.iter().all(|&v| v <= i32::MAX as usize) {
        DType::I32
    } else {
        DType::I64
    }
}

/// Whether the kernel must address with 64 bits: an operand (its number of elements) does
/// not fit a 32-bit index.
pub(crate) fn wide_addresses(operands: &[usize]) -> bool {
    operands.iter().any(|&n| n > u32::MAX as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_tiles_cover_every_row_once_and_skip_empty_groups() {
        let counts = [3, 0, 130, 1];
        let table = row_tiles(&counts, 64, |g| (0, 8 + g));
        let rows: Vec<[usize; ENTRIES]> = table
            .chunks(ENTRIES)
            .map(|c| c.try_into().expect("5 entries"))
            .collect();
        assert_eq!(
            rows,
            vec![
                [0, 3, 0, 8, 0],
                [3, 67, 0, 10, 2],
                [67, 131, 0, 10, 2],
                [131, 133, 0, 10, 2],
                [133, 134, 0, 11, 3],
            ]
        );
    }

    #[test]
    fn weight_tiles_reduce_over_each_group_even_when_empty() {
        let table = weight_tiles(&[2, 0, 5], 70, 64);
        let rows: Vec<&[usize]> = table.chunks(ENTRIES).collect();
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0], &[0, 64, 0, 2, 0]);
        assert_eq!(rows[1], &[64, 70, 0, 2, 0]);
        assert_eq!(rows[2], &[0, 64, 2, 2, 1]);
        assert_eq!(rows[5], &[64, 70, 2, 7, 2]);
    }

    /// The shapes the issue names: E = 64 experts at H = 6144, 2F = 32768 (an expert weight
    /// tensor of 1.29·10¹⁰ elements), 8192 tokens × top-8 rows. The tables hold no element
    /// offset, so every entry fits i32 although the last expert's weights start at element
    /// 63 · 6144 · 32768 ≈ 1.27·10¹⁰ (past 2³¹ and 2³²); the offset the kernel computes from a
    /// row, `g · K · M` in its 64-bit address type, is that exact value; and the operands'
    /// sizes select 64-bit addressing.
    #[test]
    fn tables_of_operands_past_two_to_the_31_hold_group_indices_and_select_64_bit_addressing() {
        let (e, h, f2, rows) = (64usize, 6144usize, 32768usize, 8192usize * 8);
        let counts = vec![rows / e; e];
        let forward = row_tiles(&counts, 64, |_| (0, h));
        let gradient = weight_tiles(&counts, h, 64);
        for table in [&forward, &gradient] {
            assert_eq!(table_dtype(table), DType::I32);
            let last = &table[table.len() - ENTRIES..];
            assert_eq!(last[4], e - 1, "the last tile's group");
            let offset = last[4] as u64 * h as u64 * f2 as u64;
            assert_eq!(offset, 12_683_575_296);
            assert!(offset > u32::MAX as u64);
            // What 32-bit offsets in the table would have held instead.
            assert_ne!(offset as u32 as u64, offset);
        }
        let (weights, tokens) = (e * h * f2, rows * h);
        assert!(wide_addresses(&[tokens, weights, tokens]));
        assert!(!wide_addresses(&[tokens, tokens, rows * f2 / 4]));
        assert!(wide_addresses(&[1 << 32]));
        assert!(!wide_addresses(&[u32::MAX as usize]));
        // More than 2³¹ rows: the table itself needs 64-bit entries.
        assert_eq!(table_dtype(&[0, 1 << 31, 0, 8, 0]), DType::I64);
    }
}
