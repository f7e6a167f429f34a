//! What the reference binaries share: logging setup, the runtime, and the shutdown
//! signal.

#![allow(dead_code)]

/// What `run` returns on failure: any error, printed as one line by [`exit`].
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The process's exit: success, or the error printed as one readable line on stderr
/// (its `Display`, never its `Debug`, with any line breaks folded) and a failure
/// status.
pub(crate) fn exit(result: Result<(), BoxError>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `text` on one line: its lines trimmed, the empty ones dropped, joined by spaces.
pub(crate) fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A TOML file's parse error in one line: `FILE: line L, column C: what is wrong`
/// (the toml crate's own message draws the line with a caret over several lines).
pub(crate) fn toml_error(path: &std::path::Path, text: &str, e: &toml::de::Error) -> String {
    let place = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    format!(
        "{}: {}{}",
        path.display(),
        place.unwrap_or_default(),
        one_line(e.message())
    )
}

/// The provider `type` when a config entry names none.
pub(crate) fn openai() -> String {
    "openai".to_owned()
}

/// Logs to stderr; `RUST_LOG` filters (default `info`). Colours only on a terminal: a
/// log file gets plain text.
pub(crate) fn init_tracing() {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// The tokio runtime of a binary's `--threads`: 1 is a current-thread runtime (no
/// hand-off between threads on a request's path), 0 one worker per CPU (tokio's
/// default), any other number that many workers.
pub(crate) fn runtime(threads: u16) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(n))
            .enable_all()
            .build(),
    }
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a server that calls it before it listens cannot
/// be killed by a SIGTERM sent once it answers (the default action of a signal with no
/// handler yet).
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let listen = |kind: tokio::signal::unix::SignalKind, name: &'static str| {
        let signal = tokio::signal::unix::signal(kind);
        async move {
            match signal {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for {name}");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    #[cfg(unix)]
    let (ctrl_c, terminate) = (
        listen(tokio::signal::unix::SignalKind::interrupt(), "Ctrl-C"),
        listen(tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
    );
    #[cfg(not(unix))]
    let (ctrl_c, terminate) = (
        async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        },
        std::future::pending::<()>(),
    );
    async move {
        tokio::select! {
            () = ctrl_c => {}
            () = terminate => {}
        }
    }
}
