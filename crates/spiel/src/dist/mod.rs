//! Data-parallel training's process group: how many processes train together, which one this is,
//! and the collectives the trainer needs (sums of gradients and statistics, agreement checks).
//! Uses nothing of the library but [`crate::Error`].
//!
//! A process started by `mpirun` (Open MPI's `OMPI_COMM_WORLD_SIZE`, or the `PMI_SIZE` of
//! MPICH-style launchers) with more than one process in the job joins an MPI world; any other
//! process is a group of one, where every collective is a no-op. MPI is behind the `mpi` cargo
//! feature: a build without it refuses to run as one of several processes, rather than letting
//! each train alone over the same run directory.
//!
//! MPI is initialised at `MPI_THREAD_SERIALIZED`: the trainer calls collectives from whichever
//! compute thread runs the update (and from backward hooks), one call at a time under the group's
//! lock. `MPI_Finalize` runs when the group is dropped; the front end keeps it alive on its own
//! thread until training is over.

use std::sync::Mutex;
use std::time::Instant;

use crate::{Error, Result};

/// Communication done so far: collective calls, payload bytes and seconds inside them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    /// Collective calls.
    pub calls: u64,
    /// Bytes of payload reduced (each call counts its buffer once).
    pub bytes: u64,
    /// Seconds spent in the calls (waiting for slower ranks included).
    pub secs: f64,
}

/// The processes training together.
pub struct Group {
    rank: usize,
    size: usize,
    /// Serialises the calls, holds the send buffer they reuse and counts them.
    state: Mutex<State>,
    #[cfg(feature = "mpi")]
    universe: Option<mpi::environment::Universe>,
}

#[derive(Default)]
struct State {
    scratch_f32: Vec<f32>,
    stats: CommStats,
}

/// The launcher's process count, if this process was started as one of a job's processes.
fn launcher_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|s| s.trim().parse().ok())
}

