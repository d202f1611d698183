//! The in-process transport against its contract: prefetch, redelivery, delays, stopping.

use super::*;
use futures::StreamExt;
use std::time::Duration;

fn job() -> Job {
    let dir = std::env::temp_dir();
    let text = "name = \"local-test\"\n[broker]\nurl = \"amqp://127.0.0.1:1\"\n\
                [source]\nkind = \"file\"\npath = \"x.jsonl\"\n[processor]\nkind = \"noop\"\n\
                [retry]\nbackoff = \"10ms..10ms\"\n";
    Job::parse(&dir.join("job.toml"), text, &|_| None).expect("job")
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("within 5 s")
}

#[tokio::test]
async fn prefetch_bounds_what_is_in_hand_and_acks_free_room() {
    let broker = LocalBroker::new(&job());
    let (a, b) = (broker.transport(), broker.transport());
    for i in 0..3u8 {
        within(
            a.publish(Route::Chunks, &[i], &Label::default())
                .await
                .expect("publish"),
        )
        .await
        .expect("confirmed");
    }
    let mut inbox = b.receive(Route::Chunks, 2).await.expect("receive");
    let first = within(inbox.next()).await.expect("one").expect("ok");
    let second = within(inbox.next()).await.expect("two").expect("ok");
    assert_eq!((first.payload[0], second.payload[0]), (0, 1));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), inbox.next())
            .await
            .is_err(),
        "a third message waits for room"
    );
    second.ack_through().await.expect("ack");
    let third = within(inbox.next()).await.expect("three").expect("ok");
    assert_eq!(third.payload[0], 2);
}

#[tokio::test]
async fn unsettled_messages_come_again_when_their_receiver_goes() {
    let broker = LocalBroker::new(&job());
    let t = broker.transport();
    let confirm = t
        .publish(Route::Chunks, b"x", &Label::default())
        .await
        .expect("publish");
    within(confirm).await.expect("confirmed");
    let mut inbox = t.receive(Route::Chunks, 4).await.expect("receive");
    let m = within(inbox.next()).await.expect("one").expect("ok");
    assert!(!m.redelivered);
    drop(inbox);
    let mut again = broker
        .transport()
        .receive(Route::Chunks, 4)
        .await
        .expect("receive");
    let m = within(again.next()).await.expect("again").expect("ok");
    assert!(m.redelivered);
    m.give_back().await.expect("give back");
    let m = within(again.next()).await.expect("once more").expect("ok");
    assert_eq!(m.payload, b"x");
}

#[tokio::test]
async fn a_retried_chunk_comes_back_after_its_delay_and_stopping_ends_an_inbox() {
    let broker = LocalBroker::new(&job());
    let t = broker.transport();
    let confirm = t
        .publish(Route::Delay { next: 2 }, b"r", &Label::default())
        .await
        .expect("publish");
    within(confirm).await.expect("confirmed");
    let mut inbox = t.receive(Route::Chunks, 1).await.expect("receive");
    let m = within(inbox.next()).await.expect("back").expect("ok");
    assert_eq!(m.payload, b"r");
    m.ack().await.expect("ack");
    t.stop_receiving().await;
    assert!(within(inbox.next()).await.is_none());
}
