//! The gateway served on worker runtimes (`ServeOptions::workers`, the reference
//! gateway's default): each connection and its tasks stay on one single-threaded
//! runtime, so a client's request and the publisher's session that answers it are
//! often on two threads. Whole answers, streams, many clients at once and a client
//! leaving mid-stream, on both transports.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;

use virtual_llm::Config;
use virtual_llm::http::{ServeOptions, Workers};
use virtual_llm::testkit::*;

/// A gateway whose connections are served on two workers (returned: they stop when
/// dropped).
async fn on_workers() -> (TestGateway, Workers) {
    let workers = Workers::start(2).unwrap();
    let mut options = ServeOptions::default();
    options.workers = workers.handles();
    (
        TestGateway::start_serving(Config::default(), options).await,
        workers,
    )
}

async fn many_clients_get_their_own_answers(t: &dyn Transport) {
    let (gw, _workers) = on_workers().await;
    transport_suite::clients_get_their_own_answers(&Arc::new(gw), t, 64).await;
}

async fn a_client_leaving_cancels_the_provider(t: &dyn Transport) {
    let (gw, _workers) = on_workers().await;
    transport_suite::a_client_leaving_cancels_its_task(&gw, t).await;
}

macro_rules! on_both_transports {
    ($($case:ident,)*) => {
        mod sse {
            use super::*;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(&SseTransport).await; } )*
        }
        mod ws {
            use super::*;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case(&WsTransport).await; } )*
        }
    };
}

on_both_transports! {
    many_clients_get_their_own_answers,
    a_client_leaving_cancels_the_provider,
}
