//! The channel directory conformance suite: one function per rule of the
//! [`ChannelDirectory`] contract.
//!
//! Single-replica cases take one directory; cross-replica cases take two directories
//! of different replicas over the same plane (a clustered directory). Run them with
//! [`directory_conformance_tests!`](crate::directory_conformance_tests) and
//! [`cluster_directory_conformance_tests!`](crate::cluster_directory_conformance_tests).

use std::sync::Arc;

use crate::protocol::{CancelFrame, GatewayFrame};
use crate::testkit::FakeChannel;
use crate::{ChannelDirectory, SendError, SessionId, TaskId};

fn cancel() -> GatewayFrame {
    GatewayFrame::Cancel(CancelFrame {
        task_id: TaskId::generate(),
    })
}

fn is_closing(frame: &GatewayFrame) -> bool {
    matches!(frame, GatewayFrame::Closing(_))
}

/// A bound session's frames reach its sink, in order; an unbound session's are
/// refused as closed.
pub fn bound_frames_reach_the_sink_in_order(dir: &dyn ChannelDirectory) {
    let session = SessionId::generate();
    assert_eq!(
        dir.send(&session, cancel()),
        Err(SendError::Closed),
        "no channel"
    );
    let sink = FakeChannel::new();
    let token = dir.bind(&session, Arc::new(sink.clone()));
    assert_eq!(token.session, session);
    assert_eq!(&token.binding.replica, dir.replica());
    let frames: Vec<GatewayFrame> = (0..5).map(|_| cancel()).collect();
    for f in &frames {
        dir.send(&session, f.clone())
            .expect("send to a bound session");
    }
    assert_eq!(sink.take(), frames, "every frame, in order");
    assert_eq!(dir.current(&session), Some(token.binding.clone()));
    assert!(dir.is_current(&token));
}

/// A full or closed sink says so; nothing waits.
pub fn a_full_or_closed_sink_is_reported(dir: &dyn ChannelDirectory) {
    let session = SessionId::generate();
    let sink = FakeChannel::new();
    dir.bind(&session, Arc::new(sink.clone()));
    sink.set_full(true);
    assert_eq!(dir.send(&session, cancel()), Err(SendError::Full));
    sink.set_full(false);
    sink.close();
    assert_eq!(dir.send(&session, cancel()), Err(SendError::Closed));
}

/// A second bind replaces the first, which is told to close; the old token's release
/// changes nothing, the new one's unbinds.
pub fn a_newer_bind_replaces_the_older(dir: &dyn ChannelDirectory) {
    let session = SessionId::generate();
    let (old_sink, new_sink) = (FakeChannel::new(), FakeChannel::new());
    let old = dir.bind(&session, Arc::new(old_sink.clone()));
    let new = dir.bind(&session, Arc::new(new_sink.clone()));
    assert!(
        new.binding.epoch > old.binding.epoch,
        "epochs grow: {old:?} then {new:?}"
    );
    let told = old_sink.take();
    assert!(
        told.len() == 1 && is_closing(&told[0]),
        "the older channel is told to close: {told:?}"
    );
    assert!(!dir.is_current(&old));
    assert!(!dir.release(&old), "a replaced bind's release is a no-op");
    dir.send(&session, cancel()).expect("still bound");
    assert_eq!(new_sink.take().len(), 1, "frames go to the newer channel");
    assert!(dir.release(&new));
    assert!(!dir.release(&new), "a release happens once");
    assert_eq!(dir.current(&session), None);
    assert_eq!(dir.send(&session, cancel()), Err(SendError::Closed));
}

/// `local_channels` counts this replica's channels; `close_local` tells each to close.
pub fn close_local_tells_every_channel(dir: &dyn ChannelDirectory) {
    let before = dir.local_channels();
    let sinks: Vec<FakeChannel> = (0..3).map(|_| FakeChannel::new()).collect();
    for s in &sinks {
        dir.bind(&SessionId::generate(), Arc::new(s.clone()));
    }
    assert_eq!(dir.local_channels(), before + 3);
    assert_eq!(dir.close_local("bye"), before + 3);
    for s in &sinks {
        let frames = s.take();
        assert!(
            frames.len() == 1 && is_closing(&frames[0]),
            "each channel hears closing: {frames:?}"
        );
    }
}

