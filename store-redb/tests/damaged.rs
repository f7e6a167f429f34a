//! What the store does with a damaged registry file at open: an existing empty file
//! is refused unless a fresh store is asked for (red-team finding F7), and a file
//! damaged outside redb (scribbled pages, truncations, flipped bytes) is refused as
//! `Corrupted` and never makes the open panic (finding F12).

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod common;

use std::path::Path;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use virtual_llm_core::testkit::record;
use virtual_llm_core::{Store, StoreError, Write};
use virtual_llm_redb::{RedbOptions, RedbStore};

/// The bytes of a closed registry of `rows` rows, as the gateway leaves it.
async fn registry_bytes(rows: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let store = RedbStore::open(&path).await.unwrap();
    for i in 0..rows {
        let mut r = record(&format!("model-{i:03}"));
        r.model = "m".repeat(200);
        store.write(vec![Write::Insert(r)]).await.unwrap();
    }
    store.close().await.unwrap();
    drop(store);
    std::fs::read(&path).unwrap()
}

/// Opens `bytes` as a registry file; a panic inside the open is returned as `Err`
/// with its message rather than unwinding through the test.
async fn open_bytes(bytes: &[u8]) -> Result<Result<usize, StoreError>, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    std::fs::write(&path, bytes).unwrap();
    let opened = tokio::spawn(async move {
        let store = RedbStore::open(&path).await?;
        // What the gateway does first: read every row.
        let rows = store.list().await;
        let _ = store.close().await;
        rows.map(|r| r.len())
    })
    .await;
    opened.map_err(|e| match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned()),
        Err(e) => format!("cancelled: {e}"),
    })
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[tokio::test]
async fn an_empty_file_is_refused_as_corrupted_unless_a_fresh_store_is_asked_for() {
    let owned = common::TempStore::closed_with_one_row().await;
    let path = owned.path();
    // A failed restore, a copy onto a full disk, `: > registry.redb`.
    std::fs::write(&path, b"").unwrap();
    let err = RedbStore::open(&path).await.unwrap_err();
    let StoreError::Corrupted { message } = &err else {
        panic!("an empty registry must be refused as corrupted: {err:?}");
    };
    assert!(message.contains("empty"), "{message}");
    assert!(
        message.contains("--fresh-store"),
        "says how to start afresh: {message}"
    );
    assert_eq!(len(&path), 0, "the file is left as it was");

    // Asked for explicitly, it is a new, empty registry, which keeps what it is given.
    let fresh = RedbOptions::default().accept_empty_file(true);
    let store = RedbStore::open_with(&path, fresh).await.unwrap();
    assert!(store.list().await.unwrap().is_empty());
    store
        .write(vec![Write::Insert(record("anew"))])
        .await
        .unwrap();
    store.close().await.unwrap();
    drop(store);
    let store = RedbStore::open(&path).await.unwrap();
    let rows = store.list().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].name.as_str(), "anew");
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_file_that_does_not_exist_is_created_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.redb");
    let store = RedbStore::open(&path).await.unwrap();
    assert!(store.list().await.unwrap().is_empty());
    store.close().await.unwrap();
    assert!(len(&path) > 0, "redb wrote its header and the schema");
    // The option changes nothing for a missing file.
    let other = dir.path().join("other.redb");
    let fresh = RedbOptions::default().accept_empty_file(true);
    let store = RedbStore::open_with(&other, fresh).await.unwrap();
    store.close().await.unwrap();
}

/// The red team's case: 32 bytes scribbled in every 4 KiB page but the first made
/// redb hit `unreachable!()` while opening, and the gateway died with a panic.
#[tokio::test]
async fn scribbled_pages_are_corrupted_not_a_panic() {
    let mut bytes = registry_bytes(40).await;
    for page in (4096..bytes.len()).step_by(4096) {
        let at = page + 100;
        if at + 32 <= bytes.len() {
            bytes[at..at + 32].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef].repeat(8));
        }
    }
    match open_bytes(&bytes).await {
        Ok(Err(StoreError::Corrupted { .. })) => {}
        other => panic!("scribbled pages must be refused as corrupted: {other:?}"),
    }
}

/// A small fuzz over a valid file: truncations at many lengths and single flipped
/// bytes anywhere. The open never panics; it opens (the damage was in a page nothing
/// reads, or redb recovered the previous commit) or refuses the file as corrupted (or
/// as not a registry at all, when the damage hits redb's magic number).
#[tokio::test]
async fn truncated_or_flipped_files_never_make_the_open_panic() {
    let good = registry_bytes(40).await;
    let mut rng = StdRng::seed_from_u64(0x05ee_df12);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Truncations: every 512 bytes through the first pages, then at random.
    for cut in (1..8192)
        .step_by(512)
        .chain((0..40).map(|_| rng.random_range(1..good.len())))
    {
        cases.push((format!("truncated to {cut}"), good[..cut].to_vec()));
    }
    // Flipped bytes: all through the header, then at random in the pages.
    let flips: Vec<usize> = (0..512)
        .step_by(7)
        .chain((0..160).map(|_| rng.random_range(512..good.len())))
        .collect();
    for at in flips {
        let mut bytes = good.clone();
        bytes[at] ^= 1 << rng.random_range(0..8);
        cases.push((format!("a bit flipped at {at}"), bytes));
    }
    let (mut opened, mut refused) = (0, 0);
    for (what, bytes) in &cases {
        match open_bytes(bytes).await {
            Ok(Ok(_)) => opened += 1,
            Ok(Err(StoreError::Corrupted { .. } | StoreError::Incompatible { .. })) => {
                refused += 1;
            }
            Ok(Err(e)) => panic!("{what}: neither opened nor refused as damaged: {e:?}"),
            Err(panic) => panic!("{what}: the open panicked: {panic}"),
        }
    }
    eprintln!(
        "{} damaged files: {opened} opened, {refused} refused",
        cases.len()
    );
    assert!(
        refused > 0 && opened > 0,
        "{opened} opened, {refused} refused"
    );
}
