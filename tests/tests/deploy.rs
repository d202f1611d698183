//! The Kubernetes manifests in `config/examples/deploy/` parse, and name the commands, job
//! file, volume and queue Hopper uses: a renamed queue or flag breaks this test, not a cluster.

use std::path::{Path, PathBuf};

use hopper_common::transport::amqp::Topology;
use hopper_common::{Job, StateSpec};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_path_buf()
}

fn manifest(name: &str) -> Value {
    let path = repo().join("config/examples/deploy").join(name);
    let text = std::fs::read_to_string(&path).expect("manifest");
    yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().expect("a string"))
        .collect()
}

/// The image keeps the repository's `config/` under `/app` (the Dockerfile).
fn in_repo(image_path: &str) -> PathBuf {
    repo().join(image_path.strip_prefix("/app/").expect("a path under /app"))
}

#[test]
fn the_manifests_name_what_hopper_uses() {
    let cron = manifest("dispatcher-cronjob.yaml");
    assert_eq!(cron["kind"], "CronJob");
    assert_eq!(cron["spec"]["concurrencyPolicy"], "Forbid");
    let pod = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let dispatcher = &pod["containers"][0];
    let args = strings(&dispatcher["args"]);
    assert_eq!(args[..2], ["hopper-dispatcher", "run"]);
    assert_eq!(args[3..], ["--continue"]);
    let job_file = in_repo(args[2]);
    let job = Job::load(&job_file).expect("the job file loads");

    // The volume is where the job keeps its execution context.
    let StateSpec::Sqlite { path: state } = &job.state else {
        panic!("the deployed job keeps its state in a file on the volume")
    };
    let mount = dispatcher["volumeMounts"][0]["mountPath"]
        .as_str()
        .expect("a mount");
    assert_eq!(
        in_repo(mount),
        state.parent().expect("a directory").to_path_buf()
    );
    let volume = manifest("state-volume.yaml");
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
        volume["metadata"]["name"]
    );

    let deployment = manifest("consumer-deployment.yaml");
    assert_eq!(deployment["kind"], "Deployment");
    let consumer = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&consumer["args"]);
    assert_eq!(args[0], "hopper-consumer");
    assert_eq!(in_repo(args[1]), job_file);
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"],
        deployment["spec"]["template"]["metadata"]["labels"]
    );

    let scaled = manifest("consumer-scaledobject.yaml");
    assert_eq!(scaled["kind"], "ScaledObject");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(
        trigger["metadata"]["queueName"].as_str(),
        Some(Topology::for_job(&job).chunks.as_str())
    );
    let secret = manifest("secret.yaml");
    let host_env = trigger["metadata"]["hostFromEnv"]
        .as_str()
        .expect("hostFromEnv");
    assert!(secret["stringData"][host_env].is_string());
    for container in [dispatcher, consumer] {
        assert_eq!(
            container["envFrom"][0]["secretRef"]["name"],
            secret["metadata"]["name"]
        );
    }
}

/// The flags the manifests pass are flags the binaries take.
#[test]
fn the_manifests_flags_are_the_binaries_flags() {
    let help = |bin: &str, args: &[&str]| {
        let out = std::process::Command::new(hopper_tests::bin(bin))
            .args(args)
            .output()
            .expect("run --help");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(help("hopper-dispatcher", &["run", "--help"]).contains("--continue"));
    assert!(help("hopper-consumer", &["--help"]).contains("--concurrency"));
}
