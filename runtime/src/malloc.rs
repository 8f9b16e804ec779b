//! glibc malloc settings for a process that computes with large, short-lived tensors.
//!
//! By default glibc serves every allocation above a threshold that adapts up to 32 MiB with a
//! fresh `mmap`, and hands the top of its heap back to the kernel once 128 KiB of it is free. A
//! training step allocates gigabytes of activations and frees them all at its end, so every step
//! page-faulted them in again (~80,000 faults per SmolLM2 training step, BENCHMARKS.md; the
//! kernel zeroing those pages was 8% of a step's profile). Here allocations up to 32 MiB (glibc's
//! largest threshold) come from the heap and up to 2 GiB of freed heap stays in the process for
//! the next step. The cost: the process keeps its peak heap resident.

/// Apply the settings; call once at the start of `main`. Returns whether they took effect
/// (always false off glibc).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's tunables; any value is accepted or
        // refused with 0.
        unsafe {
            let mmap = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            let trim = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            mmap == 1 && trim == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
