//! The completion log: what a client needs to resume a streamed answer (SPEC §15).
//!
//! Every streamed answer gets a fresh, unguessable [`CompletionId`] and a place in the
//! log, owned by the principal that asked. Its chunks are numbered as the client sees
//! them (`seq` 0, 1, 2…) and kept while the answer runs and for `clientResumeWindow`
//! after it ends, finished or broken, so that a client whose connection dropped can
//! ask for what came after the last chunk it saw. Nobody else can: another principal
//! asking for the id is told it does not exist.
//!
//! The client's own response is a [`Reader`] of the log like any resumed one. Readers
//! pull the answer from its source (the relayed task) as they need it, one at a time,
//! and every chunk is recorded before anyone sends it. So a slow client still slows
//! its own stream (nothing is read ahead of the readers); a reader that joins a live
//! answer follows it, waiting for each new chunk, and carries it on if the first
//! reader's connection goes; and when the last reader of a live answer leaves, its
//! source is dropped, which cancels the task as any client leaving does (SPEC §6), and
//! the answer is kept as broken: resuming it gives its chunks, then an error.
//!
//! Memory is bounded twice. An answer past `clientResumeBytes` stops being resumable:
//! its chunks are dropped, the reader at its head goes on reading the source directly,
//! and a reader behind it gets an error. All answers together stay under
//! `clientResumeTotalBytes`: the answers that ended first are dropped first, and a live
//! answer that does not fit even then stops being resumable the same way.
//!
//! Time is tokio's, as for task deadlines (tests pause it). An ended answer expires
//! `clientResumeWindow` after its end: expired answers are swept whenever an answer
//! starts or is resumed, and by one periodic sweep per log (never a timer per answer).
//! A reader already reading an answer when it expires or is dropped to make room reads
//! it to its end.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use futures::StreamExt;
//! use virtual_llm_core::completions::{CompletionLog, Event};
//! use virtual_llm_core::Config;
//!
//! let log = CompletionLog::new(&Config::default());
//! let source = futures::stream::iter(["a", "b"].map(|c| Ok(c.to_owned()))).boxed();
//! let (id, mut first) = log.start("alice", source);
//! let id = id.expect("resuming is on");
//! assert!(matches!(first.next().await, Some(Event::Chunk { seq: 0, .. })));
//! drop(first); // the connection went; the answer is kept, broken
//!
//! let mut again = log.read("alice", id.as_str(), Some(0)).unwrap();
//! assert!(matches!(again.next().await, Some(Event::Failed(_))));
//! assert!(log.read("mallory", id.as_str(), None).is_err());
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::Escaped;
use crate::protocol::ErrorBody;
use crate::sync::lock;
use crate::{ChunkStream, CompletionId, Config, Error};

/// Why a live answer's last reader leaving ends it.
const CANCELLED: &str = "the answer was cancelled: its last client went away before it ended";
/// Why a reader behind an answer that outgrew the log cannot go on.
const OUTGREW: &str = "the answer outgrew what the gateway keeps for resuming \
     (clientResumeBytes, clientResumeTotalBytes) while this client was behind";

/// One event of a streamed answer, as its readers see it.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A chunk: its number (0, 1, 2… as the client saw them) and its payload, a
    /// serialized `chat.completion.chunk`.
    Chunk {
        /// The chunk's number, the SSE `id:` of its event.
        seq: u64,
        /// The chunk's payload.
        data: String,
    },
    /// The answer is complete (`data: [DONE]`).
    Done,
    /// The answer broke: the error its client got (an `error` event).
    Failed(ErrorBody),
}

/// The streamed answers of one gateway, kept for their clients to resume. Clones
/// share it.
#[derive(Clone)]
pub struct CompletionLog {
    inner: Arc<Inner>,
}

impl fmt::Debug for CompletionLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompletionLog")
            .field("window", &self.inner.window)
            .field("answers", &self.answers())
            .field("bytes", &self.bytes())
            .finish()
    }
}

struct Inner {
    /// How long an ended answer is kept; zero keeps none.
    window: Duration,
    /// The most bytes of chunks kept for one answer.
    answer_bytes: usize,
    /// The most bytes of chunks kept, all answers together.
    total_bytes: usize,
    /// Bytes of chunks kept now, all answers together: an atomic so that the common
    /// case, a chunk that fits, takes no lock but its answer's.
    bytes: AtomicUsize,
    state: Mutex<State>,
    /// Whether the periodic sweep runs.
    sweeping: AtomicBool,
}

/// The answers kept. Lock order: this, then an [`Answer`]'s body; never the other
/// way round.
#[derive(Default)]
struct State {
    answers: HashMap<CompletionId, Arc<Answer>>,
    /// The answers that ended, in the order they ended: the order they expire in,
    /// and the order they are dropped to make room.
    ended: VecDeque<Ended>,
}

