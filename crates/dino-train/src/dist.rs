//! Process-group setup for data-parallel training: [`init`] joins the job's MPI world when the binary is
//! built with the `mpi` feature and launched by `mpirun` / `srun` (rank and world size come from MPI), installs
//! it as the process's [`dino_core::collective`], and sets each rank's thread count; [`finalize`] ends it.
//! Without the feature, or launched alone, the process is world 1 ([`dino_core::Local`]).
//!
//! The MPI backend (`Mpi` with the `mpi` feature, rsmpi) serialises every call behind one mutex (MPI initialised with
//! `MPI_THREAD_SERIALIZED`) and splits large buffers into chunks of at most 2^30 elements (MPI counts are
//! 32-bit).
//!
//! With the `nccl` feature, a run on CUDA GPUs over several ranks then calls [`use_device`]: the ranks build
//! one NCCL communicator on their GPUs (the NCCL id goes from rank 0 to the others over MPI) and it replaces
//! the MPI collective for tensors on the GPU (the gradient average, SyncBatchNorm's sums), which then never
//! leave GPU memory; host buffers (loss statistics, checks, broadcasts) still go over MPI.

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
    /// Cores this process may run on (its CPU affinity, as the launcher bound it).
    pub allowed_cores: usize,
    /// The launcher bound this rank to fewer cores than its share of the node (`online cores / ranks on the
    /// node`), so it runs fewer threads than it could (Open MPI binds to one core when np <= 2).
    pub bound_below_share: bool,
}

/// Join the job's process group (MPI when built with `mpi` and launched with several ranks) and install it;
/// then give this rank `threads` compute threads, or, when `None` and `RAYON_NUM_THREADS` is unset, its share
/// of the node (`online cores / ranks on this node`, at least 1) within the cores it is bound to. Call once, first thing in `main` (before any rayon or candle work).
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
    // The cores this process may run on (the launcher's binding: Open MPI binds each rank to one core when
    // np <= 2 and to a socket above), and the node's online cores, shared by the ranks on the node.
    let allowed = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let online = online_cpus().unwrap_or(allowed).max(allowed);
    let share = (online / local_size.max(1)).max(1);
    let env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let threads = match (threads, env) {
        (Some(t), _) => t.max(1),
        (None, Some(e)) => e,
        (None, None) => allowed.min(share),
    };
    let bound_below_share = threads < share && allowed < share;
    // candle and rayon both read RAYON_NUM_THREADS; set before either starts its pool.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    Ok(DistInfo {
        backend,
        rank,
        world_size,
        local_size,
        threads,
        allowed_cores: allowed,
        bound_below_share,
    })
}

/// The node's online CPUs (`/sys/devices/system/cpu/online`, e.g. `0-63` or `0-3,8-11`), if readable.
fn online_cpus() -> Option<usize> {
    cpu_list_len(&std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?)
}

/// The number of CPUs in a Linux CPU list (`0-63`, `0-3,8-11`, `5`); None if malformed or empty.
fn cpu_list_len(s: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// End the process group (MPI_Finalize) once every rank is done. A no-op without MPI.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    mpi_backend::finalize();
}

/// Wait until every rank of the job gets here (MPI_Barrier); at once at world size 1.
pub fn barrier() -> Result<()> {
    Ok(dino_core::collective::current().barrier()?)
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

/// Give the installed collective the run's device: with the `nccl` feature, on a CUDA device and more than
/// one rank, the ranks build an NCCL communicator over their GPUs and it becomes the collective (for the
/// tensors on the GPU; host buffers still go over MPI). Every rank must call it, with its own device. A
/// no-op otherwise. Returns the engine now installed (`local`, `mpi`, `nccl`).
pub fn use_device(device: &candle_core::Device) -> Result<&'static str> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() && dino_core::collective::world_size() > 1 {
        nccl_backend::Nccl::attach(device)?;
    }
    let _ = device;
    Ok(dino_core::collective::current().name())
}

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

#[cfg(feature = "nccl")]
mod nccl_backend {
    use std::sync::{Arc, Mutex};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::cuda::cudarc::{self, driver::CudaSlice};
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
    use dino_core::{Collective, Error as CoreError};

    use crate::error::{Error, Result};

    struct SharedComm(Comm);
    // SAFETY: an NCCL communicator may be used from any thread as long as no two calls on it overlap; every
    // use goes through the mutex that owns it.
    unsafe impl Send for SharedComm {}

    /// NCCL over the ranks' GPUs for device tensors, the MPI world (`host`) for everything else.
    pub struct Nccl {
        host: Arc<dyn Collective>,
        comm: Mutex<SharedComm>,
    }

