//! glibc's malloc, set up for large documents.
//!
//! glibc serves allocations of 128 KiB and more from their own mappings, returned to the
//! system when freed, but raises that threshold to the size of every such block freed (up to
//! 32 MiB): after the first large document, the buffers of the next ones (Automerge's columns
//! while it loads a document, JSON bodies, frames) come from the heap, and the heap keeps
//! what they leave. A relay that had received 42 MB of documents held 163 MB of RSS while
//! idle, 65 MB with a fixed threshold; a client pulling them peaked at 208 MB, 131 MB with it.
//! A fixed threshold costs a `mmap` and a `munmap` per large allocation, which is small next
//! to filling that much memory.

/// Allocations of at least this many bytes get a mapping of their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`], unless the environment sets it
/// (`MALLOC_MMAP_THRESHOLD_`, or `mmap_threshold` in `GLIBC_TUNABLES`). Called first thing
/// in `main`, before any other thread exists.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set_by_env = std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"));
        if !set_by_env {
            // SAFETY: mallopt only sets a parameter of malloc; it is called before any other
            // thread exists (glibc does not make it safe to race with initialization).
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
        }
    }
}
