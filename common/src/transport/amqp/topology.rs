//! The exchange and queues of one job, by name, and how they are declared.
//!
//! | name | what |
//! |---|---|
//! | `hopper.<job>.exchange` | direct exchange every message of the job is published to, routed by queue name; each queue below is bound to it by its own name |
//! | `hopper.<job>.chunks` | quorum queue the consumers read; a chunk past its delivery limit is dead-lettered to `replies` |
//! | `hopper.<job>.retry.<delay>` | one quorum delay queue per backoff delay (per-queue TTL), dead-lettering back to `chunks` |
//! | `hopper.<job>.replies` | quorum queue the dispatcher reads: replies, and chunks the broker dead-lettered |
//! | `hopper.<job>.dead` | quorum queue for chunks that exhausted retries or could not be decoded |
//!
//! Delay queues use a per-queue TTL, one queue per delay: per-message TTLs only expire at the
//! head of a queue, so one queue with mixed delays would hold short delays behind long ones.
//!
//! Dead-lettering is at least once (RabbitMQ 3.10+), so no chunk is lost moving between queues.
//!
//! Everything goes through the job's own exchange, never the default one: RabbitMQ grants
//! publishing per exchange, and a right to write to `amq.default` is a right to write to every
//! queue of the virtual host. With the exchange, a user whose rights stop at `hopper.<job>.`
//! can run the job and nothing else (`config/rabbitmq/hopper-users.sh`).
//!
//! Declaring is idempotent and both sides do it, so dispatcher and consumers can start in any
//! order. The queue arguments depend on nothing in the job file but the delays, which name their
//! queues: RabbitMQ refuses a re-declaration whose arguments differ, and a changed job file must
//! not make that happen.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::broker;
use crate::job::Job;
use crate::TransportError;

/// Deliveries of one chunk message (crashes of the consumers holding it) before the quorum queue
/// dead-letters it, so a message that kills consumers cannot loop forever. Set explicitly because
/// RabbitMQ 3.x has no limit by default and 4.x has 20.
pub const DELIVERY_LIMIT: i64 = 10;

/// One delay queue (`hopper.<job>.retry.<delay>`): a chunk that failed transiently waits
/// `delay` in it, then goes back to the chunk queue for its next attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayQueue {
    /// The queue's message TTL.
    pub delay: Duration,
    /// The queue's name.
    pub queue: String,
}

/// The names of one job's exchange and queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// `hopper.<job>.exchange`, which every message is published to, with its queue's name as
    /// the routing key.
    pub exchange: String,
    /// `hopper.<job>.chunks`, which the consumers read.
    pub chunks: String,
    /// `hopper.<job>.replies`, which the dispatcher reads.
    pub replies: String,
    /// `hopper.<job>.dead`, where chunks are parked for good.
    pub dead: String,
    /// One per distinct backoff delay, shortest first.
    pub delays: Vec<DelayQueue>,
}

impl Topology {
    /// The queues of `job`, with one delay queue per distinct backoff delay.
    pub fn for_job(job: &Job) -> Topology {
        let base = format!("hopper.{}", job.name);
        let mut delays: Vec<DelayQueue> = Vec::new();
        for next in 2..=job.retry.max_attempts {
            let delay = job.retry.delay_before(next);
            if delays.last().map(|t| t.delay) != Some(delay) {
                delays.push(DelayQueue {
                    delay,
                    queue: format!("{base}.retry.{}", delay_name(delay)),
                });
            }
        }
        Topology {
            exchange: format!("{base}.exchange"),
            chunks: format!("{base}.chunks"),
            replies: format!("{base}.replies"),
            dead: format!("{base}.dead"),
            delays,
        }
    }

    /// The delay queue a chunk goes to before attempt `next`, given the job's backoff.
    pub fn delay_queue(&self, job: &Job, next: u32) -> Option<&str> {
        let delay = job.retry.delay_before(next);
        self.delays
            .iter()
            .find(|t| t.delay == delay)
            .map(|t| t.queue.as_str())
    }

