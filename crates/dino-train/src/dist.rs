//! Process-group setup for data-parallel training: [`init`] joins the job's MPI world when the binary is
//! built with the `mpi` feature and launched by `mpirun` / `srun` (rank and world size come from MPI), installs
//! it as the process's [`dino_core::collective`], and sets each rank's thread count; [`finalize`] ends it.
//! Without the feature, or launched alone, the process is world 1 ([`dino_core::Local`]).
//!
//! The MPI backend ([`Mpi`], rsmpi) serialises every call behind one mutex (MPI initialised with
//! `MPI_THREAD_SERIALIZED`) and splits large buffers into chunks of at most 2^30 elements (MPI counts are
//! 32-bit).

use std::sync::Arc;

use dino_core::Collective;

use crate::error::Result;

/// What [`init`] set up.
#[derive(Debug, Clone)]
pub struct DistInfo {
    /// The engine (`local`, `mpi`).
    pub backend: &'static str,
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Ranks on this node.
    pub local_size: usize,
    /// Compute threads of this rank (`RAYON_NUM_THREADS`).
    pub threads: usize,
}

/// Join the job's process group (MPI when built with `mpi` and launched with several ranks) and install it;
/// then give this rank `threads` compute threads, or `cores / ranks on this node` (at least 1) when `None`
/// and `RAYON_NUM_THREADS` is unset. Call once, first thing in `main` (before any rayon or candle work).
pub fn init(threads: Option<usize>) -> Result<DistInfo> {
    let coll = backend()?;
    let (backend, rank, world_size, local_size) = (
        coll.name(),
        coll.rank(),
        coll.world_size(),
        coll.local_size(),
    );
    if world_size > 1 {
        dino_core::collective::install(coll)?;
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let threads = match (threads, env) {
        (Some(t), _) => t.max(1),
        (None, Some(e)) => e,
        (None, None) => (cores / local_size.max(1)).max(1),
    };
    // candle and rayon both read RAYON_NUM_THREADS; set before either starts its pool.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    Ok(DistInfo {
        backend,
        rank,
        world_size,
        local_size,
        threads,
    })
}

/// End the process group (MPI_Finalize) once every rank is done. A no-op without MPI.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    mpi_backend::finalize();
}

/// End every rank of the job with `code` (MPI_Abort), after this rank printed its error; a plain exit at
/// world size 1.
pub fn abort(code: i32) -> ! {
    dino_core::collective::current().abort(code)
}

#[cfg(feature = "mpi")]
fn backend() -> Result<Arc<dyn Collective>> {
    mpi_backend::Mpi::init()
}

#[cfg(not(feature = "mpi"))]
fn backend() -> Result<Arc<dyn Collective>> {
    Ok(Arc::new(dino_core::Local))
}

#[cfg(feature = "mpi")]
pub use mpi_backend::Mpi;

#[cfg(feature = "mpi")]
mod mpi_backend {
    use std::sync::{Arc, Mutex};

    use dino_core::{Collective, Error as CoreError};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::Threading;

    use crate::error::{Error, Result};

    /// MPI elements per call (counts are `int`).
    const CHUNK: usize = 1 << 30;

    /// The universe lives until [`finalize`] (dropping it calls MPI_Finalize).
    static UNIVERSE: Mutex<Option<Universe>> = Mutex::new(None);

    struct Comm(SimpleCommunicator);
    // SAFETY: MPI runs at MPI_THREAD_SERIALIZED and every call on the communicator goes through the mutex
    // that owns it, so no two threads use MPI at once.
    unsafe impl Send for Comm {}

    /// The MPI world as a [`Collective`].
    pub struct Mpi {
        world: Mutex<Comm>,
        rank: usize,
        size: usize,
        local_rank: usize,
        local_size: usize,
    }

    impl std::fmt::Debug for Mpi {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Mpi(rank {} of {})", self.rank, self.size)
        }
    }

    impl Mpi {
        /// Initialise MPI (a singleton world of 1 when not launched by mpirun) and wrap its world.
        pub fn init() -> Result<Arc<dyn Collective>> {
            let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
                .ok_or_else(|| {
                    Error::Msg("MPI could not be initialised (or was initialised already)".into())
                })?;
            if level < Threading::Serialized {
                return Err(Error::Msg(format!(
                    "the MPI library offers thread level {level:?}, dino needs Serialized"
                )));
            }
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            let (local_rank, local_size) = {
                let local = world.split_shared(world.rank());
                (local.rank() as usize, local.size() as usize)
            };
            *UNIVERSE
                .lock()
                .map_err(|_| Error::Msg("MPI universe lock poisoned".into()))? = Some(universe);
            Ok(Arc::new(Mpi {
                world: Mutex::new(Comm(world)),
                rank,
                size,
                local_rank,
                local_size,
            }))
        }

        fn with<T>(
            &self,
            op: &str,
            f: impl FnOnce(&SimpleCommunicator) -> T,
        ) -> dino_core::Result<T> {
            let g = self
                .world
                .lock()
                .map_err(|_| CoreError::collective(op, "MPI communicator lock poisoned"))?;
            Ok(f(&g.0))
        }
    }

    pub(super) fn finalize() {
        if let Ok(mut u) = UNIVERSE.lock() {
            u.take();
        }
    }

    impl Collective for Mpi {
        fn name(&self) -> &'static str {
            "mpi"
        }
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn local_rank(&self) -> usize {
            self.local_rank
        }
        fn local_size(&self) -> usize {
            self.local_size
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> dino_core::Result<()> {
            self.with("all_reduce", |w| {
                for chunk in buf.chunks_mut(CHUNK) {
                    let send = chunk.to_vec();
                    w.all_reduce_into(&send[..], chunk, SystemOperation::sum());
                }
            })
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> dino_core::Result<()> {
            self.with("all_reduce", |w| {
                for chunk in buf.chunks_mut(CHUNK) {
                    let send = chunk.to_vec();
                    w.all_reduce_into(&send[..], chunk, SystemOperation::sum());
                }
            })
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> dino_core::Result<()> {
            if root >= self.size {
                return Err(CoreError::collective(
                    "broadcast",
                    format!("root {root} in a world of {}", self.size),
                ));
            }
            self.with("broadcast", |w| {
                let r = w.process_at_rank(root as i32);
                let mut len = buf.len() as u64;
                r.broadcast_into(&mut len);
                buf.resize(len as usize, 0);
                for chunk in buf.chunks_mut(CHUNK) {
                    r.broadcast_into(chunk);
                }
            })
        }
        fn barrier(&self) -> dino_core::Result<()> {
            self.with("barrier", |w| w.barrier())
        }
        fn abort(&self, code: i32) -> ! {
            // No lock: a rank may abort while another thread holds it.
            // SAFETY: MPI_Abort on MPI_COMM_WORLD is allowed from any thread of an initialised process.
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
            }
            std::process::exit(code)
        }
    }
}
