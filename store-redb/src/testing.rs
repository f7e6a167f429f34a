//! Helpers for the crate's own tests: hold the state as a heartbeat flush does (and
//! close the file under it), poll a future once, a redb backend whose writes can be
//! made to fail, at once or after a given number of them (a crash in the middle of a
//! commit), and a record of what the crate logs.

use std::fmt::{self, Write as _};
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError, mpsc};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::Duration;

use redb::StorageBackend;
use redb::backends::InMemoryBackend;

use crate::RedbStore;
use crate::shared::State;

/// Polls `f` once and keeps it for later: a store call that sends its request on its
/// first poll has sent it when this returns.
pub(crate) async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}

/// The store's state held exclusively by another thread, as a heartbeat flush holds
/// it, until [`Held::release`]: meanwhile the writer thread waits and batches queue
/// up, and reads cannot take the state shared.
pub(crate) struct Held {
    /// Sends whether to close the file before letting go; dropped, it lets go.
    release: Option<mpsc::Sender<bool>>,
    holder: Option<JoinHandle<()>>,
}

/// How long the holder keeps the state if the test never releases it: a guard
/// against a test hanging on a bug (something waiting for the state on the test's
/// own thread), not a delay anything waits for.
const HOLD_AT_MOST: Duration = Duration::from_secs(30);

/// Takes `store`'s state exclusively on another thread; returns once it is held.
pub(crate) fn hold(store: &RedbStore) -> Held {
    let inner = store.inner.clone();
    let (held, is_held) = mpsc::channel();
    let (release, released) = mpsc::channel::<bool>();
    let holder = std::thread::spawn(move || {
        let mut state = inner.exclusive();
        held.send(()).unwrap();
        if released.recv_timeout(HOLD_AT_MOST) == Ok(true)
            && let State::Open(db) = std::mem::replace(&mut *state, State::Closed)
        {
            // What close does under the lock: from here on the store is closed.
            db.close().unwrap();
        }
    });
    is_held.recv().unwrap();
    Held {
        release: Some(release),
        holder: Some(holder),
    }
}

impl Held {
    /// Lets go of the state, and waits until it is let go.
    pub(crate) fn release(mut self) {
        self.let_go();
    }

    /// Closes the file, as `close` does while it holds the state, then lets go: what
    /// waited for the state finds the store closed.
    pub(crate) fn close_and_release(mut self) {
        if let Some(release) = &self.release {
            release.send(true).unwrap();
        }
        self.let_go();
    }

    fn let_go(&mut self) {
        drop(self.release.take());
        if let Some(holder) = self.holder.take() {
            holder.join().unwrap();
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.let_go();
    }
}

/// A redb backend in memory whose writes, syncs and resizes fail while `fail` is
/// set, as a full or broken disk would. Clones share the bytes and the switches, so a
/// test can open the same "file" again after a failure.
#[derive(Clone, Debug)]
pub(crate) struct FailingBackend {
    bytes: Arc<InMemoryBackend>,
    pub(crate) fail: Arc<AtomicBool>,
    /// Writes, syncs and resizes still allowed before `fail` sets itself;
    /// [`u64::MAX`] for no limit. See [`FailingBackend::crash_after`].
    allowed: Arc<AtomicU64>,
}

impl Default for FailingBackend {
    fn default() -> Self {
        FailingBackend {
            bytes: Arc::default(),
            fail: Arc::default(),
            allowed: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

/// What the failing backend's I/O returns; tests look for it in the errors they get.
pub(crate) const INJECTED: &str = "injected I/O failure";

impl FailingBackend {
    fn check(&self) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other(INJECTED));
        }
        let allowed = self.allowed.load(Ordering::SeqCst);
        if allowed == 0 {
            // The crash: this and every later write fails, as after a power cut the
            // disk takes nothing more.
            self.fail.store(true, Ordering::SeqCst);
            return Err(io::Error::other(INJECTED));
        }
        if allowed != u64::MAX {
            self.allowed.store(allowed - 1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Lets `n` more writes, syncs or resizes through, then fails them all (as if the
    /// process died there): what was written up to that point stays, the rest never
    /// reaches the "disk".
    pub(crate) fn crash_after(&self, n: u64) {
        self.allowed.store(n, Ordering::SeqCst);
    }

    /// Back to a working disk, for the restart after a crash.
    pub(crate) fn recover(&self) {
        self.allowed.store(u64::MAX, Ordering::SeqCst);
        self.fail.store(false, Ordering::SeqCst);
    }

    /// A backend holding `bytes`, as a file would.
    pub(crate) fn with_bytes(bytes: &[u8]) -> Self {
        let backend = FailingBackend::default();
        let loaded = StorageBackend::set_len(&*backend.bytes, bytes.len() as u64)
            .and_then(|()| StorageBackend::write(&*backend.bytes, 0, bytes));
        loaded.unwrap();
        backend
    }

    /// The bytes, as the file would hold them now.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        let len = StorageBackend::len(&*self.bytes).unwrap();
        let mut out = vec![0; usize::try_from(len).unwrap()];
        StorageBackend::read(&*self.bytes, 0, &mut out).unwrap();
        out
    }

    /// A database on these bytes.
    pub(crate) fn open(&self) -> redb::Database {
        redb::Database::builder()
            .create_with_backend(self.clone())
            .unwrap()
    }
}

impl StorageBackend for FailingBackend {
    fn len(&self) -> io::Result<u64> {
        StorageBackend::len(&*self.bytes)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        StorageBackend::read(&*self.bytes, offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        StorageBackend::set_len(&*self.bytes, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        StorageBackend::sync_data(&*self.bytes)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        StorageBackend::write(&*self.bytes, offset, data)
    }
}

/// An event the crate logged, as [`logged`] recorded it.
#[derive(Clone, Debug)]
pub(crate) struct Logged {
    pub(crate) level: tracing::Level,
    pub(crate) target: String,
    /// Every field, the message included, as `name=value` pairs.
    pub(crate) fields: String,
}

/// Every event of this crate logged since the first call, from any thread (the
/// writer's included): the first call installs a recording subscriber as the global
/// default of the test binary. Tests run concurrently, so a test looks for what its
/// own store would log, not at the whole list.
pub(crate) fn logged() -> Vec<Logged> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(Recorder)
            .expect("no other global subscriber in the crate's tests");
    });
    LOGGED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

static LOGGED: Mutex<Vec<Logged>> = Mutex::new(Vec::new());

/// Records this crate's events into [`LOGGED`]; spans are ignored.
struct Recorder;

impl tracing::Subscriber for Recorder {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target().starts_with("virtual_llm_redb")
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = String::new();
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn fmt::Debug| {
                let _ = write!(fields, "{}={value:?} ", field.name());
            },
        );
        let metadata = event.metadata();
        LOGGED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Logged {
                level: *metadata.level(),
                target: metadata.target().to_owned(),
                fields,
            });
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
