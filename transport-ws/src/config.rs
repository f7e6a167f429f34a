//! Socket settings shared by both ends.
//!
//! tungstenite allocates its read buffer eagerly: the default 128 KiB per connection
//! would cost over 1 GiB of gateway memory for 10 000 idle publishers, so it is set
//! explicitly here. Frames are written as soon as they are sent (no write batching):
//! each streamed token should leave at once.

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Read buffer per connection: enough for a typical frame in one read.
pub const READ_BUFFER: usize = 4 * 1024;

/// Per-task flow control, negotiated on the upgrade: a publisher that honours `credit`
/// frames sends this header (any value); a gateway that grants them answers with it,
/// its value the window — how many results of one task may be unacknowledged. Either
/// side without it: no credits, and the gateway cuts off a task whose client falls a
/// whole buffer behind instead.
pub const CREDITS_HEADER: &str = "x-task-credits";

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
