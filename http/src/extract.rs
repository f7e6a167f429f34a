//! What a route reads from a request before it calls the core, shared by every route
//! of this crate and by the transports' control-channel routes: the base path, the
//! caller's [`Principal`] from `Authorization: Bearer`, and the publisher's session
//! from [`SESSION_HEADER`].
//!
//! # Example
//!
//! A control-channel route as a transport writes it: under the gateway's base path,
//! authenticated, answering errors the one way ([`error_response`](crate::error_response)).
//!
//! ```
//! use virtual_llm_core::{Error, Gateway, Role};
//! use virtual_llm_http::{authorization, base_path, principal, respond};
//! use warp::Filter;
//! use warp::filters::BoxedFilter;
//! use warp::reply::{Reply, Response};
//!
//! fn route(gateway: Gateway) -> BoxedFilter<(Response,)> {
//!     base_path(&gateway.config().base_path)
//!         .and(warp::path!("_provider-carrier-pigeon"))
//!         .and(warp::get())
//!         .and(warp::any().map(move || gateway.clone()))
//!         .and(authorization())
//!         .then(|gateway: Gateway, authorization: Option<String>| async move {
//!             respond(async {
//!                 let who = principal(&gateway, authorization.as_deref()).await?;
//!                 who.require(Role::Publisher)?;
//!                 Ok("coo".into_response())
//!             }.await)
//!         })
//!         .boxed()
//! }
//! ```

use virtual_llm_core::protocol::SESSION_HEADER;
use virtual_llm_core::{Error, Gateway, Principal, SessionId, bearer_token};
use warp::Filter;
use warp::filters::BoxedFilter;

/// A filter matching the segments of `base` (e.g. `/api/v1/llms`), for the routes
/// mounted under the gateway's configured base path.
pub fn base_path(base: &str) -> BoxedFilter<()> {
    base.split('/')
        .filter(|s| !s.is_empty())
        .fold(warp::any().boxed(), |filter, segment| {
            filter.and(warp::path(segment.to_owned())).boxed()
        })
}

/// The `Authorization` header as sent, if any; [`principal`] reads the token in it.
///
/// A header that is not visible ASCII is rejected, and [`recover`](crate::recover)
/// answers that rejection with 401.
pub fn authorization() -> BoxedFilter<(Option<String>,)> {
    warp::header::optional::<String>("authorization").boxed()
}

/// Who is calling: the gateway's `Authenticator` asked about the bearer token in
/// `authorization` (the header's value). 401 without a valid token.
pub async fn principal(gateway: &Gateway, authorization: Option<&str>) -> Result<Principal, Error> {
    gateway
        .authenticate(authorization.and_then(bearer_token))
        .await
}

/// The [`SESSION_HEADER`] as sent, if any; [`session_id`] parses it.
pub fn session_header() -> BoxedFilter<(Option<String>,)> {
    warp::header::optional::<String>(SESSION_HEADER).boxed()
}

/// The publisher's session named by [`SESSION_HEADER`]: 400 when it is missing or not
/// a session id.
pub fn session_id(header: Option<&str>) -> Result<SessionId, Error> {
    let header =
        header.ok_or_else(|| Error::invalid(format!("the {SESSION_HEADER} header is required")))?;
    SessionId::parse(header)
}

/// The LLM name a route takes from the path's remaining segments (names may contain
/// `/`, SPEC §17): all of them, or with `suffix` all but a last segment equal to it
/// (`{base}/{name...}/infer`). Percent-decoded, so `meta-llama%2FLlama-3.1` is
/// `meta-llama/Llama-3.1`; the core checks the name. No segments left: not this
/// route (404).
pub(crate) fn name_tail(suffix: Option<&'static str>) -> BoxedFilter<(String,)> {
    warp::path::tail()
        .and_then(move |tail: warp::path::Tail| async move {
            let raw = tail.as_str();
            let raw = match suffix {
                None => raw,
                Some(suffix) => raw
                    .strip_suffix(suffix)
                    .and_then(|rest| rest.strip_suffix('/'))
                    .unwrap_or_default(),
            };
            if raw.is_empty() {
                return Err(warp::reject::not_found());
            }
            Ok(percent_encoding::percent_decode_str(raw)
                .decode_utf8_lossy()
                .into_owned())
        })
        .boxed()
}
