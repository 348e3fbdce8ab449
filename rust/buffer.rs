//! Zero-filled output buffers that are handed to NumPy without a copy and freed when the last
//! array viewing them goes away.
//!
//! A batch's dense output (~18 MB at recipe scale) is written once, so the cost of getting fresh
//! zeroed memory from the OS dominates: with 4 KiB pages that is ~4,500 page faults (measured 6-10
//! ms per batch here). Large buffers are therefore anonymous mappings (zero by construction:
//! nothing is written twice) advised to use transparent huge pages on Linux, which brings the
//! same batch to ~1.5 ms. Small buffers (and platforms without `mmap`) use a plain `Vec`.
//! Allocation is fallible: a request that cannot be met is an error, never an abort.

use std::ptr::NonNull;

use crate::error::KernelError;

/// Element types whose all-zero bit pattern is the value zero.
///
/// # Safety
/// Implementors must be plain data for which all-zero bytes are a valid value.
pub unsafe trait Zeroable: Copy + Send + Sync + 'static {
    const ZERO: Self;
}

// SAFETY: all-zero bytes are 0i64 and 0.0f32.
unsafe impl Zeroable for i64 {
    const ZERO: Self = 0;
}
unsafe impl Zeroable for f32 {
    const ZERO: Self = 0.0;
}

/// Buffers at least this large are mapped directly from the OS.
#[cfg(unix)]
const MAP_THRESHOLD_BYTES: usize = 1 << 20;

enum Storage<T: Zeroable> {
    Heap(Vec<T>),
    #[cfg(unix)]
    Mapped {
        ptr: NonNull<T>,
        bytes: usize,
    },
}

/// `len` zeroed elements of `T` at a fixed address for the buffer's whole life.
pub struct ZeroedBuffer<T: Zeroable> {
    storage: Storage<T>,
    len: usize,
}

// SAFETY: the buffer exclusively owns its memory (like a Vec<T> with T: Send + Sync).
unsafe impl<T: Zeroable> Send for ZeroedBuffer<T> {}
unsafe impl<T: Zeroable> Sync for ZeroedBuffer<T> {}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Physical memory of the machine, when the platform tells.
fn physical_memory_bytes() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf only reads system configuration.
        let (pages, page_size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && page_size > 0 {
            return (pages as usize).checked_mul(page_size as usize);
        }
    }
    None
}

fn allocation_failed(what: &str, bytes: usize) -> KernelError {
    KernelError::OutOfMemory(format!(
        "{what} ({:.2} GiB) could not be allocated",
        gib(bytes)
    ))
}

/// Refuses a request larger than the machine's physical memory (it could only end in the OOM
/// killer), with a message that names the size.
pub fn check_fits_in_memory(bytes: usize, what: &str) -> Result<(), KernelError> {
    match physical_memory_bytes() {
        Some(physical) if bytes > physical => Err(KernelError::OutOfMemory(format!(
            "{what} needs {:.1} GiB, more than this machine's {:.1} GiB of memory",
            gib(bytes),
            gib(physical)
        ))),
        _ => Ok(()),
    }
}

impl<T: Zeroable> ZeroedBuffer<T> {
    pub fn new(len: usize, what: &str) -> Result<Self, KernelError> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
            KernelError::OutOfMemory(format!(
                "{what} of {len} elements overflows the address space"
            ))
        })?;
        check_fits_in_memory(bytes, what)?;
        #[cfg(unix)]
        {
            if bytes >= MAP_THRESHOLD_BYTES {
                return Self::mapped(len, bytes, what);
            }
        }
        let mut vec = Vec::new();
        vec.try_reserve_exact(len)
            .map_err(|_| allocation_failed(what, bytes))?;
        vec.resize(len, T::ZERO);
        Ok(ZeroedBuffer {
            storage: Storage::Heap(vec),
            len,
        })
    }

    #[cfg(unix)]
    fn mapped(len: usize, bytes: usize, what: &str) -> Result<Self, KernelError> {
        // SAFETY: a fresh private anonymous mapping; the kernel fills it with zeros.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(allocation_failed(what, bytes));
        }
        #[cfg(target_os = "linux")]
        {
            // Only advice: without transparent huge pages the mapping works with 4 KiB pages.
            // SAFETY: the range is exactly the mapping created above.
            unsafe { libc::madvise(raw, bytes, libc::MADV_HUGEPAGE) };
        }
        let ptr = NonNull::new(raw.cast::<T>()).ok_or_else(|| {
            KernelError::internal(format!("{what} mapping returned a null pointer"))
        })?;
        Ok(ZeroedBuffer {
            storage: Storage::Mapped { ptr, bytes },
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        match &mut self.storage {
            Storage::Heap(vec) => vec.as_mut_slice(),
            // SAFETY: the mapping holds `len` zero-initialized elements, is exclusively owned by
            // `self` and lives until drop.
            #[cfg(unix)]
            Storage::Mapped { ptr, .. } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), self.len)
            },
        }
    }

    pub fn as_slice(&self) -> &[T] {
        match &self.storage {
            Storage::Heap(vec) => vec.as_slice(),
            // SAFETY: as in `as_mut_slice`.
            #[cfg(unix)]
            Storage::Mapped { ptr, .. } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), self.len)
            },
        }
    }

    /// The start of the elements (stable for the buffer's life; used to give NumPy views).
    pub fn as_mut_ptr(&mut self) -> *mut T {
        match &mut self.storage {
            Storage::Heap(vec) => vec.as_mut_ptr(),
            #[cfg(unix)]
            Storage::Mapped { ptr, .. } => ptr.as_ptr(),
        }
    }
}

impl<T: Zeroable> Drop for ZeroedBuffer<T> {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Storage::Mapped { ptr, bytes } = &self.storage {
            // SAFETY: unmaps exactly the mapping created in `mapped`, once.
            unsafe { libc::munmap(ptr.as_ptr().cast(), *bytes) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_buffers_start_zeroed_and_are_writable() {
        for len in [0usize, 3, 1 << 20] {
            let mut buffer = ZeroedBuffer::<i64>::new(len, "test buffer").unwrap();
            assert_eq!(buffer.len(), len);
            assert!(buffer.as_slice().iter().all(|&x| x == 0));
            if let Some(last) = buffer.as_mut_slice().last_mut() {
                *last = 7;
            }
            assert_eq!(
                buffer.as_slice().iter().sum::<i64>(),
                if len > 0 { 7 } else { 0 }
            );
        }
        let weights = ZeroedBuffer::<f32>::new(1 << 19, "weights").unwrap();
        assert!(weights.as_slice().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn absurd_requests_are_errors_not_aborts() {
        let err = ZeroedBuffer::<i64>::new(usize::MAX / 4, "output")
            .err()
            .unwrap();
        assert_eq!(
            err,
            KernelError::OutOfMemory(format!(
                "output of {} elements overflows the address space",
                usize::MAX / 4
            ))
        );
        #[cfg(target_os = "linux")]
        {
            let err = ZeroedBuffer::<f32>::new(1 << 60, "output").err().unwrap();
            assert!(matches!(err, KernelError::OutOfMemory(_)), "{err:?}");
            let message = err.to_string();
            assert!(
                message.starts_with("output needs 4294967296.0 GiB, more than this machine's "),
                "{message}"
            );
        }
    }
}
