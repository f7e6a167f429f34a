//! Worker runtimes: one single-threaded tokio runtime per thread, to serve
//! connections on (see [`ServeOptions::workers`](crate::ServeOptions::workers)).
//!
//! tokio's multi-threaded runtime lets any worker run any task: a worker that finds
//! work wakes an idle sibling to steal some, and a request's tasks wander between
//! threads. On a small machine shared with other processes, those wake-ups and hand-offs
//! cost a third of a relayed request's CPU (see `docs/benchmarks.md`, issue #20). With
//! workers, a connection and every task it spawns stay on one thread, as a request
//! does in one of nginx's worker processes; a thread is woken from another only when a
//! request crosses to a WebSocket session served on another worker.
//!
//! The price is nginx's too: a worker busy with its connections does not hand them to
//! an idle one. Connections are spread by their count, not their load.

use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Threads that each run a single-threaded tokio runtime until this is dropped.
///
/// ```
/// let workers = virtual_llm_http::Workers::start(2)?;
/// let mut options = virtual_llm_http::ServeOptions::default();
/// options.workers = workers.handles();
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Workers {
    /// Starts `count` worker threads (at least one), each with its own runtime (I/O,
    /// timers, and a blocking pool of its own).
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let mut workers = Workers {
            handles: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..count.max(1) {
            // The runtime is built, run and dropped on its own thread (dropping one
            // from async code would panic); its handle comes back here.
            let (built, handle) = std::sync::mpsc::sync_channel(1);
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = built.send(Err(e));
                            return;
                        }
                    };
                    if built.send(Ok(runtime.handle().clone())).is_err() {
                        return;
                    }
                    // Either a stop or the sender dropped: both mean stop.
                    let _ = runtime.block_on(stopped);
                })?;
            let handle = handle
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread ended before its runtime ran"))
                .and_then(|built| built);
            // Pushed before the error is returned: dropping `workers` stops the
            // threads already started.
            workers.threads.push((stop, thread));
            workers.handles.push(handle?);
        }
        Ok(workers)
    }

    /// Handles to spawn on the workers, for [`ServeOptions::workers`](crate::ServeOptions::workers).
    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }
}

impl Drop for Workers {
    /// Stops every worker: the tasks still on it are dropped (a connection closes).
    fn drop(&mut self) {
        for (stop, thread) in self.threads.drain(..) {
            let _ = stop.send(());
            if thread.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}
