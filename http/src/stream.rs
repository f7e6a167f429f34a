//! The client's side of a streamed chat completion, as OpenAI sends it: each chunk a
//! `data:` event, then `data: [DONE]`; a failure midway sends one `error` event with the
//! OpenAI error body and ends the stream, never hangs.

use futures::StreamExt;
use virtual_llm_core::ChunkStream;
use warp::reply::Response;
use warp::sse::Event;

use crate::reply::event_stream;

/// The response streaming `chunks` to the client.
pub(crate) fn chunk_stream(chunks: ChunkStream) -> Response {
    let events = futures::stream::unfold(Some(chunks), |state| async move {
        let mut chunks = state?;
        match chunks.next().await {
            Some(Ok(data)) => Some((Event::default().data(data), Some(chunks))),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "stream failed midway");
                let body = serde_json::to_string(&e.to_body()).unwrap_or_else(|_| "{}".to_owned());
                Some((Event::default().event("error").data(body), None))
            }
            None => Some((Event::default().data("[DONE]"), None)),
        }
    })
    .map(Ok::<_, std::convert::Infallible>);
    // warp wants a `Sync` body; the stream is only ever polled from one place.
    event_stream(warp::sse::reply(sync_wrapper::SyncStream::new(events)))
}
