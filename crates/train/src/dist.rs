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

/// Processes of one machine as threads of one process (`moelab train --replicas N`): each
/// replica has its own model, optimizer and (smaller) thread pool, and they exchange through
/// shared memory exactly what MPI ranks would. On a small machine this avoids the per-op
/// synchronisation of one pool spread over every core.
pub struct Local {
    rank: usize,
    shared: std::sync::Arc<LocalShared>,
}

struct LocalShared {
    size: usize,
    barrier: std::sync::Barrier,
    slots: std::sync::Mutex<Vec<Vec<u8>>>,
    bcast: std::sync::Mutex<Vec<f32>>,
    /// Messages by (from, to).
    mail: std::sync::Mutex<std::collections::HashMap<(usize, usize), Vec<f32>>>,
    posted: std::sync::Condvar,
}

impl Local {
    /// A group of `size` replicas; hand one to each thread.
    pub fn group(size: usize) -> Vec<Local> {
        let shared = std::sync::Arc::new(LocalShared {
            size,
            barrier: std::sync::Barrier::new(size),
            slots: std::sync::Mutex::new(vec![vec![]; size]),
            bcast: std::sync::Mutex::new(vec![]),
            mail: Default::default(),
            posted: std::sync::Condvar::new(),
        });
        (0..size)
            .map(|rank| Local {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Comm for Local {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_gather(&self, mine: &[u8]) -> Vec<u8> {
        let sh = &self.shared;
        sh.slots.lock().expect("group lock")[self.rank] = mine.to_vec();
        sh.barrier.wait();
        let out = sh.slots.lock().expect("group lock").concat();
        // nobody writes the next round before everyone has read this one
        sh.barrier.wait();
        out
    }
    fn send(&self, to: usize, buf: &[f32]) {
        let sh = &self.shared;
        let mut mail = sh.mail.lock().expect("group lock");
        assert!(
            mail.insert((self.rank, to), buf.to_vec()).is_none(),
            "two messages from {} to {to} in flight",
            self.rank
        );
        sh.posted.notify_all();
    }
    fn recv(&self, from: usize, buf: &mut [f32]) {
        let sh = &self.shared;
        let mut mail = sh.mail.lock().expect("group lock");
        loop {
            if let Some(m) = mail.remove(&(from, self.rank)) {
                buf.copy_from_slice(&m);
                return;
            }
            mail = sh.posted.wait(mail).expect("group lock");
        }
    }
    fn broadcast(&self, root: usize, buf: &mut [f32]) {
        let sh = &self.shared;
        if self.rank == root {
            *sh.bcast.lock().expect("group lock") = buf.to_vec();
        }
        sh.barrier.wait();
        if self.rank != root {
            buf.copy_from_slice(&sh.bcast.lock().expect("group lock"));
        }
        sh.barrier.wait();
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.all_gather(&bytes);
        buf.fill(0.0);
        for part in all.chunks(bytes.len()) {
            for (b, c) in buf.iter_mut().zip(part.chunks_exact(4)) {
                *b += f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
    }
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
    fn a_local_group_folds_like_one_process() {
        let g: Vec<Vec<f32>> = (0..4)
            .map(|k| {
                (0..1000)
                    .map(|i| ((i * 7 + k * 31) % 97) as f32 * 0.013)
                    .collect()
            })
            .collect();
        let mut want = g[0].clone();
        for x in &g[1..] {
            add_into(&mut want, x);
        }
        for size in [2usize, 4] {
            let per = 4 / size;
            let got: Vec<Vec<f32>> = std::thread::scope(|s| {
                let hs: Vec<_> = Local::group(size)
                    .into_iter()
                    .map(|c| {
                        let g = &g;
                        s.spawn(move || {
                            let r = c.rank();
                            let mine: Vec<Vec<f32>> = g[r * per..(r + 1) * per].to_vec();
                            let mut acc = mine[0].clone();
                            let held = if r == 0 {
                                for x in &mine[1..] {
                                    add_into(&mut acc, x);
                                }
                                vec![]
                            } else {
                                mine
                            };
                            fold_across(&c, &mut acc, &held);
                            let names = c.all_gather(&[r as u8]);
                            assert_eq!(names, (0..size as u8).collect::<Vec<_>>());
                            acc
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for a in got {
                assert!(
                    a.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{size} replicas"
                );
            }
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
