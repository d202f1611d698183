//! CPU seconds per process, from `/proc`: the broker's, the bench's own (the raw side's clients
//! run in it) and its waited-for children's (the Hopper binaries). On two cores shared by the
//! broker and every client, where the CPU goes (and how much of the two cores a run leaves
//! idle) says more than the wall time alone.

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on every Linux the bench runs on).
const TICKS: f64 = 100.0;

/// Fields 14.. of `/proc/<pid>/stat` (utime, stime, cutime, cstime) in seconds.
fn stat_times(pid: &str) -> Option<[f64; 4]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields that follow start after its closing paren.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is at index n - 3.
    let tick = |n: usize| -> Option<f64> { Some(fields.get(n - 3)?.parse::<f64>().ok()? / TICKS) };
    Some([tick(14)?, tick(15)?, tick(16)?, tick(17)?])
}

/// The RabbitMQ node's process (`beam.smp` running `rabbit`) on this machine, if there is one.
pub(crate) fn broker_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd);
        (cmd.contains("beam.smp") && cmd.contains("rabbit")).then_some(pid)
    })
}

/// A reading of the CPU seconds so far: subtract two to get a span's.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    /// The broker's user + system seconds (0 when it was not found).
    pub(crate) broker: f64,
    /// This process's own.
    pub(crate) own: f64,
    /// This process's children that it has waited for.
    pub(crate) children: f64,
}

impl Cpu {
    /// Reads the counters now.
    pub(crate) fn now(broker: Option<&str>) -> Cpu {
        let own = stat_times("self").unwrap_or_default();
        let broker = broker
            .and_then(stat_times)
            .map(|t| t[0] + t[1])
            .unwrap_or_default();
        Cpu {
            broker,
            own: own[0] + own[1],
            children: own[2] + own[3],
        }
    }

    /// The CPU spent between `earlier` and `self`.
    pub(crate) fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            broker: self.broker - earlier.broker,
            own: self.own - earlier.own,
            children: self.children - earlier.children,
        }
    }
}

/// Starts a new quorum-queue write-ahead log on the local broker, when `rabbitmqctl` can reach
/// it. RabbitMQ rolls its WAL over every 512 MiB written, and a round that the roll-over falls
/// in spends about 0.4 CPU-seconds more in the broker (a third more) whichever side it is, so
/// that single rounds of the same build differed by half their time. Every timed round starts
/// on a fresh WAL instead; neither side writes 512 MiB in one round.
pub(crate) fn fresh_wal() {
    let _ = std::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", "ra_log_wal:force_roll_over(ra_log_wal)."])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Waits until the broker is quiet (under a tenth of a core for a quarter of a second), at most
/// 30 s: a broker still writing or compacting the previous run's quorum queue slows whichever
/// side runs next, and that was most of the bench's noise.
pub(crate) async fn broker_quiet(broker: Option<&str>) {
    let Some(pid) = broker else { return };
    fresh_wal();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let busy = |pid: &str| stat_times(pid).map(|t| t[0] + t[1]).unwrap_or_default();
    let mut last = busy(pid);
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let now = busy(pid);
        if now - last < 0.025 {
            return;
        }
        last = now;
    }
}
