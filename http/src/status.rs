//! The status page, `GET /`: one self-contained HTML page (no build step, no external
//! asset, embedded in the binary) that shows the registry live — rows, pools, agents,
//! status, load, queue — by polling the JSON API (`GET {base}`, and `GET
//! /api/v1/agents` where the gateway has agents) with the token the user pastes, or
//! none on an open gateway. The page itself needs no token and holds no data: what it
//! shows, the API answers to the pasted token.

use http::HeaderValue;
use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use virtual_llm_core::Gateway;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::Response;

/// The page, with `{{BASE_PATH}}` where the gateway's base path goes.
const PAGE: &str = include_str!("status/page.html");

/// Scripts and styles are inline, and the page talks to its own origin only.
const POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`, for `gateway`'s base path.
pub(crate) fn route(gateway: &Gateway) -> BoxedFilter<(Response,)> {
    let page = bytes::Bytes::from(page(&gateway.config().base_path));
    warp::path::end()
        .and(warp::get())
        .map(move || status_page(page.clone()))
        .boxed()
}

/// The page for base path `base`.
fn page(base: &str) -> String {
    PAGE.replace("{{BASE_PATH}}", &escape(base.trim_end_matches('/')))
}

/// `text` safe inside an HTML attribute.
fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// `GET /`: the status page.
#[utoipa::path(get, path = "/", tag = "operations", security(()),
    responses((status = 200, description = "The status page: the registry, live, in a browser", body = String, content_type = "text/html")))]
pub(crate) fn status_page(page: bytes::Bytes) -> Response {
    let mut response = Response::new(page.into());
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_path_is_filled_in_escaped() {
        let page = page("/api/v1/llms/");
        assert!(page.contains(r#"content="/api/v1/llms""#));
        assert!(!page.contains("{{BASE_PATH}}"));
        assert!(super::page(r#"/x"><script>"#).contains("/x&quot;&gt;&lt;script&gt;"));
        // Self-contained: nothing is loaded from anywhere.
        for external in ["src=\"http", "href=\"http", "<link", "@import"] {
            assert!(!page.contains(external), "{external}");
        }
    }
}
