//! A processor written in Rust: audits product prices.
//!
//! Each item is a JSON object with `id` and `price`. An item without a numeric price, or with a
//! price outside `[processor.options] min_price..=max_price`, is refused as a bad item (skipped
//! and listed by `hopper-dispatcher status` with its line); every other item is done. A chunk
//! fails transiently when the `fail_seq` option names its seq, on its first attempt only, to
//! show a retry.
//!
//! Run it like the `hopper-consumer` binary, with a job file whose processor is `custom`:
//!
//! ```text
//! cargo run -p hopper-consumer --example custom_processor -- config/examples/price-audit.toml
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use hopper_consumer::{
    async_trait, run, Chunk, ConsumerOptions, Job, ProcessError, Processed, Processor,
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// The processor's options, from the job file's `[processor.options]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    min_price: f64,
    max_price: f64,
    fail_seq: Option<u64>,
}

#[derive(Deserialize)]
struct Product {
    id: u64,
    price: Option<f64>,
}

struct PriceAudit {
    options: Options,
}

#[async_trait]
impl Processor for PriceAudit {
    async fn process(&self, chunk: &Chunk) -> Result<Processed, ProcessError> {
        if self.options.fail_seq == Some(chunk.seq) && chunk.attempt == 1 {
            return Err(ProcessError::Transient(
                "the price service timed out".into(),
            ));
        }
        let mut out = Processed::all_done();
        let mut total = 0.0;
        for item in &chunk.items {
            match item.parse::<Product>() {
                Ok(Product { price: Some(p), .. })
                    if (self.options.min_price..=self.options.max_price).contains(&p) =>
                {
                    total += p;
                }
                Ok(Product { id, price: Some(p) }) => out.bad_item(
                    item,
                    format!(
                        "product {id}: price {p} outside {}..={}",
                        self.options.min_price, self.options.max_price
                    ),
                ),
                Ok(Product { id, price: None }) => {
                    out.bad_item(item, format!("product {id}: no price"))
                }
                Err(e) => out.bad_item(item, format!("not a product: {e}")),
            }
        }
        tracing::info!(run = chunk.run, seq = chunk.seq, total, "chunk audited");
        Ok(out)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: custom_processor JOB.toml");
        return ExitCode::from(2);
    };
    let job = match Job::load(path.as_ref()) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // `[processor.options]`, read into this processor's own type; an error names the field.
    let options: Options = match job.processor_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        eprintln!("error: cannot start the async runtime");
        return ExitCode::from(1);
    };
    runtime.block_on(async {
        // The first SIGTERM finishes the chunks in hand; a second one stops at once.
        let shutdown = CancellationToken::new();
        let processor = Arc::new(PriceAudit { options });
        let consume = async {
            match run(
                &job,
                processor,
                ConsumerOptions::default(),
                shutdown.clone(),
            )
            .await
            {
                Ok(summary) => {
                    eprintln!("stopped after {} chunks", summary.chunks);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        };
        hopper_consumer::stop_on_signals(consume, shutdown.clone(), ExitCode::from(1)).await
    })
}
