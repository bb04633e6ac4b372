//! `ferry`: the command-line interface (embedded mode: vault, store and drivers in-process).
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;
mod demo;
mod demo_guest;
mod output;

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = cli::Cli::command().get_matches();
    let mut args = match cli::Cli::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    args.home_flag = matches.value_source("home") == Some(clap::parser::ValueSource::CommandLine);
    // A server logs each request (and its scheduler's cycles) unless told otherwise.
    let serving = matches!(args.cmd, cli::Cmd::Serve { .. });
    init_logging(if serving {
        "warn,ferry_server=info"
    } else {
        "warn"
    });
    let json = args.json;
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            if !json && std::io::stderr().is_terminal() {
                eprintln!("\x1b[31merror:\x1b[0m {msg}");
            } else {
                eprintln!("error: {msg}");
            }
            ExitCode::from(1)
        }
    }
}

/// Diagnostics on stderr: `default` (warnings; requests too for `serve`); `FERRY_LOG` takes a filter such as `debug` or
/// `ferry_engine=debug,ferry_hypervisor=trace`. At `debug`, every timed section (opening a
/// snapshot, a copy pass, a QMP command, a helper process) prints its duration when it ends.
fn init_logging(default: &str) {
    use tracing_subscriber::fmt::format::FmtSpan;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::CLOSE)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The default home: `$XDG_DATA_HOME/ferry` or `~/.local/share/ferry`.
pub fn default_home() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("ferry");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/ferry")
}
