//! The process group of a data-parallel run: MPI when this binary is built with the `mpi`
//! feature and launched by `mpirun`, else none (one process). The canonical-order reduction
//! itself lives in `train::dist`; this is only the transport.

use anyhow::Result;
use train::dist::Comm;

/// Set by the MPI launchers we know (Open MPI, MPICH/Hydra, PMIx).
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The group this process belongs to (None: it runs alone).
pub fn world() -> Result<Option<Box<dyn Comm>>> {
    let Some(n) = launched_size() else {
        return Ok(None);
    };
    #[cfg(feature = "mpi")]
    {
        let _ = n;
        Ok(Some(Box::new(mpi_comm::Mpi::init()?)))
    }
    #[cfg(not(feature = "mpi"))]
    {
        if n > 1 {
            anyhow::bail!("launched as one of {n} MPI processes, but this moelab was built without MPI; rebuild with `cargo build --release --features mpi`");
        }
        Ok(None)
    }
}

#[cfg(feature = "mpi")]
mod mpi_comm {
    use anyhow::{Context, Result};
    use mpi::collective::SystemOperation;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use train::dist::Comm;

    pub struct Mpi {
        // NOTE: dropping the universe finalizes MPI, so it lives as long as the group
        _universe: mpi::environment::Universe,
        world: SimpleCommunicator,
    }

    impl Mpi {
        pub fn init() -> Result<Mpi> {
            let universe = mpi::initialize().context("MPI could not be initialised")?;
            let world = universe.world();
            Ok(Mpi {
                _universe: universe,
                world,
            })
        }
    }

    impl Comm for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_gather(&self, mine: &[u8]) -> Vec<u8> {
            let mut out = vec![0u8; mine.len() * self.size()];
            self.world.all_gather_into(mine, &mut out[..]);
            out
        }
        fn send(&self, to: usize, buf: &[f32]) {
            self.world.process_at_rank(to as i32).send(buf);
        }
        fn recv(&self, from: usize, buf: &mut [f32]) {
            self.world.process_at_rank(from as i32).receive_into(buf);
        }
        fn broadcast(&self, root: usize, buf: &mut [f32]) {
            self.world.process_at_rank(root as i32).broadcast_into(buf);
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}
