//! The job file's parsing and validation, field by field.

use super::*;

const GOOD: &str = r#"
name = "inflate-prices"
[broker]
url = "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
[source]
kind = "file"
path = "data/products.jsonl"
[processor]
kind = "file"
dir = "out"
"#;

fn parse(text: &str) -> Result<Job, JobError> {
    Job::parse(Path::new("jobs/x.toml"), text, &|_| None)
}

fn field_of(text: &str) -> String {
    match parse(text) {
        Err(JobError::Field { field, .. }) => field,
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn a_good_file_gets_defaults_and_resolved_paths() {
    let job = parse(GOOD).expect("valid");
    assert_eq!(job.name, "inflate-prices");
    assert_eq!(job.broker_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    assert_eq!(
        job.source,
        SourceSpec::File {
            path: PathBuf::from("jobs/data/products.jsonl"),
            format: FileFormat::Jsonl
        }
    );
    assert_eq!(job.chunking.items, 1000);
    assert_eq!(job.throttle.window, 32);
    assert_eq!(job.retry.max_attempts, 5);
    assert_eq!(job.retry.backoff_min, Duration::from_secs(1));
    assert_eq!(job.broker_heartbeat, Duration::from_secs(10));
    assert_eq!(
        job.state,
        StateSpec::Sqlite {
            path: PathBuf::from("jobs/hopper-state.db")
        }
    );
}

#[test]
fn each_bad_field_is_named() {
    assert_eq!(
        field_of(&GOOD.replace("inflate-prices", "Bad_Name")),
        "name"
    );
    assert_eq!(
        field_of(&format!("{GOOD}\n[chunking]\nitems = 0\n")),
        "chunking.items"
    );
    assert_eq!(
        field_of(&format!("{GOOD}\n[chunking]\nitems = \"many\"\n")),
        "chunking.items"
    );
    assert_eq!(
        field_of(&format!("{GOOD}\n[throttle]\nwindoe = 3\n")),
        "throttle.windoe"
    );
    assert_eq!(
        field_of(&GOOD.replace("kind = \"file\"\npath", "kind = \"ftp\"\npath")),
        "source.kind"
    );
    assert_eq!(
        field_of(&GOOD.replace("dir = \"out\"", "")),
        "processor.dir"
    );
    assert_eq!(
        field_of(&GOOD.replace("name = \"inflate-prices\"", "")),
        "name"
    );
    assert_eq!(
        field_of(&format!("{GOOD}\n[retry]\nbackoff = \"5m..1s\"\n")),
        "retry.backoff"
    );
    // A chunk is one message: data and framing must stay under the broker's limit.
    assert_eq!(
        field_of(&format!(
            "{GOOD}\n[chunking]\nitems = 1000000\nmax_bytes = 1048576\n"
        )),
        "chunking.max_bytes"
    );
    assert!(parse(&format!("{GOOD}\n[chunking]\nmax_bytes = 16000000\n")).is_ok());
    for bad in ["0s", "500ms", "1h"] {
        assert_eq!(
            field_of(&GOOD.replace("[source]", &format!("heartbeat = \"{bad}\"\n[source]"))),
            "broker.heartbeat",
            "{bad}"
        );
    }
}

#[test]
fn unknown_field_message_names_it() {
    let err = parse(&format!("{GOOD}\n[throttle]\nwindoe = 3\n")).expect_err("unknown field");
    assert!(err.to_string().contains("windoe"), "{err}");
}

#[test]
fn not_toml_is_a_syntax_error() {
    assert!(matches!(parse("name = = 3"), Err(JobError::Syntax { .. })));
}

#[test]
fn unset_variable_without_default_names_the_field() {
    let text = GOOD.replace(
        "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}",
        "${NOPE}",
    );
    let err = parse(&text).expect_err("unset var");
    assert!(err.to_string().contains("broker.url"), "{err}");
    assert!(err.to_string().contains("NOPE"), "{err}");
}

#[test]
fn expansion() {
    let env = |n: &str| (n == "A").then(|| "x".to_string());
    assert_eq!(expand("a${A}b", &env).as_deref(), Ok("axb"));
    assert_eq!(expand("${B:-d}", &env).as_deref(), Ok("d"));
    assert_eq!(expand("$$5 $x", &env).as_deref(), Ok("$5 $x"));
    assert!(expand("${B}", &env).is_err());
    assert!(expand("${A", &env).is_err());
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(
        redact_url("amqp://u:secret@h:5672/%2f"),
        "amqp://u:***@h:5672/%2f"
    );
    assert!(!redact_url("postgres://u:pw@h/db").contains("pw"));
}

#[test]
fn backoff_doubles_and_caps() {
    let job = parse(&format!("{GOOD}\n[retry]\nbackoff = \"1s..5s\"\n")).expect("valid");
    let d: Vec<u64> = (2..=6)
        .map(|n| job.retry.delay_before(n).as_secs())
        .collect();
    assert_eq!(d, vec![1, 2, 4, 5, 5]);
}

#[test]
fn custom_options_are_read_into_the_processor_own_type_naming_a_bad_field() {
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Options {
        min_price: f64,
    }
    let custom = GOOD.replace("kind = \"file\"\ndir = \"out\"", "kind = \"custom\"");
    let good = parse(&format!("{custom}[processor.options]\nmin_price = 1.5\n")).expect("valid");
    assert_eq!(
        good.processor_options::<Options>()
            .expect("options")
            .min_price,
        1.5
    );
    let bad = parse(&format!(
        "{custom}[processor.options]\nmin_price = \"cheap\"\n"
    ))
    .expect("valid job file");
    match bad.processor_options::<Options>() {
        Err(JobError::Field { field, .. }) => assert_eq!(field, "processor.options.min_price"),
        other => panic!("expected a field error, got {other:?}"),
    }
    let missing = parse(&custom).expect("valid job file");
    match missing.processor_options::<Options>() {
        Err(JobError::Field { field, .. }) => assert_eq!(field, "processor.options.min_price"),
        other => panic!("expected a field error, got {other:?}"),
    }
    match parse(GOOD).expect("valid").processor_options::<Options>() {
        Err(JobError::Field { field, .. }) => assert_eq!(field, "processor.kind"),
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn a_postgres_state_store_gets_its_schema_and_a_bad_one_is_named() {
    let with = |state: &str| format!("{GOOD}\n[state]\n{state}\n");
    let job = parse(&with("url = \"postgres://u:pw@db/ops\"")).expect("valid");
    assert_eq!(
        job.state,
        StateSpec::Postgres {
            url: "postgres://u:pw@db/ops".into(),
            schema: "hopper".into()
        }
    );
    let job = parse(&with("url = \"postgresql://db/ops\"\nschema = \"ops_2\"")).expect("valid");
    assert!(matches!(job.state, StateSpec::Postgres { ref schema, .. } if schema == "ops_2"));
    for bad in ["Ops", "2ops", "pg_x", "a-b", "", "a;drop"] {
        let text = with(&format!("url = \"postgres://db/ops\"\nschema = {bad:?}"));
        assert_eq!(field_of(&text), "state.schema", "{bad:?}");
    }
    assert_eq!(
        field_of(&with("url = \"sqlite://s.db\"\nschema = \"x\"")),
        "state.schema"
    );
    assert_eq!(field_of(&with("url = \"mysql://db\"")), "state.url");
}

#[test]
fn metrics_addresses_are_checked() {
    let job = parse(&format!(
        "{GOOD}\n[metrics]\ndispatcher = \"0.0.0.0:9464\"\nconsumer = \"127.0.0.1:0\"\n"
    ))
    .expect("valid");
    assert_eq!(
        job.metrics.dispatcher,
        Some("0.0.0.0:9464".parse().expect("addr"))
    );
    assert_eq!(
        job.metrics.consumer,
        Some("127.0.0.1:0".parse().expect("addr"))
    );
    assert_eq!(parse(GOOD).expect("valid").metrics, MetricsSpec::default());
    assert_eq!(
        field_of(&format!("{GOOD}\n[metrics]\nconsumer = \"localhost\"\n")),
        "metrics.consumer"
    );
    assert_eq!(
        field_of(&format!("{GOOD}\n[metrics]\nport = 1\n")),
        "metrics.port"
    );
}

#[test]
fn an_exec_processor_names_the_variables_its_command_gets() {
    let exec = |env: &str| {
        GOOD.replace(
            "kind = \"file\"\ndir = \"out\"",
            &format!("kind = \"exec\"\ncommand = [\"true\"]\n{env}"),
        )
    };
    let job = parse(&exec("env = [\"API_TOKEN\", \"_x1\"]")).expect("valid");
    assert_eq!(
        job.processor,
        ProcessorSpec::Exec {
            command: vec!["true".into()],
            env: vec!["API_TOKEN".into(), "_x1".into()]
        }
    );
    for bad in ["A-B", "1X", "", "A=B"] {
        assert_eq!(
            field_of(&exec(&format!("env = [{bad:?}]"))),
            "processor.env",
            "{bad:?}"
        );
    }
    assert_eq!(
        field_of(&GOOD.replace("dir = \"out\"", "dir = \"out\"\nenv = [\"X\"]")),
        "processor.env"
    );
}

#[test]
fn a_job_never_prints_a_password_debug_or_display() {
    let text = r#"
name = "secrets"
[broker]
url = "amqp://app:broker-pw@rabbit:5672/%2f"
[state]
url = "postgres://ops:state-pw@db/ops"
[source]
kind = "postgres"
url = "postgres://reader@db/app?password=source-pw&sslmode=disable"
query = "SELECT id FROM t"
key = "id"
[processor]
kind = "postgres"
url = "postgres://writer:processor-pw@db/app"
statement = "SELECT $1::bigint"
params = ["id"]
"#;
    let job = parse(text).expect("valid");
    let shown = format!(
        "{job:?} {} {}",
        job.broker_url,
        redact_url("postgres://db/x?password=q-pw")
    );
    for secret in ["broker-pw", "state-pw", "source-pw", "processor-pw", "q-pw"] {
        assert!(!shown.contains(secret), "{secret} shown: {shown}");
    }
    assert!(
        shown.contains("***") && shown.contains("sslmode=disable"),
        "{shown}"
    );
    // The URL itself is still there to connect with.
    assert_eq!(
        job.broker_url.expose(),
        "amqp://app:broker-pw@rabbit:5672/%2f"
    );
}

mod hostile {
    //! Hostile job files: random text, and a good file with characters changed, cut or
    //! inserted. Parsing never panics: a job, or an error naming the file.
    use super::*;
    use proptest::prelude::*;

    fn named(e: &JobError) -> bool {
        e.to_string().contains("x.toml")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn random_text_is_a_job_or_a_named_error(text in "\\PC{0,400}") {
            if let Err(e) = parse(&text) {
                prop_assert!(named(&e), "{e}");
            }
        }

        #[test]
        fn a_mutated_good_file_is_a_job_or_a_named_error(
            edits in proptest::collection::vec((any::<usize>(), any::<char>()), 1..5),
            cut in 0usize..40,
        ) {
            let mut chars: Vec<char> = GOOD.chars().collect();
            for (at, c) in edits {
                let i = at % chars.len();
                if at % 3 == 0 {
                    chars.insert(i, c);
                } else {
                    chars[i] = c;
                }
            }
            chars.truncate(chars.len().saturating_sub(cut));
            let text: String = chars.into_iter().collect();
            if let Err(e) = parse(&text) {
                prop_assert!(named(&e), "{e}");
            }
        }
    }
}
