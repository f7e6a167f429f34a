//! Socket settings shared by both ends.
//!
//! tungstenite allocates its read buffer eagerly: the default 128 KiB per connection
//! would cost over 1 GiB of gateway memory for 10 000 idle publishers, so it is set
//! explicitly here. Frames are written as soon as they are sent (no write batching):
//! each streamed token should leave at once.

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Read buffer per connection: enough for a typical frame in one read.
pub const READ_BUFFER: usize = 4 * 1024;

/// The WebSocket settings for a connection whose frames may be at most `max_frame`
/// bytes (the gateway's body limit).
pub fn socket_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(max_frame.saturating_mul(2).max(READ_BUFFER))
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}