struct Ended {
    id: CompletionId,
    expires: Instant,
}

/// One streamed answer.
struct Answer {
    id: CompletionId,
    /// The principal that asked: the only one that may read it.
    owner: String,
    body: Mutex<Body>,
    /// Bumped on every change of `body`: readers wait on it for a new chunk, the end,
    /// or the source to pull.
    changed: watch::Sender<u64>,
}

impl Answer {
    fn touch(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// [`touch`](Answer::touch) for a chunk appended by the reader that pulled it from
    /// the source, which holds a receiver of its own: only when another reader holds
    /// one too (most answers have one reader, and waking nobody still costs the
    /// channel's locks on every chunk). A
    /// reader that subscribes after the count was read reads the body after the
    /// chunk went in (it subscribes before it locks the body; the chunk went in under
    /// that lock), so it misses nothing.
    fn touch_followers(&self) {
        if self.changed.receiver_count() > 1 {
            self.touch();
        }
    }
}

/// An answer's chunks, one after the other in one buffer: appending one copies it in
/// (no allocation of its own), and forgetting an answer frees two allocations, not one
/// per chunk.
///
/// What an answer counts against the log's bounds is the memory its two buffers hold,
/// room to grow included: they grow by doubling (never past `clientResumeBytes`) while
/// the answer runs, and give the spare room back when it ends.
struct Body {
    /// The chunks' text, end to end.
    text: String,
    /// Where each chunk ends in `text`: chunk `seq` is `text[ends[seq - 1]..ends[seq]]`.
    ends: Vec<usize>,
    phase: Phase,
}

/// The buffers' sizes an answer grows to.
#[derive(Clone, Copy, PartialEq)]
struct Room {
    text: usize,
    ends: usize,
}

impl Room {
    /// The bytes buffers of these sizes hold.
    fn bytes(self) -> usize {
        self.text
            .saturating_add(self.ends.saturating_mul(std::mem::size_of::<usize>()))
    }
}

impl Body {
    /// How many chunks are kept.
    fn count(&self) -> usize {
        self.ends.len()
    }

    /// Chunk `i`, if kept.
    fn chunk(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = match i.checked_sub(1) {
            Some(before) => self.ends.get(before).copied().unwrap_or(0),
            None => 0,
        };
        self.text.get(start..end)
    }

    /// The buffers' sizes now.
    fn room(&self) -> Room {
        Room {
            text: self.text.capacity(),
            ends: self.ends.capacity(),
        }
    }

    /// Bytes held: what the answer counts against the log's bounds.
    fn bytes(&self) -> usize {
        self.room().bytes()
    }

    /// The buffers' sizes once a chunk of `len` bytes is in: as they are when it fits,
    /// else doubled (at least 4 chunk places), the text never past `cap` unless the
    /// chunks alone are.
    fn room_for(&self, len: usize, cap: usize) -> Room {
        let mut room = self.room();
        let need = self.text.len().saturating_add(len);
        if need > room.text {
            room.text = room.text.saturating_mul(2).min(cap).max(need);
        }
        if self.ends.len() == room.ends {
            room.ends = room.ends.saturating_mul(2).max(4);
        }
        room
    }

    /// Appends `data` within buffers of `room`'s sizes (grown to them exactly): the
    /// bytes held beyond `room`'s, were the buffers to grow past it (they do not).
    fn push(&mut self, data: &str, room: Room) -> usize {
        if room.text > self.text.capacity() {
            self.text.reserve_exact(room.text - self.text.len());
        }
        if room.ends > self.ends.capacity() {
            self.ends.reserve_exact(room.ends - self.ends.len());
        }
        self.text.push_str(data);
        let end = self.text.len();
        self.ends.push(end);
        self.bytes().saturating_sub(room.bytes())
    }

