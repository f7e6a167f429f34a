//! The probes of orchestrators and load balancers, without a token and telling nothing
//! about the registry: `GET /healthz` (the process is alive: 200 `ok`, draining or not)
//! and `GET /readyz` (it can take requests: 200 `ok`, or 503 with an OpenAI-shaped
//! error while it drains or its store does not answer).

use virtual_llm_core::Gateway;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::{Reply, Response};

use crate::error::error_response;
use crate::openapi::E503;

/// `GET /healthz` and `GET /readyz`.
pub(crate) fn routes(gateway: Gateway) -> BoxedFilter<(Response,)> {
    let healthz = warp::path!("healthz").and(warp::get()).map(healthz);
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .then(move || readyz(gateway.clone()));
    healthz.or(readyz).unify().boxed()
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain")))]
pub(crate) fn healthz() -> Response {
    "ok".into_response()
}

/// `GET /readyz`: the gateway can take requests.
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain"), E503))]
pub(crate) async fn readyz(gateway: Gateway) -> Response {
    match gateway.ready().await {
        Ok(()) => "ok".into_response(),
        Err(e) => {
            tracing::debug!(error = %e, "not ready");
            // A store that fails is "not ready", not a server error: an orchestrator
            // takes the replica out of rotation meanwhile.
            let mut response = error_response(&e);
            if response.status().is_server_error() {
                *response.status_mut() = warp::http::StatusCode::SERVICE_UNAVAILABLE;
            }
            response
        }
    }
}
