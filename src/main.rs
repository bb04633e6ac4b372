//! `ferry`: the command-line interface (embedded mode: vault, store and drivers in-process).
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

mod cli;
mod demo;
mod output;

fn main() -> ExitCode {
    use clap::Parser;
    let args = cli::Cli::parse();
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