    /// Gives back the room the buffers grew into beyond the chunks: an answer that
    /// ended takes no more. The bytes given back.
    fn shrink(&mut self) -> usize {
        let before = self.bytes();
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
        before.saturating_sub(self.bytes())
    }
}

enum Phase {
    /// Still coming: its source, unless a reader is pulling it, and how many readers
    /// it has.
    Live {
        source: Option<ChunkStream>,
        readers: usize,
    },
    /// Complete.
    Finished,
    /// Broken with this error.
    Broken(ErrorBody),
    /// No longer resumable: it outgrew the log, its chunks are gone.
    Dropped,
}

impl CompletionLog {
    /// An empty log with `config`'s `clientResumeWindow`, `clientResumeBytes` and
    /// `clientResumeTotalBytes`.
    pub fn new(config: &Config) -> Self {
        CompletionLog {
            inner: Arc::new(Inner {
                window: config.client_resume_window,
                answer_bytes: config.client_resume_bytes,
                total_bytes: config.client_resume_total_bytes,
                bytes: AtomicUsize::new(0),
                state: Mutex::new(State::default()),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Starts keeping a streamed answer asked by `owner` (a principal id), pulled
    /// from `source`: its id (`None` when resuming is off: the window is zero) and
    /// its first reader, the asking client's.
    pub fn start(&self, owner: &str, source: ChunkStream) -> (Option<CompletionId>, Reader) {
        if self.inner.window.is_zero() {
            return (None, Reader::direct(source));
        }
        self.inner.start_sweeping();
        let id = CompletionId::generate();
        let answer = Arc::new(Answer {
            id: id.clone(),
            owner: owner.to_owned(),
            body: Mutex::new(Body {
                text: String::new(),
                ends: Vec::new(),
                phase: Phase::Live {
                    source: Some(source),
                    readers: 1,
                },
            }),
            changed: watch::channel(0).0,
        });
        {
            let mut state = lock(&self.inner.state);
            self.inner.sweep(&mut state, Instant::now());
            state.answers.insert(id.clone(), answer.clone());
            self.inner.gauges(&state);
        }
        (Some(id), Reader::logged(self.inner.clone(), answer, 0))
    }

    /// A reader of answer `id` for `owner`, from the chunk after `starting_after`
    /// (from the first without it): the chunks kept, then the answer as it goes on,
    /// then its end.
    ///
    /// [`Error::UnknownCompletion`] for an id that is not kept, whatever the reason
    /// (never existed, expired, outgrew the log, another principal's);
    /// [`Error::InvalidRequest`] for a `starting_after` past the answer's last chunk.
    pub fn read(
        &self,
        owner: &str,
        id: &str,
        starting_after: Option<u64>,
    ) -> Result<Reader, Error> {
        let id = CompletionId::parse(id).map_err(|_| Error::UnknownCompletion)?;
        let mut state = lock(&self.inner.state);
        self.inner.sweep(&mut state, Instant::now());
        let answer = state
            .answers
            .get(&id)
            .filter(|answer| answer.owner == owner)
            .cloned()
            .ok_or(Error::UnknownCompletion)?;
        let from = match starting_after {
            None => 0,
            Some(seq) => seq.saturating_add(1),
        };
        {
            let mut body = lock(&answer.body);
            let count = body.count() as u64;
            if from > count {
                return Err(Error::invalid(match count {
                    0 => "starting_after: the answer has no chunk yet".to_owned(),
                    n => format!("starting_after is past the answer's last chunk ({})", n - 1),
                }));
            }
            if let Phase::Live { readers, .. } = &mut body.phase {
                *readers += 1;
            }
        }
        drop(state);
        crate::metrics::client_resumed();
        Ok(Reader::logged(self.inner.clone(), answer, from))
    }

    /// How many answers are kept now, live or ended.
    pub fn answers(&self) -> usize {
        lock(&self.inner.state).answers.len()
    }

    /// How many bytes are held now, all answers together (see [`Config::client_resume_bytes`]).
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::SeqCst)
    }
}

impl Inner {
    /// Starts the periodic sweep, once per log: every window, it drops the answers
    /// that expired. It stops when the log is gone.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::SeqCst);
            return;
        };
        let log = Arc::downgrade(self);
        let every = self.window;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(log) = log.upgrade() else { return };
                let mut state = lock(&log.state);
                log.sweep(&mut state, Instant::now());
            }
        });
    }

    /// Drops the answers that expired by `now`.
    fn sweep(&self, state: &mut State, now: Instant) {
        let mut swept = false;
        while state.ended.front().is_some_and(|e| e.expires <= now) {
            if let Some(ended) = state.ended.pop_front() {
                self.remove(state, &ended.id);
                swept = true;
            }
        }
        if swept {
            self.gauges(state);
        }
    }

    /// Forgets answer `id`, releasing its bytes.
    fn remove(&self, state: &mut State, id: &CompletionId) {
        if let Some(answer) = state.answers.remove(id) {
            let bytes = lock(&answer.body).bytes();
            self.bytes.fetch_sub(bytes, Ordering::SeqCst);
        }
    }

    fn gauges(&self, state: &State) {
        crate::metrics::completions_kept(state.answers.len(), self.bytes.load(Ordering::SeqCst));
    }

    /// Records `data` as `answer`'s next chunk and gives `source` back to it for the
    /// next reader that needs one; past a bound, makes the answer unresumable. Either
    /// way `data` comes back, for the reader that pulled it: `Ok` when it was kept.
    fn append(
        &self,
        answer: &Answer,
        data: String,
        source: &mut Option<ChunkStream>,
    ) -> Result<String, String> {
        // Only the reader pulling the source appends, so the room computed here is
        // still what the answer needs once the lock is taken again below.
        let push = |body: &mut Body, room: Room, source: &mut Option<ChunkStream>| {
            // Counted, should the buffers ever grow past the room asked for: the
            // total stays what the answers hold.
            let beyond = body.push(&data, room);
            self.bytes.fetch_add(beyond, Ordering::SeqCst);
            if let Phase::Live { source: slot, .. } = &mut body.phase {
                *slot = source.take();
            }
        };
        let (room, growth) = {
            // The common case, a chunk that fits in the room the answer has (or in
            // the log's total as it is), under one lock of the answer: the total is
            // an atomic.
            let mut body = lock(&answer.body);
            let held = body.bytes();
            let room = body.room_for(data.len(), self.answer_bytes);
            if room.bytes() > self.answer_bytes {
                drop(body);
                self.drop_live(answer);
                return Err(data);
            }
            let growth = room.bytes().saturating_sub(held);
            if growth == 0 || self.reserve_fitting(growth) {
                push(&mut body, room, source);
                drop(body);
                answer.touch_followers();
                return Ok(data);
            }
            (room, growth)
        };
        // Room must be made: `reserve` takes the log's lock, which comes before an
        // answer's, so the answer's is not held.
        if !self.reserve(growth) {
            self.drop_live(answer);
            return Err(data);
        }
        push(&mut lock(&answer.body), room, source);
        answer.touch_followers();
        Ok(data)
    }

    /// Counts `len` more bytes if they fit in the total as it is; `false` (and
    /// nothing counted) when room must be made first.
    fn reserve_fitting(&self, len: usize) -> bool {
        let total = self
            .bytes
            .fetch_add(len, Ordering::SeqCst)
            .saturating_add(len);
        if total <= self.total_bytes {
            return true;
        }
        self.bytes.fetch_sub(len, Ordering::SeqCst);
        false
    }

    /// Counts `len` more bytes, dropping the answers that ended first until they fit
    /// in the total; `false` (and nothing counted) when they do not fit even then.
    fn reserve(&self, len: usize) -> bool {
        if self.reserve_fitting(len) {
            return true;
        }
        let mut state = lock(&self.state);
        self.bytes.fetch_add(len, Ordering::SeqCst);
        while self.bytes.load(Ordering::SeqCst) > self.total_bytes {
            let Some(oldest) = state.ended.pop_front() else {
                break;
            };
            self.remove(&mut state, &oldest.id);
        }
        let fits = self.bytes.load(Ordering::SeqCst) <= self.total_bytes;
        if !fits {
            self.bytes.fetch_sub(len, Ordering::SeqCst);
        }
        self.gauges(&state);
        fits
    }

    /// Makes live `answer` unresumable: forgotten, its chunks dropped. Its source
    /// stays with the reader pulling it.
    fn drop_live(&self, answer: &Answer) {
        {
            let mut state = lock(&self.state);
            self.remove(&mut state, &answer.id);
            let mut body = lock(&answer.body);
            body.text = String::new();
            body.ends = Vec::new();
            body.phase = Phase::Dropped;
            drop(body);
            self.gauges(&state);
        }
        tracing::debug!(completion = %answer.id, "a streamed answer outgrew the completion log");
        answer.touch();
    }

    /// Ends live `answer` with `phase` (finished or broken): it expires a window from
    /// now.
    fn end(&self, answer: &Answer, phase: Phase) {
        {
            let mut body = lock(&answer.body);
            if !matches!(body.phase, Phase::Live { .. }) {
                return;
            }
            body.phase = phase;
            let freed = body.shrink();
            self.bytes.fetch_sub(freed, Ordering::SeqCst);
        }
        answer.touch();
        self.ended(answer);
    }

    /// Starts `answer`'s window, now that it ended.
    fn ended(&self, answer: &Answer) {
        let mut state = lock(&self.state);
        if state.answers.contains_key(&answer.id) {
            state.ended.push_back(Ended {
                id: answer.id.clone(),
                expires: Instant::now() + self.window,
            });
        }
        self.gauges(&state);
    }
}

