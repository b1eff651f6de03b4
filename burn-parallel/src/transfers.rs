//! Host ↔ device transfers, counted.
//!
//! Every place in this workspace's libraries that reads a tensor back to the host (a blocking
//! synchronisation with the device on a GPU) or uploads host values (index tables, staged
//! collective results) calls [`read`] or [`upload`]; the counts are kept per thread (Burn runs a
//! backward pass on the thread that calls `backward()`), so
//! [`measure`] around a forward or a backward pass gives exactly what that pass transferred.
//!
//! What is counted: the libraries' own transfers — collectives staged through host memory,
//! routing tables read for dropless dispatch, finiteness checks, index tables and tile tables
//! uploaded for the MoE operations. What is not: on the CPU backend (Flex) the native MoE
//! operations read and write tensor memory in place, which is the device's own memory there,
//! and Burn's internal operations are Burn's.

use std::cell::RefCell;
use std::ops::Sub;

/// Which way a transfer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Device to host: the host waits for the device (a synchronisation).
    Read,
    /// Host to device: values made on the host (indices, staged results) uploaded.
    Upload,
}

/// One counted transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transfer {
    /// Which way.
    pub direction: Direction,
    /// What it was for (a fixed description, e.g. `"reading the routing map"`).
    pub what: &'static str,
    /// Bytes moved.
    pub bytes: u64,
}

/// Transfer counts, device→host and host→device reported separately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostTransfers {
    /// Device-to-host reads (each one a blocking synchronisation on a GPU).
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Host-to-device uploads.
    pub uploads: u64,
    /// Bytes uploaded.
    pub upload_bytes: u64,
}

impl Sub for HostTransfers {
    type Output = Self;

    fn sub(self, earlier: Self) -> Self {
        Self {
            reads: self.reads - earlier.reads,
            read_bytes: self.read_bytes - earlier.read_bytes,
            uploads: self.uploads - earlier.uploads,
            upload_bytes: self.upload_bytes - earlier.upload_bytes,
        }
    }
}

impl std::ops::Add for HostTransfers {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            reads: self.reads + other.reads,
            read_bytes: self.read_bytes + other.read_bytes,
            uploads: self.uploads + other.uploads,
            upload_bytes: self.upload_bytes + other.upload_bytes,
        }
    }
}

struct Counter {
    totals: HostTransfers,
    /// Open [`measure`] calls: each records the transfers made while it runs.
    logs: Vec<Vec<Transfer>>,
}

thread_local! {
    static COUNTER: RefCell<Counter> = const {
        RefCell::new(Counter {
            totals: HostTransfers {
                reads: 0,
                read_bytes: 0,
                uploads: 0,
                upload_bytes: 0,
            },
            logs: Vec::new(),
        })
    };
}

fn count(direction: Direction, what: &'static str, bytes: u64) {
    COUNTER.with(|c| {
        let mut c = c.borrow_mut();
        match direction {
            Direction::Read => {
                c.totals.reads += 1;
                c.totals.read_bytes += bytes;
            }
            Direction::Upload => {
                c.totals.uploads += 1;
                c.totals.upload_bytes += bytes;
            }
        }
        for log in &mut c.logs {
            log.push(Transfer {
                direction,
                what,
                bytes,
            });
        }
    });
}

/// Counts a device-to-host read of `bytes` for `what`.
pub fn read(what: &'static str, bytes: u64) {
    count(Direction::Read, what, bytes);
}

/// Counts a host-to-device upload of `bytes` for `what`.
pub fn upload(what: &'static str, bytes: u64) {
    count(Direction::Upload, what, bytes);
}

/// This thread's totals so far (subtract two snapshots for what happened in between).
pub fn snapshot() -> HostTransfers {
    COUNTER.with(|c| c.borrow().totals)
}

/// Runs `f` and returns its result with every transfer it made on this thread, in order.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Vec<Transfer>) {
    COUNTER.with(|c| c.borrow_mut().logs.push(Vec::new()));
    let result = f();
    let log = COUNTER.with(|c| c.borrow_mut().logs.pop().unwrap_or_default());
    (result, log)
}

/// The counts of a list of transfers.
pub fn totals(log: &[Transfer]) -> HostTransfers {
    log.iter().fold(HostTransfers::default(), |mut t, x| {
        match x.direction {
            Direction::Read => {
                t.reads += 1;
                t.read_bytes += x.bytes;
            }
            Direction::Upload => {
                t.uploads += 1;
                t.upload_bytes += x.bytes;
            }
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_records_what_ran_inside_it_and_snapshots_subtract() {
        let before = snapshot();
        let ((), log) = measure(|| {
            read("a", 8);
            let ((), inner) = measure(|| upload("b", 4));
            assert_eq!(inner.len(), 1);
        });
        upload("outside", 2);
        assert_eq!(
            log.iter()
                .map(|t| (t.direction, t.what))
                .collect::<Vec<_>>(),
            [(Direction::Read, "a"), (Direction::Upload, "b")]
        );
        assert_eq!(
            totals(&log),
            HostTransfers {
                reads: 1,
                read_bytes: 8,
                uploads: 1,
                upload_bytes: 4
            }
        );
        let delta = snapshot() - before;
        assert_eq!((delta.reads, delta.uploads, delta.upload_bytes), (1, 2, 6));
    }
}
