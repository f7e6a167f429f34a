//! Socket settings shared by both ends.
//!
//! tungstenite allocates its read buffer eagerly: the default 128 KiB per connection
//! would cost over 1 GiB of gateway memory for 10 000 idle publishers, so it is set
//! explicitly here. Both ends gather the frames that are ready together and flush
//! once per batch, so a socket buffers up to [`PUBLISHER_WRITE_BUFFER`] (the
//! publisher's) or [`GATEWAY_WRITE_BUFFER`] (the gateway's, per publisher) between
//! flushes; a frame still leaves at once when nothing else is ready. A write buffer
//! grows only as far as a batch needs it: a publisher never sent a task costs none.

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Read buffer per connection: enough for a typical frame in one read.
pub const READ_BUFFER: usize = 4 * 1024;

/// The publisher's write buffer: a batch of frames ready together is written with one
/// system call when it is flushed (a batch larger than this goes out in several).
pub const PUBLISHER_WRITE_BUFFER: usize = 64 * 1024;

/// The gateway's write buffer per publisher socket: the task frames, cancels and
/// credits ready together for one publisher leave with one system call up to this.
pub const GATEWAY_WRITE_BUFFER: usize = 16 * 1024;

/// Per-task flow control, negotiated on the upgrade: a publisher that honours `credit`
/// frames sends this header (any value); a gateway that grants them answers with it,
/// its value the window — how many results of one task may be unacknowledged. Either
/// side without it: no credits, and the gateway cuts off a task whose client falls a
/// whole buffer behind instead.
pub const CREDITS_HEADER: &str = "x-task-credits";

/// The gateway's settings for a publisher's socket whose frames may be at most
/// `max_frame` bytes: [`socket_config`] with the [`GATEWAY_WRITE_BUFFER`].
pub fn gateway_socket_config(max_frame: usize) -> WebSocketConfig {
    socket_config(max_frame)
        .write_buffer_size(GATEWAY_WRITE_BUFFER)
        // Above the write buffer (tungstenite requires it), by two frames.
        .max_write_buffer_size(GATEWAY_WRITE_BUFFER + max_frame.saturating_mul(2))
}

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