    /// Every queue's name.
    pub fn all_queues(&self) -> Vec<&str> {
        let mut names = vec![
            self.chunks.as_str(),
            self.replies.as_str(),
            self.dead.as_str(),
        ];
        names.extend(self.delays.iter().map(|t| t.queue.as_str()));
        names
    }

    /// Declares the exchange and every queue, each bound to the exchange by its own name
    /// (idempotent).
    ///
    /// # Errors
    /// The broker's error at the step that failed, naming its exchange or queue: for example a
    /// queue of the same name declared with other arguments, or a user without a right the step
    /// needs ([`TransportError::Rejected`], whose message says which right).
    pub async fn declare(&self, channel: &Channel) -> Result<(), TransportError> {
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(broker("declare the exchange", &self.exchange))?;
        let durable = QueueDeclareOptions::durable();
        // A chunk past its delivery limit (it killed or outlived every consumer that took it) is
        // dead-lettered to the replies queue: the dispatcher records it dead, with why, and
        // parks it on the dead queue for people. Without this it would hold its run open.
        let mut chunk_args = self.dead_letter_to(&self.replies);
        chunk_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        let declare = "declare the queue";
        channel
            .queue_declare(self.chunks.as_str().into(), durable, chunk_args)
            .await
            .map_err(broker(declare, &self.chunks))?;
        channel
            .queue_declare(self.replies.as_str().into(), durable, quorum())
            .await
            .map_err(broker(declare, &self.replies))?;
        channel
            .queue_declare(self.dead.as_str().into(), durable, quorum())
            .await
            .map_err(broker(declare, &self.dead))?;
        for tier in &self.delays {
            let mut args = self.dead_letter_to(&self.chunks);
            let ttl = i64::try_from(tier.delay.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            channel
                .queue_declare(tier.queue.as_str().into(), durable, args)
                .await
                .map_err(broker(declare, &tier.queue))?;
        }
        for queue in self.all_queues() {
            channel
                .queue_bind(
                    queue.into(),
                    self.exchange.as_str().into(),
                    queue.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(broker("bind the queue", queue))?;
        }
        Ok(())
    }

    /// A quorum queue whose dead letters go to `target` through the job's exchange, at least
    /// once: RabbitMQ's default (at most once) can drop a message moving between queues when a
    /// broker node fails, and a chunk lost between queues would hold its run open for ever.
    /// At-least-once dead-lettering needs `reject-publish` overflow.
    fn dead_letter_to(&self, target: &str) -> FieldTable {
        let mut args = quorum();
        args.insert("x-dead-letter-exchange".into(), string(&self.exchange));
        args.insert("x-dead-letter-routing-key".into(), string(target));
        args.insert("x-dead-letter-strategy".into(), string("at-least-once"));
        args.insert("x-overflow".into(), string("reject-publish"));
        args
    }

    /// Deletes every queue of the job, messages included, and its exchange. For tests and
    /// clean-up.
    ///
    /// # Errors
    /// The broker's error.
    pub async fn delete(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for q in self.all_queues() {
            channel
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await?;
        }
        channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), string("quorum"));
    args
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// `1s`, `90s`, `250ms`: short, and sorts the tiers readably in the management UI.
fn delay_name(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn one_tier_per_distinct_delay() {
        let text = r#"
name = "t"
[broker]
url = "amqp://h"
[source]
kind = "file"
path = "a.jsonl"
[processor]
kind = "noop"
[retry]
max_attempts = 6
backoff = "500ms..2s"
"#;
        let job = Job::parse(Path::new("t.toml"), text, &|_| None).expect("valid");
        let t = Topology::for_job(&job);
        let names: Vec<&str> = t.delays.iter().map(|r| r.queue.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "hopper.t.retry.500ms",
                "hopper.t.retry.1s",
                "hopper.t.retry.2s"
            ]
        );
        assert_eq!(t.delay_queue(&job, 2), Some("hopper.t.retry.500ms"));
        assert_eq!(t.delay_queue(&job, 6), Some("hopper.t.retry.2s"));
        assert_eq!(t.chunks, "hopper.t.chunks");
        assert_eq!(t.exchange, "hopper.t.exchange");
    }
}
