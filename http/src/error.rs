//! The one place a [`virtual_llm_core::Error`] becomes an HTTP response: its status,
//! `Retry-After`, `WWW-Authenticate` and (for `rate_limited`) `x-ratelimit-*` headers
//! and OpenAI-shaped body all come from
//! the core's one mapping ([`Error::status`], [`Error::response_headers`],
//! [`Error::to_body`]), so no route, transport or embedder decides a status of its own
//! and no internal detail reaches a response body. Requests no route matched are
//! answered here too ([`recover`]).

use std::convert::Infallible;

use http::header::HeaderValue;
use virtual_llm_core::Error;
use virtual_llm_core::error::Escaped;
use virtual_llm_core::limits::{RateWindow, reset_text};
use warp::Rejection;
use warp::reply::Response;

use crate::reply;

/// The OpenAI-shaped error response for `error`: its status, `Retry-After` and
/// `WWW-Authenticate` headers, and body `{"error":{"message","type","code"}}`. For
/// transports' and embedders' own routes too.
///
/// ```
/// use virtual_llm_core::Error;
///
/// let response = virtual_llm_http::error_response(&Error::Unauthenticated);
/// assert_eq!(response.status(), 401);
/// assert!(response.headers().contains_key("www-authenticate"));
/// ```
pub fn error_response(error: &Error) -> Response {
    let status = logged(error);
    let mut response = reply::json(status, &error.to_body());
    for (name, value) in error.response_headers() {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    if let Error::RateLimited {
        requests, tokens, ..
    } = error
    {
        rate_limit_headers(&mut response, "requests", *requests);
        rate_limit_headers(&mut response, "tokens", *tokens);
    }
    response
}

/// Logs `error` as every answer made of one is logged (a failure as a warning, a
/// refusal at debug level), and returns its status.
pub(crate) fn logged(error: &Error) -> u16 {
    let status = error.status();
    if status >= 500 {
        tracing::warn!(%status, error = %Escaped(error), "request failed");
    } else {
        tracing::debug!(%status, error = %Escaped(error), "request refused");
    }
    status
}

/// The OpenAI headers of one per-minute limit (`what`: `requests` or `tokens`):
/// `x-ratelimit-limit-{what}`, `x-ratelimit-remaining-{what}` and
/// `x-ratelimit-reset-{what}` (`1m30s`, `250ms`); none when the caller has no such
/// limit.
fn rate_limit_headers(response: &mut Response, what: &str, window: Option<RateWindow>) {
    let Some(window) = window else {
        return;
    };
    let values = [
        ("limit", window.limit.to_string()),
        ("remaining", window.remaining.to_string()),
        ("reset", reset_text(window.reset)),
    ];
    for (field, value) in values {
        let name = format!("x-ratelimit-{field}-{what}");
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
}

/// Either side of a handler: the response, from `Ok`, or the [`error_response`] of the
/// error.
pub fn respond(result: Result<Response, Error>) -> Response {
    result.unwrap_or_else(|e| error_response(&e))
}

/// The answer to a request no route took, for `.recover(recover)` once at the end of a
/// filter chain: OpenAI-shaped 404 or 405; or, for a route that matched but whose
/// header could not be read (not visible ASCII), 401 for `Authorization` (it holds no
/// token we issued), else 400. Checked first: only a route whose path and method
/// matched reads headers.
pub async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if let Some(header) = rejection.find::<warp::reject::InvalidHeader>() {
        if header.name().eq_ignore_ascii_case("authorization") {
            Error::Unauthenticated
        } else {
            Error::invalid(format!("the {} header is not valid", header.name()))
        }
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        Error::MethodNotAllowed
    } else {
        Error::NoRoute {
            what: "this path".to_owned(),
        }
    };
    Ok(error_response(&error))
}
