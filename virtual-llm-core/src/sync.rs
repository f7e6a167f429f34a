//! Lock helpers: the one way virtual-llm takes a `std::sync` lock.
//!
//! The locks in virtual-llm guard plain maps and queues whose invariants hold between
//! statements, so a panic elsewhere (a poisoned lock) leaves nothing half-done: these
//! helpers take the data back instead of spreading the panic, and need no `unwrap`.
//! Backends and transports use them too, rather than a copy of their own.
//!
//! # Example
//! ```
//! use std::sync::{Mutex, RwLock};
//! use virtual_llm_core::sync::{lock, read, write};
//!
//! let queue = Mutex::new(vec![1]);
//! lock(&queue).push(2);
//! assert_eq!(*lock(&queue), [1, 2]);
//!
//! let table = RwLock::new(0);
//! *write(&table) += 1;
//! assert_eq!(*read(&table), 1);
//! ```

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, taking the data back if a panic poisoned the lock.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `l`, taking the data back if a panic poisoned the lock.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `l`, taking the data back if a panic poisoned the lock.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, RwLock};

    use super::*;

    #[test]
    fn a_poisoned_mutex_gives_its_data_back() {
        let m = Arc::new(Mutex::new(vec![1]));
        let poisoner = m.clone();
        let panicked = std::thread::spawn(move || {
            let mut guard = poisoner.lock().unwrap();
            guard.push(2);
            panic!("poison the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        lock(&m).push(3);
        assert_eq!(*lock(&m), [1, 2, 3]);
    }

    #[test]
    fn a_poisoned_rwlock_gives_its_data_back() {
        let l = Arc::new(RwLock::new(1));
        let poisoner = l.clone();
        let panicked = std::thread::spawn(move || {
            let mut guard = poisoner.write().unwrap();
            *guard = 2;
            panic!("poison the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(l.is_poisoned());
        *write(&l) += 1;
        assert_eq!(*read(&l), 3);
    }
}
