//! ferry's operations behind one interface ([`ferry_api::Api`]): [`Local`] runs them
//! in-process over the engine (embedded mode), [`serve`] puts the same code behind a REST API
//! with tokens and roles, and runs the replication scheduler.
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

pub mod agents;
pub mod http;
pub mod local;
pub mod scheduler;
pub mod tls;

pub use local::Local;

/// How long a stopping server waits for the jobs it runs to stop after it cancelled them.
pub const STOP_GRACE: Duration = Duration::from_secs(30);

/// Sends small writes at once: a response written in parts (headers, then a large body)
/// would otherwise wait for the peer's delayed ACK, 40 ms a request on Linux.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY: {e}");
    }
}

/// Runs `ferry serve`: the API of the installation at `home` on `listen` (`127.0.0.1:7450`;
/// port 0 picks a free one) until SIGTERM or SIGINT. Prints `listening on URL` on stdout
/// once it accepts connections. With `resume`, jobs that a killed ferry left running continue
/// by themselves (see [`interrupted_jobs`]). On a signal it cancels the jobs it runs (a re-run
/// of their command continues them) and exits.
pub fn serve(
    home: &Path,
    listen: &str,
    resume: bool,
    agent_timeout: Duration,
    tls: Option<(&Path, &Path)>,
) -> Result<()> {
    let acceptor = tls.map(|(c, k)| tls::acceptor(c, k)).transpose()?;
    ferry_engine::Engine::init(home)?;
    let interrupted = interrupted_jobs(home)?;
    // Settles them: their VMs become `…_interrupted` until they continue.
    ferry_engine::Engine::open(home)?;
    let mut local = Local::new(home);
    local.set_server_mode();
    let hub = std::sync::Arc::new(agents::Hub::new(home.to_path_buf(), agent_timeout));
    local.set_hub(hub.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry-serve")
        .build()?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen} (in use, or not an address of this machine?); pick another with --listen HOST:PORT"))?;
        let addr = listener.local_addr()?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        println!("listening on {scheme}://{addr}");
        std::io::stdout().flush().ok();
        tracing::info!("ferry serve: home {}, listening on {scheme}://{addr}", home.display());
        if resume {
            for id in &interrupted {
                resume_job(home, *id, hub.clone());
            }
        } else if !interrupted.is_empty() {
            tracing::warn!(
                "ferry serve: {} interrupted job(s) left as they are (--no-resume): {:?}; re-run their commands to continue them",
                interrupted.len(),
                interrupted
            );
        }
        let sched = scheduler::Scheduler::start(local.clone());
        let app = http::router(http::Srv {
            local: local.clone(),
            hub,
        });
        match acceptor {
            Some(acceptor) => {
                let l = tls::TlsListener { tcp: listener, acceptor };
                tokio::select! {
                    r = axum::serve(l, app) => r.context("the HTTPS server stopped")?,
                    _ = shutdown_signal() => tracing::info!("ferry serve: stopping"),
                }
            }
            None => {
                tokio::select! {
                    r = axum::serve(axum::serve::ListenerExt::tap_io(listener, no_delay), app) => r.context("the HTTP server stopped")?,
                    _ = shutdown_signal() => tracing::info!("ferry serve: stopping"),
                }
            }
        }
        sched.stop();
        anyhow::Ok(())
    });
    let home = home.to_path_buf();
    // Jobs run on blocking threads of this process: cancel them cleanly before exiting.
    cancel_own_jobs(&home);
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Jobs recorded as running whose process is gone: what a killed server (or CLI) left behind.
pub fn interrupted_jobs(home: &Path) -> Result<Vec<i64>> {
    let vault = ferry_vault::Vault::open(home)?;
    let mut out = Vec::new();
    for j in vault.jobs(false)? {
        if j.state != ferry_model::JobState::Running {
            continue;
        }
        let alive = vault
            .job_runner(j.id)?
            .is_some_and(|r| ferry_engine::jobs::runner_alive(&r));
        if !alive {
            out.push(j.id);
        }
    }
    Ok(out)
}

/// Continues an interrupted job on a thread of its own, from its durable log.
fn resume_job(home: &Path, id: i64, hub: std::sync::Arc<agents::Hub>) {
    let home = home.to_path_buf();
    std::thread::spawn(move || {
        wait_for_agents(&home, &hub);
        let r = ferry_engine::Engine::open(&home).and_then(|mut e| {
            e.set_remote(std::sync::Arc::new(agents::Remote(hub.clone())));
            e.set_notify(std::sync::Arc::new(move |m: &str| {
                tracing::info!("job {id}: {m}")
            }));
            e.resume_interrupted(id, ferry_engine::RunOpts::default())
        });
        match r {
            Ok(Some(j)) => tracing::info!(
                "ferry serve: continued interrupted job {id} ({} of VM {}): {}",
                j.kind.as_str(),
                j.vm,
                j.state.as_str()
            ),
            Ok(None) => tracing::info!("ferry serve: interrupted job {id} needs no continuation"),
            Err(e) => tracing::warn!(
                "ferry serve: interrupted job {id} could not continue on its own ({e:#}); re-run its command"
            ),
        }
    });
}

/// Waits until every agent host is connected, or the agent timeout has passed: agents find a
/// restarted control plane by themselves within a heartbeat, and a job resumed before that
/// would be refused for a disconnected host.
fn wait_for_agents(home: &Path, hub: &agents::Hub) {
    let deadline = std::time::Instant::now() + hub.timeout;
    let hosts: Vec<String> = ferry_vault::Vault::open(home)
        .and_then(|v| v.hosts())
        .map(|hs| hs.into_iter().filter(|h| h.agent).map(|h| h.name).collect())
        .unwrap_or_default();
    while std::time::Instant::now() < deadline && hosts.iter().any(|h| hub.check(h).is_err()) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Requests cancellation of every job this process runs and waits (up to [`STOP_GRACE`]) for
/// them to stop.
fn cancel_own_jobs(home: &Path) {
    let Ok(vault) = ferry_vault::Vault::open(home) else {
        return;
    };
    let me = std::process::id() as i64;
    let own: Vec<i64> = vault
        .jobs(false)
        .unwrap_or_default()
        .into_iter()
        .filter(|j| j.state == ferry_model::JobState::Running)
        .filter(|j| {
            vault
                .job_runner(j.id)
                .ok()
                .flatten()
                .is_some_and(|r| r.pid == me)
        })
        .map(|j| j.id)
        .collect();
    for id in &own {
        let _ = vault.request_cancel(*id);
    }
    let t = std::time::Instant::now();
    while t.elapsed() < STOP_GRACE
        && own.iter().any(|id| {
            vault
                .job(*id)
                .ok()
                .flatten()
                .is_some_and(|j| j.state == ferry_model::JobState::Running)
        })
    {
        std::thread::sleep(Duration::from_millis(100));
    }
}
