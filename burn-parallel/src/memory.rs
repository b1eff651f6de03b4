//! Heap accounting for the training loop's memory report (like `torch.cuda.max_memory_allocated`
//! in torchtitan's per-step memory log, for the CPU backend whose tensors live on the heap).
//!
//! Install [`Counting`] as the global allocator of a binary (the `burn-recipes` binary and the context-parallel check do) and
//! [`live`] / [`peak`] report the bytes requested and not yet freed; without it they report
//! `None`.
//!
//! ```
//! use burn_parallel::memory::Counting;
//! #[global_allocator]
//! static GLOBAL: Counting<std::alloc::System> = Counting(std::alloc::System);
//! # fn main() {
//! let before = burn_parallel::memory::live().unwrap();
//! let buffer = vec![0u8; 1 << 20];
//! assert!(burn_parallel::memory::live().unwrap() >= before + (1 << 20));
//! drop(buffer);
//! assert!(burn_parallel::memory::peak().unwrap() >= before + (1 << 20));
//! # }
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A global allocator that counts the live bytes of allocator `A` and their peak.
#[derive(Debug, Default)]
pub struct Counting<A>(pub A);

fn grew(bytes: usize) {
    LARGEST.fetch_max(bytes, Ordering::Relaxed);
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the wrapped allocator; the counters are atomics
// and never allocate. (The one place the workspace's `unsafe_code` lint is lifted: a global
// allocator cannot be written without it.)
#[allow(unsafe_code)]
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            INSTALLED.store(true, Ordering::Relaxed);
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

/// Bytes allocated and not yet freed, when [`Counting`] is the global allocator.
pub fn live() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| LIVE.load(Ordering::Relaxed))
}

/// The most bytes live at once since the start or the last [`reset_peak`].
pub fn peak() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| PEAK.load(Ordering::Relaxed))
}

/// The largest single allocation (or growth of one) since the start or the last
/// [`reset_peak`]: the largest intermediate buffer.
pub fn largest() -> Option<usize> {
    INSTALLED
        .load(Ordering::Relaxed)
        .then(|| LARGEST.load(Ordering::Relaxed))
}

/// Starts a new peak from the bytes live now, and a new [`largest`].
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    LARGEST.store(0, Ordering::Relaxed);
}

/// Refuses, before allocating, what needs `need` bytes when this machine has less available
/// ([`available`]); `what` names it (and its parts) in the error. Passes where the system
/// does not say.
pub fn require(need: u64, what: impl FnOnce() -> String) -> crate::error::Result<()> {
    match available() {
        Some(have) if need > have => Err(crate::ParallelError::OutOfMemory {
            what: what(),
            need,
            have,
        }),
        _ => Ok(()),
    }
}

/// The memory this machine can still give (`MemAvailable` of `/proc/meminfo`), in bytes;
/// `None` where the system does not say.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_refuses_more_than_is_available_naming_both_sizes() {
        assert!(require(0, || "nothing".into()).is_ok());
        let Some(have) = available() else {
            return;
        };
        let err = require(have + (1 << 30), || "a test buffer".into())
            .expect_err("more than is available");
        let text = err.to_string();
        assert!(
            text.starts_with("a test buffer needs about ") && text.contains("GiB available"),
            "{text}"
        );
    }
}
