//! Wake and sleep recipes (SPEC §12): what a publisher runs to wake a sleeping upstream
//! or put an idle one to sleep. A [`Recipe`] is a seam; [`CommandRecipe`] runs a
//! program (`{"command": ["systemctl", "--user", "start", "vllm"]}`), and the
//! OpenAI crate's `UrlRecipe` calls a URL (vLLM's `POST /wake_up`, a webhook).
//!
//! A recipe only takes the action. Whether the upstream then answers is the
//! publisher's business: it probes the [`Provider`](crate::Provider) until it is ready
//! or the LLM's ready timeout passes.

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::Error;

/// Wakes a sleeping upstream or puts an idle one to sleep.
///
/// # Contract
/// - `run` returns `Ok` once the action was taken: the command exited 0, the URL
///   answered 2xx. It need not wait until the upstream answers; the publisher probes
///   for that.
/// - An `Err` is one line saying why, which the gateway shows the clients that waited
///   for the wake (`wake_failed`): a command's exit status and the last line of its
///   stderr, a URL's HTTP status. It names no secret: no API key, no header value, no
///   URL that may carry a token.
/// - Dropping the future stops the work: a command is killed, a request aborted. The
///   publisher bounds a run by the LLM's ready timeout that way.
/// - The publisher never runs two recipes of one LLM at once; recipes of different
///   LLMs may run concurrently.
#[async_trait]
pub trait Recipe: fmt::Debug + Send + Sync + 'static {
    /// Takes the action; `Err` says why it failed, in one line.
    async fn run(&self) -> Result<(), String>;
}

/// The most of a command's stderr kept: enough for its last lines.
const STDERR_TAIL: usize = 4096;
/// The longest last line of stderr quoted in a failure, in characters.
const MAX_QUOTED_LINE: usize = 240;
/// How long stderr is still read after the command exited: a process it left running
/// in the background (a daemon it started) may hold stderr open for ever.
const STDERR_GRACE: Duration = Duration::from_millis(500);

/// A recipe that runs a program: `argv[0]` with the rest as its arguments, no shell.
///
/// Its stdin and stdout are empty and discarded; the last few KiB of its stderr are
/// kept, so that a failure can quote stderr's last line. A non-zero exit fails with
/// `exit status N: <last line of stderr>`; a program that cannot be started fails with
/// `cannot run <program>: <why>`. Dropping the run kills the program (not what it
/// started in the background).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use virtual_llm_core::{CommandRecipe, Recipe};
///
/// let ok = CommandRecipe::new(["true"]).unwrap();
/// assert_eq!(ok.run().await, Ok(()));
/// let fails = CommandRecipe::new(["sh", "-c", "echo 'no such unit' >&2; exit 5"]).unwrap();
/// assert_eq!(fails.run().await, Err("exit status 5: no such unit".to_owned()));
/// # });
/// ```
#[derive(Clone)]
pub struct CommandRecipe {
    program: String,
    args: Vec<String>,
}

impl fmt::Debug for CommandRecipe {
    /// The program only: arguments may carry secrets (a token passed to `curl`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandRecipe")
            .field("program", &self.program)
            .field("args", &format_args!("[{} hidden]", self.args.len()))
            .finish()
    }
}

impl CommandRecipe {
    /// A recipe running `argv`: the program, then its arguments.
    ///
    /// Fails with [`Error::InvalidRequest`] when `argv` is empty or names no program.
    pub fn new<I, S>(argv: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut argv = argv.into_iter().map(Into::into);
        let program = argv
            .next()
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| Error::invalid("a command recipe must name a program"))?;
        Ok(CommandRecipe {
            program,
            args: argv.collect(),
        })
    }

    /// The program it runs.
    pub fn program(&self) -> &str {
        &self.program
    }
}

#[async_trait]
impl Recipe for CommandRecipe {
    async fn run(&self) -> Result<(), String> {
        tracing::debug!(program = %self.program, "running a recipe command");
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        let mut tail = Tail::default();
        let status = match child.stderr.take() {
            Some(mut stderr) => {
                let mut buf = [0u8; 1024];
                let mut open = true;
                let status = loop {
                    tokio::select! {
                        status = child.wait() => break status,
                        read = stderr.read(&mut buf), if open => match read {
                            Ok(0) | Err(_) => open = false,
                            Ok(n) => tail.push(&buf[..n]),
                        },
                    }
                };
                if open {
                    // What it wrote just before it exited.
                    let drain = async {
                        while let Ok(n @ 1..) = stderr.read(&mut buf).await {
                            tail.push(&buf[..n]);
                        }
                    };
                    if tokio::time::timeout(STDERR_GRACE, drain).await.is_err() {
                        tracing::debug!(program = %self.program, "stderr still open after exit; something it started holds it");
                    }
                }
                status
            }
            None => child.wait().await,
        }
        .map_err(|e| format!("cannot wait for {}: {e}", self.program))?;
        if status.success() {
            return Ok(());
        }
        let how = exit_description(status);
        Err(match tail.last_line() {
            Some(line) => format!("{how}: {line}"),
            None => how,
        })
    }
}

/// `exit status N`, or how else the program ended (a signal).
fn exit_description(status: std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(signal) = status.signal() {
            return format!("killed by signal {signal}");
        }
    }
    status.to_string()
}

/// The last bytes of a stream.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > STDERR_TAIL {
            let cut = self.0.len() - STDERR_TAIL;
            self.0.drain(..cut);
        }
    }

    /// The last line with something in it, without control characters, bounded.
    fn last_line(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.0);
        let line = text
            .lines()
            .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
            .map(|l| l.trim().to_owned())
            .rfind(|l| !l.is_empty())?;
        Some(crate::error::bounded(line, MAX_QUOTED_LINE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_line_bounded_and_clean() {
        let mut tail = Tail::default();
        assert_eq!(tail.last_line(), None);
        tail.push(b"first\nsecond\x1b[0m\r\n\n  \n");
        assert_eq!(tail.last_line().as_deref(), Some("second[0m"));
        tail.push(&vec![b'x'; 10 * STDERR_TAIL]);
        assert_eq!(tail.0.len(), STDERR_TAIL);
        assert!(tail.last_line().unwrap().chars().count() <= MAX_QUOTED_LINE);
    }

    #[test]
    fn a_command_names_a_program_and_hides_its_arguments() {
        assert!(CommandRecipe::new(Vec::<String>::new()).is_err());
        assert!(CommandRecipe::new([" "]).is_err());
        let recipe = CommandRecipe::new(["curl", "-H", "Authorization: Bearer sk-secret"]).unwrap();
        assert_eq!(recipe.program(), "curl");
        let shown = format!("{recipe:?}");
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(shown.contains("curl"), "{shown}");
    }
}
