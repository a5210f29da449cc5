//! The fleet benchmark's report: one table per image, and what else ran on the machine.

use crate::Outcome;

/// One format's image at the origin: its reference through the link and its layer digests,
/// largest first.
pub struct Image {
    pub key: &'static str,
    pub label: &'static str,
    pub reference: String,
    pub layers: Vec<(String, usize)>,
}

/// The path of the row with a mirror answering 503 in front of the origin.
pub const UNAVAILABLE: &str = "mirror answering 503";

/// A row of the table.
pub struct Row {
    pub path: &'static str,
    pub out: Outcome,
    /// Printed under the table when not empty.
    pub note: String,
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// The table of one image's rows. `one` is the origin bytes of one node alone directly, the
/// baseline of the bytes goal; each row's time is compared with N = 1 of its own path.
pub fn print_table(image: &Image, rows: &[Row]) {
    let one = rows
        .iter()
        .find(|r| r.path == "direct" && r.out.n == 1)
        .map(|r| r.out.origin_bytes);
    let total: usize = image.layers.iter().map(|l| l.1).sum();
    println!(
        "\n#### {} ({:.1} MB in {} layers of {})\n",
        image.label,
        total as f64 / 1e6,
        image.layers.len(),
        image
            .layers
            .iter()
            .map(|l| format!("{:.1}", l.1 as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    println!(
        "| path | N | all done s | vs N=1 | last mount ready s | origin MB | vs one node direct | vs N=1 | origin GETs per layer (MB written) | nodes from cache MB | nodes from origin MB | whole streams / blobs waited for | mirror failures | errors | CPU nice 0 / niced / steal |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let o = &r.out;
        // The mirror answering 503 is compared with the origin alone.
        let path = match r.path {
            UNAVAILABLE => "direct",
            p => p,
        };
        let base = rows.iter().find(|b| b.path == path && b.out.n == 1);
        let time_ratio = base.map_or(String::new(), |b| {
            format!(
                "{:.2}x",
                o.all_done.as_secs_f64() / b.out.all_done.as_secs_f64()
            )
        });
        // Against next to nothing (a warm cache's N = 1), a ratio says nothing.
        let bytes_ratio = match base {
            Some(b) if b.out.origin_bytes >= 1_000_000 => {
                format!("{:.2}x", o.origin_bytes as f64 / b.out.origin_bytes as f64)
            }
            _ => "-".into(),
        };
        let vs_one = one.map_or(String::new(), |one| {
            format!("{:.2}x", o.origin_bytes as f64 / one.max(1) as f64)
        });
        let gets: Vec<String> = image
            .layers
            .iter()
            .map(|(d, _)| match o.origin_gets.get(d) {
                Some(&(n, written)) => format!("{n} ({:.1})", mb(written)),
                None => "0".into(),
            })
            .collect();
        let errors = if o.errors.is_empty() {
            "0".to_string()
        } else {
            format!("{}: {}", o.errors.len(), o.errors.join("; "))
        };
        println!(
            "| {} | {} | {:.2} | {time_ratio} | {:.2} | {:.2} | {vs_one} | {bytes_ratio} | {} | {:.1} | {:.1} | {} / {} | {} | {errors} | {:.0}% / {:.0}% / {:.0}% |",
            r.path,
            o.n,
            o.all_done.as_secs_f64(),
            o.slowest_ready.as_secs_f64(),
            mb(o.origin_bytes),
            gets.join(" / "),
            mb(o.from_mirror),
            mb(o.from_origin),
            o.whole_streams,
            o.waited_for_store,
            o.mirror_failures,
            o.cpu.0 * 100.0,
            o.cpu.1 * 100.0,
            o.cpu.2 * 100.0,
        );
    }
    for r in rows.iter().filter(|r| !r.note.is_empty()) {
        println!("\n{}, N = {}: {}.", r.path, r.out.n, r.note);
    }
}

/// CPU time counters of the machine (`/proc/stat`, in ticks): (at nice 0, niced, steal,
/// all).
pub fn cpu_ticks() -> (u64, u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let ours = at(0) + at(2) + at(5) + at(6);
    (ours, at(1), at(7), v.iter().take(8).sum())
}

/// Other load on the machine, for the report: processes whose command line names fuzzing.
pub fn other_load() -> String {
    let fuzz = std::process::Command::new("pgrep")
        .args(["-f", "fuzz"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "load average {}; {fuzz} processes matching `pgrep -f fuzz`",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}
