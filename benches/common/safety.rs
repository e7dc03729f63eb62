//! The benches' ways out: [`fatal`] for an error, and the safety nets that make sure no server
//! or redis-server outlives the bench: an overall deadline, a panic hook (the bench profile has
//! `panic = "abort"`, so `Drop` guards do not run on panic), SIGINT/SIGTERM handlers. Each kills
//! and reaps every child by PID through the shared registry (`tests/support/process.rs`); the
//! signal handler calls async-signal-safe functions only.

use super::server::kill_children;
use std::thread;
use std::time::Duration;

/// Prints `# FATAL: msg`, kills and reaps every child, exits with status 2.
pub fn fatal(msg: &str) -> ! {
    eprintln!("# FATAL: {msg}");
    kill_children();
    std::process::exit(2);
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: kill, waitpid, _exit.
    kill_children();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) };
}

/// Installs the overall deadline watchdog (exit status 3), the panic hook and the
/// SIGINT/SIGTERM handlers.
pub fn install_safety_nets(deadline: Duration) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_children();
        default_hook(info);
    }));
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    thread::Builder::new()
        .name("deadline".into())
        .spawn(move || {
            thread::sleep(deadline);
            eprintln!(
                "# FATAL: overall deadline of {} s exceeded; killing server and exiting",
                deadline.as_secs()
            );
            kill_children();
            std::process::exit(3);
        })
        .expect("spawn deadline thread");
}
