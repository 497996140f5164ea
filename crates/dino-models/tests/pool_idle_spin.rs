//! The vendored rayon-core's idle spin (vendor/rayon-core/DINO-RS-PATCH.md): a pool thread that runs out of
//! work keeps looking for 1 ms (`DINO_RAYON_SPIN_US`) before it sleeps. Its own test binary: the global pool
//! and the spin setting belong to the process, so each measurement runs in a child process of this binary.

#![cfg(target_os = "linux")]

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Parallel ops in a measurement, each followed by a serial gap on thread 0.
const OPS: usize = 100;
/// The serial gap after each op: far longer than the published spin (32 yields, ~5 us when the CPU is free),
/// far shorter than the patched spin the test sets ([`LONG_SPIN_US`]).
const GAP: Duration = Duration::from_millis(2);
/// The patched spin set in the test, in microseconds: 50 ms rather than the default 1 ms, a margin over [`GAP`]
/// that a busy machine cannot erode.
const LONG_SPIN_US: &str = "50000";
/// Set in the child processes.
const CHILD: &str = "DINO_TEST_POOL_SPIN_CHILD";
/// Held while a child runs: the tests of this binary run on parallel threads, and two children at once would
/// share the 2 cores the measurement needs to itself.
static ONE_CHILD: Mutex<()> = Mutex::new(());

/// Busy work on the calling thread for `d`.
fn busy(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// The calling thread's voluntary context switches so far (the times it blocked), from procfs.
fn voluntary_switches() -> u64 {
    let status =
        std::fs::read_to_string("/proc/thread-self/status").expect("read /proc/thread-self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("voluntary_ctxt_switches in /proc/thread-self/status")
}

/// Pool thread 1's voluntary context switches so far.
fn worker_switches() -> u64 {
    rayon::broadcast(|ctx| (ctx.index() == 1).then(voluntary_switches))
        .into_iter()
        .flatten()
        .next()
        .expect("a pool thread 1")
}

/// Runs in a child: a 2-thread pool with this thread as thread 0, [`OPS`] two-way splits each followed by a
/// [`GAP`] of serial work, and prints how often pool thread 1 blocked meanwhile.
#[test]
#[ignore = "run by the other tests of this binary, in child processes"]
fn child_count_worker_sleeps() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .use_current_thread()
        .build_global()
        .expect("the global pool");
    busy(Duration::from_millis(20));
    let before = worker_switches();
    for _ in 0..OPS {
        rayon::join(
            || busy(Duration::from_micros(20)),
            || busy(Duration::from_micros(20)),
        );
        busy(GAP);
    }
    let sleeps = worker_switches() - before;
    println!("worker-sleeps {sleeps}");
}

/// How often pool thread 1 blocked over [`OPS`] gaps, in a child process with `DINO_RAYON_SPIN_US` set to
/// `spin_us`.
fn worker_sleeps(spin_us: &str) -> u64 {
    child(spin_us).0
}

/// [`worker_sleeps`] and the child's stderr.
fn child(spin_us: &str) -> (u64, String) {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args([
        "--exact",
        "child_count_worker_sleeps",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, "1")
    .env("DINO_RAYON_SPIN_US", spin_us)
    .env_remove("RAYON_NUM_THREADS");
    let out = {
        let _one = ONE_CHILD.lock().unwrap_or_else(|e| e.into_inner());
        cmd.output().expect("run the child test")
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "child failed: {text}{err}");
    // The harness prints the test's name on the same line, before the count.
    let sleeps = text
        .split("worker-sleeps ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no count in the child's output: {text}"));
    (sleeps, err)
}

/// A value that is not a number keeps the default and says so on stderr, naming the variable and the value.
#[test]
fn a_spin_that_is_not_a_number_is_reported() {
    let (_, err) = child("1ms");
    assert!(
        err.contains("DINO_RAYON_SPIN_US=\"1ms\" is not a whole number of microseconds")
            && err.contains("the default 1000 us"),
        "no warning on stderr: {err}"
    );
    let (_, err) = child("250");
    assert!(
        !err.contains("DINO_RAYON_SPIN_US"),
        "a warning for a number: {err}"
    );
}

/// With a 50 ms spin the idle worker stays awake through 2 ms gaps; with the published one
/// (`DINO_RAYON_SPIN_US=0`) it sleeps in most of them, which shows the count can tell the two apart. It fails
/// when the vendored rayon-core is not the one in use (the `[patch]` entry removed) or its spin is gone.
#[test]
fn idle_workers_stay_awake_through_short_serial_gaps() {
    let patched = worker_sleeps(LONG_SPIN_US);
    // On a machine busy with other processes a yield can hand the core away for a whole time slice, and the
    // published 32 yields then outlast the gap too: measure again before calling that a failure.
    let mut published = 0;
    for _ in 0..3 {
        published = worker_sleeps("0");
        if published > OPS as u64 / 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        patched < OPS as u64 / 10,
        "with a {LONG_SPIN_US} us spin pool thread 1 blocked {patched} times over {OPS} gaps of {GAP:?}"
    );
    assert!(
        published > OPS as u64 / 2,
        "with DINO_RAYON_SPIN_US=0 pool thread 1 blocked only {published} times over {OPS} gaps of {GAP:?} \
         (three tries; is another process keeping both cores busy?)"
    );
}
