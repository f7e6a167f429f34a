//! [`NatsError`]: why a replica could not join the plane.

/// Why [`NatsPlane::connect`](crate::NatsPlane::connect) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The options are not usable.
    #[error("invalid NATS options: {0}")]
    Options(String),
    /// The NATS server could not be reached, or refused the connection.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// The server's URL as given.
        url: String,
        /// What the client said.
        message: String,
    },
    /// The plane's subscriptions could not be made.
    #[error("cannot subscribe on NATS: {0}")]
    Subscribe(String),
}
