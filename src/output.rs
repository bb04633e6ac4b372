//! Printing results: one JSON document with `--json`, readable text otherwise, and progress
//! bars on a terminal.
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use ferry_engine::Observer;
use ferry_model::{format_bytes, Job};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Prints `v` as the one JSON document on stdout.
pub fn json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// A one-line human summary of a job.
pub fn job_line(j: &Job) -> String {
    let mut s = format!(
        "job {} {} {}: {} — read {}, transferred {}, written {}",
        j.id,
        j.kind.as_str(),
        j.vm,
        j.state.as_str(),
        format_bytes(j.bytes_read),
        format_bytes(j.bytes_transferred),
        format_bytes(j.bytes_written)
    );
    if let Some(d) = j.downtime_ms {
        s.push_str(&format!(", downtime {d} ms"));
    }
    if let Some(e) = &j.error {
        s.push_str(&format!(" ({e})"));
    }
    s
}

/// Prints a job in the selected format.
pub fn job(j: &Job, as_json: bool) {
    if as_json {
        json(j);
    } else {
        println!("{}", job_line(j));
        for s in &j.steps {
            let bytes = if s.bytes_total > 0 {
                format!(
                    " {} / {}",
                    format_bytes(s.bytes_done),
                    format_bytes(s.bytes_total)
                )
            } else {
                String::new()
            };
            let time = s
                .elapsed_ms
                .map(|ms| format!("  {:.2} s", ms as f64 / 1000.0))
                .unwrap_or_default();
            println!("  {:<32} {:<10}{}{}", s.name, s.state.as_str(), bytes, time);
        }
        for n in &j.notes {
            println!("  note: {n}");
        }
    }
}

/// True when progress bars should be drawn (stdout is a terminal and output is for people).
pub fn show_progress(as_json: bool) -> bool {
    !as_json && std::io::stdout().is_terminal()
}

/// An observer that draws a progress bar for the running step of a job.
pub fn progress_observer() -> (Observer, Arc<Mutex<Option<ProgressBar>>>) {
    let bar: Arc<Mutex<Option<ProgressBar>>> = Arc::new(Mutex::new(None));
    let b2 = bar.clone();
    let style = ProgressStyle::with_template(
        "{spinner} {msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .expect("template")
    .progress_chars("=> ");
    let current = Arc::new(Mutex::new(String::new()));
    let obs: Observer = Arc::new(move |j: &Job| {
        let Some(step) = j
            .steps
            .iter()
            .find(|s| s.state == ferry_model::JobState::Running)
        else {
            return;
        };
        let mut g = b2.lock().unwrap();
        let mut cur = current.lock().unwrap();
        if *cur != step.name || g.is_none() {
            if let Some(old) = g.take() {
                old.finish();
            }
            let pb = ProgressBar::new(step.bytes_total.max(1));
            pb.set_style(style.clone());
            pb.set_message(step.name.clone());
            *g = Some(pb);
            *cur = step.name.clone();
        }
        if let Some(pb) = g.as_ref() {
            pb.set_length(step.bytes_total.max(1));
            pb.set_position(step.bytes_done.min(step.bytes_total.max(1)));
        }
    });
    (obs, bar)
}

/// Finishes a bar left by [`progress_observer`].
pub fn finish_bar(bar: &Arc<Mutex<Option<ProgressBar>>>) {
    if let Some(pb) = bar.lock().unwrap().take() {
        pb.finish();
    }
}
