//! The access log: one line per inference request, at INFO under the target
//! [`TARGET`] (`virtual_llm::access`), so an operator can route it apart (e.g.
//! `RUST_LOG=info,virtual_llm::access=info` to a file of its own). A line carries the
//! route, the principal, the model asked for, the HTTP status, the duration and the
//! bytes of the answer's body — never a body. The principal and the model come from the
//! network and are logged with control characters escaped
//! ([`Escaped`](virtual_llm_core::error::Escaped)). A stream's line is written when it
//! ends, or when its client goes away.

use std::time::Duration;

use tokio::time::Instant;
use virtual_llm_core::error::Escaped;

/// The `tracing` target of the access log.
pub const TARGET: &str = "virtual_llm::access";

/// One request's line, written once: by [`AccessLog::finish`], or when dropped.
#[derive(Debug)]
pub(crate) struct AccessLog {
    route: &'static str,
    principal: Option<String>,
    model: Option<String>,
    started: Instant,
    status: u16,
    bytes: u64,
    stream: bool,
    written: bool,
}

impl AccessLog {
    /// A request to `route` has begun.
    pub(crate) fn start(route: &'static str) -> Self {
        AccessLog {
            route,
            principal: None,
            model: None,
            started: Instant::now(),
            status: 0,
            bytes: 0,
            stream: false,
            written: false,
        }
    }

    /// Who asked.
    pub(crate) fn principal(&mut self, id: &str) {
        self.principal = Some(id.to_owned());
    }

    /// What it asked for.
    pub(crate) fn model(&mut self, model: &str) {
        self.model = Some(model.to_owned());
    }

    /// The answer is a stream with `status`: the line waits for its end.
    pub(crate) fn streaming(&mut self, status: u16) {
        self.status = status;
        self.stream = true;
    }

    /// `n` more bytes of a stream went out.
    pub(crate) fn sent(&mut self, n: usize) {
        self.bytes = self.bytes.saturating_add(n as u64);
    }

    /// The answer had `status` and `bytes`: writes the line.
    pub(crate) fn finish(mut self, status: u16, bytes: u64) {
        self.status = status;
        self.bytes = bytes;
        self.write();
    }

    fn write(&mut self) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let took: Duration = self.started.elapsed();
        tracing::info!(
            target: TARGET,
            route = self.route,
            principal = %Escaped(self.principal.as_deref().unwrap_or("-")),
            model = %Escaped(self.model.as_deref().unwrap_or("-")),
            status = self.status,
            duration_ms = took.as_millis() as u64,
            bytes = self.bytes,
            stream = self.stream,
            "request"
        );
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.write();
    }
}
