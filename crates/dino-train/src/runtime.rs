//! Process-level settings for training speed (defined in `dino_models::runtime`, beside the ops they serve),
//! and the process's memory figures.

pub use dino_models::runtime::{
    allocated_bytes, main_thread_in_pool, peak_allocated_bytes, reset_peak_allocated,
    tune_allocator, TensorAlloc,
};

/// This process's peak resident memory in bytes (Linux `VmHWM`); `None` where /proc does not tell.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
}

/// The machine's memory in bytes (Linux `MemTotal`); `None` where /proc does not tell.
pub fn total_memory_bytes() -> Option<u64> {
    proc_kib("/proc/meminfo", "MemTotal:")
}

/// The memory this machine can give processes now without swapping (Linux `MemAvailable`); `None` where /proc
/// does not tell.
pub fn available_memory_bytes() -> Option<u64> {
    proc_kib("/proc/meminfo", "MemAvailable:")
}

/// This process's resident memory now (Linux `VmRSS`); `None` where /proc does not tell.
pub fn rss_bytes() -> Option<u64> {
    proc_kib("/proc/self/status", "VmRSS:")
}

/// Bytes in GiB.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Advice when a run's `peak` memory came within a quarter of the machine's `total` and its step could run
/// in smaller student passes (`student_passes`: the same training in less memory); `None` otherwise.
pub fn memory_advice(peak: u64, total: u64, cfg: &crate::TrainConfig) -> Option<String> {
    let smaller = match cfg.smaller_student_passes() {
        [] => return None,
        [next] => next.to_string(),
        [next, rest @ ..] => format!("{next} (or {})", rest[0]),
    };
    (peak.saturating_mul(4) > total.saturating_mul(3)).then(|| {
        format!(
            "note: the run's peak memory, {:.1} GiB, is {:.0}% of this machine's {:.1} GiB; --student-passes \
             {smaller} trains the same in less (each pass's activations are freed before the next)",
            gib(peak),
            100.0 * peak as f64 / total as f64,
            gib(total)
        )
    })
}

/// [`memory_advice`] for this process now (Linux; `None` elsewhere).
pub fn memory_advice_now(cfg: &crate::TrainConfig) -> Option<String> {
    memory_advice(peak_rss_bytes()?, total_memory_bytes()?, cfg)
}

/// The `key: N kB` line of a /proc file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{StudentPasses, TrainConfig};

    #[test]
    fn memory_advice_names_the_next_smaller_passes_near_the_machine_limit() {
        const GIB: u64 = 1 << 30;
        let vit = |passes| TrainConfig {
            student_passes: passes,
            ..TrainConfig::official()
        };
        let a = memory_advice(20 * GIB, 24 * GIB, &vit(StudentPasses::Auto)).unwrap();
        assert!(
            a.contains("20.0 GiB")
                && a.contains("83%")
                && a.contains("24.0 GiB")
                && a.contains("--student-passes crop"),
            "{a}"
        );
        let a = memory_advice(20 * GIB, 24 * GIB, &vit(StudentPasses::All)).unwrap();
        assert!(a.contains("--student-passes resolution (or crop)"), "{a}");
        // Far from the limit, already per crop, or with the head's BatchNorm (one pass only): nothing.
        assert_eq!(
            memory_advice(12 * GIB, 24 * GIB, &vit(StudentPasses::Auto)),
            None
        );
        assert_eq!(
            memory_advice(20 * GIB, 24 * GIB, &vit(StudentPasses::Crop)),
            None
        );
        let bn = TrainConfig {
            use_bn_in_head: true,
            ..TrainConfig::official()
        };
        assert_eq!(memory_advice(20 * GIB, 24 * GIB, &bn), None);
        // A ResNet runs per resolution at most (per crop would change its BatchNorm statistics).
        let resnet = |passes| TrainConfig {
            arch: "resnet18".into(),
            student_passes: passes,
            ..TrainConfig::official()
        };
        assert_eq!(
            memory_advice(20 * GIB, 24 * GIB, &resnet(StudentPasses::Auto)),
            None
        );
        let a = memory_advice(20 * GIB, 24 * GIB, &resnet(StudentPasses::All)).unwrap();
        assert!(a.contains("--student-passes resolution trains"), "{a}");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn memory_figures_are_read_on_linux() {
        // A 64 MiB buffer, touched, raises the peak to at least that much.
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        let peak = peak_rss_bytes().unwrap();
        let total = total_memory_bytes().unwrap();
        assert!(peak >= 64 << 20, "peak {peak}");
        assert!(total > peak, "total {total}, peak {peak}");
        let (rss, available) = (rss_bytes().unwrap(), available_memory_bytes().unwrap());
        // The peak read after the resident figure (which grows while the test binary runs).
        let peak = peak_rss_bytes().unwrap();
        assert!((64 << 20..=peak).contains(&rss), "rss {rss}, peak {peak}");
        assert!(available < total, "available {available}, total {total}");
    }
}
