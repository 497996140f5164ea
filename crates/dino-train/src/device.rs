//! The device a run computes on: `--device cpu|cuda|cuda:N|auto` (config key `device`), resolved once to a
//! candle `Device` with a one-line error when it cannot be had. Tensors built from host data (batches,
//! schedules, checkpoints) are moved to it; checkpoints are written from host copies, so files do not depend
//! on the device that wrote them.

use candle_core::Device;

use crate::error::{Error, Result};

/// Where a run computes, as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// CUDA GPU number `N` (`cuda` is `cuda:0`).
    Cuda(usize),
    /// CUDA GPU 0 when this build has CUDA and a GPU answers, the CPU otherwise.
    Auto,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "auto" => Ok(Self::Auto),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}` (expected cpu, cuda, cuda:N or auto)"
                )),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(0) => f.write_str("cuda"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl serde::Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// The candle device, or a one-line error saying why it cannot be used (`what` names the flag or key).
    pub fn resolve(self, what: &str) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                cuda(n).map_err(|reason| Error::Msg(format!("{what} {self}: {reason}")))
            }
            Self::Auto => Ok(cuda(0).unwrap_or(Device::Cpu)),
        }
    }

    /// The device of one rank of a job with `local_size` ranks on its node, `local_rank` among them: GPU
    /// `N + local_rank` for `cuda:N` (one GPU per rank, as torchrun's `LOCAL_RANK`: `cuda` on a node of 4
    /// ranks uses GPUs 0-3), GPU `local_rank` or the CPU for `auto`, the CPU for `cpu`.
    pub fn resolve_for_rank(
        self,
        what: &str,
        local_rank: usize,
        local_size: usize,
    ) -> Result<Device> {
        match self {
            _ if local_size <= 1 => self.resolve(what),
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => cuda(n + local_rank).map_err(|reason| {
                Error::Msg(format!(
                    "{what} {self} (GPU {} for rank {local_rank} of the {local_size} on this node): {reason}",
                    n + local_rank
                ))
            }),
            Self::Auto => Ok(cuda(local_rank).unwrap_or(Device::Cpu)),
        }
    }
}

/// A short name of a resolved device for messages and logs (`cpu`, `cuda:0`).
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        other => format!("{:?}", other.location()),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(_n: usize) -> std::result::Result<Device, String> {
    Err("this dino was built without CUDA support (rebuild with `--features cuda`, see docs/CUDA.md)".into())
}

#[cfg(feature = "cuda")]
fn cuda(n: usize) -> std::result::Result<Device, String> {
    use candle_core::cuda::cudarc;
    // cudarc loads the CUDA libraries on first use and panics when one is missing: look first.
    // SAFETY: each check only tries to dlopen the library's candidate names.
    let libs: [(&str, bool); 5] = unsafe {
        [
            (
                "libcuda (the NVIDIA driver)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
            ("libcublasLt", cudarc::cublaslt::sys::is_culib_present()),
            ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ("libcurand", cudarc::curand::sys::is_culib_present()),
        ]
    };
    if let Some((lib, _)) = libs.iter().find(|(_, present)| !present) {
        return Err(if lib.starts_with("libcuda ") {
            "no CUDA driver on this machine (libcuda not found): no GPU to run on".into()
        } else {
            format!(
                "{lib} not found: put the CUDA 13 libraries on LD_LIBRARY_PATH (see docs/CUDA.md)"
            )
        });
    }
    Device::new_cuda(n).map_err(|e| {
        let text = dino_core::error::candle_text(&e);
        format!("no usable CUDA GPU {n}: {text}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("CUDA", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
            ("auto", DeviceSpec::Auto),
        ] {
            assert_eq!(s.parse::<DeviceSpec>(), Ok(d));
            assert_eq!(d.to_string().parse::<DeviceSpec>(), Ok(d));
        }
        for bad in ["cuda:", "cuda:x", "tpu", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(e.contains("expected cpu, cuda, cuda:N or auto"), "{e}");
        }
    }

    #[test]
    fn cpu_resolves_and_auto_falls_back() {
        assert!(DeviceSpec::Cpu.resolve("--device").unwrap().is_cpu());
        let auto = DeviceSpec::Auto.resolve("--device").unwrap();
        if !cfg!(feature = "cuda") {
            assert!(auto.is_cpu());
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn each_rank_of_a_node_asks_for_its_own_gpu() {
        assert!(DeviceSpec::Cpu
            .resolve_for_rank("--device", 3, 4)
            .unwrap()
            .is_cpu());
        assert!(DeviceSpec::Auto
            .resolve_for_rank("--device", 1, 2)
            .unwrap()
            .is_cpu());
        let e = DeviceSpec::Cuda(1)
            .resolve_for_rank("--device", 2, 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "--device cuda:1 (GPU 3 for rank 2 of the 4 on this node): this dino was built"
            ),
            "{e}"
        );
        // One rank on the node: the plain message of `resolve`.
        let e = DeviceSpec::Cuda(1)
            .resolve_for_rank("--device", 0, 1)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--device cuda:1: this dino was built"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_one_line() {
        let e = DeviceSpec::Cuda(0)
            .resolve("--device")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--device cuda: this dino was built without CUDA support (rebuild with `--features cuda`, see \
             docs/CUDA.md)"
        );
    }
}
