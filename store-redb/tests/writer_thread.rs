//! The writer thread's lifetime: one `redb-writer` thread per open store, gone after
//! `close`, and gone after a drop without `close` too (it holds its store weakly, so
//! neither keeps the other alive), and the file released. One test alone in its
//! binary, so that no other test's store adds threads to the count. Linux: threads
//! are counted by name in `/proc/self/task`.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

use std::time::Duration;

use virtual_llm_core::testkit::record;
use virtual_llm_core::{Store, StoreError, Write};
use virtual_llm_redb::RedbStore;

/// The threads of this process named `redb-writer`.
fn writer_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "redb-writer")
        .count()
}

/// Returns once `n` writer threads are left. A thread ends on its own schedule once
/// its channel closes, so this polls; the bound only turns a leak into a failure.
async fn until_writer_threads(n: usize) {
    for _ in 0..10_000 {
        if writer_threads() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{} writer threads, expected {n}", writer_threads());
}

/// Opens `path` once the store dropped before has released it: the writer thread ends
/// with the store handle, the file only after the flusher's last flush, on its own
/// schedule, so this polls; the bound only turns a leak into a failure.
async fn open_once_released(path: &std::path::Path) -> RedbStore {
    for _ in 0..10_000 {
        match RedbStore::open(path).await {
            Ok(store) => return store,
            Err(StoreError::Unavailable { .. }) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => panic!("opening {}: {e:?}", path.display()),
        }
    }
    panic!("{} is still held", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_thread_ends_with_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    assert_eq!(writer_threads(), 0);
    let closed = RedbStore::open(&a).await.unwrap();
    let dropped = RedbStore::open(&b).await.unwrap();
    for store in [&closed, &dropped] {
        store
            .write(vec![Write::Insert(record("row"))])
            .await
            .unwrap();
    }
    assert_eq!(writer_threads(), 2, "one per store");

    closed.close().await.unwrap();
    until_writer_threads(1).await;
    drop(closed);

    // No close: the thread goes with the handle, and the flusher's last flush drops
    // the state and releases the file.
    drop(dropped);
    until_writer_threads(0).await;

    // Both files were released and kept their rows.
    for path in [&a, &b] {
        let store = open_once_released(path).await;
        assert_eq!(store.list().await.unwrap().len(), 1);
        store.close().await.unwrap();
    }
    until_writer_threads(0).await;
}
