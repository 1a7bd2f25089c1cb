//! `rotation watch`: polls the organisation's latest rotation job until it finishes,
//! following any job that supersedes it.
//!
//! Progress goes to standard error: a live bar when that is a terminal, otherwise
//! a plain line at most every [`LINE_INTERVAL`]. The result goes to standard
//! output: one final line, or the finished job as JSON.

use std::{
    io::{self, IsTerminal},
    time::{Duration, Instant},
};

use cmk_proto::control::v1::{GetRotationRequest, RotationState};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    cli::OutputFormat,
    client::Client,
    error::Error,
    output::{self, RotationView, print},
};

/// How often a progress line is printed when there is no terminal to draw on.
const LINE_INTERVAL: Duration = Duration::from_secs(5);

const PAUSED: &str = "paused: the master key is revoked; waiting for reactivation";

/// Follows the latest rotation job until it is finished.
pub async fn watch(client: &Client, interval: Duration, format: OutputFormat) -> Result<(), Error> {
    let mut progress = if io::stderr().is_terminal() {
        Progress::bar()
    } else {
        Progress::lines()
    };
    let mut job_id = None;
    loop {
        let request = GetRotationRequest {
            org_id: client.org(),
        };
        let rotation = client.call(client.admin().get_rotation(request)).await?;
        let state = RotationState::try_from(rotation.state);
        let job = RotationView::from(rotation);
        if let Some(previous) = job_id.filter(|&previous| previous != job.job_id) {
            progress.note(&format!(
                "rotation job {previous} was superseded by job {} towards {}; following it",
                job.job_id, job.target_key_id
            ));
        }
        job_id = Some(job.job_id);
        match state {
            Ok(RotationState::Finished) => {
                progress.finish();
                return match format {
                    OutputFormat::Table => output::write_stdout(&job.finished_line()),
                    OutputFormat::Json => print(format, &job),
                };
            }
            Ok(RotationState::Paused) => progress.paused(&job),
            // A superseded job is followed by polling again: the latest job is the
            // one that took over.
            Ok(RotationState::Running | RotationState::Superseded | RotationState::Unspecified)
            | Err(_) => progress.update(&job),
        }
        tokio::time::sleep(interval).await;
    }
}

/// Where progress is shown.
enum Progress {
    /// A live bar on a terminal.
    Bar(ProgressBar),
    /// Plain lines, for logs and pipes.
    Lines {
        /// When the last line was printed.
        last: Option<Instant>,
        /// Whether the "paused" line has been printed for the current pause.
        paused: bool,
    },
}

impl Progress {
    fn bar() -> Self {
        let bar = ProgressBar::new(0);
        // The template is a constant that indicatif accepts (the tests build it).
        bar.set_style(style());
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress::Bar(bar)
    }

    fn lines() -> Self {
        Progress::Lines {
            last: None,
            paused: false,
        }
    }

    fn show(bar: &ProgressBar, job: &RotationView, message: String) {
        bar.set_prefix(format!("rotation job {}", job.job_id));
        bar.set_length(job.total);
        bar.set_position(job.done);
        bar.set_message(message);
    }

    fn update(&mut self, job: &RotationView) {
        match self {
            Progress::Bar(bar) => Self::show(bar, job, job.speed()),
            Progress::Lines { last, paused } => {
                *paused = false;
                if last.is_none_or(|last| last.elapsed() >= LINE_INTERVAL) {
                    eprintln!("{}", job.progress_line());
                    *last = Some(Instant::now());
                }
            }
        }
    }

    fn paused(&mut self, job: &RotationView) {
        match self {
            Progress::Bar(bar) => Self::show(bar, job, PAUSED.to_string()),
            Progress::Lines { last, paused } => {
                if !*paused {
                    eprintln!(
                        "rotation job {} ({} of {} KEKs re-wrapped) {PAUSED}",
                        job.job_id, job.done, job.total
                    );
                    *paused = true;
                    *last = Some(Instant::now());
                }
            }
        }
    }

    fn note(&mut self, text: &str) {
        match self {
            Progress::Bar(bar) => bar.println(text),
            Progress::Lines { last, .. } => {
                eprintln!("{text}");
                // Show the new job's progress at once.
                *last = None;
            }
        }
    }

    fn finish(&mut self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {prefix}: [{bar:40}] {pos}/{len} KEKs ({percent}%) {msg}",
    )
    .expect("the progress template is valid")
    .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_template_is_valid() {
        style();
    }
}
