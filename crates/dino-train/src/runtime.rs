//! Process-level settings for training speed (defined in `dino_models::runtime`, beside the ops they serve),
//! and the process's memory figures.

pub use dino_models::runtime::{main_thread_in_pool, tune_allocator, TensorAlloc};

/// This process's peak resident memory in bytes (Linux `VmHWM`); `None` where /proc does not tell.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_kib("/proc/self/status", "VmHWM:")
}

/// The machine's memory in bytes (Linux `MemTotal`); `None` where /proc does not tell.
pub fn total_memory_bytes() -> Option<u64> {
    proc_kib("/proc/meminfo", "MemTotal:")
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
    }
}
