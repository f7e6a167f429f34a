//! Turning the core's answers into HTTP responses: JSON bodies, OpenAI-shaped errors
//! (status, `Retry-After`, `WWW-Authenticate` from the core's one mapping), and the
//! OpenAI streaming format (`data:` chunks, `data: [DONE]`, an `error` event on
//! failure).

use futures::StreamExt;
use http::StatusCode;
use http::header::HeaderValue;
use serde::Serialize;
use virtual_llm_core::{ChunkStream, Error};
use warp::reply::{Reply, Response};
use warp::sse::Event;

/// A JSON body with `status`.
pub(crate) fn json<T: Serialize>(status: u16, body: &T) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// `204 No Content`.
pub(crate) fn no_content() -> Response {
    warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response()
}

/// The OpenAI-shaped error response for `error`: its status, `Retry-After` and
/// `WWW-Authenticate` headers, and body. For embedders' own routes too.
pub fn error(error: &Error) -> Response {
    let status = error.status();
    if status >= 500 {
        tracing::warn!(%status, error = %error, "request failed");
    } else {
        tracing::debug!(%status, error = %error, "request refused");
    }
    let mut response = json(status, &error.to_body());
    for (name, value) in error.response_headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// Either side of a handler: the response, from `Ok` or from the error.
pub(crate) fn respond(result: Result<Response, Error>) -> Response {
    result.unwrap_or_else(|e| error(&e))
}

/// A chat-completion stream as OpenAI sends it: each chunk a `data:` event, then
/// `data: [DONE]`; a failure midway sends one `error` event and closes, never hangs.
pub(crate) fn chunk_stream(chunks: ChunkStream) -> Response {
    let events = futures::stream::unfold(Some(chunks), |state| async move {
        let mut chunks = state?;
        match chunks.next().await {
            Some(Ok(data)) => Some((Event::default().data(data), Some(chunks))),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "stream failed midway");
                let body = serde_json::to_string(&e.to_body()).unwrap_or_else(|_| "{}".to_owned());
                Some((Event::default().event("error").data(body), None))
            }
            None => Some((Event::default().data("[DONE]"), None)),
        }
    })
    .map(Ok::<_, std::convert::Infallible>);
    // warp wants a `Sync` body; the stream is only ever polled from one place.
    event_stream(warp::sse::reply(sync_wrapper::SyncStream::new(events)))
}

/// Headers every event stream carries, so proxies neither buffer nor cache it.
pub(crate) fn event_stream(reply: impl Reply) -> Response {
    let mut response = reply.into_response();
    let headers = response.headers_mut();
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