    impl Nccl {
        /// Build the communicator on `device` (every rank at once) and install it over the MPI collective.
        pub fn attach(device: &Device) -> Result<()> {
            let host = dino_core::collective::current();
            let Device::Cuda(cuda) = device else {
                return Ok(());
            };
            let (rank, world) = (host.rank(), host.world_size());
            // Every rank learns whether every rank can go on before any of them waits on NCCL.
            // SAFETY: only tries to dlopen libnccl's candidate names.
            let present = unsafe { cudarc::nccl::sys::is_culib_present() };
            let id = match (present, rank) {
                (true, 0) => Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}")),
                (true, _) => Ok(Id::uninit([0; 128])),
                (false, _) => Err(
                    "libnccl not found: put NCCL 2 (libnccl.so.2, e.g. from the \
                                   nvidia-nccl-cu13 wheel) on LD_LIBRARY_PATH, see docs/CUDA.md"
                        .to_string(),
                ),
            };
            let mut failed = [f64::from(u8::from(id.is_err()))];
            host.all_reduce_sum_f64(&mut failed)?;
            let id = match id {
                Err(why) => return Err(Error::Msg(format!("NCCL on rank {rank}: {why}"))),
                Ok(_) if failed[0] > 0.0 => {
                    return Err(Error::Msg(format!(
                        "NCCL: {} of {world} ranks could not start it (their errors say why)",
                        failed[0]
                    )))
                }
                Ok(id) => id,
            };
            let mut bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            host.broadcast_bytes(&mut bytes, 0)?;
            if bytes.len() != 128 {
                return Err(Error::Msg(format!(
                    "NCCL on rank {rank}: the NCCL id from rank 0 has {} bytes, not 128",
                    bytes.len()
                )));
            }
            let internal: [std::ffi::c_char; 128] =
                std::array::from_fn(|i| bytes[i] as std::ffi::c_char);
            let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, Id::uninit(internal))
                .map_err(|e| Error::Msg(format!("NCCL on rank {rank}: ncclCommInitRank: {e:?}")))?;
            dino_core::collective::upgrade(Arc::new(Nccl {
                host,
                comm: Mutex::new(SharedComm(comm)),
            }))?;
            Ok(())
        }
    }

    /// Sum over the ranks of a contiguous f32/f64 GPU tensor, by NCCL into a new buffer on the same stream.
    struct NcclSum<'a>(&'a Comm);

    fn reduce<
        T: cudarc::nccl::safe::NcclType + candle_core::cuda::CudaDType + cudarc::driver::DeviceRepr,
    >(
        comm: &Comm,
        s: &CudaStorage,
        start: usize,
        end: usize,
    ) -> candle_core::Result<CudaStorage> {
        let src: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
        let src = src.slice(start..end);
        let dev = s.device().clone();
        // SAFETY: every element is written by the all-reduce before the buffer is read.
        let mut dst = unsafe { dev.alloc::<T>(end - start)? };
        comm.all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }

    impl CustomOp1 for NcclSum<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(
            &self,
            _s: &CpuStorage,
            _l: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("NCCL reduces GPU tensors only")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("NCCL all-reduce: the tensor must be contiguous")
            };
            let out = match s.dtype() {
                DType::F32 => reduce::<f32>(self.0, s, start, end)?,
                DType::F64 => reduce::<f64>(self.0, s, start, end)?,
                other => {
                    candle_core::bail!("NCCL all-reduce: f32 or f64 tensors only, got {other:?}")
                }
            };
            Ok((out, l.shape().clone()))
        }
    }

    impl Collective for Nccl {
        fn name(&self) -> &'static str {
            "nccl"
        }
        fn rank(&self) -> usize {
            self.host.rank()
        }
        fn world_size(&self) -> usize {
            self.host.world_size()
        }
        fn local_rank(&self) -> usize {
            self.host.local_rank()
        }
        fn local_size(&self) -> usize {
            self.host.local_size()
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> dino_core::Result<()> {
            self.host.all_reduce_sum_f32(buf)
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> dino_core::Result<()> {
            self.host.all_reduce_sum_f64(buf)
        }
        fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> dino_core::Result<()> {
            self.host.broadcast_bytes(buf, root)
        }
        fn barrier(&self) -> dino_core::Result<()> {
            self.host.barrier()
        }
        fn abort(&self, code: i32) -> ! {
            self.host.abort(code)
        }
        fn all_reduce_sum_tensor(&self, x: &Tensor) -> dino_core::Result<Tensor> {
            if !x.device().is_cuda() {
                return dino_core::collective::host_all_reduce_sum(self.host.as_ref(), x);
            }
            let comm = self.comm.lock().map_err(|_| {
                CoreError::collective("all_reduce", "NCCL communicator lock poisoned")
            })?;
            Ok(x.contiguous()?.apply_op1_no_bwd(&NcclSum(&comm.0))?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_list_len;

    #[test]
    fn cpu_lists_count_their_cpus() {
        assert_eq!(cpu_list_len("0-63\n"), Some(64));
        assert_eq!(cpu_list_len("0-3,8-11"), Some(8));
        assert_eq!(cpu_list_len("5"), Some(1));
        assert_eq!(cpu_list_len("0,2,4-5"), Some(4));
        assert_eq!(cpu_list_len(""), None);
        assert_eq!(cpu_list_len("3-1"), None);
        assert_eq!(cpu_list_len("a-b"), None);
    }
}
