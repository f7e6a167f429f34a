//! Successful answers: JSON bodies, complete answers (with an upstream's
//! `Retry-After`), `204 No Content`, and the headers every event stream carries.
//! Errors are answered in `error`; the client's chat-completion stream is built in
//! `stream`.

use http::StatusCode;
use http::header::{HeaderValue, RETRY_AFTER};
use serde::Serialize;
use virtual_llm_core::Completion;
use warp::reply::{Reply, Response};

/// A JSON body with `status`.
pub(crate) fn json<T: Serialize>(status: u16, body: &T) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// A complete answer: its status and body, and its `Retry-After` (whole seconds) when
/// it carries one (an upstream's own 503 passed through).
pub(crate) fn completion(answer: &Completion) -> Response {
    let mut response = json(answer.status, &answer.body);
    if let Some(secs) = answer.retry_after_secs() {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// `204 No Content`.
pub(crate) fn no_content() -> Response {
    warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response()
}

/// `reply` with the headers every event stream carries (`Cache-Control: no-cache`,
/// `X-Accel-Buffering: no`), so that proxies neither buffer nor cache it. For a
/// transport's control stream too.
pub fn event_stream(reply: impl Reply) -> Response {
    let mut response = reply.into_response();
    let headers = response.headers_mut();
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
