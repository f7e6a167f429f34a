//! Socket settings shared by both ends.
//!
//! tungstenite allocates its read buffer eagerly: the default 128 KiB per connection
//! would cost over 1 GiB of gateway memory for 10 000 idle publishers, so it is set
//! explicitly here. The gateway writes each frame as soon as it is sent (no write
//! buffer). The publisher's writer gathers the frames that are ready together and
//! flushes once per batch, so its socket buffers up to [`PUBLISHER_WRITE_BUFFER`]
//! between flushes; a frame still leaves at once when nothing else is ready.

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Read buffer per connection: enough for a typical frame in one read.
pub const READ_BUFFER: usize = 4 * 1024;

/// The publisher's write buffer: a batch of frames ready together is written with one
/// system call when it is flushed (a batch larger than this goes out in several).
pub const PUBLISHER_WRITE_BUFFER: usize = 64 * 1024;

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
