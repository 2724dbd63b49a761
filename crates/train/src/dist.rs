//! Data-parallel training: how processes ("ranks") share a step's micro-batches and combine
//! what they computed so that the result is bit-identical for any number of processes.
//!
//! A step has `A` micro-batches (`train.grad_accum`); with `W` ranks, rank r computes the
//! contiguous block `[r A/W, (r+1) A/W)`. The gradient of the step is the canonical left fold
//! `S = ((G_0 + G_1) + G_2) + ...` over micro-batches in order — the same additions a single
//! process does. MPI's own allreduce adds in an order that depends on the world size (and
//! the library), so it is not used for gradients: rank 0 folds its block and sends the
//! partial sum to rank 1, which adds its own gradients in order and passes it on; the last
//! rank broadcasts the total. Losses, expert loads and flags travel by all-gather (data
//! movement only, no arithmetic), and every rank folds them in the same order.
//!
//! The transport is the [`Comm`] trait: [`Single`] for one process; an MPI implementation
//! lives behind the binary's `mpi` feature.

/// A group of processes training together.
pub trait Comm {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Every rank's `mine` (equal lengths on all ranks), concatenated in rank order.
    fn all_gather(&self, mine: &[u8]) -> Vec<u8>;
    fn send(&self, to: usize, buf: &[f32]);
    fn recv(&self, from: usize, buf: &mut [f32]);
    /// Overwrites `buf` on every rank with `root`'s.
    fn broadcast(&self, root: usize, buf: &mut [f32]);
    /// The transport's own sum reduction: only for comparing costs (`moelab bench
    /// allreduce`); its result may differ across world sizes in the last bits.
    fn all_reduce_sum(&self, buf: &mut [f32]);
    /// Ends every process of the group (after one of them failed).
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// One process: nothing to exchange.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, mine: &[u8]) -> Vec<u8> {
        mine.to_vec()
    }
    fn send(&self, to: usize, _: &[f32]) {
        panic!("send to rank {to} in a single process")
    }
    fn recv(&self, from: usize, _: &mut [f32]) {
        panic!("recv from rank {from} in a single process")
    }
    fn broadcast(&self, _: usize, _: &mut [f32]) {}
    fn all_reduce_sum(&self, _: &mut [f32]) {}
}

/// The micro-batches (indices within a step) that `rank` computes.
pub fn block(rank: usize, size: usize, grad_accum: u64) -> std::ops::Range<u64> {
    let per = grad_accum / size as u64;
    rank as u64 * per..(rank as u64 + 1) * per
}

/// `acc += g`, element by element (no reduction: any thread split gives the same bits).
pub fn add_into(acc: &mut [f32], g: &[f32]) {
    use rayon::prelude::*;
    acc.par_chunks_mut(1 << 16)
        .zip(g.par_chunks(1 << 16))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// Completes the canonical fold across ranks. On entry rank 0's `acc` holds the fold of its
/// own block, and every other rank holds its micro-batch gradients in `held`, in order. On
/// return every rank's `acc` holds the fold over all micro-batches of the step.
pub fn fold_across(comm: &dyn Comm, acc: &mut [f32], held: &[Vec<f32>]) {
    let (r, w) = (comm.rank(), comm.size());
    if w == 1 {
        return;
    }
    if r > 0 {
        comm.recv(r - 1, acc);
        for g in held {
            add_into(acc, g);
        }
    }
    if r + 1 < w {
        comm.send(r + 1, acc);
    }
    comm.broadcast(w - 1, acc);
}

/// Gathers each rank's f32 values (equal counts), in rank order.
pub fn gather_f32(comm: &dyn Comm, mine: &[f32]) -> Vec<f32> {
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    comm.all_gather(&bytes)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// Gathers each rank's u64 values (equal counts), in rank order.
pub fn gather_u64(comm: &dyn Comm, mine: &[u64]) -> Vec<u64> {
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    comm.all_gather(&bytes)
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// The ranks whose `digest` differs from the most common one (ties: from rank 0's).
pub fn disagreeing(digests: &[Vec<u8>]) -> Vec<usize> {
    let count = |d: &Vec<u8>| digests.iter().filter(|x| *x == d).count();
    let best = digests
        .iter()
        .enumerate()
        .max_by_key(|(i, d)| (count(d), std::cmp::Reverse(*i)))
        .map(|(_, d)| d.clone())
        .unwrap_or_default();
    (0..digests.len()).filter(|&i| digests[i] != best).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_step_in_order() {
        for w in [1usize, 2, 4] {
            let all: Vec<u64> = (0..w).flat_map(|r| block(r, w, 8)).collect();
            assert_eq!(all, (0..8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn disagreement_names_the_odd_rank() {
        let d = |x: u8| vec![x; 4];
        assert_eq!(disagreeing(&[d(1), d(1), d(2), d(1)]), vec![2]);
        assert_eq!(disagreeing(&[d(1), d(2)]), vec![1]);
        assert!(disagreeing(&[d(3), d(3)]).is_empty());
    }
}