/// The next frame `sink` receives, within 10 s (a bound for a frame that never
/// comes, not a delay).
async fn arrives(sink: &FakeChannel, what: &str) -> GatewayFrame {
    tokio::time::timeout(std::time::Duration::from_secs(10), sink.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no frame within 10 s"))
}

/// Across replicas: a channel bound on `a` is known to `b` once `a` has settled and
/// reached from `b`, frames in order; a bind on `b` replaces it (and `a`'s channel is
/// told to close); `a`'s late release cannot unbind `b`'s; once `b` released and
/// settled, `a` knows of no channel.
pub async fn a_channel_is_reached_and_replaced_across_replicas(
    a: &dyn ChannelDirectory,
    b: &dyn ChannelDirectory,
) {
    assert_ne!(a.replica(), b.replica(), "two replicas");
    let session = SessionId::generate();
    let on_a = FakeChannel::new();
    let token_a = a.bind(&session, Arc::new(on_a.clone()));
    a.settled().await;
    assert_eq!(b.current(&session), Some(token_a.binding.clone()));
    let frames: Vec<GatewayFrame> = (0..5).map(|_| cancel()).collect();
    for f in &frames {
        b.send(&session, f.clone()).expect("b reaches a's channel");
    }
    for f in &frames {
        assert_eq!(&arrives(&on_a, "a frame sent from b").await, f, "in order");
    }
    assert_eq!(a.local_channels(), 1);
    assert_eq!(b.local_channels(), 0, "b holds none");
    let on_b = FakeChannel::new();
    let token_b = b.bind(&session, Arc::new(on_b.clone()));
    assert!(token_b.binding.epoch > token_a.binding.epoch, "epochs grow");
    b.settled().await;
    let told = arrives(&on_a, "the replaced channel").await;
    assert!(is_closing(&told), "a's channel is told to close: {told:?}");
    assert_eq!(a.local_channels(), 0, "a holds none any more");
    assert!(!a.is_current(&token_a));
    assert!(!a.release(&token_a), "a's late release changes nothing");
    assert_eq!(a.current(&session), Some(token_b.binding.clone()));
    let frame = cancel();
    a.send(&session, frame.clone())
        .expect("a reaches b's channel");
    assert_eq!(arrives(&on_b, "a frame sent from a").await, frame);
    assert!(b.release(&token_b));
    b.settled().await;
    assert_eq!(a.current(&session), None);
    assert_eq!(
        a.send(&session, cancel()),
        Err(SendError::Closed),
        "no channel"
    );
    assert!(
        on_a.take().is_empty() && on_b.take().is_empty(),
        "nothing more"
    );
}

/// Stamps out one test per single-replica case of the channel directory suite.
/// `$setup` is an async fn returning something that dereferences to a
/// [`ChannelDirectory`](crate::ChannelDirectory); each test runs on a Tokio runtime
/// (a clustered directory's plane runs in the background). With `if = $ready` (a fn
/// returning `bool`), each test returns at once when it is `false`: a plane whose
/// server is not installed (the fn prints why).
#[macro_export]
macro_rules! directory_conformance_tests {
    ($setup:path) => {
        $crate::directory_conformance_tests!($setup, if = $crate::testkit::store_suite::always);
    };
    ($setup:path, if = $ready:path) => {
        $crate::directory_conformance_tests!(@cases $setup, $ready;
            bound_frames_reach_the_sink_in_order,
            a_full_or_closed_sink_is_reported,
            a_newer_bind_replaces_the_older,
            close_local_tells_every_channel,
        );
    };
    (@cases $setup:path, $ready:path; $($case:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                if !$ready() {
                    return;
                }
                let directory = $setup().await;
                $crate::testkit::directory_suite::$case(&*directory);
            }
        )*
    };
}

/// Stamps out the single-replica cases for the first directory of `$setup`, and the
/// cross-replica cases for the pair. `$setup` is an async fn returning two
/// directories of different replicas over one plane; `if = $ready` as for
/// [`directory_conformance_tests!`](crate::directory_conformance_tests).
#[macro_export]
macro_rules! cluster_directory_conformance_tests {
    ($setup:path) => {
        $crate::cluster_directory_conformance_tests!(
            $setup,
            if = $crate::testkit::store_suite::always
        );
    };
    ($setup:path, if = $ready:path) => {
        mod single_replica {
            use super::*;
            async fn first() -> std::sync::Arc<dyn $crate::ChannelDirectory> {
                $setup().await.0
            }
            $crate::directory_conformance_tests!(first, if = $ready);
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_channel_is_reached_and_replaced_across_replicas() {
            if !$ready() {
                return;
            }
            let (a, b) = $setup().await;
            $crate::testkit::directory_suite::a_channel_is_reached_and_replaced_across_replicas(
                &*a, &*b,
            )
            .await;
        }
    };
}
