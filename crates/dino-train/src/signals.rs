//! A graceful stop of a training run: SIGINT (Ctrl-C), SIGTERM (`kill`, Slurm's end of a job or
//! preemption, `mpirun` passing on a Ctrl-C), SIGHUP (the terminal closed) and SIGUSR1 / SIGUSR2 (a
//! scheduler's warning before the time limit, e.g. Slurm's `--signal=USR1@120`, which `mpirun` passes on)
//! ask [`crate::run::train`] to stop after the step it is in; it writes a checkpoint there (inside the
//! epoch, with the epoch's running sums, so the same command resumes exactly) and returns with
//! [`crate::TrainSummary::stopped_by`] set. An evaluation in progress (the k-NN baselines, a periodic or the
//! final k-NN) is cut short instead of finished. A second signal ends the process at once, as without the
//! handler. [`install`] is the binary's choice (a library never takes over signals by
//! itself); [`request_stop`] asks the same from code, e.g. another thread.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The number of the first stop signal received (or passed to [`request_stop`]); 0: none.
static STOP: AtomicI32 = AtomicI32::new(0);

/// Whether the handler says on stderr what the first signal does ([`install`]'s `announce`).
static ANNOUNCE: AtomicBool = AtomicBool::new(false);

/// What the handler writes on the first signal.
const ANNOUNCEMENT: &[u8] =
    b"\nstopping after the current step with a checkpoint, or now if evaluating (a second signal stops at once)\n";

/// SIGINT's number (2): what [`request_stop`] takes for an interruption from code.
pub const SIGINT: i32 = 2;
/// SIGTERM's number (15).
pub const SIGTERM: i32 = 15;
/// SIGHUP's number (1).
pub const SIGHUP: i32 = 1;
/// SIGUSR1's number (10 on Linux).
#[cfg(unix)]
pub const SIGUSR1: i32 = libc::SIGUSR1;
/// SIGUSR2's number (12 on Linux).
#[cfg(unix)]
pub const SIGUSR2: i32 = libc::SIGUSR2;

/// The signals [`install`] handles: each one's default action ends the process and loses the run's state
/// since its last checkpoint.
#[cfg(unix)]
pub const STOP_SIGNALS: [i32; 5] = [SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2];

/// Ask the running training loop to stop after its current step, as if signal `signal` had arrived.
pub fn request_stop(signal: i32) {
    let _ = STOP.compare_exchange(0, signal.max(1), Ordering::SeqCst, Ordering::SeqCst);
}

/// The signal of a pending stop request, if any.
pub fn stop_requested() -> Option<i32> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The conventional name of a stop signal, for messages.
pub fn name(signal: i32) -> String {
    match signal {
        SIGINT => "SIGINT".into(),
        SIGTERM => "SIGTERM".into(),
        SIGHUP => "SIGHUP".into(),
        #[cfg(unix)]
        SIGUSR1 => "SIGUSR1".into(),
        #[cfg(unix)]
        SIGUSR2 => "SIGUSR2".into(),
        s => format!("signal {s}"),
    }
}

/// Install the handlers of [`STOP_SIGNALS`] (Unix; elsewhere nothing); with `announce`, the first signal
/// also says on stderr that the run will stop after its step (one process of a job should). A signal that
/// this process was started with ignored (a background job's SIGINT, `nohup`) stays ignored.
pub fn install(announce: bool) -> std::io::Result<()> {
    ANNOUNCE.store(announce, Ordering::SeqCst);
    #[cfg(unix)]
    {
        for sig in STOP_SIGNALS {
            // SAFETY: the handler only touches an atomic and calls the async-signal-safe `_exit`; the
            // sigaction structs are zero-initialised plain C data, filled before use.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut act.sa_mask);
                act.sa_flags = libc::SA_RESTART;
                if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    if STOP
        .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // The second signal: end now, with the status a shell reports for a death by that signal.
        // SAFETY: `_exit` is async-signal-safe.
        unsafe { libc::_exit(128 + sig) }
    }
    if ANNOUNCE.load(Ordering::SeqCst) {
        // SAFETY: `write` is async-signal-safe; the buffer is a static.
        unsafe {
            libc::write(2, ANNOUNCEMENT.as_ptr().cast(), ANNOUNCEMENT.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_named() {
        // STOP itself is exercised by tests/stop.rs (its own process: a request would stop any run of
        // this test binary).
        assert_eq!(name(SIGTERM), "SIGTERM");
        assert_eq!(name(SIGINT), "SIGINT");
        assert_eq!(name(libc::SIGHUP), "SIGHUP");
        assert_eq!(name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(name(libc::SIGUSR2), "SIGUSR2");
        assert_eq!(name(libc::SIGQUIT), "signal 3");
    }
}