/// The body of the `error` event of a stream that broke with `e`.
fn error_body(e: &Error) -> ErrorBody {
    tracing::debug!(error = %Escaped(e), "stream failed midway");
    e.to_body()
}

/// A reader of one streamed answer: the asking client's, or a resuming one. Read it
/// with [`Reader::next`] (or as a stream, [`Reader::into_stream`]): chunks, then one
/// [`Event::Done`] or [`Event::Failed`], then nothing.
///
/// Dropping the last reader of a live answer cancels it (see the [module](self)).
pub struct Reader {
    log: Option<Arc<Inner>>,
    /// The answer read through the log; `None` when reading the source directly
    /// (resuming is off, or the answer outgrew the log).
    answer: Option<Arc<Answer>>,
    changed: Option<watch::Receiver<u64>>,
    /// The source, while this reader pulls it (or for good, reading directly).
    source: Option<ChunkStream>,
    /// The seq of the next chunk to give.
    next: u64,
    done: bool,
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("completion", &self.answer.as_ref().map(|a| &a.id))
            .field("next", &self.next)
            .field("done", &self.done)
            .finish()
    }
}

impl Reader {
    fn direct(source: ChunkStream) -> Self {
        Reader {
            log: None,
            answer: None,
            changed: None,
            source: Some(source),
            next: 0,
            done: false,
        }
    }

