//! The raw side: plain lapin over the same bytes, the floor Hopper is measured against.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;

use crate::cpu::Cpu;
use crate::{Shape, CHUNK_ITEMS, CONSUMERS};

/// One raw run: its wall time and the CPU the broker and the clients (this process) spent.
pub(crate) struct RawRun {
    pub(crate) took: Duration,
    pub(crate) cpu: Cpu,
}

/// Raw lapin: the same lines, cut into the same messages, through a quorum queue.
pub(crate) async fn raw(url: &str, input: &Path, shape: Shape) -> Result<RawRun> {
    let broker = crate::cpu::broker_pid();
    let queue = format!("hopper-bench-raw-{}", std::process::id());
    let setup = lapin::Connection::connect(url, Default::default()).await?;
    let ch = setup.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
        .await?;

    let text = std::fs::read(input)?;
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let messages = lines.len().div_ceil(CHUNK_ITEMS);

    crate::cpu::broker_quiet(broker.as_deref()).await;
    let started = Instant::now();
    let cpu_start = Cpu::now(broker.as_deref());
    let mut consumers = Vec::new();
    let per = messages; // each consumer stops when the shared count reaches `messages`
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    for i in 0..CONSUMERS {
        let conn = lapin::Connection::connect(url, Default::default()).await?;
        let c = conn.create_channel().await?;
        c.basic_qos(shape.prefetch, BasicQosOptions::default())
            .await?;
        let mut stream = c
            .basic_consume(
                queue.as_str().into(),
                format!("bench-{i}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let count = count.clone();
        let done = done_tx.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(d)) = stream.next().await {
                // Like a consumer that looks at its payload: count the lines.
                let _lines = d.data.iter().filter(|b| **b == b'\n').count();
                if d.ack(BasicAckOptions::default()).await.is_err() {
                    break;
                }
                if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == per {
                    let _ = done.send(()).await;
                }
            }
            drop(conn);
        }));
    }

    let pub_conn = lapin::Connection::connect(url, Default::default()).await?;
    let p = pub_conn.create_channel().await?;
    p.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut confirms = FuturesUnordered::new();
    let mut buf = Vec::with_capacity(CHUNK_ITEMS * 256);
    for chunk in lines.chunks(CHUNK_ITEMS) {
        while confirms.len() >= shape.window {
            let c: lapin::Result<lapin::Confirmation> =
                confirms.next().await.context("a confirm")?;
            if !c?.is_ack() {
                bail!("raw publish nacked");
            }
        }
        buf.clear();
        for l in chunk {
            buf.extend_from_slice(l);
            buf.push(b'\n');
        }
        let confirm = p
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &buf,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        confirms.push(confirm);
    }
    while let Some(c) = confirms.next().await {
        if !c?.is_ack() {
            bail!("raw publish nacked");
        }
    }
    tokio::time::timeout(Duration::from_secs(600), done_rx.recv())
        .await
        .context("raw consumers did not finish")?;
    let took = started.elapsed();
    let cpu = Cpu::now(broker.as_deref()).since(cpu_start);
    for c in consumers {
        c.abort();
    }
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(RawRun { took, cpu })
}
