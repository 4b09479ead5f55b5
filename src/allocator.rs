//! How the gateway asks glibc's allocator to keep its memory: freed blocks kept for
//! reuse rather than handed back at once, and few heaps. Each is measured in
//! BENCHMARKS.md; an operator's own setting of either (environment or
//! `GLIBC_TUNABLES`) is kept. Other C libraries and allocators are left as they are.

use elfin_actors::config::Workers;

/// Sets both parameters before the gateway's threads start.
pub fn tune(workers: &Workers) {
    let threads = match workers {
        Workers::Threads(n) => n.get(),
        Workers::Caller => 1,
    };
    imp::keep_freed_memory();
    imp::limit_heaps(threads + 1);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    /// Free memory at the top of a heap that the allocator keeps for reuse.
    const TRIM_THRESHOLD: libc::c_int = 4 << 20;

    /// Whether the operator set `variable` or the tunable `tunable` themselves.
    fn tuned(variable: &str, tunable: &str) -> bool {
        std::env::var_os(variable).is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains(tunable))
    }

    fn set(parameter: libc::c_int, value: libc::c_int, what: &str) {
        // SAFETY: mallopt only changes the allocator's parameters (under its lock).
        if unsafe { libc::mallopt(parameter, value) } != 1 {
            log::warn!("cannot set the allocator's {what}");
        }
    }

    /// A busy tunnel allocates and frees 64 KiB blocks (reads, TLS records) without
    /// pause. glibc's allocator hands the top of a heap back to the system whenever
    /// 128 KiB of it are free, and the next block faults the same pages in again:
    /// about 30 000 page faults and as many zeroed pages per GiB through a tunnel, and
    /// a `madvise` call per trim. Keeping up to 4 MiB per heap ends that churn; a
    /// larger free top is still given back.
    pub fn keep_freed_memory() {
        if !tuned("MALLOC_TRIM_THRESHOLD_", "trim_threshold") {
            set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "trim threshold");
        }
    }

    /// glibc gives threads up to eight heaps (arenas) per core. The gateway runs some
    /// forty threads (the store's blocking pool, the admin server, the cluster's
    /// client), and every heap a thread has used keeps its own free memory (up to the
    /// trim threshold) and its own fragments of freed connection state: at 15 000
    /// idle devices that was 0.4 KiB a device (BENCHMARKS.md, "Memory per device").
    /// One heap per session worker and one more for everything else keeps the
    /// workers from waiting on each other's locks (small blocks come from each
    /// thread's own cache anyway) and measured no cost to a tunnel.
    pub fn limit_heaps(heaps: usize) {
        if !tuned("MALLOC_ARENA_MAX", "arena_max") {
            let heaps = libc::c_int::try_from(heaps).unwrap_or(libc::c_int::MAX);
            set(libc::M_ARENA_MAX, heaps, "heap count");
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn keep_freed_memory() {}
    pub fn limit_heaps(_: usize) {}
}
