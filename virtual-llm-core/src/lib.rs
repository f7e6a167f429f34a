//! The core of virtual-llm: the registry lifecycle, task relay and protocol, with no
//! transport and no storage engine.
//!
//! A gateway embeds a [`Gateway`] over a [`Store`]; a transport (SSE, WebSocket) turns
//! HTTP requests and connections into calls on it and hands it a [`ChannelSink`] per
//! connected publisher. A publisher answers tasks with a [`Provider`].
//!
//! # Layout
//! - [`config`]: every timing and limit, with the defaults of the spec.
//! - [`error`]: the errors, the one mapping to HTTP status and OpenAI error bodies, and
//!   [`error::bounded`], the one way a message is cut to a length.
//! - [`access`]: who may see and call a row (SPEC §16).
//! - [`limits`]: limits per principal and the [`limits::RateLimiter`]; [`usage`]:
//!   token usage per principal and LLM (SPEC §16).
//! - [`agent`]: virtual agents, personas over a published model (SPEC §13).
//! - [`protocol`]: the wire types: register, hello, task, cancel, results, frames;
//!   [`raw_body`]: a client's body kept as its JSON text, read only at the top level.
//! - `record`, `name`, `ids`, `time`: rows, names, ids and wall-clock time.
//! - [`store`]: the [`Store`] trait; `memory`: the in-memory [`MemoryStore`].
//! - `gateway`, `lifecycle`, `relay`: the service: register, heartbeat, bind, GC
//!   sweep, restart recovery; infer and deliver.
//! - `shutdown`: the end of a graceful shutdown, waiting for the last unbinds.
//! - [`task`]: task correlation, deadlines, cancellation.
//! - [`completions`]: the completion log, streamed answers kept for their clients to
//!   resume (SPEC §15).
//! - [`channel`]: control channel sinks; `directory`: the [`ChannelDirectory`] seam
//!   (where each session's channel is, bind epochs) and its [`LocalDirectory`].
//! - [`router`]: the [`Router`] seam, which rows may answer a request, and
//!   [`router::choose`], which of them takes it; [`admission`]: the [`Admission`]
//!   seam, in-flight counts and the fair, bounded queue of each pool;
//!   `task_router`: the [`TaskRouter`] seam, results to tasks on other replicas.
//! - `wake`: the [`Waker`] seam and wake-on-demand: one wake per sleeping row,
//!   shared by the requests waiting for it, and the cooldown after a failed one.
//! - `gc`: the background GC task and its drop guard.
//! - [`metrics`]: what the core measures, through the `metrics` facade.
//! - [`publisher`]: the publisher's lifecycle (register, channel, heartbeats, task
//!   pump, reconnect), independent of the wire; `readiness`: what it knows of its
//!   upstreams (probes, wakes, idle sleeps); `recipe`: the [`Recipe`] seam (waking and
//!   putting to sleep an upstream) and the [`CommandRecipe`].
//! - [`session_file`]: the lock that keeps one publisher per session file.
//! - `auth`, `backend`, `provider`, `echo`, [`openai`]: the other seams, and the echo
//!   model.
//! - [`sync`]: taking a `std::sync` lock without spreading a poisoning panic; shared
//!   with the backends and transports.
//! - `testkit` (feature `testkit`): the Store conformance suite, a manual clock and a
//!   fake channel.

#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod access;
pub mod admission;
pub mod agent;
mod auth;
mod backend;
pub mod batch;
pub mod channel;
pub mod completions;
pub mod config;
mod directory;
mod echo;
pub mod error;
mod failover;
mod feed;
mod gateway;
mod gc;
mod ids;
pub mod lease;
mod lifecycle;
pub mod limits;
mod memory;
pub mod metrics;
mod name;
pub mod openai;
#[cfg(feature = "openapi")]
mod openapi;
pub mod protocol;
mod provider;
pub mod publisher;
mod quota;
pub mod raw_body;
mod readiness;
mod recipe;
mod record;
mod relay;
mod reply;
pub mod router;
pub mod session_file;
mod shutdown;
pub mod store;
pub mod sync;
pub mod task;
mod task_log;
mod task_router;
mod time;
pub mod usage;
pub mod view;
mod wake;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use admission::{Admission, LoadChanges, LocalAdmission, RowLoad, Slot};
pub use auth::{Authenticator, OpenAccess, Principal, Role, StaticTokens, bearer_token};
pub use backend::PublicBackend;
pub use channel::{ChannelSink, SendError};
pub use completions::CompletionLog;
pub use config::Config;
pub use directory::{BindToken, ChannelDirectory, LocalDirectory};
pub use echo::{EchoProvider, echo_embedding};
pub use error::{Error, StoreError, UnavailableKind};
pub use gateway::{Gateway, GatewayBuilder, LOCAL_REPLICA};
pub use gc::GcGuard;
pub use ids::{CompletionId, LlmId, MAX_ID_LEN, MAX_REPLICA_LEN, ReplicaId, SessionId, TaskId};
pub use lifecycle::{Binding, SweepReport, activated, deactivated};
pub use memory::MemoryStore;
pub use name::{LlmName, MAX_NAME_LEN};
pub use openai::InferRequest;
pub use protocol::TaskResult;
pub use provider::Provider;
pub use publisher::{Catalog, PublishedLlm, Publisher, PublisherOptions};
pub use raw_body::RawBody;
pub use recipe::{CommandRecipe, Recipe};
pub use record::{ChannelBinding, LlmKind, LlmRecord, LlmStatus, LlmView, Model};
pub use reply::{ChunkStream, Completion, Reply};
pub use router::{PoolRouter, Route, Router};
pub use session_file::{SessionFileError, SessionFileLock};
pub use store::{LeaseRenewal, RowChange, Store, Write};
pub use task::{TaskEvent, TaskHandle};
pub use task_router::{
    Delivery, HeldTask, LocalTaskRouter, RESULTS_PER_DELIVERY, TaskInbound, TaskRouter,
};
pub use time::{Clock, SystemClock, Timestamp};
pub use view::RegistryView;
pub use wake::{ChannelWaker, RecipeWaker, WakeTarget, Waker, Wakers};