    fn logged(log: Arc<Inner>, answer: Arc<Answer>, from: u64) -> Self {
        Reader {
            log: Some(log),
            changed: Some(answer.changed.subscribe()),
            answer: Some(answer),
            source: None,
            next: from,
            done: false,
        }
    }

    /// The next event; `None` after the answer's end.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if self.done {
                return None;
            }
            let (Some(answer), Some(log)) = (self.answer.clone(), self.log.clone()) else {
                return self.next_direct().await;
            };
            if let Some(changed) = &mut self.changed {
                changed.borrow_and_update();
            }
            {
                let mut body = lock(&answer.body);
                if let Some(data) = usize::try_from(self.next).ok().and_then(|i| body.chunk(i)) {
                    let event = Event::Chunk {
                        seq: self.next,
                        data: data.to_owned(),
                    };
                    self.next += 1;
                    return Some(event);
                }
                match &mut body.phase {
                    Phase::Finished => {
                        self.done = true;
                        return Some(Event::Done);
                    }
                    Phase::Broken(e) => {
                        self.done = true;
                        return Some(Event::Failed(e.clone()));
                    }
                    Phase::Dropped => {
                        self.done = true;
                        return Some(Event::Failed(
                            Error::CompletionGone { reason: OUTGREW }.to_body(),
                        ));
                    }
                    Phase::Live { source, .. } => {
                        if self.source.is_none() {
                            self.source = source.take();
                        }
                    }
                }
            }
            let Some(source) = self.source.as_mut() else {
                // Another reader is pulling the source: wait for what it brings. The
                // sender lives in the answer this reader holds, so this never fails.
                if let Some(changed) = &mut self.changed {
                    let _ = changed.changed().await;
                }
                continue;
            };
            match source.next().await {
                Some(Ok(data)) => {
                    // The reader pulling the source is at the answer's head: the
                    // chunk it appends is its next one.
                    let data = match log.append(&answer, data, &mut self.source) {
                        Ok(kept) => kept,
                        Err(data) => {
                            // Unresumable now: this reader, at the head, reads on
                            // directly.
                            self.answer = None;
                            self.changed = None;
                            data
                        }
                    };
                    let event = Event::Chunk {
                        seq: self.next,
                        data,
                    };
                    self.next += 1;
                    return Some(event);
                }
                Some(Err(e)) => {
                    self.source = None;
                    log.end(&answer, Phase::Broken(error_body(&e)));
                }
                None => {
                    self.source = None;
                    log.end(&answer, Phase::Finished);
                }
            }
        }
    }

    async fn next_direct(&mut self) -> Option<Event> {
        let source = self.source.as_mut()?;
        let event = match source.next().await {
            Some(Ok(data)) => {
                let event = Event::Chunk {
                    seq: self.next,
                    data,
                };
                self.next += 1;
                return Some(event);
            }
            Some(Err(e)) => Event::Failed(error_body(&e)),
            None => Event::Done,
        };
        self.done = true;
        self.source = None;
        Some(event)
    }

    /// The reader as a stream of its events.
    pub fn into_stream(self) -> BoxStream<'static, Event> {
        futures::stream::unfold(self, |mut reader| async move {
            let event = reader.next().await?;
            Some((event, reader))
        })
        .boxed()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let (Some(answer), Some(log)) = (self.answer.take(), self.log.take()) else {
            return; // reading directly: dropping the source cancels it, if unfinished
        };
        let cancelled = {
            let mut body = lock(&answer.body);
            let Phase::Live { source, readers } = &mut body.phase else {
                return;
            };
            *readers = readers.saturating_sub(1);
            if *readers > 0 {
                if self.source.is_some() {
                    *source = self.source.take();
                }
                None
            } else {
                let source = source.take().or_else(|| self.source.take());
                body.phase = Phase::Broken(Error::CompletionGone { reason: CANCELLED }.to_body());
                let freed = body.shrink();
                log.bytes.fetch_sub(freed, Ordering::SeqCst);
                Some(source)
            }
        };
        answer.touch();
        if let Some(source) = cancelled {
            drop(source); // cancels the task
            log.ended(&answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc;

    use super::*;

    type Sender = mpsc::UnboundedSender<Result<String, Error>>;

    /// The bytes of a chunk's place in an answer's list of chunk ends.
    const W: usize = std::mem::size_of::<usize>();

    fn config(window: u64, answer_bytes: usize, total_bytes: usize) -> Config {
        Config {
            client_resume_window: Duration::from_secs(window),
            client_resume_bytes: answer_bytes,
            client_resume_total_bytes: total_bytes,
            ..Config::default()
        }
    }

    fn source() -> (Sender, ChunkStream) {
        let (tx, rx) = mpsc::unbounded();
        (tx, rx.boxed())
    }

    fn send(tx: &Sender, data: &str) {
        tx.unbounded_send(Ok(data.to_owned())).unwrap();
    }

    fn chunk(seq: u64, data: &str) -> Event {
        Event::Chunk {
            seq,
            data: data.to_owned(),
        }
    }

    async fn rest(reader: &mut Reader) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(event) = reader.next().await {
            events.push(event);
        }
        events
    }

    fn code(event: &Event) -> Option<&str> {
        match event {
            Event::Failed(body) => body.error.code.as_deref(),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_answer_is_kept_for_its_window_then_forgotten() {
        let log = CompletionLog::new(&config(60, 1024, 4096));
        let (tx, chunks) = source();
        let (id, mut first) = log.start("alice", chunks);
        let id = id.unwrap();
        for c in ["a", "b", "c"] {
            send(&tx, c);
        }
        drop(tx);
        let all = rest(&mut first).await;
        assert_eq!(
            all,
            [chunk(0, "a"), chunk(1, "b"), chunk(2, "c"), Event::Done]
        );
        // Ended: its three bytes and three chunk ends, no room to spare.
        assert_eq!((log.answers(), log.bytes()), (1, 3 + 3 * W));

        tokio::time::advance(Duration::from_secs(59)).await;
        let mut again = log.read("alice", id.as_str(), Some(0)).unwrap();
        assert_eq!(
            rest(&mut again).await,
            [chunk(1, "b"), chunk(2, "c"), Event::Done]
        );
        let mut whole = log.read("alice", id.as_str(), None).unwrap();
        assert_eq!(rest(&mut whole).await, all);
        let mut end = log.read("alice", id.as_str(), Some(2)).unwrap();
        assert_eq!(rest(&mut end).await, [Event::Done]);

        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            log.read("alice", id.as_str(), Some(0)),
            Err(Error::UnknownCompletion)
        ));
        assert_eq!((log.answers(), log.bytes()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_periodic_sweep_forgets_expired_answers_without_a_caller() {
        let log = CompletionLog::new(&config(10, 1024, 4096));
        let (tx, chunks) = source();
        let (_, mut first) = log.start("alice", chunks);
        send(&tx, "a");
        drop(tx);
        rest(&mut first).await;
        assert_eq!(log.answers(), 1);
        // At most two windows later, with nobody calling the log.
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert_eq!((log.answers(), log.bytes()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn another_principal_or_a_wrong_id_gets_not_found() {
        let log = CompletionLog::new(&config(60, 1024, 4096));
        let (tx, chunks) = source();
        let (id, mut first) = log.start("alice", chunks);
        let id = id.unwrap();
        send(&tx, "a");
        assert_eq!(first.next().await, Some(chunk(0, "a")));
        for (who, id) in [
            ("mallory", id.as_str()),
            ("alice", "cmpl_00000000000000000000000000000000"),
            ("alice", "../not an id"),
            ("alice", ""),
        ] {
            assert!(
                matches!(log.read(who, id, None), Err(Error::UnknownCompletion)),
                "{who} reading {id:?}"
            );
        }
        assert!(log.read("alice", id.as_str(), None).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn starting_after_past_the_last_chunk_is_refused() {
        let log = CompletionLog::new(&config(60, 1024, 4096));
        let (tx, chunks) = source();
        let (id, mut first) = log.start("alice", chunks);
        let id = id.unwrap();
        assert!(matches!(
            log.read("alice", id.as_str(), Some(0)),
            Err(Error::InvalidRequest { .. })
        ));
        send(&tx, "a");
        assert_eq!(first.next().await, Some(chunk(0, "a")));
        assert!(log.read("alice", id.as_str(), Some(0)).is_ok());
        assert!(matches!(
            log.read("alice", id.as_str(), Some(1)),
            Err(Error::InvalidRequest { .. })
        ));
        assert!(matches!(
            log.read("alice", id.as_str(), Some(u64::MAX)),
            Err(Error::InvalidRequest { .. })
        ));
    }

    /// Two readers of a live answer each hear every chunk as it comes, not only at the
    /// answer's end: the reader that pulled a chunk from the source wakes the other
    /// (and wakes nobody when it reads alone).
    #[tokio::test(start_paused = true)]
    async fn a_reader_follows_a_live_answer_to_its_end() {
        let log = CompletionLog::new(&config(60, 1024, 4096));
        let (tx, chunks) = source();
        let (id, mut first) = log.start("alice", chunks);
        send(&tx, "a");
        assert_eq!(first.next().await, Some(chunk(0, "a")));
        let mut second = log.read("alice", id.unwrap().as_str(), Some(0)).unwrap();
        let (heard, mut hearing) = tokio::sync::mpsc::unbounded_channel();
        let follower = tokio::spawn(async move {
            while let Some(event) = second.next().await {
                let _ = heard.send(event);
            }
        });
        for (seq, c) in [(1, "b"), (2, "c")] {
            send(&tx, c);
            // Whichever reader needs the next chunk pulls the source: each must wake
            // the other (a bound for a hang; time is paused).
            let got = tokio::time::timeout(Duration::from_secs(60), first.next()).await;
            assert_eq!(got.ok().flatten(), Some(chunk(seq, c)), "chunk {seq}");
            // The follower runs when this task yields (one thread): a few turns are
            // plenty for a woken follower, and no number of them wakes one that was not.
            let mut got = None;
            for _ in 0..16 {
                tokio::task::yield_now().await;
                if let Ok(event) = hearing.try_recv() {
                    got = Some(event);
                    break;
                }
            }
            assert_eq!(got, Some(chunk(seq, c)), "chunk {seq} heard while live");
        }
        drop(tx);
        assert_eq!(first.next().await, Some(Event::Done));
        follower.await.unwrap();
        assert_eq!(hearing.recv().await, Some(Event::Done));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_carries_a_live_answer_on_when_the_first_leaves() {
        let log = CompletionLog::new(&config(60, 1024, 4096));
        let (tx, chunks) = source();
        let (id, mut first) = log.start("alice", chunks);
        send(&tx, "a");
        assert_eq!(first.next().await, Some(chunk(0, "a")));
        let mut second = log.read("alice", id.unwrap().as_str(), Some(0)).unwrap();
        drop(first);
        assert!(!tx.is_closed(), "a reader is left: the answer goes on");
        send(&tx, "b");
        drop(tx);
        assert_eq!(rest(&mut second).await, [chunk(1, "b"), Event::Done]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_reader_leaving_cancels_the_answer_and_keeps_it_broken() {
        let log = CompletionLog::new(&config(60, 1024, 4096));
        let (tx, chunks) = source();
        let (id, mut first) = log.start("alice", chunks);
        send(&tx, "a");
        assert_eq!(first.next().await, Some(chunk(0, "a")));
        drop(first);
        assert!(
            tx.is_closed(),
            "the source is dropped: the task is cancelled"
        );
        let mut again = log.read("alice", id.unwrap().as_str(), None).unwrap();
        let events = rest(&mut again).await;
        assert_eq!(events[0], chunk(0, "a"));
        assert_eq!(code(&events[1]), Some("completion_gone"));
        assert_eq!(events.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_answer_resumes_to_the_same_error() {
        let log = CompletionLog::new(&config(60, 1024, 4096));
        let (tx, chunks) = source();
        let (id, mut first) = log.start("alice", chunks);
        send(&tx, "a");
        tx.unbounded_send(Err(Error::Upstream {
            message: "the model crashed".into(),
        }))
        .unwrap();
        let events = rest(&mut first).await;
        assert_eq!(events.len(), 2);
        assert_eq!(code(&events[1]), Some("upstream_error"));
        let mut again = log.read("alice", id.unwrap().as_str(), Some(0)).unwrap();
        assert_eq!(rest(&mut again).await, events[1..]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_past_its_byte_cap_stops_being_resumable() {
        // Live, an answer holds its text's buffer (doubled as it grows) and room for
        // four chunk ends: 4 + 4W, then 8 + 4W, then 16 + 4W, past this cap.
        let log = CompletionLog::new(&config(60, 12 + 4 * W, 4096));
        let (tx, chunks) = source();
        let (id, mut first) = log.start("alice", chunks);
        let id = id.unwrap();
        send(&tx, "aaaa");
        send(&tx, "bbbb");
        assert_eq!(first.next().await, Some(chunk(0, "aaaa")));
        assert_eq!(first.next().await, Some(chunk(1, "bbbb")));
        let mut behind = log.read("alice", id.as_str(), None).unwrap();
        assert_eq!(behind.next().await, Some(chunk(0, "aaaa")));
        assert_eq!(log.bytes(), 8 + 4 * W);

        send(&tx, "cccc"); // 16 + 4W: past the cap
        assert_eq!(first.next().await, Some(chunk(2, "cccc")));
        assert!(matches!(
            log.read("alice", id.as_str(), None),
            Err(Error::UnknownCompletion)
        ));
        assert_eq!((log.answers(), log.bytes()), (0, 0));
        let events = rest(&mut behind).await;
        assert_eq!(
            events.len(),
            1,
            "the chunks it had not read are gone: {events:?}"
        );
        assert_eq!(code(&events[0]), Some("completion_gone"));

        // The reader at the head reads on, directly.
        send(&tx, "dddd");
        drop(tx);
        assert_eq!(rest(&mut first).await, [chunk(3, "dddd"), Event::Done]);
        assert_eq!(log.bytes(), 0);
    }

    /// What an answer counts is what its buffers hold: room to grow while it runs,
    /// given back when it ends or its last reader leaves; an empty chunk still costs
    /// its place, so empty chunks cannot grow an answer past its cap unseen.
    #[tokio::test(start_paused = true)]
    async fn an_answer_counts_what_it_holds_and_gives_back_its_spare_room() {
        let log = CompletionLog::new(&config(60, 1024, 1 << 20));
        let (tx, chunks) = source();
        let (_, mut reader) = log.start("alice", chunks);
        for c in ["abc", "def", "ghi", "jkl", "mno"] {
            send(&tx, c);
            reader.next().await.unwrap();
        }
        // 15 bytes in a text grown 3, 6, 12, 24; room for 8 chunk ends.
        assert_eq!(log.bytes(), 24 + 8 * W);
        drop(tx);
        assert_eq!(reader.next().await, Some(Event::Done));
        assert_eq!(log.bytes(), 15 + 5 * W, "finished: the spare room is back");

        let (tx, chunks) = source();
        let (_, mut left) = log.start("alice", chunks);
        send(&tx, "abc");
        left.next().await.unwrap();
        drop(left); // cancelled: kept as broken, its spare room back too
        assert_eq!(log.bytes(), (15 + 5 * W) + (3 + W));

        let log = CompletionLog::new(&config(60, 64 * W, 1 << 20));
        let (tx, chunks) = source();
        let (id, mut empty) = log.start("alice", chunks);
        // 64 ends fill the cap exactly; the 65th doubles their room past it.
        for _ in 0..65 {
            send(&tx, "");
            assert_eq!(
                empty.next().await.map(|e| matches!(e, Event::Chunk { .. })),
                Some(true)
            );
        }
        assert!(
            log.read("alice", id.unwrap().as_str(), None).is_err(),
            "65 ends and no text: past the cap"
        );
    }

    /// Starts an answer of `chunks` for alice and reads it to its end: its id.
    async fn finished(log: &CompletionLog, chunks: &[&str]) -> CompletionId {
        let (tx, source) = source();
        let (id, mut reader) = log.start("alice", source);
        for c in chunks {
            send(&tx, c);
        }
        drop(tx);
        rest(&mut reader).await;
        id.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_budget_drops_the_answers_that_ended_first() {
        // An ended answer of one 4-byte chunk holds 4 + W; a live one 4 + 4W (room
        // for four chunk ends): room for two ended and one live, and a little.
        let log = CompletionLog::new(&config(60, 100, 10 + 5 * W));
        // `second` starts first, but ends after `first`.
        let (tx, source2) = source();
        let (second, mut reader2) = log.start("alice", source2);
        let first = finished(&log, &["1111"]).await;
        send(&tx, "2222");
        drop(tx);
        rest(&mut reader2).await;
        let second = second.unwrap();
        assert_eq!((log.answers(), log.bytes()), (2, 2 * (4 + W)));

        let (tx, source3) = source();
        let (third, mut reader3) = log.start("alice", source3);
        let third = third.unwrap();
        send(&tx, "3333"); // 2 (4 + W) + 4 + 4W: past the total, `first` goes
        assert_eq!(reader3.next().await, Some(chunk(0, "3333")));
        assert!(log.read("alice", first.as_str(), None).is_err());
        assert!(log.read("alice", second.as_str(), None).is_ok());
        assert_eq!((log.answers(), log.bytes()), (2, (4 + W) + (4 + 4 * W)));

        send(&tx, "3333"); // its text doubles to 8: past it again, `second` goes
        assert_eq!(reader3.next().await, Some(chunk(1, "3333")));
        assert!(log.read("alice", second.as_str(), None).is_err());
        assert_eq!((log.answers(), log.bytes()), (1, 8 + 4 * W));

        // Nothing ended is left to drop: the live answer stops being resumable, and
        // its reader reads on.
        let long = "3".repeat(20); // 28 + 4W
        send(&tx, &long);
        assert_eq!(reader3.next().await, Some(chunk(2, &long)));
        assert!(log.read("alice", third.as_str(), None).is_err());
        assert_eq!((log.answers(), log.bytes()), (0, 0));
        drop(tx);
        assert_eq!(reader3.next().await, Some(Event::Done));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_window_keeps_nothing() {
        let log = CompletionLog::new(&config(0, 1024, 4096));
        let (tx, chunks) = source();
        let (id, mut reader) = log.start("alice", chunks);
        assert_eq!(id, None);
        send(&tx, "a");
        drop(tx);
        assert_eq!(rest(&mut reader).await, [chunk(0, "a"), Event::Done]);
        assert_eq!((log.answers(), log.bytes()), (0, 0));
    }
}
