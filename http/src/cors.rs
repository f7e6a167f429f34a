//! CORS for browser clients (a chat web app calling the gateway from its own origin):
//! off unless an embedder asks for it with [`with_cors`].

use virtual_llm_core::Error;
use virtual_llm_core::openai::REQUEST_TIMEOUT_HEADER;
use virtual_llm_core::protocol::SESSION_HEADER;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response};

/// `routes`, answering CORS preflights and marking answers for browser pages from
/// `origins` (`scheme://host[:port]` each, or `*` for any origin). Requests may carry
/// `Authorization`, `Content-Type` and `x-request-timeout`; pages may read
/// `Retry-After`, `x-completion-id` and the rate-limit headers. A preflight from
/// another origin is refused (403).
///
/// Fails with [`Error::InvalidConfig`] for an origin that is not one.
///
/// ```
/// # async fn run(gateway: virtual_llm_core::Gateway) {
/// let routes = virtual_llm_http::routes(gateway, []);
/// let origins = ["https://chat.example.com".to_owned()];
/// let routes = virtual_llm_http::with_cors(routes, &origins).expect("an origin");
/// # let _ = routes;
/// # }
/// ```
pub fn with_cors(
    routes: BoxedFilter<(Response,)>,
    origins: &[String],
) -> Result<BoxedFilter<(Response,)>, Error> {
    let mut cors = warp::cors()
        .allow_methods(["GET", "POST", "OPTIONS"])
        .allow_headers([
            "authorization",
            "content-type",
            REQUEST_TIMEOUT_HEADER,
            SESSION_HEADER,
        ])
        .expose_headers([
            "retry-after",
            "x-completion-id",
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ])
        .max_age(600);
    for origin in origins {
        if origin == "*" {
            cors = cors.allow_any_origin();
        } else {
            check_origin(origin)?;
            cors = cors.allow_origin(origin.as_str());
        }
    }
    Ok(routes.with(cors).map(Reply::into_response).boxed())
}

/// Checks `origins` as [`with_cors`] would, so that a binary can refuse a bad one
/// before it opens anything.
pub fn check_origins(origins: &[String]) -> Result<(), Error> {
    origins
        .iter()
        .filter(|o| o.as_str() != "*")
        .try_for_each(|o| check_origin(o))
}

/// `scheme://host[:port]`, http or https, nothing after: what a browser sends as
/// `Origin` (warp panics on anything else, so it is checked first).
fn check_origin(origin: &str) -> Result<(), Error> {
    let invalid = || Error::InvalidConfig {
        reason: format!(
            "CORS origin {origin:?} is not an origin: write scheme://host[:port], e.g. https://chat.example.com, or *"
        ),
        settings: vec!["corsOrigin"],
    };
    let (scheme, rest) = origin.split_once("://").ok_or_else(invalid)?;
    let host_ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !matches!(scheme, "http" | "https") || !host_ok {
        return Err(invalid());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => (host, Some(port)),
        _ => (rest, None),
    };
    if host.is_empty() || port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(invalid());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        for ok in [
            "https://chat.example.com",
            "http://127.0.0.1:3000",
            "http://localhost",
        ] {
            assert!(check_origin(ok).is_ok(), "{ok}");
        }
        for bad in [
            "chat.example.com",
            "ftp://x",
            "https://",
            "https://x/",
            "https://x:port",
            "https://a b",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}
