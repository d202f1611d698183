//! The operator's view of a job's queues, without the management plugin: how many messages and
//! consumers each holds (a passive declare tells), and deleting them all with the job's exchange
//! (`clean --queues`).

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

use super::{broker, connect, Topology};
use crate::{Job, TransportError};

/// One of the job's queues as the broker holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueState {
    /// Its name (`hopper.<job>.chunks`...).
    pub name: String,
    /// Messages ready and unacked; `None` when the queue does not exist.
    pub messages: Option<u32>,
    /// Consumers attached.
    pub consumers: u32,
}

/// Every queue of `job` (chunks, replies, dead, the delay queues), as the broker holds it.
///
/// # Errors
/// The broker cannot be reached, or refuses to answer.
pub async fn inspect(job: &Job) -> Result<Vec<QueueState>, TransportError> {
    let conn = connect(&job.broker_url, "hopper-admin", &job.broker_tls).await?;
    let states = inspect_on(&conn, job).await;
    let _ = conn.close(200, "done".into()).await;
    states
}

async fn inspect_on(conn: &Connection, job: &Job) -> Result<Vec<QueueState>, TransportError> {
    let topology = Topology::for_job(job);
    let mut states = Vec::new();
    for name in topology.all_queues() {
        // A passive declare of a missing queue closes its channel: a new one each time.
        let channel = conn
            .create_channel()
            .await
            .map_err(broker("open a channel", name))?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let state = match channel
            .queue_declare(name.into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => {
                // Closed before the connection is, which otherwise logs an error about it.
                let _ = channel.close(200, "done".into()).await;
                QueueState {
                    name: name.to_string(),
                    messages: Some(q.message_count()),
                    consumers: q.consumer_count(),
                }
            }
            Err(e) => match broker("look at the queue", name)(e) {
                TransportError::Rejected { code: 404, .. } => QueueState {
                    name: name.to_string(),
                    messages: None,
                    consumers: 0,
                },
                other => return Err(other),
            },
        };
        states.push(state);
    }
    Ok(states)
}

/// Deletes every queue of `job` that exists, messages included, and the job's exchange;
/// returns the names deleted.
///
/// # Errors
/// The broker cannot be reached, or refuses (a user without the configure right).
pub async fn delete(job: &Job) -> Result<Vec<String>, TransportError> {
    let conn = connect(&job.broker_url, "hopper-admin", &job.broker_tls).await?;
    let mut present: Vec<String> = inspect_on(&conn, job)
        .await?
        .into_iter()
        .filter(|q| q.messages.is_some())
        .map(|q| q.name)
        .collect();
    let channel = conn
        .create_channel()
        .await
        .map_err(broker("open a channel", "-"))?;
    for name in &present {
        channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(broker("delete the queue", name))?;
    }
    let exchange = Topology::for_job(job).exchange;
    if exchange_exists(&conn, &exchange).await? {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .map_err(broker("delete the exchange", &exchange))?;
        present.push(exchange);
    }
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(present)
}

/// Whether `exchange` exists (a passive declare, on a channel of its own: a missing one
/// closes it).
async fn exchange_exists(conn: &Connection, exchange: &str) -> Result<bool, TransportError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(broker("open a channel", exchange))?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    match channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            passive,
            FieldTable::default(),
        )
        .await
    {
        Ok(()) => {
            let _ = channel.close(200, "done".into()).await;
            Ok(true)
        }
        Err(e) => match broker("look at the exchange", exchange)(e) {
            TransportError::Rejected { code: 404, .. } => Ok(false),
            other => Err(other),
        },
    }
}