/// This process's rank as its launcher announced it (0 when not launched as part of a job).
/// Readable before the group exists, e.g. to quiet the logs of every rank but the first.
pub fn launched_rank() -> usize {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl Group {
    /// A group of one process.
    pub fn solo() -> Group {
        Group {
            rank: 0,
            size: 1,
            state: Mutex::default(),
            #[cfg(feature = "mpi")]
            universe: None,
        }
    }

    /// The group this process was launched into: the MPI world under `mpirun -n N` (N > 1),
    /// else a group of one.
    pub fn from_launcher() -> Result<Group> {
        let n = launcher_size().unwrap_or(1);
        if n <= 1 {
            return Ok(Group::solo());
        }
        Group::join_mpi(n)
    }

    #[cfg(not(feature = "mpi"))]
    fn join_mpi(n: usize) -> Result<Group> {
        Err(Error::Invalid(format!(
            "started by mpirun as one of {n} processes, but this spiel was built without MPI; build it with `cargo build --release --features mpi` (Open MPI and libclang needed, see the README)"
        )))
    }

    #[cfg(feature = "mpi")]
    fn join_mpi(n: usize) -> Result<Group> {
        use mpi::topology::Communicator;
        use mpi::Threading;
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Invalid("MPI was already initialised in this process".into()))?;
        if level < Threading::Serialized {
            return Err(Error::Invalid(format!(
                "this MPI library offers thread level {level:?}; spiel needs Serialized"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if size != n {
            return Err(Error::Invalid(format!(
                "the launcher announced {n} processes but the MPI world has {size}"
            )));
        }
        Ok(Group {
            rank,
            size,
            state: Mutex::default(),
            universe: Some(universe),
        })
    }

    /// This process's rank, 0..size.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Processes in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether this is rank 0, the one that writes the run's files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Communication done so far.
    pub fn stats(&self) -> CommStats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replace `buf` with its elementwise sum over all ranks (every rank passes a buffer of the
    /// same length, in the same order of calls).
    pub fn sum_f32(&self, buf: &mut [f32]) {
        if self.size == 1 {
            return;
        }
        let mut st = self.lock();
        let t = Instant::now();
        let State { scratch_f32, stats } = &mut *st;
        // rsmpi offers no MPI_IN_PLACE: the send side is a copy, reused from call to call.
        scratch_f32.clear();
        scratch_f32.extend_from_slice(buf);
        self.all_reduce_f32(scratch_f32, buf);
        stats.calls += 1;
        stats.bytes += std::mem::size_of_val(buf) as u64;
        stats.secs += t.elapsed().as_secs_f64();
    }

    /// `out` = the elementwise sum over all ranks of `local` (same lengths on every rank).
    pub fn sum_f32_into(&self, local: &[f32], out: &mut [f32]) {
        assert_eq!(local.len(), out.len(), "sum_f32_into: buffers of different lengths");
        if self.size == 1 {
            out.copy_from_slice(local);
            return;
        }
        let mut st = self.lock();
        let t = Instant::now();
        self.all_reduce_f32(local, out);
        st.stats.calls += 1;
        st.stats.bytes += std::mem::size_of_val(out) as u64;
        st.stats.secs += t.elapsed().as_secs_f64();
    }

    /// Replace `buf` with its elementwise sum over all ranks.
    pub fn sum_f64(&self, buf: &mut [f64]) {
        if self.size == 1 {
            return;
        }
        let mut st = self.lock();
        let t = Instant::now();
        let send = buf.to_vec();
        self.all_reduce_f64(&send, buf);
        st.stats.calls += 1;
        st.stats.bytes += std::mem::size_of_val(buf) as u64;
        st.stats.secs += t.elapsed().as_secs_f64();
    }

    /// Whether every rank holds the same `values[i]`, for each `i`.
    pub fn agree(&self, values: &[u64]) -> Vec<bool> {
        if self.size == 1 {
            return vec![true; values.len()];
        }
        let mut st = self.lock();
        let t = Instant::now();
        let (lo, hi) = self.min_max_u64(values);
        st.stats.calls += 2;
        st.stats.bytes += 2 * std::mem::size_of_val(values) as u64;
        st.stats.secs += t.elapsed().as_secs_f64();
        lo.iter().zip(&hi).map(|(a, b)| a == b).collect()
    }

    /// Whether any rank passes `true`.
    pub fn any(&self, flag: bool) -> bool {
        if self.size == 1 {
            return flag;
        }
        let mut v = [f64::from(u8::from(flag))];
        self.sum_f64(&mut v);
        v[0] > 0.0
    }

    /// Wait until every rank has come here.
    pub fn barrier(&self) {
        if self.size == 1 {
            return;
        }
        let _st = self.lock();
        self.mpi_barrier();
    }

    /// End the whole job with `code` (a rank that fails alone would leave the others waiting in
    /// their next collective). A group of one just exits.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if self.universe.is_some() {
            use mpi::topology::Communicator;
            mpi::topology::SimpleCommunicator::world().abort(code);
        }
        std::process::exit(code)
    }

    #[cfg(feature = "mpi")]
    fn all_reduce_f32(&self, send: &[f32], recv: &mut [f32]) {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        mpi::topology::SimpleCommunicator::world().all_reduce_into(send, recv, SystemOperation::sum());
    }

    #[cfg(feature = "mpi")]
    fn all_reduce_f64(&self, send: &[f64], recv: &mut [f64]) {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        mpi::topology::SimpleCommunicator::world().all_reduce_into(send, recv, SystemOperation::sum());
    }

    #[cfg(feature = "mpi")]
    fn min_max_u64(&self, values: &[u64]) -> (Vec<u64>, Vec<u64>) {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        let world = mpi::topology::SimpleCommunicator::world();
        let mut lo = vec![0u64; values.len()];
        let mut hi = vec![0u64; values.len()];
        world.all_reduce_into(values, &mut lo[..], SystemOperation::min());
        world.all_reduce_into(values, &mut hi[..], SystemOperation::max());
        (lo, hi)
    }

    #[cfg(feature = "mpi")]
    fn mpi_barrier(&self) {
        use mpi::collective::CommunicatorCollectives;
        mpi::topology::SimpleCommunicator::world().barrier();
    }

    // Without MPI a group has one rank and the collectives above return before reaching these.
    #[cfg(not(feature = "mpi"))]
    fn all_reduce_f32(&self, _send: &[f32], _recv: &mut [f32]) {
        unreachable!("a group without MPI has one rank")
    }

    #[cfg(not(feature = "mpi"))]
    fn all_reduce_f64(&self, _send: &[f64], _recv: &mut [f64]) {
        unreachable!("a group without MPI has one rank")
    }

    #[cfg(not(feature = "mpi"))]
    fn min_max_u64(&self, _values: &[u64]) -> (Vec<u64>, Vec<u64>) {
        unreachable!("a group without MPI has one rank")
    }

    #[cfg(not(feature = "mpi"))]
    fn mpi_barrier(&self) {
        unreachable!("a group without MPI has one rank")
    }
}

/// A 64-bit FNV-1a hash of `indices`, the same in every process: what ranks compare to prove they
/// hold the same mask.
pub fn hash_indices(indices: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &i in indices {
        for b in i.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_of_one_leaves_buffers_as_they_are_and_agrees_with_itself() {
        let g = Group::solo();
        assert_eq!((g.rank(), g.size(), g.is_root()), (0, 1, true));
        let mut v = vec![1.5f32, -2.0, 3.25];
        g.sum_f32(&mut v);
        assert_eq!(v, [1.5, -2.0, 3.25]);
        let mut out = vec![0.0; 3];
        g.sum_f32_into(&v, &mut out);
        assert_eq!(out, v);
        assert_eq!(g.agree(&[1, 2, 3]), [true, true, true]);
        assert!(g.any(true) && !g.any(false));
        g.barrier();
        assert_eq!(g.stats(), CommStats::default());
    }

    #[test]
    fn index_hashes_tell_masks_apart() {
        assert_eq!(hash_indices(&[1, 2, 3]), hash_indices(&[1, 2, 3]));
        assert_ne!(hash_indices(&[1, 2, 3]), hash_indices(&[1, 2, 4]));
        assert_ne!(hash_indices(&[1, 2]), hash_indices(&[2, 1]));
    }
}
